"""Leases and the gc epoch: how saves, loads and gc stay out of each other's way.

Objects under locks/ (all small msgpack maps, see docs/FORMAT.md "Garbage collection"):

    locks/save-<id>, locks/load-<id>   a lease held for the duration of one save or load,
                                       refreshed every ttl/4 by a background thread
    locks/gc                           one gc at a time (create-only)
    locks/epoch                        the gc epoch: a counter and whether a gc is running,
                                       changed only by compare-and-swap

A lease is stale when it has not been refreshed for `ttl` seconds (its holder died); stale
leases are ignored by gc and removed by `clear_stale_locks`. A lease or the gc lock whose
holder ran on this machine and is gone (ckptstore.liveness) counts as released at once: a
killed save does not make gc stand down, nor a killed gc hold up saves, for `ttl`.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from ckptstore import keys
from ckptstore.backends.base import CREATE, OVERWRITE, Backend, PutMode
from ckptstore.errors import (
    AlreadyExistsError,
    FormatError,
    ObjectNotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
)
from ckptstore.liveness import holder_fields, holder_is_dead
from ckptstore.manifest import MAX_REF_BYTES

DEFAULT_TTL = 600.0
GC_LOCK = keys.lock_key("gc")
EPOCH = keys.lock_key("epoch")
LEASE_KINDS = ("save", "load")


def _pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": 1, **obj}, use_bin_type=True)


def _unpack(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False) if len(data) < 65536 else None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise FormatError(f"corrupt {what}: {exc}") from exc
    if not isinstance(obj, dict):
        raise FormatError(f"corrupt {what}")
    return obj


@dataclass(frozen=True)
class LockInfo:
    """A lease or lock as `ckptstore locks` lists it."""

    name: str
    kind: str  # save, load, gc, epoch, canary
    owner: str
    age_seconds: float  # since the last refresh (server time of the last write)
    stale: bool
    holder_dead: bool = False  # written by a process of this machine that is gone (liveness.py)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _kind(key: str) -> str:
    name = key[len(keys.LOCKS):]
    return name.split("-", 1)[0] if "-" in name else name


def server_now(backend: Backend, probe_key: str) -> float:
    """The server's idea of now: the modification time of an object we just wrote.

    Comparing server timestamps with server timestamps keeps lease ages honest when the
    client's clock is off.
    """
    try:
        return max(backend.head(probe_key).modified, 0.0)
    except ObjectNotFoundError:
        return time.time()


def lock_payload(owner: str) -> bytes:
    """The bytes of a lease or locks/gc: its owner, when it was refreshed, and who holds it
    (liveness.py)."""
    return _pack({"owner": owner, "refreshed": time.time(), **holder_fields()})


def list_locks(backend: Backend, *, ttl: float = DEFAULT_TTL, now: float | None = None) -> list[LockInfo]:
    """Every object under locks/, with owner, age and staleness."""
    now = time.time() if now is None else now
    found = []
    for info in backend.list(keys.LOCKS):
        owner, dead = "?", False
        with contextlib.suppress(ObjectNotFoundError, FormatError):
            lock = _unpack(backend.get_small(info.key, MAX_REF_BYTES).data, "lock")
            owner, dead = str(lock.get("owner", "?")), holder_is_dead(lock)
        age = max(0.0, now - info.modified)
        kind = _kind(info.key)
        stale = kind in (*LEASE_KINDS, "gc", "canary") and age > ttl
        found.append(LockInfo(info.key, kind, owner, age, stale, dead))
    return found


def fresh_leases(backend: Backend, *, ttl: float, now: float) -> list[LockInfo]:
    """Save and load leases refreshed within `ttl` whose holders are not provably dead."""
    return [lock for lock in list_locks(backend, ttl=ttl, now=now)
            if lock.kind in LEASE_KINDS and not lock.stale and not lock.holder_dead]


class Lease:
    """A lease object held while a save or load runs; refreshed in the background."""

    def __init__(self, backend: Backend, kind: str, owner: str, *, ttl: float = DEFAULT_TTL,
                 required: bool = True):
        self.backend = backend
        self.required = required  # False: read-only credentials just go without a lease
        self.held = False
        self.key = keys.lock_key(f"{kind}-{secrets.token_hex(8)}")
        self.owner = owner
        self.ttl = ttl
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        return lock_payload(self.owner)

    def __enter__(self) -> Lease:
        try:
            self.backend.put(self.key, self._payload(), mode=CREATE)
        except PermissionDeniedError:
            if self.required:
                raise
            return self
        self.held = True
        self._thread = threading.Thread(target=self._refresh, name="ckptstore-lease", daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            with contextlib.suppress(Exception):  # a missed refresh is retried next period
                self.backend.put(self.key, self._payload(), mode=OVERWRITE)

    def __exit__(self, *exc: object) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Exception):  # a leftover lease goes stale and is ignored
            self.backend.delete(self.key)


# -- the gc epoch ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Epoch:
    """The gc epoch: bumped when a gc starts (running=True) and when it ends.

    `last_sweep` is the number of the last epoch in which a gc swept; a gc that stood down
    leaves it alone, so saves only re-check their objects after a real sweep.
    """

    number: int
    running: bool
    owner: str = ""
    last_sweep: int = 0

    def swept_since(self, earlier: Epoch) -> bool:
        """Whether a gc may have deleted objects between `earlier` and this epoch."""
        return earlier.running or self.running or self.last_sweep > earlier.number


def read_epoch(backend: Backend) -> tuple[Epoch, str | None]:
    """The current epoch and its version (None when no gc ever ran)."""
    try:
        result = backend.get_small(EPOCH, MAX_REF_BYTES)
    except ObjectNotFoundError:
        return Epoch(0, False), None
    obj = _unpack(result.data, "gc epoch")
    number, running, last_sweep = obj.get("epoch"), obj.get("running"), obj.get("last_sweep", 0)
    if not isinstance(number, int) or not isinstance(running, bool) or not isinstance(last_sweep, int):
        raise FormatError("corrupt gc epoch")
    return Epoch(number, running, str(obj.get("owner", "")), last_sweep), result.version


def set_epoch(backend: Backend, *, running: bool, owner: str, swept_in: int | None = None) -> Epoch:
    """Bump the epoch by compare-and-swap (retrying on a lost race); return the new epoch.

    `swept_in`: the epoch number in which this gc swept, recorded as `last_sweep`.
    """
    while True:
        current, version = read_epoch(backend)
        last_sweep = current.last_sweep if swept_in is None else max(current.last_sweep, swept_in)
        new = Epoch(current.number + 1, running, owner, last_sweep)
        payload = _pack({"epoch": new.number, "running": running, "owner": owner, "last_sweep": last_sweep})
        try:
            backend.put(EPOCH, payload, mode=CREATE if version is None else PutMode.update(version))
            return new
        except (AlreadyExistsError, PreconditionFailedError):
            continue


def gc_lock_alive(backend: Backend, *, ttl: float) -> bool:
    """Whether a gc holds a fresh gc lock and is not provably dead (a process of this
    machine that is gone: then no one need wait `ttl` for its lock to go stale)."""
    try:
        info = backend.head(GC_LOCK)
        if time.time() - info.modified > ttl:
            return False
        lock = _unpack(backend.get_small(GC_LOCK, MAX_REF_BYTES).data, "gc lock")
    except ObjectNotFoundError:
        return False
    except FormatError:
        return True  # unreadable but fresh: honour it until it is stale
    return not holder_is_dead(lock)


def wait_for_gc(backend: Backend, *, ttl: float, poll: float = 0.2) -> Epoch:
    """Block until no live gc is running; return the epoch seen then."""
    while True:
        epoch, _ = read_epoch(backend)
        if not epoch.running or not gc_lock_alive(backend, ttl=ttl):
            return epoch  # idle, or the running gc died (its lock is gone or stale)
        time.sleep(poll)


@contextlib.contextmanager
def gc_lock(backend: Backend, owner: str, *, ttl: float) -> Iterator[bool]:
    """Hold locks/gc for the block; yields False (holding nothing) if a live gc has it."""
    payload = lock_payload(owner)
    try:
        backend.put(GC_LOCK, payload, mode=CREATE)
    except AlreadyExistsError:
        try:
            current = backend.get_small(GC_LOCK, MAX_REF_BYTES)
        except ObjectNotFoundError:
            yield False
            return
        if gc_lock_alive(backend, ttl=ttl):
            yield False
            return
        try:  # the holder died: take the lock over, once, by compare-and-swap
            backend.put(GC_LOCK, payload, mode=PutMode.update(current.version))
        except PreconditionFailedError:
            yield False
            return
    try:
        yield True
    finally:
        with contextlib.suppress(Exception):
            backend.delete(GC_LOCK)
