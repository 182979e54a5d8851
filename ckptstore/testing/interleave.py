"""Forcing one interleaving of concurrent saves, gcs and tags, for deterministic tests.

A `HookBackend` wraps a backend and runs a callback right before or right after chosen
operations (matched by operation name and a key regex). Two parties (say a save and a gc,
each on its own thread with its own wrapped view of one store) then meet at exactly the
points a test names, through `threading.Event`s their hooks set and wait for::

    listed = threading.Event(); headed = threading.Event()
    gc_view = HookBackend(inner, [Hook("list", "^refs/", before=lambda: headed.wait(10))])
    save_view = HookBackend(inner, [Hook("put", "^locks/save-", before=lambda: listed.wait(10)), ...])

`get_small` (refs, the gc epoch, locks, the marker) is one operation, "get_small", where the
inner backend reads bytes and version at once; while a hook on "head" or "get_range" could
still claim the key, it is a head and a bounded get_range instead, as `Backend.get_small` does.

Random stress runs almost never hit the narrow windows the gc protocol guards (a 45 s
stress run found none of issue 12's five bugs); a forced interleaving hits them every time.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ckptstore.backends.base import OVERWRITE, Backend, Buffer, GetResult, ObjectInfo, PutMode
from ckptstore.testing.wrappers import ForwardingBackend


@dataclass(eq=False)
class Hook:
    """Call `before()` / `after()` around the first `times` calls of `op` on a key matching
    `key` (re.search; for `list`, the prefix). `times=None`: every call."""

    op: str
    key: str = ""
    before: Callable[[], object] | None = None
    after: Callable[[], object] | None = None
    times: int | None = 1
    fired: int = 0
    _pattern: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pattern = re.compile(self.key)

    def claims(self, op: str, key: str) -> bool:
        return op == self.op and bool(self._pattern.search(key)) and (self.times is None or self.fired < self.times)


class HookBackend(ForwardingBackend):
    """Runs the hooks of `hooks` around matching operations (see the module docstring)."""

    def __init__(self, inner: Backend, hooks: Sequence[Hook] = ()):
        super().__init__(inner)
        self.hooks = list(hooks)
        self._lock = threading.Lock()

    def _around(self, op: str, key: str, call: Callable[[], object]) -> object:
        with self._lock:
            hooks = [h for h in self.hooks if h.claims(op, key)]
            for hook in hooks:
                hook.fired += 1
        for hook in hooks:
            if hook.before is not None:
                hook.before()
        result = call()
        for hook in hooks:
            if hook.after is not None:
                hook.after()
        return result

    def get(self, key: str) -> GetResult:
        return self._around("get", key, lambda: self.inner.get(key))  # type: ignore[return-value]

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._around("get_range", key, lambda: self.inner.get_range(key, start, length))  # type: ignore[return-value]

    def read_into(self, key: str, start: int, buffers: Sequence[memoryview]) -> int:
        return self._around("read_into", key, lambda: self.inner.read_into(key, start, buffers))  # type: ignore[return-value]

    def get_small(self, key: str, limit: int) -> GetResult:
        """One "get_small" operation (the inner backend's single read) for hooks on it; while
        a hook on "head" or "get_range" could still claim this key, the head and bounded read
        of `Backend.get_small` through this wrapper instead, so that hook sees them as before."""
        with self._lock:
            split = any(h.claims(op, key) for h in self.hooks for op in ("head", "get_range"))
        if split:
            return Backend.get_small(self, key, limit)
        return self._around("get_small", key, lambda: self.inner.get_small(key, limit))  # type: ignore[return-value]

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        return self._around("put", key, lambda: self.inner.put(key, data, mode=mode))  # type: ignore[return-value]

    def head(self, key: str) -> ObjectInfo:
        return self._around("head", key, lambda: self.inner.head(key))  # type: ignore[return-value]

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return iter(self._around("list", prefix, lambda: list(self.inner.list(prefix))))  # type: ignore[call-overload]

    def delete(self, key: str, *, version: str | None = None) -> None:
        self._around("delete", key, lambda: self.inner.delete(key, version=version))
