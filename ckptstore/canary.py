"""Proving that a backend enforces the conditional puts a commit relies on.

Some S3-compatible servers accept `If-None-Match` / `If-Match` and ignore them; a store on
such a server would silently fall back to "last writer wins". Before the first write
through a remote backend, the store runs this canary on a scratch key under locks/ and
refuses to continue if either condition is ignored. Results are cached per process and URL.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

from ckptstore import keys
from ckptstore.backends.base import CREATE, Backend, PutMode
from ckptstore.errors import (
    AlreadyExistsError,
    ConditionalWritesUnsupportedError,
    PreconditionFailedError,
)

_proven: set[str] = set()
_lock = threading.Lock()


@dataclass(frozen=True)
class CanaryReport:
    """What the canary saw: each check and whether the server enforced it."""

    url: str
    create_only_enforced: bool
    update_if_version_enforced: bool
    update_if_version_works: bool

    @property
    def ok(self) -> bool:
        return self.create_only_enforced and self.update_if_version_enforced and self.update_if_version_works


def run_canary(backend: Backend) -> CanaryReport:
    """Exercise create-only and update-if-version on a scratch key; report what held."""
    key = keys.lock_key(f"canary-{uuid.uuid4().hex}")
    first = backend.put(key, b"canary 1 " + uuid.uuid4().bytes, mode=CREATE)
    try:
        try:
            backend.put(key, b"canary 2 " + uuid.uuid4().bytes, mode=CREATE)
            create_only = False
        except AlreadyExistsError:
            create_only = True
        current = backend.get(key).version
        try:
            backend.put(key, b"canary 3 " + uuid.uuid4().bytes, mode=PutMode.update(current))
            update_works = True
        except PreconditionFailedError:
            update_works = False
        try:
            # `first` (or `current`, if the create above was ignored) is stale by now.
            backend.put(key, b"canary 4 " + uuid.uuid4().bytes, mode=PutMode.update(first))
            update_enforced = False
        except PreconditionFailedError:
            update_enforced = True
    finally:
        backend.delete(key)
    return CanaryReport(backend.url, create_only, update_enforced, update_works)


def ensure_conditional_writes(backend: Backend) -> None:
    """Raise ConditionalWritesUnsupportedError unless `backend` enforces conditional puts."""
    if not backend.needs_canary:
        return
    with _lock:
        if backend.url in _proven:
            return
    report = run_canary(backend)
    if not report.ok:
        failed = [name for name, held in (("create-only (If-None-Match / if_generation_match=0)",
                                           report.create_only_enforced),
                                          ("update-if-version (If-Match / if_generation_match)",
                                           report.update_if_version_enforced),
                                          ("update with the current version", report.update_if_version_works))
                  if not held]
        raise ConditionalWritesUnsupportedError(
            f"{backend.url}: the server does not enforce {', '.join(failed)}; committing here could lose "
            f"checkpoints to concurrent writers, so ckptstore refuses to write. Use a server with conditional "
            f"writes (AWS S3, GCS, a recent MinIO or SeaweedFS)",
            operation="canary")
    with _lock:
        _proven.add(backend.url)
