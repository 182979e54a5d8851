"""Checking that committed steps are readable: refs, manifests and chunks (`ckptstore verify`).

For every step checked:

1. its ref decodes and names the step it is stored under;
2. its manifest exists, hashes to its key and decodes;
3. every chunk the manifest lists exists with the stored size the manifest records (`head`);
4. with `deep=True`, every chunk is read, decoded with the raw length the manifest expects
   and re-hashed with the store's hash algorithm.

Each manifest and each chunk is checked once, however many steps share it; a damaged chunk
is reported once for every step that references it, so the report says which steps are
affected. Nothing stops at the first problem: every damaged object reachable from the steps
checked is reported. Verify only reads; it never repairs or deletes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptstore import keys
from ckptstore.chunkblob import HEADER_SIZE, decode_chunk
from ckptstore.chunkio import bounded_map
from ckptstore.commit import read_ref
from ckptstore.errors import FormatError, IntegrityError, ObjectNotFoundError, StepNotFoundError
from ckptstore.manifest import ChunkEntry, Manifest
from ckptstore.manifestread import MAX_MANIFEST_READ, decode_whole
from ckptstore.progress import Progress
from ckptstore.store import Store

ProblemKind = Literal["corrupt-ref", "missing-manifest", "corrupt-manifest", "missing-chunk", "size-mismatch",
                      "corrupt-chunk"]


@dataclass(frozen=True)
class Problem:
    """One damaged object as seen from one step: what is wrong, where, and why."""

    step: int
    kind: ProblemKind
    key: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    """What `verify` checked and every problem it found."""

    url: str
    deep: bool
    steps: list[int] = field(default_factory=list)  # steps checked (a step deleted meanwhile is left out)
    manifests_checked: int = 0
    chunks_checked: int = 0  # distinct chunks
    bytes_read: int = 0  # manifest bytes, plus chunk bytes when deep
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def steps_checked(self) -> int:
        return len(self.steps)

    @property
    def damaged_steps(self) -> list[int]:
        return sorted({p.step for p in self.problems})

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url, "ok": self.ok, "deep": self.deep, "steps_checked": self.steps_checked,
            "steps": self.steps, "manifests_checked": self.manifests_checked,
            "chunks_checked": self.chunks_checked, "bytes_read": self.bytes_read,
            "damaged_steps": self.damaged_steps, "problems": [p.as_dict() for p in self.problems],
            "seconds": self.seconds,
        }


# (kind, detail) of a damaged object, or None when it is fine
_Finding = tuple[ProblemKind, str] | None


def _resolve_steps(store: Store, steps: Iterable[int] | None) -> list[int]:
    existing = store.steps()
    if steps is None:
        return existing
    wanted = sorted({keys.check_step(s) for s in steps})
    present = set(existing)
    for step in wanted:
        if step not in present:
            raise StepNotFoundError(step, store.url)
    return wanted


def verify(store: Store, steps: Iterable[int] | None = None, *, deep: bool = False,
           progress: bool = False) -> VerifyReport:
    """Check `steps` (default: every committed step) of `store`; see the module docstring.

    Raises StepNotFoundError for a requested step that does not exist, and lets backend
    failures other than a missing object (TransientError, PermissionDeniedError) through:
    a verify that could not look is not a verify that passed.
    """
    started = time.perf_counter()
    backend = store.backend
    report = VerifyReport(store.url, deep)
    wanted = _resolve_steps(store, steps)

    # 1. refs
    def read_step_ref(step: int) -> tuple[int, str | None, _Finding]:
        key = keys.step_ref_key(step)
        try:
            found = read_ref(backend, key)
        except FormatError as exc:
            return step, None, ("corrupt-ref", str(exc))
        if found is None:
            return step, None, None  # deleted since listing: not a problem, not checked
        if found[0].step != step:
            return step, None, ("corrupt-ref", f"ref names step {found[0].step}")
        return step, found[0].manifest, None

    step_manifest: dict[int, str] = {}
    for step, digest, finding in bounded_map(read_step_ref, wanted, store.threads):
        if finding is not None:
            report.steps.append(step)
            report.problems.append(Problem(step, finding[0], keys.step_ref_key(step), finding[1]))
        elif digest is not None:
            report.steps.append(step)
            step_manifest[step] = digest

    # 2. manifests, each once
    def check_manifest(digest: str) -> tuple[str, Manifest | None, _Finding, int]:
        key = keys.manifest_key(digest)
        try:
            data = backend.get_range(key, 0, MAX_MANIFEST_READ + 1)
        except ObjectNotFoundError:
            return digest, None, ("missing-manifest", "no object at the key the ref names"), 0
        if store._hash(data) != digest:
            return digest, None, ("corrupt-manifest", "its bytes do not hash to its key"), len(data)
        try:
            return digest, decode_whole(backend, store._hash, data), None, len(data)
        except IntegrityError as exc:  # a part or chunk table of a v2 root is missing or corrupt
            return digest, None, ("corrupt-manifest", f"{type(exc).__name__}: {exc}"), len(data)
        except FormatError as exc:
            return digest, None, ("corrupt-manifest", f"{type(exc).__name__}: {exc}"), len(data)

    manifests: dict[str, Manifest] = {}
    manifest_findings: dict[str, tuple[ProblemKind, str]] = {}
    for digest, manifest, finding, nbytes in bounded_map(check_manifest, sorted(set(step_manifest.values())),
                                                        store.threads):
        report.manifests_checked += 1
        report.bytes_read += nbytes
        if manifest is not None:
            manifests[digest] = manifest
        elif finding is not None:
            manifest_findings[digest] = finding

    # 3. chunks, each once (keyed by digest and the sizes the manifest records)
    chunks: dict[tuple[str, int, int], ChunkEntry] = {}
    for manifest in manifests.values():
        for entry in manifest.chunks:
            chunks.setdefault((entry.digest, entry.raw_size, entry.stored_size), entry)

    def check_chunk(entry: ChunkEntry) -> tuple[ChunkEntry, _Finding, int]:
        key = keys.chunk_key(entry.digest)
        try:
            if not deep:
                size = backend.head(key).size
                if size != entry.stored_size:
                    return entry, ("size-mismatch", f"stored object is {size} bytes, the manifest records "
                                                    f"{entry.stored_size}"), 0
                return entry, None, 0
            # A valid blob is never longer than header + raw: one byte more catches junk.
            blob = backend.get_range(key, 0, HEADER_SIZE + entry.raw_size + 1)
        except ObjectNotFoundError:
            return entry, ("missing-chunk", "no object at the chunk's key"), 0
        if len(blob) != entry.stored_size:
            longer = " (longer than header + raw size)" if len(blob) > HEADER_SIZE + entry.raw_size else ""
            return entry, ("size-mismatch", f"read {len(blob)} bytes{longer}, the manifest records "
                                            f"{entry.stored_size}"), len(blob)
        try:
            raw = decode_chunk(blob, expected_raw_length=entry.raw_size)
        except FormatError as exc:  # UnsupportedFormatError included: this reader cannot check it
            return entry, ("corrupt-chunk", f"{type(exc).__name__}: {exc}"), len(blob)
        if store._hash(raw) != entry.digest:
            return entry, ("corrupt-chunk", "decoded payload does not hash to its key"), len(blob)
        return entry, None, len(blob)

    todo = list(chunks.values())
    chunk_findings: dict[tuple[str, int, int], tuple[ProblemKind, str]] = {}
    total = sum(e.stored_size for e in todo) if deep else len(todo)
    with Progress(total, "verify", "bytes" if deep else "chunks", enabled=progress) as bar:
        for entry, finding, nbytes in bounded_map(check_chunk, todo, store.threads):
            report.chunks_checked += 1
            report.bytes_read += nbytes
            if finding is not None:
                chunk_findings[(entry.digest, entry.raw_size, entry.stored_size)] = finding
            bar.advance(entry.stored_size if deep else 1)

    # 4. attribute every finding to every step it affects
    for step, digest in step_manifest.items():
        if digest in manifest_findings:
            kind, detail = manifest_findings[digest]
            report.problems.append(Problem(step, kind, keys.manifest_key(digest), detail))
            continue
        seen: set[str] = set()
        for entry in manifests[digest].chunks:
            found = chunk_findings.get((entry.digest, entry.raw_size, entry.stored_size))
            if found is not None and entry.digest not in seen:
                seen.add(entry.digest)
                report.problems.append(Problem(step, found[0], keys.chunk_key(entry.digest), found[1]))
    report.steps.sort()
    report.problems.sort(key=lambda p: (p.step, p.key))
    report.seconds = time.perf_counter() - started
    return report
