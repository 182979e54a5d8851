"""Every error ckptstore raises, in one place.

The tree::

    CkptStoreError
    ├── BackendError                  a storage operation failed (permanent unless a subclass says so)
    │   ├── ObjectNotFoundError       the key does not exist
    │   ├── AlreadyExistsError        create-only put found the key present
    │   ├── PreconditionFailedError   update-if-version found another version (or no object)
    │   ├── TransientError            retryable: throttling, 5xx, timeouts, resets
    │   ├── PermissionDeniedError     credentials or bucket policy refused the operation
    │   └── ConditionalWritesUnsupportedError  the server ignores create-only or compare-and-swap
    ├── StoreNotFoundError            a URL points at no store and create=False
    ├── InvalidKeyError               a key that could escape the root or is malformed
    ├── InvalidURLError               a store URL ckptstore cannot open
    ├── InvalidArgumentError          a bad argument to the public API (also a ValueError)
    │   └── InvalidStepError          a step that is not an int in [0, MAX_STEP]
    ├── StepExistsError               commit without overwrite found the step committed
    ├── StepNotFoundError             the requested step has no ref (also a KeyError)
    │   └── TagNotFoundError          the requested tag has no ref
    ├── PathNotFoundError             load(select=...) named a path the step does not hold (also a KeyError)
    ├── TagExistsError                tag without overwrite found the name taken
    ├── CommitConflictError           another writer replaced the step while we committed
    ├── ChunkVanishedError            a chunk kept vanishing mid-save (a concurrent gc): nothing committed
    ├── ObjectTooLargeError           a save built an object over a reader's limit: nothing committed
    ├── IntegrityError                stored bytes do not match their hash
    ├── FormatError                   a stored object is malformed (truncated, hostile, garbage)
    │   └── UnsupportedFormatError    written by a newer/unknown format version
    ├── UnsupportedValueError         the state holds a value the format cannot represent
    │   └── StateConflictError        ranks of a distributed save passed states that cannot merge
    ├── DistributedSaveError          a rank of a distributed save died or timed out
    ├── EpochContentionError          the gc epoch kept changing under a compare-and-swap
    ├── GCLockLostError               a gc found that it no longer owns locks/gc (it stops)
    ├── IncompatibleStoresError       cp between stores with different hash algorithms
    ├── InteropError                  a foreign checkpoint (DCP, torch.save, safetensors) that cannot be converted
    └── StateMismatchError            load(into=...) found tensors missing, unexpected, or of another shape/dtype

Backend errors carry the key and the operation so a message always says what failed where.
"""

from __future__ import annotations

import datetime as _dt


def _rebuild(cls: type[BaseException], args: tuple[object, ...], state: dict[str, object]) -> BaseException:
    error = cls.__new__(cls)
    BaseException.__init__(error, *args)
    error.__dict__.update(state)
    return error


