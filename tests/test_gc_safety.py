"""gc never loses a committed step: each of issue 12's defects, forced deterministically.

Every test here forces one interleaving (ckptstore.testing.interleave) or one failure
(ckptstore.testing.faults) that the random stress tests never hit, and fails on the code
before the fix it guards (each test's docstring says what the old code did).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from ckptstore import cli, keys
from ckptstore.backends.base import CREATE, OVERWRITE, Backend, PutMode
from ckptstore.backends.memory import MemoryBackend, drop_memory_space
from ckptstore.chunking import ChunkingPolicy
from ckptstore.commit import commit_ref
from ckptstore.errors import (
    IntegrityError,
    PermissionDeniedError,
    PreconditionFailedError,
    StepExistsError,
    TransientError,
)
from ckptstore.gclock import GC_LOCK
from ckptstore.hashing import hasher
from ckptstore.leases import Lease
from ckptstore.manifest import Ref
from ckptstore.retry import RetryingBackend
from ckptstore.store import Store
from ckptstore.testing.faults import Fault, FaultInjectingBackend
from ckptstore.testing.interleave import Hook, HookBackend

SMALL = ChunkingPolicy(chunk_size=4096, small_tensor_limit=256, pack_size=1024)
WAIT = 30.0  # how long a gate waits before the test gives up (never reached when it passes)


def _state(seed: int) -> dict[str, Any]:
    return {"w": torch.arange(4096, dtype=torch.float32) + seed, "step": seed}


def _equal(loaded: dict[str, Any], seed: int) -> bool:
    return torch.equal(loaded["w"], _state(seed)["w"]) and loaded["step"] == seed


@pytest.fixture
def space() -> Iterator[str]:
    name = uuid.uuid4().hex
    yield name
    drop_memory_space(name)


def _store(backend: Backend, ttl: float = 600.0) -> Store:
    store = Store(backend, chunking=SMALL, lease_ttl=ttl)
    store.marker  # noqa: B018 - create the store (opening no longer does)
    return store


def _objects(backend: Backend) -> set[str]:
    return {o.key for prefix in (keys.CHUNKS, keys.MANIFESTS) for o in backend.list(prefix)}


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # handed to the test through `out`
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _result(thread: threading.Thread, out: dict[str, Any]) -> Any:
    thread.join(WAIT)
    assert not thread.is_alive(), "a party of the interleaving never finished"
    if "error" in out:
        raise out["error"]
    return out["result"]


def _with_garbage(inner: Backend, ttl: float = 600.0) -> Store:
    """Step 0 committed (seed 0); step 1 (seed 1) saved then deleted: its chunks are garbage
    that a later save of seed 1 deduplicates against."""
    store = _store(inner, ttl)
    store.save(0, _state(0))
    store.save(1, _state(1))
    store.delete(1)
    return store


# -- 1. fail closed: a manifest or ref gc cannot read keeps everything ----------------------
def _unsupported_manifest_step(store: Store) -> None:
    """Step 5 names a manifest of a future format version (v=3), stored under its own hash,
    as a newer ckptstore would write it."""
    data = msgpack.packb({"v": 3, "step": 5, "chunks": []}, use_bin_type=True)
    digest = hasher(store.marker.hash_algorithm)(data)
    store.backend.put(keys.manifest_key(digest), data, mode=CREATE)
    commit_ref(store.backend, keys.step_ref_key(5), Ref(manifest=digest, step=5, committed=0.0, writer="newer"),
               overwrite=False)


FAILURES: dict[str, Callable[[Store, MemoryBackend], Backend]] = {
    # A SlowDown storm that outlasts the retries.
    "transient": lambda s, inner: RetryingBackend(FaultInjectingBackend(inner, [
        Fault("get_range", key=keys.manifest_key(s.ref(0).manifest), times=None,
              error=TransientError("SlowDown"))]), attempts=3, sleep=lambda _: None),
    "permission": lambda s, inner: FaultInjectingBackend(inner, [
        Fault("get_range", key=r"^manifests/", times=None, error=PermissionDeniedError("AccessDenied"))]),
    "ref-unreadable": lambda s, inner: FaultInjectingBackend(inner, [
        Fault("get_range", key=r"^refs/steps/", times=None, error=PermissionDeniedError("AccessDenied"))]),
    "corrupt": lambda s, inner: (inner.put(keys.manifest_key(s.ref(0).manifest), b"\x93garbage", mode=OVERWRITE),
                                 inner)[1],
    "missing": lambda s, inner: (inner.delete(keys.manifest_key(s.ref(0).manifest)), inner)[1],
    "unsupported-format": lambda s, inner: (_unsupported_manifest_step(s), inner)[1],
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_gc_sweeps_nothing_when_a_reachable_manifest_or_ref_cannot_be_read(space: str, failure: str) -> None:
    """Old code: _mark recorded the broken ref and went on without marking its chunks, so the
    sweep deleted the chunks of a committed step (and kept none of them)."""
    inner = MemoryBackend(space)
    store = _with_garbage(inner)
    view = FAILURES[failure](store, inner)
    before = _objects(inner)
    report = _store(view).gc(min_age=0)
    assert report.failed and not report.ran, report
    assert report.deleted_chunks == report.deleted_manifests == 0
    assert report.broken_refs and all(b.startswith("refs/steps/") for b in report.broken_refs), report.broken_refs
    assert "swept nothing" in report.reason
    assert _objects(inner) == before  # not even step 1's garbage: nothing is swept
    # The lock and the epoch are left as after any gc: the next one can run.
    assert not inner.exists(GC_LOCK)
    if failure not in ("corrupt", "missing", "unsupported-format"):  # the failure was the server's: passes now
        assert _store(inner).gc(min_age=0).deleted_chunks > 0
        assert _equal(_store(inner).load(0), 0)


def test_a_dry_run_fails_closed_too(space: str) -> None:
    inner = MemoryBackend(space)
    store = _with_garbage(inner)
    inner.delete(keys.manifest_key(store.ref(0).manifest))
    report = store.gc(dry_run=True, min_age=0)
    assert report.failed and report.deleted_chunks == 0 and not report.ran


def test_cli_gc_exits_non_zero_and_names_the_broken_ref(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = str(tmp_path / "store")
    from ckptstore import open as open_store

    store = open_store(url, chunking=SMALL)
    store.save(0, _state(0))
    store.save(1, _state(1))
    store.delete(1)
    manifest = tmp_path / "store" / keys.manifest_key(store.ref(0).manifest)
    manifest.write_bytes(b"\x93garbage")
    chunks_before = sorted(p.name for p in (tmp_path / "store" / "chunks").rglob("*") if p.is_file())
    code = cli.main(["gc", url, "--min-age", "0"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR
    assert "refs/steps/00000000000000000000" in err and "swept nothing" in err
    assert sorted(p.name for p in (tmp_path / "store" / "chunks").rglob("*") if p.is_file()) == chunks_before


# -- 2. the gc lock stays fresh, is judged by server time, proven before deletes -----------
@contextlib.contextmanager
def _skewed_client_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> Iterator[None]:
    """This process's wall clock off by `seconds`; memory://'s server clock and local files'
    mtimes (the kernel's) are unaffected, as a real server's would be."""
    import time

    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)
    try:
        yield
    finally:
        monkeypatch.setattr(time, "time", real)


@pytest.mark.parametrize("skew", [0.0, 3600.0, -3600.0])
def test_a_mark_longer_than_the_ttl_keeps_the_lock_and_a_waiting_save_waits(
        space: str, skew: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """gc pauses in mark for 3 TTLs while a save that began during the gc waits to commit.
    Old code: locks/gc was refreshed only after deletes (and judged by the client's clock),
    so the save judged the gc dead after one TTL (at once with the client's clock an hour
    ahead), committed, and the sweep then deleted the chunks it had deduplicated against.
    A second gc could take the live lock over the same way."""
    ttl = 1.0
    inner = MemoryBackend(space)
    _with_garbage(inner, ttl)
    in_mark, resume = threading.Event(), threading.Event()
    gc_view = HookBackend(inner, [Hook("get_range", r"^manifests/",
                                       before=lambda: (in_mark.set(), resume.wait(WAIT)))])
    with _skewed_client_clock(monkeypatch, skew):
        gc_thread, gc_out = _in_thread(lambda: _store(gc_view, ttl).gc(min_age=0))
        assert in_mark.wait(WAIT)
        save_thread, save_out = _in_thread(lambda: _store(inner, ttl).save(2, _state(1)))
        save_thread.join(3 * ttl + 2.0)
        still_waiting = save_thread.is_alive()
        second = _store(inner, ttl).gc(min_age=0)
        resume.set()
        report = _result(gc_thread, gc_out)
        _result(save_thread, save_out)
    assert still_waiting, "the save committed while the gc that had not seen its lease was still running"
    assert second.reason == "another gc holds locks/gc", second
    assert report.ran and report.deleted_chunks > 0, report
    assert _equal(_store(inner).load(2), 1)  # the chunks the sweep took were put back before the commit


def _pause_after_mark(inner: Backend, manifests: int = 1) -> tuple[HookBackend, threading.Event, threading.Event]:
    marked, resume = threading.Event(), threading.Event()
    view = HookBackend(inner, [Hook("get_range", r"^manifests/", times=manifests,
                                    after=lambda: (marked.set(), resume.wait(WAIT)))])
    return view, marked, resume


def test_gc_deletes_nothing_once_its_lock_was_taken_over_and_keeps_the_new_holders_lock(space: str) -> None:
    """Between mark and sweep another gc takes locks/gc over. Old code swept all the same
    and then deleted the other gc's lock at exit."""
    inner = MemoryBackend(space)
    _with_garbage(inner)
    view, marked, resume = _pause_after_mark(inner)
    gc_thread, gc_out = _in_thread(lambda: _store(view).gc(min_age=0))
    assert marked.wait(WAIT)
    current = inner.head(GC_LOCK).version
    theirs = msgpack.packb({"v": 1, "owner": "the other gc", "refreshed": 0.0}, use_bin_type=True)
    inner.put(GC_LOCK, theirs, mode=PutMode.update(current))
    before = _objects(inner)
    resume.set()
    report = _result(gc_thread, gc_out)
    assert report.lock_lost and report.failed and not report.ran, report
    assert report.deleted_chunks == 0 and _objects(inner) == before
    assert inner.get(GC_LOCK).data == theirs  # released only its own version: the new holder keeps its lock


def test_gc_proves_ownership_before_every_batch_of_deletes(space: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock lost in the middle of the sweep stops it at the next batch."""
    import ckptstore.gc as gc_module

    monkeypatch.setattr(gc_module, "DELETE_BATCH", 3)
    inner = MemoryBackend(space)
    store = _store(inner)
    store.save(0, _state(0))
    for step in range(1, 4):
        store.save(step, _state(step))
        store.delete(step)
    garbage = len(_objects(inner)) - len(_objects_of_step(store, 0))
    assert garbage > 6
    deletes = 0

    def steal_after_three() -> None:
        nonlocal deletes
        deletes += 1
        if deletes == 3:
            inner.put(GC_LOCK, b"\x81\xa1v\x01", mode=PutMode.update(inner.head(GC_LOCK).version))

    view = HookBackend(inner, [Hook("delete", r"^(chunks|manifests)/", after=steal_after_three, times=None)])
    report = _store(view).gc(min_age=0)
    assert report.lock_lost and deletes == 3, (report, deletes)
    assert len(_objects(inner)) == len(_objects_of_step(store, 0)) + garbage - 3


def _objects_of_step(store: Store, step: int) -> set[str]:
    ref = store.ref(step)
    return {keys.manifest_key(ref.manifest)} | {keys.chunk_key(c.digest) for c in store.manifest(ref.manifest).chunks}


def test_a_save_that_finds_the_gc_dead_breaks_its_lock_so_a_paused_gc_stops(space: str) -> None:
    """A gc that was only paused (its lock went stale) must not resume deleting after a save
    judged it dead and committed: the save breaks the lock, the gc's next proof fails."""
    ttl = 1.0
    inner = MemoryBackend(space)
    _with_garbage(inner, ttl)
    view, marked, resume = _pause_after_mark(inner)
    gc_store = _store(view, ttl)
    gc_thread, gc_out = _in_thread(lambda: gc_store.gc(min_age=0))
    assert marked.wait(WAIT)
    # The gc process "freezes": its refresh thread stops too (as under SIGSTOP).
    import ckptstore.gclock as gclock

    frozen = threading.Event()
    real_prove = gclock.GCLock.prove

    def frozen_prove(self: gclock.GCLock) -> float:
        if not frozen.is_set() and threading.current_thread().name == "ckptstore-gc-lock":
            return 0.0
        return real_prove(self)

    gclock.GCLock.prove = frozen_prove  # type: ignore[method-assign]
    try:
        saved = _store(inner, ttl).save(2, _state(1))  # waits > ttl, then breaks the stale lock
    finally:
        gclock.GCLock.prove = real_prove  # type: ignore[method-assign]
        frozen.set()
    resume.set()
    report = _result(gc_thread, gc_out)
    assert saved.step == 2
    assert report.lock_lost and report.deleted_chunks == 0, report
    assert _equal(_store(inner).load(2), 1)


# -- 3. tag() is a commit like a save ----------------------------------------------------
def test_tag_is_protected_from_an_rm_and_gc_after_it_read_the_step(space: str) -> None:
    """The step is deleted and a gc runs right after tag() read its ref. Old code: tag took
    no lease and checked no epoch, so the gc swept the step and the tag named a deleted
    manifest. Now the gc stands down for the tag's lease and the tag loads."""
    inner = MemoryBackend(space)
    store = _store(inner)
    store.save(3, _state(3))
    reports = []

    def rm_and_gc() -> None:
        _store(inner).delete(3)
        reports.append(_store(inner).gc(min_age=0))

    view = HookBackend(inner, [Hook("get_range", r"^refs/steps/", after=rm_and_gc)])
    _store(view).tag("best", 3)
    assert reports and not reports[0].ran and reports[0].blocking_leases, reports
    assert _equal(_store(inner).load("best"), 3)
    assert _store(inner).gc(min_age=0).deleted_chunks == 0  # the tag keeps the data alive


def test_a_gc_that_ran_entirely_between_the_tags_epoch_reads_is_seen(space: str) -> None:
    """A gc lists leases just before tag() takes its lease, then (the step deleted meanwhile)
    sweeps the step and finishes before the tag's second epoch read. The tag re-checks and
    refuses. Old code took no lease, read no epoch and committed a tag of a deleted manifest."""
    inner = MemoryBackend(space)
    store = _store(inner)
    store.save(3, _state(3))
    store.gc(min_age=0)  # the epoch exists: both of the tag's epoch reads are real reads
    view, gc = _gc_between_epoch_reads(inner, "entirely-between", before_resume=lambda: store.delete(3))
    with pytest.raises(IntegrityError, match="missing"):
        _store(view).tag("best", 3)
    assert gc["report"].ran and gc["report"].deleted_manifests == 1
    assert not inner.exists(keys.tag_ref_key("best"))


def test_tag_refuses_a_step_whose_manifest_or_chunk_is_gone(space: str) -> None:
    inner = MemoryBackend(space)
    store = _store(inner)
    store.save(3, _state(3))
    store.save(4, _state(4))
    inner.delete(keys.chunk_key(store.manifest(store.ref(3).manifest).chunks[-1].digest))
    with pytest.raises(IntegrityError, match="cannot be tagged"):
        store.tag("a", 3)
    inner.delete(keys.manifest_key(store.ref(4).manifest))
    with pytest.raises(IntegrityError, match="missing"):
        store.tag("b", 4)
    assert store.tags() == {}


# -- the epoch check, clause by clause --------------------------------------------------
def _gc_between_epoch_reads(inner: Backend, case: str,
                            before_resume: Callable[[], object] = lambda: None) -> tuple[HookBackend, dict[str, Any]]:
    """A view of `inner` for a party (save or tag) around which one gc runs:

    - "running-at-first-read": the gc lists leases before the party starts, and finishes
      before the party's second epoch read (only E0.running shows it);
    - "running-at-second-read": the gc lists leases right before the party's lease exists and
      is still running at the second read; it marks before the party goes on and sweeps after
      (only E1.running shows it);
    - "entirely-between": the gc lists leases right before the party's lease exists and
      finishes before the party's second epoch read (only last_sweep > E0.number shows it).

    The gc never sees the party's lease, so it sweeps what the party deduplicated against.
    `before_resume` runs right before the paused gc goes on (e.g. delete the step to tag)."""
    listed, resume, marked = threading.Event(), threading.Event(), threading.Event()
    gc_view = HookBackend(inner, [Hook("list", r"^locks/$", after=lambda: (listed.set(), resume.wait(WAIT))),
                                  Hook("get_range", r"^manifests/", after=marked.set)])
    gc: dict[str, Any] = {}

    def start_gc() -> None:
        # No mark cache: `marked` waits for the gc's read of a manifest, which the cache of the
        # gc run earlier in the test would otherwise spare.
        gc["thread"], gc["out"] = _in_thread(lambda: _store(gc_view).gc(min_age=0, cache=False))
        assert listed.wait(WAIT)

    def finish_gc() -> None:
        before_resume()
        resume.set()
        gc["report"] = _result(gc["thread"], gc["out"])

    def let_gc_mark() -> None:
        before_resume()
        resume.set()
        assert marked.wait(WAIT)

    epoch_reads = 0

    def at_epoch_read() -> None:  # before each read of locks/epoch (one get_small: bytes and version)
        nonlocal epoch_reads
        epoch_reads += 1
        if epoch_reads == 2 and case in ("running-at-first-read", "entirely-between"):
            finish_gc()

    def after_epoch_read() -> None:
        if epoch_reads == 2 and case == "running-at-second-read":
            let_gc_mark()

    hooks = [Hook("get_small", r"^locks/epoch$", before=at_epoch_read, after=after_epoch_read, times=None)]
    if case == "running-at-first-read":
        start_gc()
    else:
        hooks.append(Hook("put", r"^locks/save-", before=start_gc))
    return HookBackend(inner, hooks), gc


@pytest.mark.parametrize("case", ["running-at-first-read", "running-at-second-read", "entirely-between"])
def test_a_save_sees_every_gc_that_did_not_see_its_lease(space: str, case: str) -> None:
    """Each case is caught by exactly one clause of Epoch.swept_since; dropping that clause
    makes the save commit without putting back the chunks the gc swept (load fails)."""
    inner = MemoryBackend(space)
    _with_garbage(inner).gc(min_age=3600)  # the epoch exists; the garbage is kept (young)
    view, gc = _gc_between_epoch_reads(inner, case)
    info = _store(view).save(2, _state(1))  # deduplicates against step 1's garbage
    if "report" not in gc:
        gc["report"] = _result(gc["thread"], gc["out"])
    assert gc["report"].ran and gc["report"].deleted_chunks > 0, gc["report"]
    # It had deduplicated every chunk against step 1's garbage; the gc swept them all, and the
    # save put every one back before its manifest was built (so they count as written).
    assert info.new_chunks == info.chunks > 0, info
    assert _equal(_store(inner).load(2), 1)


def test_a_chunk_put_back_after_a_sweep_is_recorded_as_this_save_stored_it(space: str) -> None:
    """The save deduplicates against another writer's zstd copies; the sweep takes them and
    the save puts them back uncompressed. Its manifest must record the stored sizes of the
    objects as they are now (before: the sizes of the swept copies, which verify flagged)."""
    from ckptstore.chunkblob import Compression
    from ckptstore.verify import verify

    inner = MemoryBackend(space)
    zstd = Store(inner, chunking=SMALL, compression=Compression("zstd", min_ratio=1.0))
    zstd.save(0, _state(0))
    zstd.save(1, _state(1))  # compressible: arange floats
    zstd.delete(1)
    zstd.gc(min_age=3600)  # the epoch exists; the garbage is kept (young)
    view, gc = _gc_between_epoch_reads(inner, "entirely-between")
    info = _store(view).save(2, _state(1))
    assert gc["report"].deleted_chunks > 0
    store = _store(inner)
    for chunk in store.manifest(info.manifest).chunks:
        assert inner.head(keys.chunk_key(chunk.digest)).size == chunk.stored_size
    report = verify(store, deep=True)
    assert report.ok, report.problems
    assert _equal(store.load(2), 1)


def test_a_waiting_save_does_not_wait_for_a_gc_that_began_after_its_lease(space: str) -> None:
    """G1 is running when the save re-reads the epoch; G1 finishes and G2 begins at once (it
    finds the save's lease, so it will delete nothing). The save must go on while G2 still
    runs: waiting for "no gc running" let back-to-back gcs keep a save waiting for ever."""
    inner = MemoryBackend(space)
    _with_garbage(inner).gc(min_age=3600)
    listed = [threading.Event(), threading.Event()]
    resume = [threading.Event(), threading.Event()]
    gc_views = [HookBackend(inner, [Hook("list", r"^locks/$", after=lambda i=i: (listed[i].set(),
                                                                                resume[i].wait(WAIT)))])
                for i in range(2)]
    g1 = _in_thread(lambda: _store(gc_views[0]).gc(min_age=0))
    assert listed[0].wait(WAIT)
    g2: list[tuple[threading.Thread, dict[str, Any]]] = []
    epoch_reads = 0

    def at_epoch_read() -> None:
        nonlocal epoch_reads
        epoch_reads += 1
        if epoch_reads == 3:  # the first look while waiting: G1 done, G2 running by now
            resume[0].set()
            _result(*g1)
            g2.append(_in_thread(lambda: _store(gc_views[1]).gc(min_age=0)))
            assert listed[1].wait(WAIT)

    view = HookBackend(inner, [Hook("get_small", r"^locks/epoch$", before=at_epoch_read, times=None)])
    save = _in_thread(lambda: _store(view).save(2, _state(1)))
    save[0].join(10.0)
    finished_while_g2_ran = not save[0].is_alive()
    resume[1].set()
    _result(*save)
    report = _result(*g2[0])
    assert finished_while_g2_ran, "the save waited for a gc that started after its lease"
    assert not report.ran and report.blocking_leases, report  # G2 found the lease and stood down
    assert _equal(_store(inner).load(2), 1)


def test_two_creates_of_one_step_interleaved_commit_exactly_one(space: str) -> None:
    """Both saves reach their commit before either puts the ref: one wins, the other gets
    StepExistsError, and the step holds the winner's state whole."""
    inner = MemoryBackend(space)
    barrier = threading.Barrier(2, timeout=WAIT)
    views = [HookBackend(inner, [Hook("put", r"^refs/steps/", before=barrier.wait)]) for _ in range(2)]
    parties = [_in_thread(lambda v=v, seed=seed: _store(v).save(7, _state(seed)))
               for v, seed in zip(views, (70, 71), strict=True)]
    outcomes = []
    for thread, out in parties:
        try:
            outcomes.append(_result(thread, out).seq)
        except StepExistsError as exc:
            outcomes.append(exc)
    winners = [o for o in outcomes if o == 1]
    assert len(winners) == 1 and sum(isinstance(o, StepExistsError) for o in outcomes) == 1, outcomes
    loaded = _store(inner).load(7)
    assert _equal(loaded, 70) or _equal(loaded, 71)
    assert _store(inner).ref(7).seq == 1


# -- 4. retention after a commit never fails the save --------------------------------------
def _failing_ref_deletes(inner: Backend) -> FaultInjectingBackend:
    return FaultInjectingBackend(inner, [Fault("delete", key=r"^refs/steps/", times=None,
                                               error=PermissionDeniedError("AccessDenied"))])


def test_a_failed_retention_delete_is_reported_not_raised(space: str, caplog: pytest.LogCaptureFixture) -> None:
    """Old code raised from save() after the commit: the trainer believed nothing was saved
    and its retry got StepExistsError."""
    inner = MemoryBackend(space)
    store = _store(_failing_ref_deletes(inner))
    store.save(1, _state(1))
    with caplog.at_level(logging.WARNING, logger="ckptstore.store"):
        info = store.save(2, _state(2), keep_last=1)
    assert info.step == 2 and info.retention_deleted == ()
    assert len(info.retention_errors) == 1 and "step 1" in info.retention_errors[0]
    assert "AccessDenied" in info.retention_errors[0]
    assert any("retention failed" in r.getMessage() for r in caplog.records)
    assert _store(inner).steps() == [1, 2]


def test_a_failed_retention_delete_reaches_the_async_future_as_a_result(space: str) -> None:
    inner = MemoryBackend(space)
    store = _store(_failing_ref_deletes(inner))
    store.save(1, _state(1))
    info = store.save_async(2, _state(2), keep_last=1).result(WAIT)
    store.close()
    assert info.step == 2 and info.retention_errors and "step 1" in info.retention_errors[0]


def test_retention_keeps_a_step_recommitted_between_its_read_and_its_delete(space: str) -> None:
    """Retention deletes a ref only at the version it read: an overwrite in between stays."""
    inner = MemoryBackend(space)
    store = _store(inner)
    store.save(1, _state(1))

    # After step 2's commit, the next head of step 1's ref is retention's (the save read that
    # ref before, for the chunks it need not head).
    committed, recommitted = threading.Event(), threading.Event()

    def recommit() -> None:
        if committed.is_set() and not recommitted.is_set():
            recommitted.set()
            _store(inner).save(1, _state(11), overwrite=True)

    view = HookBackend(inner, [Hook("put", r"^refs/steps/0+2$", after=committed.set),
                               Hook("head", r"^refs/steps/0+1$", after=recommit, times=None)])
    info = _store(view).save(2, _state(2), keep_last=1)
    assert recommitted.is_set()
    assert info.retention_deleted == () and info.retention_errors == ()
    assert _equal(_store(inner).load(1), 11)


def test_rm_after_an_sdk_retry_does_not_remove_a_new_commit(space: str) -> None:
    """The delete lands, the client is told it failed, the step is committed again, then the
    retry layer repeats the delete. Unconditional deletes removed the new commit."""
    inner = MemoryBackend(space)
    store = _store(inner)
    store.save(1, _state(1))
    faulty = FaultInjectingBackend(inner, [Fault("delete", key=r"^refs/steps/", action="apply_then_fail",
                                                 error=TransientError("timeout"))])
    retrying = RetryingBackend(faulty, attempts=3, sleep=lambda _: _store(inner).save(1, _state(12)))
    with pytest.raises(PreconditionFailedError, match="committed again"):
        _store(retrying).delete(1)
    assert _equal(_store(inner).load(1), 12)


# -- 5. locks --clear-stale judges by the server's clock -----------------------------------
@pytest.mark.parametrize("skew", [3600.0, -3600.0])
def test_clear_stale_locks_with_a_skewed_operator_clock(space: str, skew: float,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Old code: an operator whose clock ran an hour ahead deleted a live save's lease."""
    import ckptstore.backends.memory as memory

    ttl = 5.0
    inner = MemoryBackend(space)
    store = _store(inner, ttl)
    inner.put(keys.lock_key("save-00000000000000aa"), b"\x81\xa1v\x01")  # written "long ago" below
    real = memory._server_clock
    monkeypatch.setattr(memory, "_server_clock", lambda: real() + 100.0)  # the server moves 100 s on
    with Lease(inner, "save", "live saver", ttl=ttl), _skewed_client_clock(monkeypatch, skew):
        cleared = store.clear_stale_locks()
        listed = {lock.name: lock for lock in store.locks()}
    assert [lock.name for lock in cleared] == ["locks/save-00000000000000aa"]
    live = [lock for lock in listed.values() if lock.owner == "live saver"]
    assert len(live) == 1 and not live[0].stale and live[0].age_seconds < ttl

