"""Whether the process that wrote a lock is provably gone.

A lock's age is the only evidence that works across machines, so a dead holder's lock is
normally honoured until it is `ttl` old (600 s by default). A holder on *this* machine can
be checked at once: the lock records the kernel's boot id, the pid namespace and the pid,
and when the first two match ours and no such process runs (or it is a zombie), the
holder is dead. Anything else (another machine, another container, a pid reused by a new
process, a lock written before these fields existed) counts as alive: the check can only
shorten a wait, never end one that should continue.
"""

from __future__ import annotations

import functools
import os
import socket
from typing import Any


@functools.lru_cache(maxsize=1)
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def holder_fields() -> dict[str, Any]:
    """What a lock records about its holder, for `holder_is_dead`."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "pidns": _pid_namespace(), "pid": os.getpid()}


def holder_is_dead(lock: dict[str, Any]) -> bool:
    """True only when `lock` was written on this machine, in this pid namespace, by a
    process that no longer runs."""
    boot, pidns, pid = lock.get("boot"), lock.get("pidns"), lock.get("pid")
    if not boot or boot != _boot_id() or not pidns or pidns != _pid_namespace():
        return False
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    return not _running(pid)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    try:  # exited but not yet reaped by its parent: dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
