"""The deadline of one backend operation, shared by every layer that waits or retries in it.

An operation against a remote store (a get, a put, one page of a listing) may be retried by
the SDK (boto3, google-cloud-storage) and again by `ckptstore.retry.RetryingBackend`. Each
layer used to keep its own clock, so a dead endpoint took the sum of all of them (GCS: 114 s
refused, 124 s never answering, against a documented 60 s). Now the outermost layer sets the
moment the operation must end (`deadline_at`), and the layers below read what is left
(`seconds_left`): no request, SDK retry or ckptstore retry starts after it, and no request
waits longer than what is left for an answer. A transfer that keeps receiving or sending
bytes is not cut: timeouts bound silence, not transfer time. An operation made of several
requests (a multipart upload) calls `progressed()` after each one that lands, which starts
every enclosing deadline again: the deadline bounds a wait without progress, not a transfer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from urllib.parse import urlsplit

from ckptstore.errors import InvalidArgumentError, TransientError

#: Seconds an operation may wait for a remote store, retries included (storage option `deadline`).
DEFAULT_DEADLINE = 60.0
#: Seconds to wait for a TCP connection (storage option `connect_timeout`).
DEFAULT_CONNECT_TIMEOUT = 10.0


@dataclass
class _Deadline:
    ends_at: float  # time.monotonic()
    seconds: float
    outer: _Deadline | None


_CURRENT: ContextVar[_Deadline | None] = ContextVar("ckptstore_operation_deadline", default=None)


def _chain() -> Iterator[_Deadline]:
    node = _CURRENT.get()
    while node is not None:
        yield node
        node = node.outer


def check_seconds(name: str, value: float | None, *, optional: bool = False) -> None:
    """Raise InvalidArgumentError unless `value` is a positive number (or None, if `optional`)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidArgumentError(f"{name} must be a positive number of seconds, got {value!r}")


@contextlib.contextmanager
def deadline_at(since: float, seconds: float) -> Iterator[None]:
    """Within the block, operations must end `seconds` after `since` (a `time.monotonic()`
    value), or after their last `progressed()`. An enclosing deadline that ends earlier stays
    in force."""
    token = _CURRENT.set(_Deadline(since + seconds, seconds, _CURRENT.get()))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def deadline_in(seconds: float) -> contextlib.AbstractContextManager[None]:
    """`deadline_at` from now."""
    return deadline_at(time.monotonic(), seconds)


def seconds_left() -> float | None:
    """Seconds until the current operation's deadline (negative once passed), or None outside one."""
    ends = [node.ends_at for node in _chain()]
    return min(ends) - time.monotonic() if ends else None


def progressed() -> None:
    """A request of the current operation landed: every enclosing deadline starts again."""
    now = time.monotonic()
    for node in _chain():
        node.ends_at = now + node.seconds


def capped(timeout: float) -> float:
    """`timeout`, shortened to what is left of the current deadline (never below a millisecond)."""
    left = seconds_left()
    return timeout if left is None else max(0.001, min(timeout, left))


def endpoint_name(url: str) -> str:
    """`url` as it may appear in a message: scheme, host and port, never user info or a query."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return "an unnamed endpoint"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number: leave it out rather than fail while reporting a failure
        port = ""
    return f"{parts.scheme}://{host}{port}"


def out_of_time(endpoint: str, deadline: float, *, key: str | None, operation: str,
                last: BaseException | None = None) -> TransientError:
    """The error of an operation whose deadline passed before `endpoint` answered."""
    cause = f" (the last try: {type(last).__name__})" if last is not None else ""
    return TransientError(f"no answer from {endpoint} within the {deadline:g} s deadline{cause}",
                          key=key, operation=operation)
