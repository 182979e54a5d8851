"""Retrying transient backend failures: `RetryingBackend` wraps any backend.

Every operation that fails with `TransientError` (throttling, 5xx, timeouts, resets) is tried
again with exponential backoff and jitter, up to `attempts` tries in all and never starting a
new try (nor sleeping towards one) past `deadline` seconds after the first; then the typed
`TransientError` is raised, saying how many attempts were made. Every other error passes
straight through. A listing's deadline counts from its last progress (a page received), so
a long listing is not cut short.

The deadline is shared with the SDK underneath (`ckptstore.deadline`): each try runs with the
moment the operation must end, and the S3 and GCS backends stop their own retries and cut
their request timeouts to what is left. `deadline` defaults to the inner backend's own
(storage option `deadline`, 60 s), else DEFAULT_DEADLINE.

Why retrying every operation is safe:
- Reads, lists, deletes and overwrite puts are idempotent. A list that fails half-way is
  listed again from the start, skipping keys already yielded.
- A delete-if-version whose try landed finds the object absent on its retry: a no-op, so
  it succeeds. If the key was re-created in between, the retry raises
  PreconditionFailedError and the new object stays; that error, like every non-transient
  one, is never retried.
- Content-addressed puts (chunks, manifests) write the same bytes under the same key, however
  often they land.
- A *conditional* put (create-only, update-if-version) that failed transiently may have
  landed; its retry then sees AlreadyExistsError / PreconditionFailedError caused by our own
  first try. Only in that case (an earlier try of this same call was ambiguous) the wrapper
  reads the object back: if it holds exactly our bytes, our write landed and the put
  succeeds with that version. Callers make conditional payloads unique (refs carry a random
  commit id, leases and locks an owner and a time), so "the same bytes" means "our write".
  Without this, a retried lease or gc-lock create would find its own object and fail or
  stand down. `ckptstore.commit` resolves ambiguous ref puts by commit id on its own as well.

Interplay with the SDKs' own retries (the totals stay bounded by `deadline`):
- S3 (boto3 "standard" mode, `max_attempts=5` in backends/s3.py) retries throttling, 5xx and
  connection errors itself, with jittered backoff. What reaches this layer is a request that
  failed 5 times; `attempts` tries here mean up to 5 x `attempts` requests, but none starts,
  and none waits for an answer, past the deadline.
- GCS (google-cloud-storage's retry predicate, uploads included in 3.x) retries likewise, at
  most `max_attempts=5` tries per call, its timeout being what is left of the deadline.
- Local and memory backends never raise TransientError; wrapping them costs one call frame.
Worst case per operation against a dead endpoint: `deadline`, plus (S3 only) the connect
timeout of a request started just before it (10 s) or one boto3 backoff begun just before it
(at most 16 s with 5 attempts). Measured per operation: 1.8-2.0 s with a 2 s deadline, 60.1 s
at the default against an endpoint that never answers, 6 s (S3) and 14 s (GCS) refused.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from ckptstore.backends.base import (
    OVERWRITE,
    Backend,
    Buffer,
    DeleteFailures,
    GetResult,
    ObjectInfo,
    PutMode,
)
from ckptstore.deadline import DEFAULT_DEADLINE, check_seconds, deadline_at
from ckptstore.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    ObjectNotFoundError,
    PreconditionFailedError,
    TransientError,
)

__all__ = ["DEFAULT_ATTEMPTS", "DEFAULT_DEADLINE", "DEFAULT_RETRIES", "RetryingBackend"]

#: Tries per operation (the first plus DEFAULT_RETRIES retries).
DEFAULT_ATTEMPTS = 5
DEFAULT_RETRIES = DEFAULT_ATTEMPTS - 1
_INNER = object()  # `deadline` not given: the inner backend's, else DEFAULT_DEADLINE

T = TypeVar("T")


def _joined(data: Buffer | Sequence[Buffer]) -> bytes:
    if isinstance(data, bytes):
        return data
    parts = [data] if isinstance(data, (bytearray, memoryview)) else data
    return b"".join(memoryview(p).cast("B") for p in parts)


class RetryingBackend(Backend):
    """Forwards to `inner`, retrying TransientError with exponential backoff and jitter.

    The n-th retry waits a random time in [d/2, d], d = min(max_delay, base_delay * 2**n).
    `sleep` is injectable so tests run without waiting; `clock` (seconds, default
    `time.monotonic()`) is what the deadline is judged by, so a test whose `sleep` only advances
    a simulated clock (ckptstore.testing.wrappers.SimulatedClock) passes that clock's `now`
    too and its deadline runs on simulated time. See the module docstring.
    """

    def __init__(self, inner: Backend, *, attempts: int = DEFAULT_ATTEMPTS, base_delay: float = 0.2,
                 max_delay: float = 5.0, deadline: Any = _INNER, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] | None = None):
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise InvalidArgumentError(f"attempts must be an int of at least 1, got {attempts!r}")
        for name, value in (("base_delay", base_delay), ("max_delay", max_delay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidArgumentError(f"{name} must be a number of seconds, not negative, got {value!r}")
        if deadline is _INNER:
            deadline = getattr(inner, "deadline", DEFAULT_DEADLINE)
        check_seconds("deadline", deadline, optional=True)
        self.inner = inner
        self.url = inner.url
        self.needs_canary = inner.needs_canary
        self.max_delete_batch = inner.max_delete_batch
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.deadline = deadline
        self._sleep = sleep
        self._clock = clock

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0-based)."""
        delay = min(self.max_delay, self.base_delay * 2**retry)
        return random.uniform(delay / 2, delay)

    def _gave_up(self, operation: str, key: str, tries: int, last: TransientError) -> TransientError:
        error = TransientError(f"gave up after {tries} attempt{'s' if tries != 1 else ''}; last error: {last}")
        error.key, error.operation = key, operation  # the message already names them, via `last`
        error.attempts = tries  # type: ignore[attr-defined]
        return error

    def _now(self) -> float:
        return time.monotonic() if self._clock is None else self._clock()

    def _ending(self, since: float) -> contextlib.AbstractContextManager[None]:
        """The deadline of a try of an operation begun (or last making progress) at `since`,
        for the layers below (ckptstore.deadline), which count in `time.monotonic()`: the time
        left by our clock is carried over to it."""
        if self.deadline is None:
            return contextlib.nullcontext()
        if self._clock is not None:
            since = time.monotonic() - (self._clock() - since)
        return deadline_at(since, self.deadline)

    def _wait_or_give_up(self, operation: str, key: str, tries: int, last: TransientError, since: float) -> None:
        """After `tries` failed tries: sleep before the next one, or raise when out of tries, or
        when the sleep would end past the deadline (no new try could start in time)."""
        delay = self.backoff(tries - 1)
        out_of_time = self.deadline is not None and self._now() + delay - since >= self.deadline
        if tries >= self.attempts or out_of_time:
            raise self._gave_up(operation, key, tries, last) from last
        self._sleep(delay)

    def _retrying(self, operation: str, key: str, call: Callable[[int], T]) -> T:
        """Run `call(try_number)` until it returns, raises a non-transient error, or we give up."""
        started = self._now()
        tries = 0
        while True:
            try:
                with self._ending(started):
                    return call(tries)
            except TransientError as exc:
                tries += 1
                self._wait_or_give_up(operation, key, tries, exc, started)

    # -- reads -----------------------------------------------------------------------------
    def get(self, key: str) -> GetResult:
        return self._retrying("get", key, lambda _: self.inner.get(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._retrying("get_range", key, lambda _: self.inner.get_range(key, start, length))

    def read_into(self, key: str, start: int, buffers: Sequence[memoryview]) -> int:
        # A failed try may have filled part of the buffers; the next one overwrites them.
        return self._retrying("read_into", key, lambda _: self.inner.read_into(key, start, buffers))

    def get_small(self, key: str, limit: int) -> GetResult:
        # One read (bytes and version together) retried whole; FormatError is never retried.
        return self._retrying("get_small", key, lambda _: self.inner.get_small(key, limit))

    def head(self, key: str) -> ObjectInfo:
        return self._retrying("head", key, lambda _: self.inner.head(key))

    def exists(self, key: str) -> bool:
        return self._retrying("exists", key, lambda _: self.inner.exists(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under `prefix`; a listing that fails part-way starts over and skips
        the keys already yielded (order is not guaranteed on every server, so no resume token)."""
        yielded: set[str] = set()
        progress = self._now()  # the deadline counts from here: the start, or the last key received
        tries = 0
        while True:
            try:
                listing = self.inner.list(prefix)
                while True:
                    # Only the inner step runs under the deadline, never the caller's work between keys.
                    with self._ending(progress):
                        info = next(listing, None)
                    if info is None:
                        return
                    progress = self._now()
                    if info.key not in yielded:
                        yielded.add(info.key)
                        yield info
            except TransientError as exc:
                tries += 1
                self._wait_or_give_up("list", prefix, tries, exc, progress)

    # -- writes ----------------------------------------------------------------------------
    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        if mode.kind == "overwrite":
            return self._retrying("put", key, lambda _: self.inner.put(key, data, mode=mode))

        def conditional(try_number: int) -> str:
            try:
                return self.inner.put(key, data, mode=mode)
            except (AlreadyExistsError, PreconditionFailedError):
                # Only after an ambiguous try can the conflict be our own earlier write.
                version = self._holds(key, data) if try_number > 0 else None
                if version is None:
                    raise
                return version

        return self._retrying("put", key, conditional)

    def _holds(self, key: str, data: Buffer | Sequence[Buffer]) -> str | None:
        """The version of `key` if it holds exactly `data` (our earlier try landed), else None."""
        ours = _joined(data)
        try:
            if self.head(key).size != len(ours):
                return None  # cheap refusal before downloading someone else's object
            current = self.get(key)
        except ObjectNotFoundError:
            return None
        return current.version if current.data == ours else None

    def delete(self, key: str, *, version: str | None = None) -> None:
        self._retrying("delete", key, lambda _: self.inner.delete(key, version=version))

    def delete_many(self, keys: Sequence[str]) -> DeleteFailures:
        """The inner batch delete; only the keys that failed with TransientError are tried
        again (with the backoff and deadline of any operation). Every other failure, and a
        transient one still failing when out of tries, is returned."""
        started = self._now()
        pending: Sequence[str] = keys
        failed: DeleteFailures = []
        tries = 0
        while True:
            with self._ending(started):
                failures = self.inner.delete_many(pending)
            tries += 1
            transient = [(key, exc) for key, exc in failures if isinstance(exc, TransientError)]
            failed += [(key, exc) for key, exc in failures if not isinstance(exc, TransientError)]
            if not transient:
                return failed
            try:
                self._wait_or_give_up("delete_many", transient[0][0], tries, transient[0][1], started)
            except TransientError:
                return failed + [(key, self._gave_up("delete_many", key, tries, exc)) for key, exc in transient]
            pending = [key for key, _ in transient]

    # -- the rest ---------------------------------------------------------------------------
    def cleanup_staging(self, min_age: float, *, now: float | None = None) -> int:
        """The inner backend's crash-leftover cleanup (gc calls it with the server's `now`),
        retried; 0 if it has none."""
        cleanup = getattr(self.inner, "cleanup_staging", None)
        if not callable(cleanup):
            return 0
        return self._retrying("cleanup_staging", "", lambda _: int(cleanup(min_age, now=now)))

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Backend-specific attributes (bucket, prefix, root, ...) read through the wrapper.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"RetryingBackend({self.inner!r}, attempts={self.attempts})"