class CkptStoreError(Exception):
    """Root of every error raised by ckptstore."""

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries (DCP broadcasts the coordinator's failure to every
        # rank). Their __init__ signatures differ from their args: rebuild without calling it.
        return _rebuild, (type(self), self.args, dict(self.__dict__))


class BackendError(CkptStoreError):
    """A storage operation failed; permanent unless a subclass says otherwise."""

    def __init__(self, message: str, *, key: str | None = None, operation: str | None = None):
        self.key = key
        self.operation = operation
        where = []
        if operation:
            where.append(operation)
        if key is not None:
            where.append(repr(key))
        super().__init__(f"{message} ({' '.join(where)})" if where else message)


class ObjectNotFoundError(BackendError):
    """The key does not exist."""


class AlreadyExistsError(BackendError):
    """A create-only put found the key already present."""


class PreconditionFailedError(BackendError):
    """An update-if-version put found a different version, or no object at all."""


class TransientError(BackendError):
    """A retryable failure (throttling, 5xx, timeout, connection reset)."""


class PermissionDeniedError(BackendError):
    """The server refused the operation for these credentials."""


class ConditionalWritesUnsupportedError(BackendError):
    """The server accepted a conditional put it should have refused: commits would be unsafe."""


class StoreNotFoundError(CkptStoreError):
    """The URL points at no ckptstore store (no CKPTSTORE marker) and create=False."""


class InvalidKeyError(CkptStoreError, ValueError):
    """A key is malformed or could escape the store root."""


class InvalidURLError(CkptStoreError, ValueError):
    """A store URL that ckptstore cannot open."""


class InvalidArgumentError(CkptStoreError, ValueError):
    """A bad argument to the public API (keep_last=0, retries=-1, ...); also a ValueError."""


class InvalidStepError(InvalidArgumentError):
    """A step that is not an int in [0, MAX_STEP] (save(-1, ...)); also a ValueError."""


def _when(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class StepExistsError(CkptStoreError):
    """A commit without overwrite found the step already committed; nothing was changed."""

    def __init__(self, step: int, committed_at: float, writer: str):
        self.step = step
        self.committed_at = committed_at
        self.writer = writer
        super().__init__(
            f"step {step} already exists (committed {_when(committed_at)} by {writer}); "
            f"pass overwrite=True (CLI: --overwrite) to replace it atomically"
        )


class StepNotFoundError(CkptStoreError, KeyError):
    """The requested step (or tag) has no ref in this store."""

    def __init__(self, step: int | str, store: str = ""):
        self.step = step
        where = f" in {store}" if store else ""
        super().__init__(f"step {step} not found{where}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class TagNotFoundError(StepNotFoundError):
    """The requested tag has no ref in this store."""

    def __init__(self, name: str, store: str = ""):
        super().__init__(name, store)
        self.args = (f"tag {name!r} not found" + (f" in {store}" if store else ""),)


class TagExistsError(CkptStoreError):
    """A tag without overwrite found the name already taken; nothing was changed."""

    def __init__(self, name: str, step: int):
        self.name = name
        self.step = step
        super().__init__(f"tag {name!r} already names step {step}; pass overwrite=True (CLI: --force) to move it")


class CommitConflictError(CkptStoreError):
    """Another writer replaced the step between our read of its ref and our conditional put."""

    def __init__(self, step: int, ours: str, theirs: str | None):
        self.step = step
        self.our_commit = ours
        self.their_commit = theirs
        other = f"commit {theirs}" if theirs else "a delete"
        super().__init__(
            f"step {step}: our commit {ours} lost a compare-and-swap race to {other}; "
            f"the stored step is the other writer's, nothing was clobbered"
        )


class ChunkVanishedError(CkptStoreError):
    """A save (or cp) kept losing a chunk it was storing: every create-only put reported
    AlreadyExists (another writer had stored the same bytes), yet each `head` after it found
    the key gone, so a concurrent gc was sweeping that writer's orphan each time. Raised after
    a bounded number of puts (ckptstore.chunkio.CHUNK_PUT_ATTEMPTS), before anything that
    names the chunk is committed: nothing was committed, and saving again once the gc has
    finished is expected to succeed. Not a BackendError: every storage operation succeeded."""

    def __init__(self, key: str, attempts: int):
        self.key = key
        self.attempts = attempts
        super().__init__(
            f"chunk {key} kept vanishing: {attempts} create-only puts each reported it present, and each "
            f"following head found it gone; probably removed by a concurrent gc. Nothing was committed; "
            f"save again once the gc has finished"
        )


class ObjectTooLargeError(CkptStoreError):
    """A save (or cp, import, tag) built an object (manifest, ref) that readers would refuse:
    over a byte cap or a count budget of docs/FORMAT.md, "Reader validation". Raised after
    encoding, before the object is stored: nothing was committed, the previous step stays latest."""

    def __init__(self, what: str, size: int, limit: int, unit: str = "bytes", advice: str = "", reason: str = ""):
        self.what = what
        self.size = size
        self.limit = limit
        reason = reason or f"holds {size} {unit}, over the readers' limit of {limit}"
        advice = advice or ("save fewer or larger tensors per step (e.g. fewer ranks or shards), "
                            "or keep large values out of `metadata`")
        super().__init__(f"{what} {reason}: a step saved so could never be loaded, so nothing was committed; "
                         f"{advice}")


class IntegrityError(CkptStoreError):
    """Stored bytes do not match the hash they are stored under."""


class FormatError(CkptStoreError):
    """A stored object is malformed: truncated, garbage, or hostile."""


class UnsupportedFormatError(FormatError):
    """An object written by a format version this reader does not know."""


class UnsupportedValueError(CkptStoreError, TypeError):
    """The state holds a value the format cannot represent; the path names where."""

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__(f"cannot save value at {path}: {reason}")


class IncompatibleStoresError(CkptStoreError, ValueError):
    """Two stores whose objects cannot be copied between them (different hash algorithms)."""


class InteropError(CkptStoreError, ValueError):
    """A foreign checkpoint that cannot be converted: unknown format, a refused pickle class,
    a dtype the target format cannot hold."""


def _listed(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class StateMismatchError(CkptStoreError, ValueError):
    """load(into=...) found `into` unlike the stored state: tensors only `into` has (`missing`,
    as torch's load_state_dict names them), tensors only the step has (`unexpected`), and
    tensors of another kind, shape or dtype (`mismatched`: (path, what differs)). Paths are
    dotted names (``model.0.weight``). Nothing was read or filled."""

    def __init__(self, message: str, *, missing: list[str] | None = None, unexpected: list[str] | None = None,
                 mismatched: list[tuple[str, str]] | None = None):
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])
        parts = [message]
        if self.missing:
            parts.append(f"missing from the step ({len(self.missing)}): {_listed(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected, in the step but not in into ({len(self.unexpected)}): "
                         f"{_listed(self.unexpected)}")
        if self.mismatched:
            parts.append(f"mismatched ({len(self.mismatched)}): "
                         f"{_listed([f'{path} ({why})' for path, why in self.mismatched])}")
        super().__init__("; ".join(parts))


class PathNotFoundError(CkptStoreError, KeyError):
    """load(select=[...]) named a dotted path the step does not hold. `paths` lists every such
    name; the message says what exists where each one stopped matching."""

    def __init__(self, paths: list[str], context: str, nearby: dict[str, list[str]]):
        self.paths = list(paths)
        told = [f"{path!r} (there: {_listed(nearby.get(path, [])) or 'nothing'})" for path in self.paths]
        super().__init__(f"{context} holds nothing at {'; '.join(told)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class InsufficientMemoryError(CkptStoreError, MemoryError):
    """A load would allocate more memory than this machine has (RAM plus swap), or the
    allocation failed: checked before any tensor is allocated or byte read."""


class StateConflictError(UnsupportedValueError):
    """Ranks passed states that cannot be merged: a leaf that differs between the ranks holding
    it, or a dict on one rank where another has a leaf. `path` and `ranks` name them."""

    def __init__(self, path: str, ranks: tuple[int, ...], reason: str):
        self.ranks = ranks
        super().__init__(path, f"ranks {', '.join(map(str, ranks))}: {reason}; a value held by several ranks "
                               f"must be identical on all of them (see ckptstore.distributed)")


class DistributedSaveError(CkptStoreError):
    """A collective of a distributed save failed: a rank died, or did not answer within the
    process group's timeout. Nothing was committed unless the message says so."""


class EpochContentionError(CkptStoreError):
    """The gc epoch (locks/epoch) changed under every one of a bounded number of
    compare-and-swap attempts: something keeps rewriting it. Nothing was changed."""


class GCLockLostError(CkptStoreError):
    """A gc found that locks/gc is no longer the version it wrote (another gc or a waiting
    save judged it dead and took or broke it): the gc stops before deleting anything more."""
