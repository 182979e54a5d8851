"""Garbage collection: free the chunks and manifests that no ref reaches.

Protocol (argued in docs/FORMAT.md, "Garbage collection"):
1. take locks/gc (ckptstore/gclock.py: create-only, a dead holder's lock taken over by
   compare-and-swap), refreshed by compare-and-swap in the background for the whole run;
2. bump the epoch to running;
3. list leases: if any fresh save or load lease exists, stand down (sweep nothing);
4. mark: every ref (steps and tags) -> its manifest -> the manifest's chunks. Fail closed:
   if any ref, or a manifest a ref names, cannot be read and decoded, sweep nothing. What
   an earlier mark learned comes from the mark cache (ckptstore/gccache.py) where it is
   keyed by content or by a version the listing shows unchanged, so a repeated gc reads
   only new refs and manifests;
5. sweep: prove the lock is still ours, then delete unmarked manifests and chunks older
   than `min_age` (server time), proving again before every batch of deletes;
6. prove once more, bump the epoch to idle, release our own version of locks/gc.
A save reads the epoch before it creates its lease and again before it commits; if a gc
ran or is running in between, it waits for it to finish and re-checks that every object it
is about to reference still exists (re-uploading what vanished). So a gc that did not see a
save's lease can never leave that save's commit pointing at a deleted object.

gc needs only the store's backend and the hash function its marker names (`Store.gc` passes
them); it knows nothing of the Store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ckptstore import keys
from ckptstore.backends.base import Backend, ObjectInfo
from ckptstore.deadline import deadline_in
from ckptstore.epoch import set_epoch
from ckptstore.errors import CkptStoreError, GCLockLostError, ObjectNotFoundError
from ckptstore.gccache import MarkCache
from ckptstore.gclock import GCLock
from ckptstore.leases import fresh_leases
from ckptstore.manifest import MAX_REF_BYTES, decode_ref
from ckptstore.manifestread import reachable_digests, read_manifest_object
from ckptstore.threads import bounded_map

log = logging.getLogger(__name__)

#: Most keys gc deletes in one batch request (`Backend.delete_many`; the backend's own
#: `max_delete_batch` may be lower: S3 1,000, GCS and the per-key default 100). gc proves it
#: still owns locks/gc before every batch, and the batch must end within ttl/4 of that proof.
DELETE_BATCH = 1000
#: Fan-out folders (`chunks/xx/`) gc lists at a time.
LIST_THREADS = 16
#: Refs gc reads at a time while marking (manifests: half as many).
MARK_THREADS = 16

#: What `_read_manifest_chunks` returns for a manifest, as a number: bump it whenever that
#: changes (a new manifest version, more digests to keep), so chunk sets the mark cache holds
#: from older code are ignored (ckptstore/gccache.py).
MARK_FORMAT = 1

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class GCReport:
    """What a gc run saw and did. `ok` is False when it could not do its whole job: another
    gc was running, or saves made it stand down, or it failed closed (broken refs, a lost lock)."""

    dry_run: bool
    ran: bool = False  # False: another gc held the lock, leases made it stand down, or it failed closed
    reason: str = ""
    blocking_leases: list[str] = field(default_factory=list)
    refs: int = 0
    reachable_manifests: int = 0
    reachable_chunks: int = 0
    deleted_manifests: int = 0
    deleted_chunks: int = 0
    deleted_bytes: int = 0
    kept_young: int = 0  # unreachable, but younger than min_age
    broken_refs: list[str] = field(default_factory=list)  # refs gc could not follow: nothing was swept
    lock_lost: bool = False  # locks/gc stopped being ours mid-run: it stopped deleting
    list_errors: list[str] = field(default_factory=list)  # listing chunks/ or manifests/ failed: nothing was swept
    delete_failures: list[str] = field(default_factory=list)  # "key: error" of each delete that failed (kept)
    staging_removed: int = 0  # local staging files / S3 multipart uploads left by crashes
    refs_read: int = 0  # refs read from the store; the others' targets came from the mark cache
    manifests_read: int = 0  # manifests read from the store; the others' chunk sets came from the mark cache
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """It failed closed (refs it could not follow, a listing that failed, its lock lost) or
        some deletes failed (`ckptstore gc` exits 1)."""
        return bool(self.broken_refs) or self.lock_lost or bool(self.list_errors) or bool(self.delete_failures)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "failed": self.failed}


class _MarkFailed(Exception):
    """Some ref or manifest could not be read: the sweep must not run."""


class _ListFailed(Exception):
    """Listing manifests/ or chunks/ failed: the sweep must not run."""


class DigestSet:
    """The reachable chunk digests, compactly: raw digests in a sorted numpy array of fixed-width
    bytes (32 B a chunk for a 32-byte hash, against ~99 B in a set of bytes and ~147 B in a set
    of hex str). Built by `add` (duplicates welcome), then `freeze`; membership is exact.
    Digests of another width than the first one (no store mixes hashes) go in a plain set."""

    def __init__(self) -> None:
        self._width = 0
        self._pending = bytearray()
        self._sorted: Any = None  # numpy array of dtype S<width>
        self._odd: set[bytes] = set()

    def add(self, hex_digests: Iterable[str]) -> None:
        for digest in map(bytes.fromhex, hex_digests):
            self._width = self._width or len(digest)
            if len(digest) == self._width:
                self._pending += digest
            else:
                self._odd.add(digest)
        self._maybe_merge()

    def add_raw(self, raw: bytes, width: int) -> None:
        """Digests of `width` bytes each, concatenated (a chunk set from the mark cache)."""
        self._width = self._width or width
        if width == self._width:
            self._pending += raw
        else:
            self._odd.update(raw[i:i + width] for i in range(0, len(raw), width))
        self._maybe_merge()

    def _maybe_merge(self) -> None:
        if self._sorted is None or len(self._pending) > self._sorted.nbytes // 4 + (1 << 20):
            self._merge()  # few duplicates wait: the peak stays about twice the final array

    def _merge(self) -> None:
        import numpy as np

        pending = np.frombuffer(self._pending, dtype=f"S{max(1, self._width)}")
        self._pending = bytearray()
        merged = pending.copy() if self._sorted is None else np.concatenate([self._sorted, pending])
        self._sorted = None  # both inputs freed before the de-duplicated copy is made
        del pending
        merged.sort()
        keep = np.empty(merged.size, dtype=bool)
        keep[:1] = True
        np.not_equal(merged[1:], merged[:-1], out=keep[1:])
        self._sorted = merged[keep]

    def freeze(self) -> DigestSet:
        self._merge()
        return self

    def __len__(self) -> int:
        return int(self._sorted.size) + len(self._odd) if self._sorted is not None else len(self._odd)

    def contains_each(self, hex_digests: Sequence[str]) -> list[bool]:
        """For each digest, whether it is in the set (one vectorised search for all of them)."""
        import numpy as np

        raw = [bytes.fromhex(d) for d in hex_digests]
        found = [d in self._odd for d in raw]
        same = [i for i, d in enumerate(raw) if len(d) == self._width]
        if same and self._sorted is not None and self._sorted.size:
            query = np.frombuffer(b"".join(raw[i] for i in same), dtype=self._sorted.dtype)
            at = np.minimum(np.searchsorted(self._sorted, query), self._sorted.size - 1)
            for i, hit in zip(same, (self._sorted[at] == query).tolist(), strict=True):
                found[i] = bool(hit)
        return found


def _read_manifest_chunks(backend: Backend, hash_: Callable[[Any], str], digest: str) -> set[str]:
    """The chunk digests of manifest `digest`, always hash-checked: gc trusts no manifest whose
    bytes are not the ones its ref named, whatever the store's `verify` setting. For a v2 root:
    its chunk tables' entries and its part and table blobs (the parts are not read)."""
    return set(reachable_digests(backend, hash_, read_manifest_object(backend, hash_, digest)))


