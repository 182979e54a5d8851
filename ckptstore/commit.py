"""Committing a step: the one place where "overwrite" is decided.

A step exists exactly when its ref exists. Commit is a create-only put of the ref; with
overwrite, a compare-and-swap of the ref against the version just read. Every ref payload
carries a random commit id, so an ambiguous put (timed out, retried by the SDK) is resolved
by re-reading the ref: if it carries our commit id, our commit landed.
"""

from __future__ import annotations

import time
from dataclasses import replace

from ckptstore.backends.base import CREATE, Backend, PutMode
from ckptstore.errors import (
    AlreadyExistsError,
    CommitConflictError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StepExistsError,
    TransientError,
)
from ckptstore.manifest import MAX_REF_BYTES, Ref, decode_ref, encode_ref

# How often an ambiguous outcome (transient error on the conditional put) is retried after
# re-reading the ref showed our commit did not land.
_AMBIGUOUS_RETRIES = 3


def read_ref(backend: Backend, key: str) -> tuple[Ref, str] | None:
    """The ref at `key` and its version, or None if absent. Raises FormatError.

    Never reads more than MAX_REF_BYTES + 1 bytes, whatever is planted at `key`
    (Backend.get_small: one bounded ranged get that returns the version too).
    """
    try:
        result = backend.get_small(key, MAX_REF_BYTES)
    except ObjectNotFoundError:
        return None
    return decode_ref(result.data), result.version


def _landed(backend: Backend, key: str, ref: Ref) -> bool:
    current = read_ref(backend, key)
    return current is not None and current[0].commit_id == ref.commit_id


def commit_ref(backend: Backend, key: str, ref: Ref, *, overwrite: bool) -> Ref:
    """Publish `ref` at `key`; returns the ref as committed (seq/replaces filled in on replace).

    Raises StepExistsError (exists, overwrite=False; nothing touched) or CommitConflictError
    (overwrite=True and another writer changed the ref between our read and our put).
    """
    current = None
    for attempt in range(_AMBIGUOUS_RETRIES + 1):
        try:
            backend.put(key, encode_ref(ref), mode=CREATE)
            return ref
        except AlreadyExistsError:
            current = read_ref(backend, key)
            if current is not None:
                break
            # Deleted between our create and our read: the step is free again, try again.
        except TransientError:
            if _landed(backend, key, ref):
                return ref
            if attempt == _AMBIGUOUS_RETRIES:
                raise
            time.sleep(0.1 * 2**attempt)
    if current is None:
        raise CommitConflictError(ref.step, ref.commit_id, None)
    existing, version = current
    if existing.commit_id == ref.commit_id:
        return ref  # our own earlier attempt landed
    if not overwrite:
        raise StepExistsError(ref.step, existing.committed, existing.writer)

    replacement = replace(ref, seq=existing.seq + 1, replaces=existing.manifest)
    for attempt in range(_AMBIGUOUS_RETRIES + 1):
        try:
            backend.put(key, encode_ref(replacement), mode=PutMode.update(version))
            return replacement
        except PreconditionFailedError:
            now = read_ref(backend, key)
            if now is not None and now[0].commit_id == replacement.commit_id:
                return replacement  # an SDK retry of our own put found its first try landed
            raise CommitConflictError(ref.step, replacement.commit_id,
                                      now[0].commit_id if now else None) from None
        except TransientError:
            if _landed(backend, key, replacement):
                return replacement
            if attempt == _AMBIGUOUS_RETRIES:
                raise
            time.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")
