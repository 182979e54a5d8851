"""Copying committed steps between any two stores (`ckptstore cp`): local, S3, GCS, memory.

Per step, in the order a save writes (docs/FORMAT.md, "Commit protocol"):

1. read the source ref and manifest (the manifest must hash to its key);
2. for every chunk the destination lacks (`head`), get the blob from the source, decode it
   and check its hash, so a corrupt source chunk is never propagated (`IntegrityError`),
   then put it create-only (`AlreadyExists` is fine: the key is content-addressed; if the
   `head` after it finds the chunk gone, a gc swept the other writer's copy, and it is put
   again: `chunkio.put_chunk`, bounded, then `ChunkVanishedError`);
3. put the manifest create-only under the same key;
4. commit the destination ref with `commit_ref`: create-only, or compare-and-swap with
   `overwrite=True`, exactly like `Store.save` (`StepExistsError` otherwise).

A step the destination already holds with the same content (the manifest a copy would
commit: the same digest, or the same manifest re-encoded with the destination's stored
sizes) is "already there": a success that writes nothing, so an interrupted copy is simply
run again. A step it holds with other content raises `StepExistsError` before anything is
copied, unless `overwrite` or `skip_existing`.

Then the source's tags that name a copied (or already there) step are created in the
destination through `Store.tag`, so they follow the tag protocol (lease, gc epoch, objects
checked). A tag the destination has on the same step is already there; on another step it
raises `TagExistsError` before anything is copied, unless `overwrite` (moved to the copied
step) or `skip_existing` (left as it is). A tag that names an older commit of its step than
the one copied (the step was overwritten after tagging) is not copied: it would name other
content in the destination. Those left alone are listed in `CopyReport.tags_skipped`.

The source is only read: it is never created (a URL with no store raises
`StoreNotFoundError`) and works with read-only credentials or a read-only mount.

Both stores must use the same hash algorithm, because chunk and manifest keys are hashes.
Chunks already in the destination are never transferred again, so repeating a copy moves
no chunk bytes. The copy holds a save lease on the destination (and a load lease on the
source) and re-checks its objects before each commit if a gc swept in between, like a save.

If the destination already holds a chunk under a different stored size (written there with
another compression setting), the manifest is re-encoded with the destination's sizes; the
copied step then has a new manifest key, and its content is unchanged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ckptstore import keys
from ckptstore.backends.base import CREATE
from ckptstore.canary import ensure_conditional_writes
from ckptstore.chunkblob import HEADER_SIZE, decode_chunk
from ckptstore.chunkio import bounded_map, put_chunk
from ckptstore.commit import commit_ref
from ckptstore.epoch import read_epoch
from ckptstore.errors import (
    AlreadyExistsError,
    FormatError,
    IncompatibleStoresError,
    IntegrityError,
    InvalidArgumentError,
    ObjectNotFoundError,
    StepExistsError,
    StepNotFoundError,
    TagExistsError,
    UnsupportedFormatError,
)
from ckptstore.gclock import settle_with_gc
from ckptstore.leases import DEFAULT_TTL, Lease
from ckptstore.manifest import (
    ChunkEntry,
    Manifest,
    Ref,
    encode_manifest,
    summarize,
)
from ckptstore.manifestread import MAX_MANIFEST_READ, decode_whole
from ckptstore.progress import Progress
from ckptstore.store import Store, writer_identity


@dataclass
class CopyReport:
    """What a copy did."""

    src: str
    dst: str
    steps: list[int] = field(default_factory=list)  # steps committed in the destination
    already_there: list[int] = field(default_factory=list)  # steps the destination held with the same content
    skipped: list[int] = field(default_factory=list)  # steps it held with other content (skip_existing)
    tags: list[str] = field(default_factory=list)  # tags created (or moved, with overwrite) in the destination
    tags_already_there: list[str] = field(default_factory=list)  # tags it had on the same step
    tags_skipped: list[str] = field(default_factory=list)  # tags of copied steps left alone (module docstring)
    chunks_copied: int = 0  # distinct chunks transferred
    bytes_copied: int = 0  # stored bytes of the chunks transferred
    chunks_skipped: int = 0  # distinct chunks the destination already had
    manifests_rewritten: int = 0  # manifests re-encoded with the destination's chunk sizes
    seconds: float = 0.0

    @property
    def steps_copied(self) -> int:
        return len(self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "steps_copied": self.steps_copied}


@dataclass(frozen=True)
class _Source:
    step: int
    manifest: Manifest
    digest: str
    encoded: bytes


def _read_source(src: Store, step: int) -> _Source:
    ref = src.ref(step)
    key = keys.manifest_key(ref.manifest)
    try:
        data = src.backend.get_range(key, 0, MAX_MANIFEST_READ + 1)
    except ObjectNotFoundError as exc:
        raise IntegrityError(f"step {step}: manifest {key} is missing in {src.url}") from exc
    if src._hash(data) != ref.manifest:
        raise IntegrityError(f"step {step}: manifest {key} in {src.url} is corrupt: its bytes do not hash to its key")
    return _Source(step, decode_whole(src.backend, src._hash, data, src.threads), ref.manifest, data)


def copy_steps(src: Store, dst: Store, steps: Iterable[int] | None = None, *, overwrite: bool = False,
               skip_existing: bool = False, progress: bool = False, tags: bool = True) -> CopyReport:
    """Copy `steps` (default: every committed step) of `src` into `dst`, with the tags that name
    them (`tags=False`: none); see the module docstring.

    A step (or tag) that `dst` holds with other content raises StepExistsError (TagExistsError)
    before anything is copied, unless `overwrite` (atomic replace, as `save(..., overwrite=True)`;
    a tag is moved) or `skip_existing` (leave it as it is); one with the same content is already
    there. Raises StoreNotFoundError when `src` holds no store (nothing is created anywhere),
    StepNotFoundError for a requested step `src` lacks, IntegrityError for a missing or corrupt
    source object (the step is then not committed), IncompatibleStoresError when the stores use
    different hash algorithms, and InvalidArgumentError for `overwrite` with `skip_existing`.
    """
    started = time.perf_counter()
    if overwrite and skip_existing:
        raise InvalidArgumentError("overwrite and skip_existing exclude each other")
    # The source is only read: a URL with no store raises here, and nothing is created.
    src_algorithm = src._require_store().hash_algorithm
    dst_algorithm = dst.marker.hash_algorithm  # the destination is written to: this creates it if needed
    if src_algorithm != dst_algorithm:
        raise IncompatibleStoresError(
            f"{src.url} hashes with {src_algorithm} and {dst.url} with {dst_algorithm}; "
            f"keys are hashes, so steps can only be copied between stores that use the same algorithm "
            f"(load and save the steps instead)")
    available = src.steps()
    if steps is None:
        wanted = available
    else:
        wanted = sorted({keys.check_step(s) for s in steps})
        present = set(available)
        for step in wanted:
            if step not in present:
                raise StepNotFoundError(step, src.url)

    report = CopyReport(src.url, dst.url)
    sources = list(bounded_map(lambda s: _read_source(src, s), wanted, src.threads))
    todo = _steps_to_copy(dst, sources, overwrite=overwrite, skip_existing=skip_existing, report=report)
    copied_digests = {s.step: s.digest for s in sources if s.step not in report.skipped}
    tag_plan = _plan_tags(src, dst, copied_digests, overwrite=overwrite, skip_existing=skip_existing,
                          report=report) if tags else []
    if todo:
        _commit_steps(src, dst, todo, overwrite=overwrite, progress=progress, report=report)
    for name, step in tag_plan:
        try:
            dst.tag(name, step, overwrite=overwrite)
            report.tags.append(name)
        except TagExistsError as exc:  # created meanwhile by someone else
            if exc.step != step:
                raise
            report.tags_already_there.append(name)
    report.seconds = time.perf_counter() - started
    return report


def _steps_to_copy(dst: Store, sources: list[_Source], *, overwrite: bool, skip_existing: bool,
                   report: CopyReport) -> list[_Source]:
    """The sources `dst` still needs. Steps it holds with the same content are already there;
    with other content they are skipped (`skip_existing`) or refused, before anything is copied."""
    if overwrite:
        return list(sources)
    existing = set(dst.steps())
    todo = []
    for source in sources:
        held = _held_ref(dst, source.step) if source.step in existing else None
        if held is None:
            todo.append(source)
        elif _same_content(dst, held, source):
            report.already_there.append(source.step)
        elif skip_existing:
            report.skipped.append(source.step)
        else:
            raise StepExistsError(source.step, held.committed, held.writer)
    return todo


def _held_ref(dst: Store, step: int) -> Ref | None:
    try:
        return dst.ref(step)
    except StepNotFoundError:  # deleted since it was listed
        return None


def _same_content(dst: Store, held: Ref, source: _Source) -> bool:
    """Whether `held` names the manifest a copy of `source` would commit: the same one, or the
    same one re-encoded with the destination's stored sizes (see `_manifest_for`)."""
    if held.manifest == source.digest:
        return True

    def sizeless(manifest: Manifest) -> Manifest:
        return replace(manifest, chunks=tuple(replace(c, stored_size=0) for c in manifest.chunks))

    return sizeless(dst.manifest(held.manifest)) == sizeless(source.manifest)


