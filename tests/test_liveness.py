"""ckptstore.liveness: a lock's holder counts as dead only when that is certain."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ckptstore.liveness import holder_fields, holder_is_dead


def _exited_child(reap: bool) -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    if reap:
        proc.wait()
    else:
        import os
        import time

        # Let it exit without reaping it: a zombie still answers kill(pid, 0).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        assert os.path.exists(f"/proc/{proc.pid}")
    return proc.pid


def test_a_running_holder_is_alive() -> None:
    assert not holder_is_dead(holder_fields())


def test_a_holder_that_exited_here_is_dead_reaped_or_zombie() -> None:
    for reap in (True, False):
        assert holder_is_dead({**holder_fields(), "pid": _exited_child(reap)})


def test_anything_uncertain_counts_as_alive() -> None:
    dead_pid = _exited_child(True)
    mine = holder_fields()
    for lock in ({**mine, "pid": dead_pid, "boot": "another-boot"},  # another machine or reboot
                 {**mine, "pid": dead_pid, "pidns": mine["pidns"] + 1},  # another container
                 {**mine, "pid": dead_pid, "host": "a-clone"},  # a cloned VM: same boot id and pidns
                 {**mine, "pid": dead_pid, "host": ""},
                 {k: v for k, v in {**mine, "pid": dead_pid}.items() if k != "host"},
                 {**mine, "start": "x"}, {**mine, "start": 0}, {**mine, "start": True},  # running pid, no usable start
                 {"owner": "old@host:1", "refreshed": 0.0, "pid": dead_pid},  # written before these fields
                 {**mine, "pid": "12"}, {**mine, "pid": True}, {**mine, "pid": -1}):
        assert not holder_is_dead(lock), lock


def test_a_running_pid_with_another_start_time_is_a_reused_pid_so_the_holder_is_dead() -> None:
    mine = holder_fields()
    assert mine["start"] > 0
    assert not holder_is_dead(mine)  # same pid, same start: the holder itself
    assert holder_is_dead({**mine, "start": mine["start"] + 1})
    assert holder_is_dead({**mine, "start": mine["start"] - 1})


def test_gc_ignores_the_lease_of_a_dead_saver_but_not_of_a_live_one(tmp_path: Path) -> None:
    """A save SIGKILLed on this machine leaves a fresh lease; gc need not stand down for it
    for the lease TTL (600 s here), while a running holder's lease still stops it."""
    import torch

    import ckptstore
    from ckptstore.lockfile import pack as _pack

    store = ckptstore.open(tmp_path / "store")
    store.save(1, {"w": torch.ones(4)})
    store.delete(1)
    live = {"owner": "me", "refreshed": time.time(), **holder_fields()}
    store.backend.put("locks/save-0000000000000001", _pack(live))
    report = store.gc(min_age=0)
    assert not report.ran and report.blocking_leases == ["locks/save-0000000000000001"]

    store.backend.put("locks/save-0000000000000001", _pack({**live, "pid": _exited_child(True)}))
    report = store.gc(min_age=0)
    assert report.ran and report.deleted_manifests == 1, report
    assert [lock.holder_dead for lock in store.locks() if lock.kind == "save"] == [True]
