"""locks/gc: one gc at a time, and how saves wait for it.

A gc run holds locks/gc for its whole run (`GCLock`):
- it takes the lock create-only, or takes over a dead holder's lock by compare-and-swap;
- a background thread refreshes it every ttl/4 by compare-and-swap against the version it
  last wrote, for the whole run (lists, mark, sweep, clean-up), so a long mark never lets
  the lock look dead;
- before the sweep and before every batch of deletes, gc proves by that compare-and-swap
  that the lock is still its own, and deletes nothing once it is not (`GCLockLostError`);
- it deletes only its own version at the end.

A lock is dead when the server has not seen it refreshed for `ttl` (+ the clock
resolution), or its holder provably died on this machine (liveness.py), or someone marked
it released. A save that waits for a gc and finds its lock dead *breaks* it (a
compare-and-swap to a released lock) before it goes on: if the gc was only paused, its next
proof fails and it stops before deleting anything more.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

from ckptstore import keys
from ckptstore.backends.base import CREATE, Backend, PutMode
from ckptstore.epoch import Epoch, read_epoch
from ckptstore.errors import (
    AlreadyExistsError,
    FormatError,
    GCLockLostError,
    ObjectNotFoundError,
    PreconditionFailedError,
    TransientError,
)
from ckptstore.leases import is_stale
from ckptstore.liveness import holder_is_dead
from ckptstore.lockfile import lock_payload, unpack
from ckptstore.manifest import MAX_REF_BYTES
from ckptstore.serverclock import ServerClock, probe_clock

GC_LOCK = keys.lock_key("gc")


@dataclass(frozen=True)
class GCLockState:
    """What a look at locks/gc found. `held`: a live gc holds it. `version`: the version the
    judgement was made on (a takeover or break names it), None when there is no lock."""

    held: bool
    version: str | None
    why: str
    released: bool = False


def gc_lock_state(backend: Backend, *, ttl: float, now: float) -> GCLockState:
    """Judge locks/gc at server time `now`. Anything uncertain counts as held."""
    try:
        info = backend.head(GC_LOCK)
    except ObjectNotFoundError:
        return GCLockState(False, None, "no gc lock")
    age = now - info.modified
    if is_stale(age, ttl):
        return GCLockState(False, info.version, f"stale: not refreshed for {age:.0f} s (ttl {ttl:.0f} s)")
    try:
        result = backend.get_small(GC_LOCK, MAX_REF_BYTES)
        lock = unpack(result.data, "gc lock")
    except ObjectNotFoundError:
        return GCLockState(False, None, "no gc lock")
    except FormatError:
        return GCLockState(True, info.version, "unreadable but fresh: honoured until stale")
    if lock.get("released") is True:
        return GCLockState(False, result.version, "released", released=True)
    if holder_is_dead(lock):
        return GCLockState(False, result.version, f"its holder {lock.get('owner', '?')} died on this machine")
    return GCLockState(True, result.version, f"held by {lock.get('owner', '?')}")


def break_gc_lock(backend: Backend, state: GCLockState, owner: str) -> bool:
    """Mark a dead gc's lock released by compare-and-swap against the judged version; False
    if it changed meanwhile (refreshed: its gc lives after all)."""
    assert state.version is not None and not state.held
    try:
        backend.put(GC_LOCK, lock_payload(owner, released=True), mode=PutMode.update(state.version))
    except PreconditionFailedError:
        return False
    return True


def settle_with_gc(backend: Backend, epoch_at_start: Epoch, *, ttl: float, owner: str = "") -> Epoch | None:
    """A save's (tag's, copy's) step 3: read the epoch again, after the lease exists. None when
    no gc can have swept since `epoch_at_start`; otherwise wait for the gcs that may not have
    seen our lease and return the epoch then: the caller re-checks what it will reference."""
    current, _ = read_epoch(backend)
    if not current.swept_since(epoch_at_start):
        return None
    return wait_for_gc(backend, ttl=ttl, owner=owner, seen=current)


def wait_for_gc(backend: Backend, *, ttl: float, owner: str = "", seen: Epoch | None = None,
                clock: ServerClock | None = None, poll: float = 0.2) -> Epoch:
    """Block until no live gc that was running at `seen` runs any more; return the epoch then.

    `seen` must have been read after the caller's lease existed: a gc whose running epoch is
    newer than it started after that, found the lease and deletes nothing, so it is not waited
    for (without this, back-to-back gcs could keep a save waiting for ever). A dead gc's lock
    is broken first (see the module docstring). Ages are judged by the server's clock."""
    clock = clock or probe_clock(backend)
    while True:
        epoch, _ = read_epoch(backend)
        if not epoch.running or (seen is not None and epoch.number > seen.number):
            return epoch
        state = gc_lock_state(backend, ttl=ttl, now=clock.now())
        if not state.held:
            if state.version is None or state.released:
                return epoch
            if break_gc_lock(backend, state, owner or "a save that found the gc dead"):
                return epoch
            continue  # it changed: look again
        time.sleep(poll)


