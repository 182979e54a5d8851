"""A backend wrapper that injects faults: errors, delays, hangs, lies and crashes.

Wrap any backend and describe what should go wrong with `Fault` values::

    from ckptstore.errors import BackendError, TransientError
    from ckptstore.testing.faults import Fault, FaultInjectingBackend
    from ckptstore.url import open_backend

    backend = FaultInjectingBackend(open_backend(url), [
        # the second and third chunk puts fail as if the server throttled them
        Fault("put", key=r"^chunks/", skip=1, times=2, error=TransientError("SlowDown")),
        # the ref put lands, then the caller sees a timeout (the ambiguous conditional put)
        Fault("put", key=r"^refs/steps/", action="apply_then_fail"),
    ])
    store = Store(backend)
    ...
    assert backend.fired(backend.faults[0]) == 2

Matching: a fault matches a call when its `op` names the operation (or is "*") and its
`key` regex is found (`re.search`) in the key (for `list`, the prefix; for
`cleanup_staging`, the empty string). `exists` is an operation of its own: it calls the
inner backend's `exists`, so a fault on "head" does not see it. So is `get_small` (the
bounded read of refs, the gc epoch, locks and the marker: one request on S3 and GCS),
except on a key that a fault on "head" or "get_range" (or "*") matches: there it is that
head and bounded get_range, each faulted as before. Faults are checked in the
order they were added; the first one that matches *and still has calls left to affect* acts.
Every matching call counts towards `skip`, whether or not an earlier fault acted on it.

Actions:
- ``fail``: raise `error` without touching the inner backend.
- ``delay``: sleep `seconds`, then do the operation.
- ``hang``: block until `release()` (or, when `seconds` > 0, until that timeout, then raise
  `error`); then do the operation.
- ``truncate``: a backend that lies. A put stores only the first `keep` bytes and reports
  success; get / get_range / read_into return (or fill) only `keep` bytes.
- ``apply_then_fail``: do the operation, then raise `error` (the put landed, the caller
  was told it failed: the ambiguous outcome of a timed-out request).
- ``kill_before`` / ``kill_after``: SIGKILL the current process before / after the operation
  (for crash tests in child processes; never use them in the pytest process itself).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ckptstore.backends.base import OVERWRITE, Backend, Buffer, GetResult, ObjectInfo, PutMode
from ckptstore.errors import BackendError, TransientError
from ckptstore.testing.wrappers import ForwardingBackend

__all__ = ["ACTIONS", "OPERATIONS", "Fault", "FaultInjectingBackend"]

OPERATIONS = ("get", "get_range", "get_small", "read_into", "put", "head", "exists", "list", "delete",
              "cleanup_staging")
ACTIONS = ("fail", "delay", "hang", "truncate", "apply_then_fail", "kill_before", "kill_after")

# Operations a truncate can lie about (the others carry no payload).
_TRUNCATABLE = ("get", "get_range", "get_small", "read_into", "put")

T = TypeVar("T")


@dataclass(eq=False)  # identity, not value, equality: two equal faults are still two faults
class Fault:
    """What goes wrong, on which calls. See the module docstring."""

    op: str | tuple[str, ...]
    key: str = ""
    action: str = "fail"
    error: type[BaseException] | BaseException = TransientError
    seconds: float = 0.0
    skip: int = 0
    times: int | None = 1
    keep: int = 0
    _pattern: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ops = (self.op,) if isinstance(self.op, str) else tuple(self.op)
        unknown = [o for o in ops if o != "*" and o not in OPERATIONS]
        if unknown or not ops:
            raise ValueError(f"unknown operation(s) {unknown or ops!r}; known: {OPERATIONS} or '*'")
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; known: {ACTIONS}")
        if self.action == "truncate" and "*" not in ops and not set(ops) & set(_TRUNCATABLE):
            raise ValueError(f"truncate applies only to {_TRUNCATABLE}, not {ops}")
        if self.skip < 0 or (self.times is not None and self.times < 0) or self.keep < 0:
            raise ValueError("skip, times and keep must not be negative")
        self._pattern = re.compile(self.key)

    def matches(self, op: str, key: str) -> bool:
        """Whether a call of `op` on `key` is one this fault looks at."""
        ops = (self.op,) if isinstance(self.op, str) else self.op
        return ("*" in ops or op in ops) and self._pattern.search(key) is not None

    def new_error(self, op: str, key: str) -> BaseException:
        """The exception to raise: an instance as given, or the class built with a message."""
        if isinstance(self.error, BaseException):
            return self.error  # the same instance each time: tests compare identity
        if issubclass(self.error, BackendError):
            return self.error(f"injected {self.action}", key=key, operation=op)
        return self.error(f"injected {self.action} ({op} {key!r})")


class FaultInjectingBackend(ForwardingBackend):
    """Forwards to `inner`, except where a `Fault` says otherwise. Thread-safe.

    `calls` logs (op, key) of every call in order; `fired(fault)` counts the calls a fault
    affected; `release()` unblocks every "hang" (present and future).
    """

    def __init__(self, inner: Backend, faults: Iterable[Fault] = ()):
        super().__init__(inner)
        self.faults: list[Fault] = []
        self.calls: list[tuple[str, str]] = []
        self._seen: dict[int, int] = {}  # id(fault) -> matching calls so far
        self._fired: dict[int, int] = {}  # id(fault) -> calls affected
        self._lock = threading.Lock()
        self._released = threading.Event()
        for fault in faults:
            self.add(fault)

    def add(self, fault: Fault) -> None:
        """Start injecting `fault` (after the faults already added)."""
        with self._lock:
            self.faults.append(fault)
            self._seen[id(fault)] = 0
            self._fired[id(fault)] = 0

    def fired(self, fault: Fault) -> int:
        """How many calls `fault` affected so far."""
        with self._lock:
            return self._fired[id(fault)]

    def release(self) -> None:
        """Unblock every call hanging on a "hang" fault, and let later ones through at once."""
        self._released.set()

    # -- the decision, made atomically so concurrent calls count exactly ----------------

    def _pick(self, op: str, key: str) -> Fault | None:
        with self._lock:
            self.calls.append((op, key))
            chosen = None
            for fault in self.faults:
                if not fault.matches(op, key):
                    continue
                seen = self._seen[id(fault)]
                self._seen[id(fault)] = seen + 1
                if chosen is not None or seen < fault.skip:
                    continue
                if fault.times is not None and self._fired[id(fault)] >= fault.times:
                    continue
                if fault.action == "truncate" and op not in _TRUNCATABLE:
                    continue
                self._fired[id(fault)] += 1
                chosen = fault
            return chosen

    def _run(self, op: str, key: str, call: Callable[[Fault | None], T]) -> T:
        """Apply the fault (if any) around `call`; `call` gets the fault so truncate can lie."""
        fault = self._pick(op, key)
        if fault is None:
            return call(None)
        action = fault.action
        if action == "fail":
            raise fault.new_error(op, key)
        if action == "kill_before":
            _kill_self()
        if action == "delay":
            time.sleep(fault.seconds)
        elif action == "hang":
            released = self._released.wait(fault.seconds if fault.seconds > 0 else None)
            if not released:
                raise fault.new_error(op, key)
        result = call(fault if action == "truncate" else None)
        if action == "kill_after":
            _kill_self()
        if action == "apply_then_fail":
            raise fault.new_error(op, key)
        return result

    # -- operations ------------------------------------------------------------------------

    def get(self, key: str) -> GetResult:
        def call(fault: Fault | None) -> GetResult:
            result = self.inner.get(key)
            return GetResult(result.data[:fault.keep], result.version) if fault else result
        return self._run("get", key, call)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        def call(fault: Fault | None) -> bytes:
            data = self.inner.get_range(key, start, length)
            return data[:fault.keep] if fault else data
        return self._run("get_range", key, call)

    def get_small(self, key: str, limit: int) -> GetResult:
        with self._lock:
            split = any(f.matches(op, key) for f in self.faults for op in ("head", "get_range"))
        if split:  # the faults on head / get_range see the two calls Backend.get_small makes
            return Backend.get_small(self, key, limit)

        def call(fault: Fault | None) -> GetResult:
            result = self.inner.get_small(key, limit)
            return GetResult(result.data[:fault.keep], result.version) if fault else result
        return self._run("get_small", key, call)

    def read_into(self, key: str, start: int, buffers: Sequence[memoryview]) -> int:
        def call(fault: Fault | None) -> int:
            if fault is None:
                return self.inner.read_into(key, start, buffers)
            # Fill only the first `keep` bytes, as a server that closed the stream early would.
            limited, left = [], fault.keep
            for buf in buffers:
                if left <= 0:
                    break
                flat = buf.cast("B")
                limited.append(flat[:left])
                left -= min(left, flat.nbytes)
            return self.inner.read_into(key, start, limited) if limited else 0
        return self._run("read_into", key, call)

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        def call(fault: Fault | None) -> str:
            if fault is None:
                return self.inner.put(key, data, mode=mode)
            parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
            joined = b"".join(memoryview(p).cast("B") for p in parts)
            return self.inner.put(key, joined[:fault.keep], mode=mode)
        return self._run("put", key, call)

    def head(self, key: str) -> ObjectInfo:
        return self._run("head", key, lambda _: self.inner.head(key))

    def exists(self, key: str) -> bool:
        # Through the inner backend's own exists (it may not be a head), faults on "exists".
        return self._run("exists", key, lambda _: self.inner.exists(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Materialised so a fault fires at the call, not at some later iteration.
        return iter(self._run("list", prefix, lambda _: list(self.inner.list(prefix))))

    def delete(self, key: str, *, version: str | None = None) -> None:
        self._run("delete", key, lambda _: self.inner.delete(key, version=version))

    def cleanup_staging(self, min_age: float, *, now: float | None = None) -> int:
        return self._run("cleanup_staging", "",
                         lambda _: ForwardingBackend.cleanup_staging(self, min_age, now=now))

    def __getattr__(self, name: str) -> Any:
        # Backend-specific extras (e.g. S3's multipart cleanup) stay reachable through the wrapper.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # SIGKILL is asynchronous on some platforms: never run past it
