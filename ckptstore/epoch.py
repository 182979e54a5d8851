"""The gc epoch (locks/epoch): how a save learns that a gc may have swept while it ran.

A small msgpack map changed only by compare-and-swap: a counter bumped when a gc starts
(running=True) and when it ends, and `last_sweep`, the number of the last epoch in which a
gc swept. docs/FORMAT.md, "Why a committed ref never points at a missing object", argues
why comparing the epoch read before a save's lease with the one read before its commit
catches every sweep that could have taken an object the save references.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ckptstore import keys
from ckptstore.backends.base import CREATE, Backend, PutMode
from ckptstore.errors import (
    AlreadyExistsError,
    EpochContentionError,
    FormatError,
    ObjectNotFoundError,
    PreconditionFailedError,
)
from ckptstore.lockfile import pack, unpack
from ckptstore.manifest import MAX_REF_BYTES

EPOCH = keys.lock_key("epoch")

#: How many compare-and-swaps of the epoch may lose before set_epoch gives up. Only gcs
#: write the epoch, and only one gc holds locks/gc, so a loss means a gc whose lock was
#: taken over is still finishing: a handful of losses is already unusual.
MAX_EPOCH_ATTEMPTS = 8


@dataclass(frozen=True)
class Epoch:
    """The gc epoch: bumped when a gc starts (running=True) and when it ends.

    `last_sweep` is the number of the last epoch in which a gc swept; a gc that stood down
    leaves it alone, so saves only re-check their objects after a real sweep.
    """

    number: int
    running: bool
    owner: str = ""
    last_sweep: int = 0

    def swept_since(self, earlier: Epoch) -> bool:
        """Whether a gc may have deleted objects between `earlier` and this epoch."""
        return earlier.running or self.running or self.last_sweep > earlier.number


def epoch_to_plain(epoch: Epoch) -> list[Any]:
    """The epoch as plain data a collective or a plan carries between ranks."""
    return [epoch.number, epoch.running, epoch.owner, epoch.last_sweep]


def epoch_from_plain(value: Any) -> Epoch:
    """`epoch_to_plain`'s inverse; FormatError when `value` is not one."""
    if (not isinstance(value, list) or len(value) != 4 or not isinstance(value[0], int)
            or not isinstance(value[1], bool) or not isinstance(value[2], str) or not isinstance(value[3], int)):
        raise FormatError(f"a malformed gc epoch: {value!r}"[:200])
    return Epoch(value[0], value[1], value[2], value[3])


def read_epoch(backend: Backend) -> tuple[Epoch, str | None]:
    """The current epoch and its version (None when no gc ever ran)."""
    try:
        result = backend.get_small(EPOCH, MAX_REF_BYTES)
    except ObjectNotFoundError:
        return Epoch(0, False), None
    obj = unpack(result.data, "gc epoch")
    number, running, last_sweep = obj.get("epoch"), obj.get("running"), obj.get("last_sweep", 0)
    if not isinstance(number, int) or not isinstance(running, bool) or not isinstance(last_sweep, int):
        raise FormatError("corrupt gc epoch")
    return Epoch(number, running, str(obj.get("owner", "")), last_sweep), result.version


def set_epoch(backend: Backend, *, running: bool, owner: str, swept_in: int | None = None,
              attempts: int = MAX_EPOCH_ATTEMPTS) -> Epoch:
    """Bump the epoch by compare-and-swap, retrying a lost race up to `attempts` times in all;
    return the new epoch. Raises EpochContentionError when every attempt lost.

    `swept_in`: the epoch number in which this gc swept, recorded as `last_sweep`.
    """
    for attempt in range(attempts):
        current, version = read_epoch(backend)
        last_sweep = current.last_sweep if swept_in is None else max(current.last_sweep, swept_in)
        new = Epoch(current.number + 1, running, owner, last_sweep)
        payload = pack({"epoch": new.number, "running": running, "owner": owner, "last_sweep": last_sweep})
        try:
            backend.put(EPOCH, payload, mode=CREATE if version is None else PutMode.update(version))
            return new
        except (AlreadyExistsError, PreconditionFailedError):
            if attempt + 1 < attempts:
                time.sleep(min(0.05 * 2**attempt, 1.0))
    raise EpochContentionError(
        f"the gc epoch ({EPOCH}) changed under each of {attempts} compare-and-swaps; "
        f"another gc may still be finishing: nothing was changed, run gc again")
