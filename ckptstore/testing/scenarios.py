"""Multi-process scenarios shared by the tests of every backend: commit races and crashes.

Workers run in fresh interpreters (multiprocessing "spawn", or `python -m` for the crash
saver), so they behave like separate trainer processes: no shared memory, no shared locks.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from typing import Any

import ckptstore


def state_for(tag: int, *, elements: int = 4096) -> dict[str, Any]:
    """A deterministic state whose every tensor and value encodes `tag`.

    Two different tags share no chunk, so a loaded state that mixes writers is detectable:
    `tag_of(state)` raises unless every part agrees.
    """
    import torch

    base = torch.arange(elements, dtype=torch.float32)
    return {
        "model": {"w": base + tag, "b": torch.full((17,), float(tag), dtype=torch.bfloat16)},
        "optim": {0: {"exp_avg": base * 0 + tag * 2, "step": tag}},
        "tag": tag,
    }


def tag_of(state: dict[str, Any]) -> int:
    """The tag `state` was built from; AssertionError if its parts disagree (a torn read)."""
    import torch

    tag = state["tag"]
    expected = state_for(tag, elements=state["model"]["w"].numel())
    assert state["optim"][0]["step"] == tag, "optimizer step from another writer"
    for path in (("model", "w"), ("model", "b")):
        got, want = state[path[0]][path[1]], expected[path[0]][path[1]]
        assert got.dtype == want.dtype and torch.equal(got, want), f"tensor {path} from another writer"
    assert torch.equal(state["optim"][0]["exp_avg"], expected["optim"][0]["exp_avg"]), "exp_avg torn"
    return int(tag)


@dataclass(frozen=True)
class Outcome:
    """What one worker saw in one round: 'won' or the name of the error it got."""

    worker: int
    round: int
    tag: int
    result: str


def _race_worker(url: str, worker: int, rounds: int, overwrite: bool, first_step: int,
                 barrier: Any, queue: Any) -> None:
    store = ckptstore.open(url)
    for r in range(rounds):
        tag = (r + 1) * 1000 + worker
        state = state_for(tag)
        barrier.wait(timeout=120)
        try:
            store.save(first_step + r, state, overwrite=overwrite)
            result = "won"
        except ckptstore.CkptStoreError as exc:
            result = type(exc).__name__
        except Exception as exc:  # reported, and the test fails on it
            result = f"untyped {type(exc).__name__}: {exc}"
        queue.put(Outcome(worker, r, tag, result))
    store.close()


def race_commit(url: str, *, processes: int = 8, rounds: int = 1, overwrite: bool = False,
                first_step: int = 0, timeout: float = 600) -> list[list[Outcome]]:
    """`processes` processes commit the same step at once, `rounds` times; outcomes per round."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes)
    queue = ctx.Queue()
    workers = [ctx.Process(target=_race_worker, args=(url, w, rounds, overwrite, first_step, barrier, queue))
               for w in range(processes)]
    for p in workers:
        p.start()
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + timeout
    while len(outcomes) < processes * rounds:
        outcomes.append(queue.get(timeout=max(1.0, deadline - time.monotonic())))
    for p in workers:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"race worker exited with {p.exitcode}")
    return [sorted((o for o in outcomes if o.round == r), key=lambda o: o.worker) for r in range(rounds)]


def crash_saver(url: str, first_step: int, overwrite_every: int) -> None:
    """Save steps first_step, first_step+1, ... forever (until killed), printing each commit.

    Every `overwrite_every`-th save instead overwrites the previous step with a new tag, so a
    kill can land in the middle of an overwrite too. Prints "ready" once the store is open,
    then one line "<step> <tag>" per commit.
    """
    store = ckptstore.open(url, chunking=ckptstore.ChunkingPolicy(chunk_size=64 << 10, small_tensor_limit=1024,
                                                                  pack_size=4096))
    print("ready", flush=True)  # the test times its kill from here, not from the interpreter's start
    step = first_step
    n = 0
    while True:
        n += 1
        if overwrite_every and n % overwrite_every == 0 and step > first_step:
            target, tag, overwrite = step - 1, 10_000_000 + n, True
        else:
            target, tag, overwrite = step, step, False
            step += 1
        store.save(target, state_for(tag, elements=64 * 1024), overwrite=overwrite)
        print(f"{target} {tag}", flush=True)


