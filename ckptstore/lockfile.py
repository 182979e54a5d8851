"""The bytes of the small objects under locks/: leases, locks/gc and the epoch.

All are msgpack maps with `v` = 1 (docs/FORMAT.md, "Objects under locks/"), read with a
bounded get and decoded here, so a hostile object there costs at most MAX_REF_BYTES.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import msgpack

from ckptstore.errors import FormatError
from ckptstore.liveness import holder_fields

# Makes every payload this process writes unique, so a retried conditional put can tell its
# own landed bytes from another writer's (ckptstore.retry) even within one clock tick.
_SERIAL = itertools.count()


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": 1, **obj}, use_bin_type=True)


def unpack(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False) if len(data) < 65536 else None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise FormatError(f"corrupt {what}: {exc}") from exc
    if not isinstance(obj, dict):
        raise FormatError(f"corrupt {what}")
    return obj


def lock_payload(owner: str, **extra: Any) -> bytes:
    """The bytes of a lease or locks/gc: its owner, when it was refreshed (the writer's clock,
    for people: ages are judged by the server's timestamps), who holds it (liveness.py)."""
    return pack({"owner": owner, "refreshed": time.time(), "serial": next(_SERIAL), **holder_fields(), **extra})