def _plan_tags(src: Store, dst: Store, digests: dict[int, str], *, overwrite: bool, skip_existing: bool,
               report: CopyReport) -> list[tuple[str, int]]:
    """(name, step) of the source's tags on the steps in `digests` (step -> the manifest copied)
    that `dst` needs; the others are reported. Raises TagExistsError before anything is copied."""
    if not digests:
        return []
    held = dst.tags()
    plan = []
    for name in src.tags():
        try:
            tagged = src.ref(name)
        except StepNotFoundError:  # untagged since it was listed
            continue
        if tagged.step not in digests:
            continue
        there = held.get(name)
        if tagged.manifest != digests[tagged.step]:
            report.tags_skipped.append(name)  # names an older commit of its step: other content
        elif there == tagged.step:
            report.tags_already_there.append(name)
        elif there is None or overwrite:
            plan.append((name, tagged.step))
        elif skip_existing:
            report.tags_skipped.append(name)
        else:
            raise TagExistsError(name, there)
    return plan


def _commit_steps(src: Store, dst: Store, sources: list[_Source], *, overwrite: bool, progress: bool,
                  report: CopyReport) -> None:
    """Copy each source's chunks and manifest into `dst` and commit its ref, as a save does."""
    total = sum({c.digest: c.stored_size for s in sources for c in s.manifest.chunks}.values())
    ensure_conditional_writes(dst.backend)
    owner = writer_identity()
    dst_ttl = getattr(dst, "lease_ttl", DEFAULT_TTL)
    # As in save: the epoch is read before the lease exists, and compared again before each
    # commit; a gc that swept in between may have deleted chunks we found present.
    epoch, _ = read_epoch(dst.backend)
    dst_sizes: dict[str, int] = {}  # chunks known present in dst during this copy -> stored size
    counted: set[str] = set()  # chunks counted in the report and the progress bar

    def transfer(source: _Source, bar: Progress) -> None:
        todo = [c for c in {c.digest: c for c in source.manifest.chunks}.values() if c.digest not in dst_sizes]
        for entry, size, copied in bounded_map(lambda c: _copy_chunk(src, dst, source.step, c), todo,
                                               dst.threads):
            dst_sizes[entry.digest] = size
            if entry.digest in counted:
                if copied:  # put back after a gc sweep
                    report.bytes_copied += size
                continue
            counted.add(entry.digest)
            if copied:
                report.chunks_copied += 1
                report.bytes_copied += size
            else:
                report.chunks_skipped += 1
            bar.advance(entry.stored_size)

    with contextlib.ExitStack() as stack:
        stack.enter_context(Lease(src.backend, "load", owner, ttl=getattr(src, "lease_ttl", DEFAULT_TTL),
                                  required=False))
        stack.enter_context(Lease(dst.backend, "save", owner, ttl=dst_ttl))
        bar = stack.enter_context(Progress(total, "cp", "bytes", enabled=progress))
        for source in sources:
            copied_before = report.bytes_copied
            transfer(source, bar)
            digest, encoded = _manifest_for(dst, source, dst_sizes)
            if digest != source.digest:
                report.manifests_rewritten += 1
            _put_manifest(dst, digest, encoded)
            settled = settle_with_gc(dst.backend, epoch, ttl=dst_ttl, owner=owner)
            if settled is not None:
                epoch = settled
                dst_sizes.clear()  # re-check every chunk this step references
                transfer(source, bar)
                digest, encoded = _manifest_for(dst, source, dst_sizes)
                _put_manifest(dst, digest, encoded)
            stored = sum(dst_sizes.get(c.digest, c.stored_size) for c in source.manifest.chunks)
            ref = Ref(manifest=digest, step=source.step, committed=time.time(), writer=owner,
                      summary=summarize(source.manifest, report.bytes_copied - copied_before, stored))
            try:
                commit_ref(dst.backend, keys.step_ref_key(source.step), ref, overwrite=overwrite)
            except StepExistsError:  # committed meanwhile (another copy of the same step?)
                held = _held_ref(dst, source.step)
                if held is None or not _same_content(dst, held, source):
                    raise
                report.already_there.append(source.step)
                continue
            report.steps.append(source.step)


