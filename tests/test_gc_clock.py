"""Every time and TTL comparison of the lease, lock, epoch and gc code, at its boundary.

Each test pins one comparison so that flipping it, dropping it or moving it by one fails:
ages are computed from the server's clock (memory://'s `_server_clock`, set here) and the
boundaries are hit exactly.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import torch

import ckptstore.backends.memory as memory
from ckptstore import keys
from ckptstore.backends.base import PutMode
from ckptstore.backends.memory import MemoryBackend, drop_memory_space
from ckptstore.epoch import EPOCH, MAX_EPOCH_ATTEMPTS, Epoch, read_epoch, set_epoch
from ckptstore.errors import EpochContentionError, GCLockLostError, PreconditionFailedError
from ckptstore.gclock import GC_LOCK, GCLock, gc_lock_state, wait_for_gc
from ckptstore.leases import Lease, fresh_leases, is_stale, list_locks
from ckptstore.liveness import holder_fields
from ckptstore.serverclock import CLOCK_RESOLUTION, ServerClock
from ckptstore.store import Store
from ckptstore.testing.faults import Fault, FaultInjectingBackend

TTL = 10.0
T0 = 1_000_000.0


class ServerTime:
    """memory://'s clock, moved by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> ServerTime:
    clock = ServerTime()
    monkeypatch.setattr(memory, "_server_clock", clock)
    return clock


@pytest.fixture
def backend() -> Iterator[MemoryBackend]:
    name = uuid.uuid4().hex
    yield MemoryBackend(name)
    drop_memory_space(name)


def _lock_bytes(**fields: object) -> bytes:
    return msgpack.packb({"v": 1, "owner": "someone", "refreshed": 0.0, **fields}, use_bin_type=True)


# -- is_stale: age > ttl + CLOCK_RESOLUTION ---------------------------------------------
def test_staleness_boundary() -> None:
    assert CLOCK_RESOLUTION == 1.0
    assert not is_stale(TTL, TTL)
    assert not is_stale(TTL + CLOCK_RESOLUTION, TTL)  # equal: still fresh (moving > to >= fails)
    assert is_stale(TTL + CLOCK_RESOLUTION + 0.001, TTL)
    assert not is_stale(TTL + 0.5, TTL)  # dropping the resolution margin fails here
    assert not is_stale(0.0, TTL) and not is_stale(-5.0, TTL)  # flipping the comparison fails here


def test_list_locks_judges_each_lease_by_server_time(backend: MemoryBackend, server: ServerTime) -> None:
    backend.put(keys.lock_key("save-00000000000000a1"), _lock_bytes())
    backend.put(keys.lock_key("epoch"), _lock_bytes(epoch=1, running=False))
    server.now += TTL + CLOCK_RESOLUTION
    at_edge = {lock.kind: lock for lock in list_locks(backend, ttl=TTL, now=server.now)}
    assert not at_edge["save"].stale and at_edge["save"].age_seconds == TTL + CLOCK_RESOLUTION
    later = {lock.kind: lock for lock in list_locks(backend, ttl=TTL, now=server.now + 0.5)}
    assert later["save"].stale
    assert not later["epoch"].stale  # the epoch never expires
    assert [lock.kind for lock in fresh_leases(backend, ttl=TTL, now=server.now)] == ["save"]
    assert fresh_leases(backend, ttl=TTL, now=server.now + 0.5) == []


def test_fresh_leases_counts_only_save_and_load_leases_of_live_holders(backend: MemoryBackend,
                                                                       server: ServerTime) -> None:
    backend.put(keys.lock_key("save-00000000000000a1"), _lock_bytes(**holder_fields()))
    backend.put(keys.lock_key("load-00000000000000a2"), _lock_bytes())
    backend.put(keys.lock_key("canary-00000000000000a3"), _lock_bytes())
    backend.put(keys.lock_key("clock-00000000000000a4"), _lock_bytes())
    backend.put(GC_LOCK, _lock_bytes())
    dead = {**holder_fields(), "pid": 2**22 + 17}  # no such process here
    backend.put(keys.lock_key("save-00000000000000a5"), _lock_bytes(**dead))
    names = sorted(lock.name for lock in fresh_leases(backend, ttl=TTL, now=server.now))
    assert names == ["locks/load-00000000000000a2", "locks/save-00000000000000a1"]