#: Small chunks so a modest state makes many chunk uploads (and a kill lands among them).
RESUME_CHUNKING = ckptstore.ChunkingPolicy(chunk_size=64 << 10, small_tensor_limit=1024, pack_size=4096)


def big_state(seed: int, *, mib: int = 16) -> dict[str, Any]:
    """A deterministic state of `mib` MiB of random float32, in 4 tensors."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}": torch.randn(mib * (1 << 18) // 4, generator=g) for i in range(4)}


def slow_saver(url: str, step: int, seed: int, delay: float) -> None:
    """Save big_state(seed) as `step`, one chunk at a time, sleeping `delay` before each chunk put."""
    from ckptstore.store import Store
    from ckptstore.testing.wrappers import SlowPutBackend
    from ckptstore.url import open_backend

    backend = SlowPutBackend(open_backend(url), prefix="chunks/", delay=delay)
    Store(backend, chunking=RESUME_CHUNKING, threads=1).save(step, big_state(seed))
    print("committed", flush=True)


#: Chunk variants the stress writers draw from: a small pool, so steps share chunks and
#: later saves dedupe against chunks that retention orphaned earlier.
STRESS_VARIANTS = 12
STRESS_CHUNKING = ckptstore.ChunkingPolicy(chunk_size=32 << 10, small_tensor_limit=512, pack_size=2048)


def stress_state(step: int) -> dict[str, Any]:
    """The state stress writers save as `step`: 4 tensors picked from STRESS_VARIANTS."""
    import torch

    picks = [(step * 7 + i * 5) % STRESS_VARIANTS for i in range(4)]
    return {f"t{i}": torch.randn(8 << 10, generator=torch.Generator().manual_seed(v)) for i, v in enumerate(picks)}


def stress_writer(url: str, writer: int, saves: int) -> None:
    """Save steps writer*100000 + 1 .. + `saves`, keeping the last 2 (so earlier steps' refs
    are deleted and their chunks orphaned while later saves reuse them). After each save it
    waits until a gc has swept since (the epoch's last_sweep moved), so every save but the
    first runs after a sweep whatever the machine's load: the interleaving is guaranteed,
    not left to timing."""
    import random

    from ckptstore.epoch import read_epoch

    rng = random.Random(writer)
    store = ckptstore.open(url, chunking=STRESS_CHUNKING)
    for n in range(1, saves + 1):
        step = writer * 100_000 + n
        swept_before = read_epoch(store.backend)[0].last_sweep
        store.save(step, stress_state(step), keep_last=2)
        print(f"committed {step}", flush=True)
        time.sleep(rng.uniform(0.05, 0.4))  # trainers compute between saves
        deadline = time.monotonic() + 120
        while n < saves and read_epoch(store.backend)[0].last_sweep <= swept_before:
            if time.monotonic() > deadline:
                raise SystemExit(f"writer {writer}: no gc swept within 120 s after step {step}")
            time.sleep(0.05)


def stress_gc(url: str, stop_file: str, delete_delay: float) -> None:
    """Run gc(min_age=0) back to back until `stop_file` exists; each delete delayed by `delete_delay`."""
    import os

    from ckptstore.store import Store
    from ckptstore.testing.wrappers import SlowDeleteBackend
    from ckptstore.url import open_backend

    backend = open_backend(url)
    store = Store(SlowDeleteBackend(backend, delay=delete_delay) if delete_delay else backend)
    while not os.path.exists(stop_file):
        report = store.gc(min_age=0)
        print(f"gc ran={int(report.ran)} deleted={report.deleted_chunks + report.deleted_manifests}", flush=True)


USAGE = """usage: python -m ckptstore.testing.scenarios crash-saver URL FIRST_STEP OVERWRITE_EVERY
       python -m ckptstore.testing.scenarios slow-saver URL STEP SEED DELAY
       python -m ckptstore.testing.scenarios stress-writer URL WRITER SAVES
       python -m ckptstore.testing.scenarios stress-gc URL STOP_FILE DELETE_DELAY"""

if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "crash-saver":
        crash_saver(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) == 6 and sys.argv[1] == "slow-saver":
        slow_saver(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    elif len(sys.argv) == 5 and sys.argv[1] == "stress-writer":
        stress_writer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) == 5 and sys.argv[1] == "stress-gc":
        stress_gc(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        sys.exit(USAGE)