def _copy_chunk(src: Store, dst: Store, step: int, entry: ChunkEntry) -> tuple[ChunkEntry, int, bool]:
    """(entry, stored size in dst, whether this call transferred it)."""
    key = keys.chunk_key(entry.digest)
    size, copied = put_chunk(dst.backend, key, lambda: [_checked_blob(src, step, entry, key)])
    return entry, size, copied


def _checked_blob(src: Store, step: int, entry: ChunkEntry, key: str) -> bytes:
    """The source's blob of chunk `key`, decoded and checked against its hash first."""
    limit = HEADER_SIZE + entry.raw_size  # a valid blob is never longer
    try:
        blob = src.backend.get_range(key, 0, limit + 1)
    except ObjectNotFoundError as exc:
        raise IntegrityError(f"step {step}: chunk {key} is missing in {src.url}") from exc
    try:
        if len(blob) > limit:
            raise FormatError(f"blob longer than header + {entry.raw_size} raw bytes")
        raw = decode_chunk(blob, expected_raw_length=entry.raw_size)
    except UnsupportedFormatError:
        raise
    except FormatError as exc:
        raise IntegrityError(f"step {step}: chunk {key} in {src.url} is corrupt: {exc}; not copied") from exc
    if src._hash(raw) != entry.digest:
        raise IntegrityError(f"step {step}: chunk {key} in {src.url} is corrupt: its content does not hash to "
                             f"its key; not copied")
    return blob


def _manifest_for(dst: Store, source: _Source, sizes: dict[str, int]) -> tuple[str, bytes]:
    """The source manifest, or one re-encoded with the destination's stored sizes."""
    chunks = source.manifest.chunks
    if all(sizes.get(c.digest, c.stored_size) == c.stored_size for c in chunks):
        return source.digest, source.encoded
    fixed = replace(source.manifest, chunks=tuple(replace(c, stored_size=sizes.get(c.digest, c.stored_size))
                                                  for c in chunks))
    encoded = encode_manifest(fixed)
    return dst._hash(encoded), encoded


def _put_manifest(dst: Store, digest: str, encoded: bytes) -> None:
    with contextlib.suppress(AlreadyExistsError):  # content-addressed: already there is success
        dst.backend.put(keys.manifest_key(digest), encoded, mode=CREATE)
