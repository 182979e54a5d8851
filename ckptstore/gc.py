"""Garbage collection: free the chunks and manifests that no ref reaches.

Protocol (argued in docs/FORMAT.md, "Garbage collection"):
1. take locks/gc (create-only; a stale one is taken over by compare-and-swap);
2. bump the epoch to running;
3. list leases: if any fresh save or load lease exists, stand down (sweep nothing);
4. mark: every ref (steps and tags) -> its manifest -> the manifest's chunks;
5. sweep: delete unmarked manifests and chunks older than `min_age`;
6. bump the epoch to idle, release locks/gc.
A save reads the epoch before it creates its lease and again before it commits; if a gc
ran or is running in between, it waits for it to finish and re-checks that every object it
is about to reference still exists (re-uploading what vanished). So a gc that did not see a
save's lease can never leave that save's commit pointing at a deleted object.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptstore import keys
from ckptstore.backends.base import OVERWRITE
from ckptstore.commit import read_ref
from ckptstore.errors import CkptStoreError, ObjectNotFoundError
from ckptstore.leases import GC_LOCK, fresh_leases, gc_lock, lock_payload, server_now, set_epoch

if TYPE_CHECKING:
    from ckptstore.store import Store


@dataclass
class GCReport:
    """What a gc run saw and did."""

    dry_run: bool
    ran: bool = False  # False: another gc held the lock, or leases made it stand down
    reason: str = ""
    blocking_leases: list[str] = field(default_factory=list)
    refs: int = 0
    reachable_manifests: int = 0
    reachable_chunks: int = 0
    deleted_manifests: int = 0
    deleted_chunks: int = 0
    deleted_bytes: int = 0
    kept_young: int = 0  # unreachable, but younger than min_age
    broken_refs: list[str] = field(default_factory=list)  # refs whose manifest is unreadable
    staging_removed: int = 0  # local staging files / S3 multipart uploads left by crashes
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _mark(store: Store, report: GCReport) -> tuple[set[str], set[str]]:
    manifests: set[str] = set()
    chunks: set[str] = set()
    for info in store.backend.list("refs/"):
        found = read_ref(store.backend, info.key)
        if found is None:
            continue
        report.refs += 1
        digest = found[0].manifest
        if digest in manifests:
            continue
        manifests.add(digest)
        try:
            manifest = store.manifest(digest)
        except CkptStoreError as exc:
            # Keep everything this ref might need; report it (verify tells more).
            report.broken_refs.append(f"{info.key}: {exc}")
            continue
        chunks.update(c.digest for c in manifest.chunks)
    report.reachable_manifests, report.reachable_chunks = len(manifests), len(chunks)
    return manifests, chunks


def collect_garbage(store: Store, *, owner: str, dry_run: bool = False, min_age: float = 3600.0,
                    ttl: float) -> GCReport:
    """Run one gc over `store` (see the module docstring); never raises for "busy"."""
    started = time.monotonic()
    report = GCReport(dry_run=dry_run)
    backend = store.backend
    if dry_run:  # read-only: no lock, no epoch, just what a sweep would delete now
        manifests, chunks = _mark(store, report)
        _sweep(store, manifests, chunks, report, now=time.time(), min_age=min_age, ttl=ttl, delete=False)
        report.ran = True
        report.seconds = time.monotonic() - started
        return report

    with gc_lock(backend, owner, ttl=ttl) as held:
        if not held:
            report.reason = "another gc holds locks/gc"
            report.seconds = time.monotonic() - started
            return report
        running = set_epoch(backend, running=True, owner=owner)
        swept_in: int | None = None
        try:
            now = server_now(backend, GC_LOCK)
            blocking = fresh_leases(backend, ttl=ttl, now=now)
            if blocking:
                report.reason = "saves or loads in progress (their leases are fresh)"
                report.blocking_leases = [lock.name for lock in blocking]
            else:
                swept_in = running.number  # from here on objects may vanish
                manifests, chunks = _mark(store, report)
                _sweep(store, manifests, chunks, report, now=now, min_age=min_age, ttl=ttl, delete=True,
                       owner=owner)
                cleanup = getattr(backend, "cleanup_staging", None)
                if callable(cleanup):  # local staging files, S3 unfinished multipart uploads
                    # Never younger than the lease TTL: a save this gc did not see (it began
                    # after the lease listing) may be mid-put; a dead writer's leftovers are older.
                    report.staging_removed = int(cleanup(max(min_age, ttl)))
                report.ran = True
        finally:
            set_epoch(backend, running=False, owner=owner, swept_in=swept_in)
    report.seconds = time.monotonic() - started
    return report


def _sweep(store: Store, manifests: set[str], chunks: set[str], report: GCReport, *, now: float,
           min_age: float, ttl: float, delete: bool, owner: str = "") -> None:
    backend = store.backend
    last_touch = time.monotonic()
    for prefix, keep, is_chunk in ((keys.MANIFESTS, manifests, False), (keys.CHUNKS, chunks, True)):
        for info in backend.list(prefix):
            try:
                digest = keys.digest_from_key(info.key)
            except CkptStoreError:
                continue  # not ours: never delete what we did not write
            if digest in keep:
                continue
            if now - info.modified < min_age:
                report.kept_young += 1
                continue
            if delete:
                try:
                    backend.delete(info.key)
                except ObjectNotFoundError:
                    continue
                if time.monotonic() - last_touch > ttl / 4:  # keep locks/gc fresh on long sweeps
                    backend.put(GC_LOCK, lock_payload(owner), mode=OVERWRITE)
                    last_touch = time.monotonic()
            if is_chunk:
                report.deleted_chunks += 1
                report.deleted_bytes += info.size
            else:
                report.deleted_manifests += 1
                report.deleted_bytes += info.size
