"""The backend interface every store sits on.

A backend is a handful of byte-level operations on keys. Writes take a `PutMode` value:
overwrite, create-only, or update-if-version-matches. Every read returns the object's
opaque *version* (S3 ETag, GCS generation, a local file's identity) that a later
conditional put can name. Failures are the typed errors in `ckptstore.errors`; each
backend translates its wire errors in exactly one place.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from ckptstore.errors import CkptStoreError, FormatError, ObjectNotFoundError

# Anything the buffer protocol can hand out as bytes.
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class PutMode:
    """How a put treats an existing object: OVERWRITE, CREATE (only if absent), or update(version)."""

    kind: Literal["overwrite", "create", "update"]
    version: str | None = None

    OVERWRITE: ClassVar[PutMode]
    CREATE: ClassVar[PutMode]

    @staticmethod
    def update(version: str) -> PutMode:
        """Replace the object only if its current version is `version`."""
        return PutMode("update", require_version(version, "update-if-version"))


def require_version(version: str, what: str = "delete-if-version") -> str:
    """`version`, refused (ValueError) when it is empty: a conditional operation needs the
    version a read returned, and an empty one must never pass for "no condition"."""
    if not version:
        raise ValueError(f"{what} needs the version returned by a read")
    return version


PutMode.OVERWRITE = OVERWRITE = PutMode("overwrite")
PutMode.CREATE = CREATE = PutMode("create")


@dataclass(frozen=True)
class ObjectInfo:
    """What head and list report about one object."""

    key: str
    size: int
    version: str
    modified: float  # seconds since the epoch; coarse on some servers, never order commits by it


@dataclass(frozen=True)
class GetResult:
    """A whole object and the version it was read at."""

    data: bytes
    version: str


#: What `Backend.delete_many` returns: each key it could not delete, with its typed error.
DeleteFailures = list[tuple[str, CkptStoreError]]


def total_length(parts: Sequence[Buffer]) -> int:
    """Byte length of a sequence of buffers."""
    return sum(memoryview(p).nbytes for p in parts)


class Backend(abc.ABC):
    """Byte-level key/value storage with conditional puts.

    Contract (checked by `ckptstore.testing.conformance.BackendConformance`):
    - `put(key, data, mode=CREATE)` raises AlreadyExistsError if the key exists; exactly one
      of many concurrent creators wins.
    - `put(key, data, mode=PutMode.update(v))` raises PreconditionFailedError unless the key
      exists at version `v`; exactly one of many concurrent updaters from `v` wins.
    - Every successful put returns the new version, and a rewrite of identical bytes still
      yields a version a stale writer cannot match (callers make payloads unique).
    - Reads raise ObjectNotFoundError for a missing key; delete of a missing key is a no-op.
    - `delete(key, version=v)` removes the key only if it exists at exactly version `v`: at
      another version it raises PreconditionFailedError and leaves the object; a missing key
      is a no-op. A delete that landed and is then retried (by an SDK or `RetryingBackend`)
      after the key was re-created therefore leaves the new object alone (S3 ETags are content
      hashes, so there only where the new object's bytes differ; callers make them unique).
    - `list(prefix)` yields every key starting with `prefix`, exactly once. Local, memory,
      GCS and AWS S3 yield lexicographic order; some S3-compatible servers (SeaweedFS) do
      not, so callers that need an order sort.
    """

    #: URL this backend was opened from, without credentials.
    url: str = ""
    #: Whether a store must prove, on open, that this backend enforces conditional puts
    #: (remote servers differ; local and memory enforce them by construction).
    needs_canary: bool = False
    #: Chunk size `ckptstore.open` uses when the caller gives no ChunkingPolicy (None: the
    #: policy's own default). A store's chunk size is a writer setting, never a format one.
    preferred_chunk_size: int | None = None
    #: Most keys one `delete_many` request removes (S3 DeleteObjects: 1,000; GCS batch: 100;
    #: the per-key default: gc's proof interval, 100). gc proves its lock before every such batch.
    max_delete_batch: int = 100

    @abc.abstractmethod
    def get(self, key: str) -> GetResult:
        """The whole object and its version. Raises ObjectNotFoundError."""

    @abc.abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from `start` (fewer only at the end of the object)."""

    def read_into(self, key: str, start: int, buffers: Sequence[memoryview]) -> int:
        """Fill `buffers` in order from the object's bytes at `start`; return bytes read.

        Backends override this to land bytes directly in the caller's memory (a tensor).
        """
        wanted = sum(b.nbytes for b in buffers)
        data = memoryview(self.get_range(key, start, wanted))
        pos = 0
        for buf in buffers:
            n = min(buf.nbytes, len(data) - pos)
            buf.cast("B")[:n] = data[pos:pos + n]
            pos += n
        return pos

    @abc.abstractmethod
    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        """Write `data` (one buffer or several, concatenated) under `mode`; return the new version."""

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size and version of `key`. Raises ObjectNotFoundError."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix` (order: see the class docstring)."""

    @abc.abstractmethod
    def delete(self, key: str, *, version: str | None = None) -> None:
        """Remove `key`; a missing key is not an error.

        With `version` (one returned by a read or put), remove it only if it is still at that
        version; raises PreconditionFailedError (and leaves it) if it is at another one.
        """

    def delete_many(self, keys: Sequence[str]) -> DeleteFailures:
        """Remove every key in `keys` (unconditionally; a missing key is not an error) and return
        the keys that could not be removed, each with its typed error; never drops one silently.

        This default deletes one key at a time; S3 and GCS send batches of `max_delete_batch`.
        """
        failures: DeleteFailures = []
        for key in keys:
            try:
                self.delete(key)
            except CkptStoreError as exc:
                failures.append((key, exc))
        return failures

    @staticmethod
    def _check_small(key: str, size: int, limit: int, *, read: bool = False) -> None:
        """FormatError when an object that must be small (`get_small`) is `size` > `limit` bytes
        (`read`: `size` is what a bounded read returned, so the object has at least that)."""
        if size > limit:
            raise FormatError(f"{key} is {'at least ' if read else ''}{size} bytes, "
                              f"over the {limit}-byte limit for this kind of object")

    def get_small(self, key: str, limit: int) -> GetResult:
        """A small object (ref, marker, lock) and its version, never reading more than `limit` + 1
        bytes: a whole get has no size bound, and anyone with write access could plant a huge
        object at such a key. Raises ObjectNotFoundError, or FormatError above `limit`.

        The version is exactly what `head(key).version` reports for the same object, usable for
        the compare-and-swap puts and deletes. S3, GCS, local and memory override this with ONE
        read whose bytes and version describe the same object generation (atomic). This default,
        for other backends (and for test wrappers that intercept head or get_range), takes the
        version from a head before the bounded read: if the object is replaced in between, the
        bytes are newer than the version, so a compare-and-swap against that version fails (a
        conflict) and never clobbers.
        """
        info = self.head(key)
        self._check_small(key, info.size, limit)
        data = self.get_range(key, 0, limit + 1)
        if len(data) > limit:
            raise FormatError(f"{key} grew past the {limit}-byte limit for this kind of object")
        return GetResult(data, info.version)

    def exists(self, key: str) -> bool:
        """Whether `key` exists (one head request)."""
        try:
            self.head(key)
        except ObjectNotFoundError:
            return False
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
