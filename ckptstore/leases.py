"""Leases: how saves and loads tell gc to stand down, and how anyone lists them.

Objects under locks/ (all small msgpack maps, see docs/FORMAT.md "Garbage collection"):

    locks/save-<id>, locks/load-<id>   a lease held for the duration of one save or load,
                                       refreshed every ttl/4 by a background thread
    locks/gc                           one gc at a time (ckptstore/gclock.py)
    locks/epoch                        the gc epoch (ckptstore/epoch.py)
    locks/clock-<id>                   a scratch object read for the server's time (serverclock.py)

A lease is stale when the server has not seen it refreshed for `ttl` seconds (its holder
died): ages are the server's time minus the server's modification time, never the local
clock (serverclock.py). Stale leases are ignored by gc and removed by `clear_stale_locks`. A
lease whose holder ran on this machine and is gone (ckptstore.liveness) counts as released at
once: a killed save does not make gc stand down for `ttl`.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from ckptstore import keys
from ckptstore.backends.base import CREATE, OVERWRITE, Backend
from ckptstore.errors import FormatError, ObjectNotFoundError, PermissionDeniedError, PreconditionFailedError
from ckptstore.liveness import holder_is_dead
from ckptstore.lockfile import lock_payload, unpack
from ckptstore.manifest import MAX_REF_BYTES
from ckptstore.serverclock import CLOCK_RESOLUTION, PROBE_KIND

DEFAULT_TTL = 600.0
LEASE_KINDS = ("save", "load")
#: Kinds whose objects go stale when not refreshed (the epoch never does).
EXPIRING_KINDS = (*LEASE_KINDS, "gc", "canary", PROBE_KIND)


@dataclass(frozen=True)
class LockInfo:
    """A lease or lock as `ckptstore locks` lists it."""

    name: str
    kind: str  # save, load, gc, epoch, canary, clock
    owner: str
    age_seconds: float  # since the last refresh, by the server's clock
    stale: bool
    holder_dead: bool = False  # written by a process of this machine that is gone (liveness.py)
    version: str = ""  # the version listed: clear_stale_locks deletes only that version

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _kind(key: str) -> str:
    name = key[len(keys.LOCKS):]
    return name.split("-", 1)[0] if "-" in name else name


def is_stale(age: float, ttl: float) -> bool:
    """Whether an object `age` seconds old (server clock) has outlived `ttl`, beyond doubt:
    the age must exceed the TTL by the servers' timestamp resolution."""
    return age > ttl + CLOCK_RESOLUTION


def list_locks(backend: Backend, *, ttl: float = DEFAULT_TTL, now: float) -> list[LockInfo]:
    """Every object under locks/, with owner, age and staleness; `now` is the server's time
    (serverclock.ServerClock), never the local clock."""
    found = []
    for info in backend.list(keys.LOCKS):
        owner, dead = "?", False
        with contextlib.suppress(ObjectNotFoundError, FormatError):
            lock = unpack(backend.get_small(info.key, MAX_REF_BYTES).data, "lock")
            owner, dead = str(lock.get("owner", "?")), holder_is_dead(lock)
        age = max(0.0, now - info.modified)
        kind = _kind(info.key)
        stale = kind in EXPIRING_KINDS and is_stale(age, ttl)
        found.append(LockInfo(info.key, kind, owner, age, stale, dead, info.version))
    return found


def fresh_leases(backend: Backend, *, ttl: float, now: float) -> list[LockInfo]:
    """Save and load leases refreshed within `ttl` (server time `now`) whose holders are not
    provably dead."""
    return [lock for lock in list_locks(backend, ttl=ttl, now=now)
            if lock.kind in LEASE_KINDS and not lock.stale and not lock.holder_dead]


def clear_stale(backend: Backend, *, ttl: float, now: float) -> list[LockInfo]:
    """Delete the leases and locks that are stale at server time `now`, each only at the
    version that was listed (one refreshed meanwhile stays); returns the deleted ones."""
    cleared = []
    for lock in list_locks(backend, ttl=ttl, now=now):
        if not lock.stale:
            continue
        try:
            backend.delete(lock.name, version=lock.version)
        except PreconditionFailedError:
            continue  # refreshed since we listed it: alive after all
        cleared.append(lock)
    return cleared


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
        except PermissionDeniedError as exc:
            if self.required:
                raise
            logging.getLogger("ckptstore").warning(
                "no lease for this read (%s): a gc might run during it; with read-only access that "
                "is expected (gc's min_age protects recent data)", exc)
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