class GCLock:
    """locks/gc held by one gc run (see the module docstring). Use `acquire()`, then
    `release()` in a finally; `prove()` before deleting; `clock.now()` is the server's time."""

    def __init__(self, backend: Backend, owner: str, *, ttl: float):
        self.backend = backend
        self.owner = owner
        self.ttl = ttl
        self.version: str | None = None
        self.lost: str | None = None
        self.clock = ServerClock(self.prove)
        self._mutex = threading.Lock()
        self._proved_at = 0.0  # time.monotonic() when the last proof returned
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lock; False (holding nothing) when a live gc has it."""
        payload = lock_payload(self.owner)
        try:
            self.version = self.backend.put(GC_LOCK, payload, mode=CREATE)
        except TransientError:
            # The create may have landed: a lock of ours that nobody refreshes would make every
            # save wait for a ttl, so take it back if it is ours, then fail.
            self._discard_if_ours(payload)
            raise
        except AlreadyExistsError:
            state = gc_lock_state(self.backend, ttl=self.ttl, now=probe_clock(self.backend).now())
            if state.held or state.version is None:
                return False
            try:  # the holder is dead: take the lock over, once, by compare-and-swap
                self.version = self.backend.put(GC_LOCK, payload, mode=PutMode.update(state.version))
            except PreconditionFailedError:
                return False
        self.clock.sync()
        self._thread = threading.Thread(target=self._refresh, name="ckptstore-gc-lock", daemon=True)
        self._thread.start()
        return True

    def _discard_if_ours(self, payload: bytes) -> None:
        with contextlib.suppress(Exception):
            found = self.backend.get_small(GC_LOCK, MAX_REF_BYTES)
            if found.data == payload:
                self.backend.delete(GC_LOCK, version=found.version)

    def prove(self) -> float:
        """Refresh the lock by compare-and-swap against the version we last wrote; return the
        server's time of that write. Raises GCLockLostError once the lock is not ours."""
        with self._mutex:
            if self.lost is not None:
                raise GCLockLostError(self.lost)
            assert self.version is not None, "prove() before acquire()"
            try:
                version = self.backend.put(GC_LOCK, lock_payload(self.owner), mode=PutMode.update(self.version))
            except PreconditionFailedError:
                self.lost = (f"{GC_LOCK} is no longer the version this gc wrote: another gc took it over, "
                             f"or a save judged this gc dead and broke it; this gc stops")
                raise GCLockLostError(self.lost) from None
            self.version = version
            self._proved_at = time.monotonic()
            return self.backend.head(GC_LOCK).modified

    def ensure_owned(self) -> None:
        """Before a delete: prove again unless the last proof is under ttl/4 old (so every
        delete is issued well within the ttl that others wait before judging the lock dead)."""
        if self.lost is not None or time.monotonic() - self._proved_at >= self.ttl / 4:
            self.prove()

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.prove()
            except GCLockLostError:
                return
            except Exception:
                continue

    def release(self) -> None:
        """Stop refreshing and delete the lock, only at our own version."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None and self.version is not None:
            with contextlib.suppress(Exception):  # a leftover lock goes stale
                self.backend.delete(GC_LOCK, version=self.version)
