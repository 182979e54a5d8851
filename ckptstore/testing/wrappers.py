"""Backend wrappers for tests: forward every operation, and count or slow down some.

`ForwardingBackend` is the base: subclasses override only what they change.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from ckptstore.backends.base import OVERWRITE, Backend, Buffer, GetResult, ObjectInfo, PutMode


def intercepts_small_reads(wrapper: Backend) -> bool:
    """Whether `wrapper`'s class overrides ForwardingBackend's `head` or `get_range` (the two
    calls of `Backend.get_small`) without overriding `get_small` itself."""
    cls = type(wrapper)
    if cls.get_small is not ForwardingBackend.get_small:
        return False
    return cls.head is not ForwardingBackend.head or cls.get_range is not ForwardingBackend.get_range


class ForwardingBackend(Backend):
    """Passes every operation to `inner` unchanged."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.url = inner.url
        self.needs_canary = inner.needs_canary

    def get(self, key: str) -> GetResult:
        return self.inner.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.inner.get_range(key, start, length)

    def read_into(self, key: str, start: int, buffers: Sequence[memoryview]) -> int:
        return self.inner.read_into(key, start, buffers)

    def get_small(self, key: str, limit: int) -> GetResult:
        """The inner backend's own get_small (one request on S3 and GCS), unless this wrapper
        intercepts `head` or `get_range`: then it is that head and bounded read through this
        wrapper (`Backend.get_small`), so what a subclass does to either still applies."""
        if intercepts_small_reads(self):
            return Backend.get_small(self, key, limit)
        return self.inner.get_small(key, limit)

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        return self.inner.put(key, data, mode=mode)

    def head(self, key: str) -> ObjectInfo:
        return self.inner.head(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str, *, version: str | None = None) -> None:
        self.inner.delete(key, version=version)

    def close(self) -> None:
        self.inner.close()

    def cleanup_staging(self, min_age: float, *, now: float | None = None) -> int:
        cleanup = getattr(self.inner, "cleanup_staging", None)
        return int(cleanup(min_age, now=now)) if callable(cleanup) else 0