# -- gc_lock_state ---------------------------------------------------------------------
def test_gc_lock_state_branches(backend: MemoryBackend, server: ServerTime) -> None:
    assert gc_lock_state(backend, ttl=TTL, now=server.now).version is None
    version = backend.put(GC_LOCK, _lock_bytes())
    state = gc_lock_state(backend, ttl=TTL, now=server.now + TTL + CLOCK_RESOLUTION)
    assert state.held  # at the edge: alive
    state = gc_lock_state(backend, ttl=TTL, now=server.now + TTL + CLOCK_RESOLUTION + 0.001)
    assert not state.held and state.version == version and "stale" in state.why
    backend.put(GC_LOCK, b"\xc1 not msgpack")
    assert gc_lock_state(backend, ttl=TTL, now=server.now).held  # unreadable but fresh
    released = backend.put(GC_LOCK, _lock_bytes(released=True))
    state = gc_lock_state(backend, ttl=TTL, now=server.now)
    assert not state.held and state.released and state.version == released
    dead = backend.put(GC_LOCK, _lock_bytes(**{**holder_fields(), "pid": 2**22 + 17}))
    state = gc_lock_state(backend, ttl=TTL, now=server.now)
    assert not state.held and not state.released and state.version == dead and "died" in state.why
    backend.put(GC_LOCK, _lock_bytes(**holder_fields()))
    assert gc_lock_state(backend, ttl=TTL, now=server.now).held


def test_wait_for_gc_returns_at_once_when_idle_and_breaks_only_a_dead_lock(backend: MemoryBackend,
                                                                            server: ServerTime) -> None:
    set_epoch(backend, running=True, owner="gc")
    backend.put(GC_LOCK, _lock_bytes(**{**holder_fields(), "pid": 2**22 + 17}))
    epoch = wait_for_gc(backend, ttl=TTL, owner="saver", poll=0.01)
    assert epoch.running
    assert msgpack.unpackb(backend.get(GC_LOCK).data)["released"] is True  # broken, by CAS
    set_epoch(backend, running=False, owner="gc")
    assert not wait_for_gc(backend, ttl=TTL, poll=0.01).running


def test_wait_for_gc_keeps_waiting_while_the_lock_is_exactly_at_the_edge(backend: MemoryBackend,
                                                                          server: ServerTime) -> None:
    set_epoch(backend, running=True, owner="gc")
    backend.put(GC_LOCK, _lock_bytes())
    polls = []

    class Clock(ServerClock):
        def now(self) -> float:
            polls.append(1)
            if len(polls) == 3:  # third look: one tick past the edge
                return T0 + TTL + CLOCK_RESOLUTION + 0.001
            return T0 + TTL + CLOCK_RESOLUTION

    wait_for_gc(backend, ttl=TTL, clock=Clock(lambda: 0.0), poll=0.001)
    assert len(polls) == 3


# -- ServerClock: anchored at the end of the write, extrapolated by the monotonic clock -----
def test_server_clock_extrapolates_with_the_monotonic_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptstore.serverclock as serverclock

    ticks = iter([100.0, 107.5, 200.0])
    monkeypatch.setattr(serverclock.time, "monotonic", lambda: next(ticks))
    clock = ServerClock(lambda: T0)
    assert clock.sync() == T0  # anchored at monotonic 100 (after the write returned)
    assert clock.now() == T0 + 7.5
    monkeypatch.setattr(serverclock.time, "time", lambda: 0.0)  # the wall clock plays no part
    assert clock.now() == T0 + 100.0


def test_server_clock_syncs_on_first_use() -> None:
    calls = []
    clock = ServerClock(lambda: calls.append(1) or T0)
    assert T0 <= clock.now() < T0 + 5 and calls == [1]
    clock.now()
    assert calls == [1]


