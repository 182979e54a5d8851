"""Running a test's ranks: spawned processes in one gloo process group on CPU.

Each rank writes what it saw to a JSON file and leaves with `leave()`; the test process joins
the ranks by a deadline (a rank still running then is killed and fails the test) and reads
the reports. Kept apart from tests/test_distributed_save.py's helpers so that the trainer
integrations' tests (tests/integrations/) share one copy.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

WORLD = 2
PG_TIMEOUT = datetime.timedelta(seconds=20)  # a killed rank fails the survivor's collectives by then at the latest
DEADLINE = 80.0  # seconds for one group of ranks


def start(worker: Callable[..., None], *args: Any) -> list[BaseProcess]:
    """Start `worker(rank, *args)` in WORLD spawned processes."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(rank, *args), daemon=True) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    return procs


def finish(procs: list[BaseProcess]) -> list[int | None]:
    """Join every rank by the deadline; their exit codes. A rank still running fails the test."""
    deadline = time.monotonic() + DEADLINE
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    assert not hung, f"ranks {hung} did not finish within {DEADLINE}s"
    return [proc.exitcode for proc in procs]


def run(worker: Callable[..., None], *args: Any) -> None:
    """Start the ranks and require that every one exits 0."""
    codes = finish(start(worker, *args))
    assert codes == [0] * WORLD, f"rank exit codes {codes}"


def join_group(rank: int, tmp: str, name: str) -> None:
    """Join the gloo group `name` (a rendezvous file under `tmp`), one thread per rank."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv-{name}", rank=rank, world_size=WORLD,
                            timeout=PG_TIMEOUT)


def leave() -> None:
    """Exit without C++ teardown: gloo threads torn down at exit sometimes abort (see test_dcp)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def report(tmp: str, name: str, rank: int, data: dict[str, Any]) -> None:
    Path(tmp, f"{name}-{rank}.json").write_text(json.dumps(data))


def reports(tmp: str, name: str) -> list[dict[str, Any]]:
    return [json.loads(Path(tmp, f"{name}-{rank}.json").read_text()) for rank in range(WORLD)]