class CountingBackend(ForwardingBackend):
    """Counts requests as (operation, first key segment), e.g. ("put", "chunks"), logs every
    (operation, key) in order, and sums the bytes reads returned by first key segment."""

    def __init__(self, inner: Backend):
        super().__init__(inner)
        self.calls: Counter[tuple[str, str]] = Counter()
        self.log: list[tuple[str, str]] = []
        self.read_bytes: Counter[str] = Counter()  # bytes reads returned, by first key segment
        self._lock = threading.Lock()

    def _count(self, operation: str, key: str) -> None:
        with self._lock:
            self.calls[(operation, key.split("/", 1)[0])] += 1
            self.log.append((operation, key))

    def _read(self, key: str, n: int) -> None:
        with self._lock:
            self.read_bytes[key.split("/", 1)[0]] += n

    def get(self, key: str) -> GetResult:
        self._count("get", key)
        result = super().get(key)
        self._read(key, len(result.data))
        return result

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self._count("get", key)
        data = super().get_range(key, start, length)
        self._read(key, len(data))
        return data

    def read_into(self, key: str, start: int, buffers: Sequence[memoryview]) -> int:
        self._count("get", key)
        n = super().read_into(key, start, buffers)
        self._read(key, n)
        return n

    def get_small(self, key: str, limit: int) -> GetResult:
        self._count("get", key)  # one request where the inner backend reads bytes and version at once
        result = self.inner.get_small(key, limit)
        self._read(key, len(result.data))
        return result

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        self._count("put", key)
        return super().put(key, data, mode=mode)

    def head(self, key: str) -> ObjectInfo:
        self._count("head", key)
        return super().head(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._count("list", prefix)
        return super().list(prefix)

    def delete(self, key: str, *, version: str | None = None) -> None:
        self._count("delete", key)
        super().delete(key, version=version)


class SlowPutBackend(ForwardingBackend):
    """Sleeps `delay` seconds before each put whose key starts with `prefix`."""

    def __init__(self, inner: Backend, *, prefix: str, delay: float):
        super().__init__(inner)
        self.prefix, self.delay = prefix, delay

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        if key.startswith(self.prefix):
            time.sleep(self.delay)
        return super().put(key, data, mode=mode)


class GatedDeleteBackend(ForwardingBackend):
    """Blocks the delete of `key` until `gate` is set; sets `reached` when it gets there."""

    def __init__(self, inner: Backend, *, key: str, gate: threading.Event):
        super().__init__(inner)
        self.key, self.gate, self.reached = key, gate, threading.Event()

    def delete(self, key: str, *, version: str | None = None) -> None:
        if key == self.key:
            self.reached.set()
            self.gate.wait(timeout=60)
        super().delete(key, version=version)


class HeadHookBackend(ForwardingBackend):
    """Calls `after()` once, right after the first head of `key` returns. It intercepts head, so
    its get_small is a head and then a bounded read (`ForwardingBackend.get_small`): `after` can
    replace the object between the two, as on a backend without a single-request get_small."""

    def __init__(self, inner: Backend, *, key: str, after: Callable[[], None]):
        super().__init__(inner)
        self.key, self.after, self.fired = key, after, False

    def head(self, key: str) -> ObjectInfo:
        info = super().head(key)
        if key == self.key and not self.fired:
            self.fired = True
            self.after()
        return info


class SlowDeleteBackend(ForwardingBackend):
    """Sleeps `delay` seconds before every delete (a slow gc sweep widens its races)."""

    def __init__(self, inner: Backend, *, delay: float):
        super().__init__(inner)
        self.delay = delay

    def delete(self, key: str, *, version: str | None = None) -> None:
        time.sleep(self.delay)
        super().delete(key, version=version)


class SimulatedClock:
    """A clock that moves only when something sleeps on it: `now()` and `sleep(seconds)`.

    Give `sleep` and `now` to `RetryingBackend(sleep=..., clock=...)` and `now` to
    `PrefixRateLimitedBackend(clock=...)`: backoff then refills the rate limiter's buckets
    without real waiting, and `now()` at the end is the time the retries would have taken.
    One thread sleeping at a time is exact; concurrent sleeps add up here where real ones
    overlap, so a many-threaded run over-counts time."""

    def __init__(self, start: float = 0.0):
        self._now = start
        self.slept = 0.0  # seconds slept in all
        self.sleeps = 0
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self._now += max(0.0, seconds)
            self.slept += max(0.0, seconds)
            self.sleeps += 1


def fan_out_prefix(key: str) -> str:
    """The key's first two path segments with their slashes (``chunks/ab/``; a key with fewer
    segments: its first one, ``refs/``): S3's per-prefix request limits as they apply once a
    bucket has been partitioned along the 256 fan-out folders."""
    parts = key.split("/")
    return "/".join(parts[:2]) + "/" if len(parts) > 2 else parts[0] + "/"


class PrefixRateLimitedBackend(ForwardingBackend):
    """Refuses puts beyond `rate` per second per key prefix, as S3 does (3,500 PUT/COPY/POST/
    DELETE per second per partitioned prefix), with the error the S3 backend raises for a 503
    SlowDown (`backends.s3.typed_error`: a TransientError, which RetryingBackend retries).

    Each prefix (`prefix(key)`, default `fan_out_prefix`; ``lambda key: ""`` for a bucket not
    yet partitioned) has a token bucket of `burst` tokens (default: one second's worth),
    refilled at `rate` per second of `clock` (default `time.monotonic`; a SimulatedClock's
    `now` for deterministic tests). A put takes a token or is refused without reaching
    `inner`. `accepted` / `refused` count puts per prefix."""

    def __init__(self, inner: Backend, *, rate: float = 3500.0, burst: float | None = None,
                 prefix: Callable[[str], str] = fan_out_prefix, clock: Callable[[], float] = time.monotonic):
        super().__init__(inner)
        self.rate = rate
        self.burst = rate if burst is None else burst
        self.prefix, self.clock = prefix, clock
        self.accepted: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self._buckets: dict[str, tuple[float, float]] = {}  # prefix -> (tokens, at)
        self._lock = threading.Lock()

    def _admit(self, key: str) -> bool:
        name = self.prefix(key)
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(name, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            admitted = tokens >= 1.0
            self._buckets[name] = (tokens - 1.0 if admitted else tokens, now)
            (self.accepted if admitted else self.refused)[name] += 1
            return admitted

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        if not self._admit(key):
            from ckptstore.backends.s3 import typed_error

            raise typed_error("SlowDown", 503, key, "put", mode)
        return super().put(key, data, mode=mode)