# -- GCLock: proofs, ensure_owned's period, takeover -----------------------------------------
def test_ensure_owned_proves_again_exactly_from_a_quarter_ttl(backend: MemoryBackend,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptstore.gclock as gclock

    lock = GCLock(backend, "gc", ttl=TTL)
    assert lock.acquire()
    lock._stop.set()  # no background refresh in this test
    monotonic = [lock._proved_at]
    monkeypatch.setattr(gclock.time, "monotonic", lambda: monotonic[0])
    proofs = []
    real = lock.prove
    monkeypatch.setattr(lock, "prove", lambda: proofs.append(1) or real())
    lock._proved_at = 50.0
    monotonic[0] = 50.0 + TTL / 4 - 0.001
    lock.ensure_owned()
    assert proofs == []
    monotonic[0] = 50.0 + TTL / 4
    lock.ensure_owned()
    assert proofs == [1]
    lock.release()


def test_prove_fails_once_the_lock_changed_and_release_keeps_the_other(backend: MemoryBackend) -> None:
    lock = GCLock(backend, "gc", ttl=TTL)
    assert lock.acquire()
    lock.prove()
    backend.put(GC_LOCK, _lock_bytes(owner="other"), mode=PutMode.update(lock.version or ""))
    with pytest.raises(GCLockLostError):
        lock.prove()
    with pytest.raises(GCLockLostError):
        lock.ensure_owned()
    lock.release()
    assert msgpack.unpackb(backend.get(GC_LOCK).data)["owner"] == "other"


def test_acquire_takes_over_only_a_dead_lock(backend: MemoryBackend, server: ServerTime) -> None:
    backend.put(GC_LOCK, _lock_bytes())
    server.now += TTL + CLOCK_RESOLUTION  # the probe's write is stamped now: exactly at the edge
    assert not GCLock(backend, "second", ttl=TTL).acquire()
    server.now += 0.001
    lock = GCLock(backend, "second", ttl=TTL)
    assert lock.acquire()
    lock.release()
    assert not backend.exists(GC_LOCK)


# -- the epoch ---------------------------------------------------------------------------
def test_set_epoch_gives_up_after_a_bounded_number_of_lost_races(backend: MemoryBackend,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptstore.epoch as epoch_module

    monkeypatch.setattr(epoch_module.time, "sleep", lambda _: None)
    set_epoch(backend, running=False, owner="first")

    def losing(times: int | None) -> FaultInjectingBackend:
        return FaultInjectingBackend(backend, [Fault("put", key=f"^{EPOCH}$", times=times,
                                                     error=PreconditionFailedError("lost the race"))])

    view = losing(MAX_EPOCH_ATTEMPTS - 1)  # the last allowed attempt wins
    assert set_epoch(view, running=True, owner="gc").number == 2
    view = losing(MAX_EPOCH_ATTEMPTS)  # every allowed attempt loses
    with pytest.raises(EpochContentionError):
        set_epoch(view, running=False, owner="gc")
    assert view.fired(view.faults[0]) == MAX_EPOCH_ATTEMPTS
    assert read_epoch(backend)[0] == Epoch(2, True, "gc", 0)  # nothing was changed


def test_swept_since_only_after_a_real_sweep() -> None:
    idle = Epoch(8, False, "", 5)
    assert not Epoch(8, False, "", 5).swept_since(idle)
    assert not Epoch(10, False, "", 5).swept_since(idle)  # a gc that stood down in between
    assert Epoch(10, False, "", 9).swept_since(idle)
    assert Epoch(9, True, "", 5).swept_since(idle)
    assert Epoch(10, False, "", 5).swept_since(Epoch(7, True, "", 5))


# -- gc: min_age and the clean-up age are judged at the server's time --------------------
def test_sweep_min_age_boundary_is_server_time(backend: MemoryBackend, server: ServerTime,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(backend, lease_ttl=TTL)
    store.save(1, {"w": torch.ones(8)})
    store.delete(1)
    garbage = {o.key for p in (keys.CHUNKS, keys.MANIFESTS) for o in backend.list(p)}
    monkeypatch.setattr(time, "time", lambda: T0 + 10 * 3600)  # the client's clock is hours ahead
    server.now += 59.999  # the gc lock's proof is stamped at this time: the garbage is 59.999 s old
    report = store.gc(min_age=60)
    assert report.ran and report.deleted_chunks == 0 and report.kept_young == len(garbage)
    server.now += 0.001  # exactly min_age old: freed
    report = store.gc(min_age=60)
    assert report.deleted_chunks + report.deleted_manifests == len(garbage)


def test_gc_stands_down_for_a_lease_written_just_now_whatever_the_client_clock(
        backend: MemoryBackend, server: ServerTime, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(backend, lease_ttl=TTL)
    store.marker  # noqa: B018 - create the store (gc of a URL with no store is StoreNotFoundError)
    for skew in (3600.0, -3600.0):
        monkeypatch.setattr(time, "time", lambda skew=skew: T0 + skew)
        with Lease(backend, "save", "saver", ttl=TTL):
            report = store.gc(min_age=0)
        assert not report.ran and report.blocking_leases, report


def test_crash_leftovers_younger_than_the_lease_ttl_survive_even_with_min_age_zero(tmp_path: Path) -> None:
    """A save this gc did not see may be mid-put: its staging file must outlive max(min_age, ttl)."""
    import os

    import ckptstore

    ttl = 120.0
    store = ckptstore.open(tmp_path / "store", lease_ttl=ttl)
    store.save(1, {"w": torch.ones(8)})
    staging = tmp_path / "store" / "tmp"
    young, old = staging / ("a" * 32 + ".tmp"), staging / ("b" * 32 + ".tmp")
    for path, age in ((young, ttl - 5), (old, ttl + 5)):
        path.write_bytes(b"partial")
        os.utime(path, (time.time() - age, time.time() - age))
    report = store.gc(min_age=0)
    assert report.staging_removed == 1
    assert young.exists() and not old.exists()


def test_a_gc_lock_create_of_unknown_outcome_is_taken_back(backend: MemoryBackend) -> None:
    """The create lands but the client only sees a timeout: the gc fails, and leaves no lock
    of its own behind that would hold up every save for a ttl."""
    from ckptstore.errors import TransientError

    view = FaultInjectingBackend(backend, [Fault("put", key=f"^{GC_LOCK}$", action="apply_then_fail",
                                                 error=TransientError("timeout"))])
    with pytest.raises(TransientError):
        GCLock(view, "gc", ttl=TTL).acquire()
    assert not backend.exists(GC_LOCK)
    other = _lock_bytes(owner="other")  # somebody else's lock is never taken back
    backend.put(GC_LOCK, other)
    GCLock(view, "gc", ttl=TTL)._discard_if_ours(_lock_bytes(owner="gc"))
    assert backend.get(GC_LOCK).data == other