def _mark(backend: Backend, hash_: Callable[[Any], str], report: GCReport, cache: MarkCache | None = None,
          now: float | None = None) -> tuple[set[str], DigestSet]:
    """Every manifest and chunk a ref reaches. Raises _MarkFailed (after recording every
    broken ref in the report) if any ref or its manifest cannot be read: only a ref that is
    confirmed gone lets its objects become garbage. With a `cache`, a ref whose listed version
    is the one it had when an earlier mark read it, and a manifest whose chunk set an earlier
    mark read, cost no request (ckptstore/gccache.py); whatever else is read is cached. `now`:
    the server's time as the mark starts (None in a dry run, which has none)."""
    manifests: set[str] = set()
    chunks = DigestSet()
    # Refs, then the manifests they name, are read MARK_THREADS at a time (a first gc over
    # 10^4 steps on S3 read them one after the other for 382 s); results are merged here, in
    # listing order, so the outcome is the sequential one.

    def target(info: ObjectInfo) -> tuple[str | None, bool]:
        digest = cache.ref_target(info.key, info.version) if cache is not None else None
        if digest is not None:
            return digest, False
        return _read_ref_target(backend, info.key, cache, now), True

    infos = list(backend.list(keys.REFS))
    named: dict[str, list[str]] = {}  # manifest digest -> the ref keys that name it
    for info, (outcome, error) in zip(infos, _concurrently(target, infos, MARK_THREADS), strict=True):
        if error is not None:  # transient, permission, unsupported format, corrupt
            report.broken_refs.append(f"{info.key}: {type(error).__name__}: {error}")
            continue
        assert outcome is not None
        digest, read = outcome
        if digest is None:
            continue  # deleted since the listing: confirmed gone
        report.refs += 1
        report.refs_read += int(read)
        named.setdefault(digest, []).append(info.key)

    def chunk_set(digest: str) -> tuple[Any, bool]:
        cached = cache.chunks(digest) if cache is not None else None
        if cached is not None:
            return cached, False
        return _read_manifest_chunks(backend, hash_, digest), True

    digests = list(named)
    for manifest, (found_set, failure) in zip(digests, _concurrently(chunk_set, digests, MARK_THREADS // 2),
                                              strict=True):
        if failure is not None:  # missing, corrupt, unreadable: every ref naming it is broken
            report.broken_refs.extend(f"{key}: {type(failure).__name__}: {failure}" for key in named[manifest])
            continue
        assert found_set is not None
        found, read = found_set
        if read:
            report.manifests_read += 1
            chunks.add(found)
            if cache is not None:
                cache.remember_chunks(manifest, found)
        else:
            chunks.add_raw(*found)
        manifests.add(manifest)
    if cache is not None:
        cache.save_refs()
    if report.broken_refs:
        raise _MarkFailed
    if cache is not None:
        cache.prune(manifests)
    chunks.freeze()
    report.reachable_manifests, report.reachable_chunks = len(manifests), len(chunks)
    return manifests, chunks


def _concurrently(fn: Callable[[T], R], items: list[T],
                  threads: int) -> Iterator[tuple[R | None, CkptStoreError | None]]:
    """(fn(item), None) or (None, the CkptStoreError it raised) for each item, in order, at most
    2 x `threads` in flight (a manifest's chunk set can be large). Other exceptions propagate."""

    def call(item: T) -> tuple[R | None, CkptStoreError | None]:
        try:
            return fn(item), None
        except CkptStoreError as exc:
            return None, exc

    return bounded_map(call, items, threads)


def _read_ref_target(backend: Backend, key: str, cache: MarkCache | None, now: float | None) -> str | None:
    """The manifest digest the ref at `key` names, or None if it is gone (as `read_ref`). With
    a cache, the answer is remembered under the ref's version (`MarkCache.remember_ref`: on
    local only once the ref is old at server time `now`). The `Backend.get_small` default takes
    the version from a head before its read (the shipped backends use one response), so the
    bytes could be newer than it: unless the cache knows that pairing to be safe on this
    backend, it is remembered only if a head after the read shows the same version (that head
    also gives the mtime the settled rule needs on local)."""
    try:
        result = backend.get_small(key, MAX_REF_BYTES)
    except ObjectNotFoundError:
        return None
    ref = decode_ref(result.data)
    if cache is not None:
        modified: float | None = None
        if not (cache.versions_unique and cache.pairing_is_safe(result.version, result.data)):
            try:
                after = backend.head(key)
            except CkptStoreError:  # gone, or unreadable now: the read stands, nothing is cached
                return ref.manifest
            if after.version != result.version:
                return ref.manifest
            modified = after.modified
        cache.remember_ref(key, result.version, ref.manifest, modified=modified, now=now)
    return ref.manifest


def _fail_closed_reason(report: GCReport) -> str:
    return (f"swept nothing: {len(report.broken_refs)} ref(s) could not be followed to their chunks "
            f"(fix or remove them; `ckptstore verify` tells more)")


_LIST_FAILED = "swept nothing: listing manifests/ or chunks/ failed (see list_errors)"


def collect_garbage(backend: Backend, hash_: Callable[[Any], str], *, owner: str, dry_run: bool = False,
                    min_age: float = 3600.0, ttl: float, cache: bool = True) -> GCReport:
    """Run one gc over the store on `backend`, whose objects are named by `hash_` (the hash
    function its marker names; see the module docstring). Never raises for "busy" or for a
    failed-closed run: the report says (`report.failed`). `cache`: use and update the mark
    cache on this machine's disk (ckptstore/gccache.py); False reads every ref and manifest."""
    started = time.monotonic()
    report = GCReport(dry_run=dry_run)
    mark_cache = MarkCache.open(backend, hash_, MARK_FORMAT) if cache else None
    if dry_run:  # read-only: no lock, no epoch, just what a sweep would delete now
        try:
            manifests, chunks = _mark(backend, hash_, report, mark_cache)
        except _MarkFailed:
            report.reason = _fail_closed_reason(report)
        else:
            # A dry run writes nothing, so it has no server time: the local clock only changes
            # which young objects it reports as kept.
            try:
                _sweep(backend, manifests, chunks, report, now=time.time(), min_age=min_age, lock=None)
            except _ListFailed:
                report.reason = _LIST_FAILED
            else:
                report.ran = True
        report.seconds = time.monotonic() - started
        return report

    lock = GCLock(backend, owner, ttl=ttl)
    if not lock.acquire():
        report.reason = "another gc holds locks/gc"
        report.seconds = time.monotonic() - started
        return report
    try:
        _collect_locked(backend, hash_, lock, report, owner=owner, min_age=min_age, ttl=ttl, cache=mark_cache)
    finally:
        lock.release()
    report.seconds = time.monotonic() - started
    return report


def _collect_locked(backend: Backend, hash_: Callable[[Any], str], lock: GCLock, report: GCReport, *, owner: str,
                    min_age: float, ttl: float, cache: MarkCache | None) -> None:
    running = set_epoch(backend, running=True, owner=owner)
    swept_in: int | None = None
    try:
        blocking = fresh_leases(backend, ttl=ttl, now=lock.clock.sync())
        if blocking:
            report.reason = "saves or loads in progress (their leases are fresh)"
            report.blocking_leases = [lease.name for lease in blocking]
            return
        swept_in = running.number  # from here on objects may vanish
        try:
            manifests, chunks = _mark(backend, hash_, report, cache, now=lock.clock.now())
        except _MarkFailed:
            report.reason = _fail_closed_reason(report)
            log.warning("gc of %s %s: %s", backend.url, report.reason, "; ".join(report.broken_refs))
            return
        now = lock.prove()  # the sweep starts only while the lock is provably ours
        try:
            _sweep(backend, manifests, chunks, report, now=now, min_age=min_age, lock=lock)
        except _ListFailed:
            report.reason = _LIST_FAILED
            log.warning("gc of %s %s: %s", backend.url, report.reason, "; ".join(report.list_errors))
            return
        cleanup = getattr(backend, "cleanup_staging", None)
        if callable(cleanup):  # local staging files, S3 unfinished multipart uploads
            # Never younger than the lease TTL: a save this gc did not see (it began
            # after the lease listing) may be mid-put; a dead writer's leftovers are older.
            lock.prove()
            report.staging_removed = int(cleanup(max(min_age, ttl), now=lock.clock.now()))
        report.ran = True
    except GCLockLostError as exc:
        report.lock_lost, report.ran = True, False
        report.reason = str(exc)
        log.warning("gc of %s stopped: %s", backend.url, exc)
    finally:
        _finish_epoch(lock, owner=owner, swept_in=swept_in)


def _finish_epoch(lock: GCLock, *, owner: str, swept_in: int | None) -> None:
    """Bump the epoch to idle, but only while the lock is provably ours: a gc that lost its
    lock must not tell saves that no gc runs while the one that took over sweeps."""
    try:
        lock.prove()
    except Exception as exc:  # lost, or the server is unreachable: leave the epoch "running"
        log.warning("gc left the epoch marked running (%s); saves re-check their chunks until the next gc", exc)
        return
    set_epoch(lock.backend, running=False, owner=owner, swept_in=swept_in)


@dataclass(frozen=True)
class _Garbage:
    """What the listing of one prefix found to delete, and how many unmarked objects were too young."""

    doomed: list[tuple[str, int]]  # (key, size)
    young: int


def fanout_prefixes(prefix: str) -> list[str]:
    """The 256 `prefix` + `xx/` folders that hold every content-addressed key under `prefix`."""
    return [f"{prefix}{i:02x}/" for i in range(256)]


def _is_content_key(prefix: str, key: str) -> str | None:
    """The digest of `key` if it is exactly where this store writes that digest under `prefix`
    (`xx/<digest>`), else None: gc never deletes what it did not write."""
    try:
        digest = keys.digest_from_key(key)
    except CkptStoreError:
        return None
    return digest if key == f"{prefix}{digest[:2]}/{digest}" else None


def list_content_keys(backend: Backend, prefix: str, *, threads: int = LIST_THREADS) -> list[ObjectInfo]:
    """Every content-addressed object under `prefix` (`chunks/`, `manifests/`): the 256 fan-out
    folders listed `threads` at a time, in folder order. Any listing error is raised."""
    return [info for part in _map_prefixes(backend, prefix, threads, lambda infos: list(infos)) for info in part]


def _map_prefixes(backend: Backend, prefix: str, threads: int, each: Callable[[Any], T]) -> list[T]:
    """`each(listing)` of the content keys in every fan-out folder of `prefix`, concurrently."""
    def one(folder: str) -> T:
        return each(info for info in backend.list(folder) if _is_content_key(prefix, info.key) is not None)

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ckptstore-gc-list") as pool:
        return list(pool.map(one, fanout_prefixes(prefix)))


def _find_garbage(backend: Backend, manifests: set[str], chunks: DigestSet, *, now: float, min_age: float,
                  threads: int) -> _Garbage:
    """Every unmarked manifest and chunk at least `min_age` old at server time `now`, manifests
    first. Lists everything before anything is deleted: a listing error raises, and nothing is swept."""
    doomed: list[tuple[str, int]] = []
    young = 0
    for prefix, marked in ((keys.MANIFESTS, lambda digests: [d in manifests for d in digests]),
                           (keys.CHUNKS, chunks.contains_each)):
        def pick(infos: Any, marked: Callable[[Sequence[str]], list[bool]] = marked) -> _Garbage:
            listed = list(infos)
            found, too_young = [], 0
            for info, is_marked in zip(listed, marked([keys.digest_from_key(i.key) for i in listed]), strict=True):
                if is_marked:
                    continue
                if now - info.modified < min_age:
                    too_young += 1
                    continue
                found.append((info.key, info.size))
            return _Garbage(found, too_young)

        for part in _map_prefixes(backend, prefix, threads, pick):
            doomed += part.doomed
            young += part.young
    return _Garbage(doomed, young)


def _sweep(backend: Backend, manifests: set[str], chunks: DigestSet, report: GCReport, *, now: float,
           min_age: float, lock: GCLock | None, threads: int = LIST_THREADS) -> None:
    """Delete (dry run: count) unmarked manifests and chunks at least `min_age` old at server
    time `now`. With a lock, every batch request starts with a proof of ownership and must end
    within ttl/4 of it (see DELETE_BATCH)."""
    try:
        garbage = _find_garbage(backend, manifests, chunks, now=now, min_age=min_age, threads=threads)
    except CkptStoreError as exc:
        report.list_errors.append(f"{type(exc).__name__}: {exc}")
        raise _ListFailed from exc
    report.kept_young += garbage.young
    batch = min(DELETE_BATCH, backend.max_delete_batch)
    for start in range(0, len(garbage.doomed), batch):
        part = garbage.doomed[start:start + batch]
        failed: dict[str, CkptStoreError] = {}
        if lock is not None:
            lock.prove()
            # No request of the batch (nor a retry) may outlast the proof: ttl/4, as ensure_owned.
            with deadline_in(lock.ttl / 4):
                failed = dict(backend.delete_many([key for key, _ in part]))
        for key, size in part:
            if key in failed:
                report.delete_failures.append(f"{key}: {type(failed[key]).__name__}: {failed[key]}")
                continue
            if key.startswith(keys.CHUNKS):
                report.deleted_chunks += 1
            else:
                report.deleted_manifests += 1
            report.deleted_bytes += size
    if report.delete_failures:
        report.reason = f"{len(report.delete_failures)} object(s) could not be deleted and were kept (delete_failures)"
        log.warning("gc of %s: %s: %s", backend.url, report.reason, "; ".join(report.delete_failures[:10]))
