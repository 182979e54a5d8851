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
    ObjectNotFoundError,
    StepExistsError,
    StepNotFoundError,
    UnsupportedFormatError,
)
from ckptstore.gclock import settle_with_gc
from ckptstore.leases import DEFAULT_TTL, Lease
from ckptstore.manifest import MAX_MANIFEST_BYTES, ChunkEntry, Manifest, Ref, decode_manifest, encode_manifest
from ckptstore.progress import Progress
from ckptstore.store import Store, writer_identity


@dataclass
class CopyReport:
    """What a copy did."""

    src: str
    dst: str
    steps: list[int] = field(default_factory=list)  # steps committed in the destination
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
        data = src.backend.get_range(key, 0, MAX_MANIFEST_BYTES + 1)
    except ObjectNotFoundError as exc:
        raise IntegrityError(f"step {step}: manifest {key} is missing in {src.url}") from exc
    if src._hash(data) != ref.manifest:
        raise IntegrityError(f"step {step}: manifest {key} in {src.url} is corrupt: its bytes do not hash to its key")
    return _Source(step, decode_manifest(data), ref.manifest, data)


def copy_steps(src: Store, dst: Store, steps: Iterable[int] | None = None, *, overwrite: bool = False,
               skip_existing: bool = False, progress: bool = False) -> CopyReport:
    """Copy `steps` (default: every committed step) of `src` into `dst`; see the module docstring.

    A step that exists in `dst` raises StepExistsError before anything is copied, unless
    `overwrite` (atomic replace, as `save(..., overwrite=True)`) or `skip_existing` (leave it
    as it is). Raises StepNotFoundError for a requested step `src` lacks, IntegrityError for
    a missing or corrupt source object (the step is then not committed), and
    IncompatibleStoresError when the stores use different hash algorithms.
    """
    started = time.perf_counter()
    if src.marker.hash_algorithm != dst.marker.hash_algorithm:
        raise IncompatibleStoresError(
            f"{src.url} hashes with {src.marker.hash_algorithm} and {dst.url} with {dst.marker.hash_algorithm}; "
            f"keys are hashes, so steps can only be copied between stores that use the same algorithm "
            f"(load and save the steps instead)")
    if overwrite and skip_existing:
        raise ValueError("overwrite and skip_existing exclude each other")
    available = src.steps()
    if steps is None:
        wanted = available
    else:
        wanted = sorted({keys.check_step(s) for s in steps})
        present = set(available)
        for step in wanted:
            if step not in present:
                raise StepNotFoundError(step, src.url)
    if not overwrite:
        existing = set(dst.steps())
        if skip_existing:
            wanted = [s for s in wanted if s not in existing]
        else:
            for step in wanted:
                if step in existing:
                    ref = dst.ref(step)
                    raise StepExistsError(step, ref.committed, ref.writer)

    report = CopyReport(src.url, dst.url)
    sources = list(bounded_map(lambda s: _read_source(src, s), wanted, src.threads))
    total = sum({c.digest: c.stored_size for s in sources for c in s.manifest.chunks}.values())
    if not sources:
        report.seconds = time.perf_counter() - started
        return report
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
            ref = Ref(manifest=digest, step=source.step, committed=time.time(), writer=owner)
            commit_ref(dst.backend, keys.step_ref_key(source.step), ref, overwrite=overwrite)
            report.steps.append(source.step)
    report.seconds = time.perf_counter() - started
    return report


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
