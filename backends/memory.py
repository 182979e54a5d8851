"""In-process backend for fast unit tests (`memory://name`). Never a stand-in for a real server.

Stores opened with the same name in one process share their objects, so tests can open a
store twice. Versions are a process-wide counter, so every put mints a new one.

Server clock: an object's `modified` time is stamped by `_server_clock`, a module-level
reference to `time.time` taken at import. It stands for the *server's* clock, separate from
the client's: a test that skews the client (`monkeypatch.setattr(time, "time", ...)`) leaves
the stamps alone, and a test moves the server's clock on its own with
`monkeypatch.setattr(ckptstore.backends.memory, "_server_clock", fake)`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from ckptstore.backends.base import OVERWRITE, Backend, Buffer, GetResult, ObjectInfo, PutMode, require_version
from ckptstore.errors import AlreadyExistsError, ObjectNotFoundError, PreconditionFailedError
from ckptstore.keys import validate_key

_SPACES: dict[str, dict[str, tuple[bytes, str, float]]] = {}
_SPACES_LOCK = threading.Lock()
_VERSIONS = itertools.count(1)
#: The "server's" clock (module docstring): captured here, so patching `time.time` misses it.
_server_clock: Callable[[], float] = time.time


class MemoryBackend(Backend):
    """Objects in a dict guarded by one lock."""

    def __init__(self, name: str = ""):
        self.url = f"memory://{name}"
        with _SPACES_LOCK:
            self._objects = _SPACES.setdefault(name, {})
        self._lock = _SPACES_LOCK

    def _entry(self, key: str, operation: str) -> tuple[bytes, str, float]:
        try:
            return self._objects[validate_key(key)]
        except KeyError:
            raise ObjectNotFoundError("no such object", key=key, operation=operation) from None

    def get(self, key: str) -> GetResult:
        with self._lock:
            data, version, _ = self._entry(key, "get")
        return GetResult(data, version)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        with self._lock:
            data, _, _ = self._entry(key, "get_range")
        return data[start:start + length]

    def get_small(self, key: str, limit: int) -> GetResult:
        """Bytes and version of one entry, taken under the lock: the same object state."""
        with self._lock:
            data, version, _ = self._entry(key, "get_small")
        self._check_small(key, len(data), limit)
        return GetResult(data, version)

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        validate_key(key)
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        payload = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
        with self._lock:
            current = self._objects.get(key)
            if mode.kind == "create" and current is not None:
                raise AlreadyExistsError("object exists", key=key, operation="put create-only")
            if mode.kind == "update" and (current is None or current[1] != mode.version):
                raise PreconditionFailedError(
                    "version changed" if current else "object vanished",
                    key=key, operation="put update-if-version",
                )
            version = str(next(_VERSIONS))
            self._objects[key] = (payload, version, _server_clock())
        return version

    def head(self, key: str) -> ObjectInfo:
        with self._lock:
            data, version, modified = self._entry(key, "head")
        return ObjectInfo(key, len(data), version, modified)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            snapshot = sorted((k, v) for k, v in self._objects.items() if k.startswith(prefix))
        for key, (data, version, modified) in snapshot:
            yield ObjectInfo(key, len(data), version, modified)

    def delete(self, key: str, *, version: str | None = None) -> None:
        validate_key(key)
        if version is not None:
            require_version(version)
        with self._lock:
            current = self._objects.get(key)
            if current is None:
                return
            if version is not None and current[1] != version:
                raise PreconditionFailedError("version changed", key=key, operation="delete if-version")
            del self._objects[key]


def drop_memory_space(name: str) -> None:
    """Forget every object of `memory://name` (test isolation)."""
    with _SPACES_LOCK:
        _SPACES.pop(name, None)
