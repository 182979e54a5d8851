"""The server's clock: the only clock that lease and lock ages are judged by.

A lease's age is the server's time now minus the server's modification time of the lease.
Taking "now" from the local clock instead lets a client whose clock runs ahead judge a live
gc dead, or delete a live save's lease (issue: clock skew). So every party reads the server's
time off an object it has just written (the server stamps its modification time), and
between two such reads extrapolates with the local *monotonic* clock, which measures elapsed
time well even when the wall clock is off by hours.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable

from ckptstore import keys
from ckptstore.backends.base import CREATE, Backend
from ckptstore.lockfile import lock_payload

#: Servers stamp modification times at this resolution or better (S3's LastModified has
#: whole seconds). An age must exceed a TTL by this much before anything is judged stale,
#: so a truncated timestamp can never make a live holder look dead.
CLOCK_RESOLUTION = 1.0

PROBE_KIND = "clock"


class ServerClock:
    """`now()`: the server's time, from the last `sync()` plus local monotonic time since.

    `anchor` writes an object and returns the server's modification time of it. The anchor
    is taken as of when the write *returned*, so `now()` never runs ahead of the server:
    ages come out short, never long, and a short age only ever keeps a holder alive.
    """

    def __init__(self, anchor: Callable[[], float]):
        self._anchor = anchor
        self._server: float | None = None
        self._monotonic = 0.0

    def sync(self) -> float:
        server = self._anchor()
        self._server, self._monotonic = server, time.monotonic()
        return server

    def now(self) -> float:
        if self._server is None:
            return self.sync()
        return self._server + (time.monotonic() - self._monotonic)


def probe_anchor(backend: Backend) -> Callable[[], float]:
    """An anchor for a party that holds no object of its own: write a scratch object under
    locks/ (create-only), read its server time, delete it."""

    def anchor() -> float:
        key = keys.lock_key(f"{PROBE_KIND}-{secrets.token_hex(8)}")
        backend.put(key, lock_payload("server clock probe"), mode=CREATE)
        try:
            return backend.head(key).modified
        finally:
            with contextlib.suppress(Exception):  # a leftover probe goes stale and is cleared
                backend.delete(key)

    return anchor


def probe_clock(backend: Backend) -> ServerClock:
    """A ServerClock anchored by scratch writes (needs write access to locks/)."""
    return ServerClock(probe_anchor(backend))
