"""Whether the process that wrote a lock is provably gone.

A lock's age is the only evidence that works across machines, so a dead holder's lock is
normally honoured until it is `ttl` old (600 s by default). A holder on *this* machine can
be checked at once: the lock records the kernel's boot id, the pid namespace, the host name,
the pid and the process's start time. When the first three match ours and no such process
runs (or it is a zombie, or the pid now belongs to a process started at another time), the
holder is dead. Anything else (another machine or container, missing fields, a malformed
value) counts as alive: the check can only shorten a wait, never end one that should continue.

Cloned VMs share a boot id, and the initial pid namespace's inode is the same on every host,
so the host name must match too. Clones that also keep the same host name cannot be told
apart from here (docs/FORMAT.md, "Objects under locks/").
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


def _start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/<pid>/stat field 22);
    None if there is no such process or it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def holder_fields() -> dict[str, Any]:
    """What a lock records about its holder, for `holder_is_dead`."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pidns": _pid_namespace(), "pid": pid,
            "start": _start_time(pid) or 0}


def holder_is_dead(lock: dict[str, Any]) -> bool:
    """True only when `lock` was written on this machine (boot id and host name), in this pid
    namespace, by a process that no longer runs there."""
    boot, pidns, host, pid = lock.get("boot"), lock.get("pidns"), lock.get("host"), lock.get("pid")
    if not boot or boot != _boot_id() or not pidns or pidns != _pid_namespace():
        return False
    if not host or host != socket.gethostname():
        return False
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if not _running(pid):
        return True
    # The pid runs: it is the holder unless it is provably another process that reused it.
    start, now_start = lock.get("start"), _start_time(pid)
    if not isinstance(start, int) or isinstance(start, bool) or start <= 0 or now_start is None:
        return False
    return start != now_start


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
