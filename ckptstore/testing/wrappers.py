"""Backend wrappers for tests: forward every operation, and count or slow down some.

`ForwardingBackend` is the base: subclasses override only what they change.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence

from ckptstore.backends.base import OVERWRITE, Backend, Buffer, GetResult, ObjectInfo, PutMode


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

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        return self.inner.put(key, data, mode=mode)

    def head(self, key: str) -> ObjectInfo:
        return self.inner.head(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def close(self) -> None:
        self.inner.close()


class CountingBackend(ForwardingBackend):
    """Counts requests as (operation, first key segment), e.g. ("put", "chunks")."""

    def __init__(self, inner: Backend):
        super().__init__(inner)
        self.calls: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def _count(self, operation: str, key: str) -> None:
        with self._lock:
            self.calls[(operation, key.split("/", 1)[0])] += 1

    def get(self, key: str) -> GetResult:
        self._count("get", key)
        return super().get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self._count("get", key)
        return super().get_range(key, start, length)

    def read_into(self, key: str, start: int, buffers: Sequence[memoryview]) -> int:
        self._count("get", key)
        return super().read_into(key, start, buffers)

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        self._count("put", key)
        return super().put(key, data, mode=mode)

    def head(self, key: str) -> ObjectInfo:
        self._count("head", key)
        return super().head(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._count("list", prefix)
        return super().list(prefix)

    def delete(self, key: str) -> None:
        self._count("delete", key)
        super().delete(key)


class SlowPutBackend(ForwardingBackend):
    """Sleeps `delay` seconds before each put whose key starts with `prefix`."""

    def __init__(self, inner: Backend, *, prefix: str, delay: float):
        super().__init__(inner)
        self.prefix, self.delay = prefix, delay

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        if key.startswith(self.prefix):
            time.sleep(self.delay)
        return super().put(key, data, mode=mode)
