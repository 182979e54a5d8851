"""Phase 1 of the plain multi-rank save (ckptstore/distributed.py), simulated in one process.

`python -m benchmarks.multirank_sim [RANKS] [TENSORS]` (default 256 ranks, 1,000 tensors each).

Each of R synthetic ranks builds the message it sends in phase 1 with the library's own code
(`introduce`: its skeleton and tensor descriptions); rank 0's merge (`merge_introductions`)
and the assignments it scatters (`MergedState.assignments`) run here, timed. No process
group: what each rank would receive is the pickled size of what torch's object collectives
deliver to it, counted the way torch 2.x sends them:

- `gather_object`: an all-gather of every object's size (8 B each, to every rank), then a
  gather to rank 0 of every object padded to the largest one;
- `scatter_object_list`: a broadcast of the largest size (8 B), then each rank its own object
  padded to the largest one, then its own size (8 B);
- `all_gather_object` (the protocol before: every rank received every rank's skeleton and
  every rank ran the merge): the sizes, then every object padded to the largest one.

A rank's own object does not travel and is not counted. Each rank's state: `tensors - 8`
tensors of its own, named like an FSDP shard's parameters, and 8 replicated tensors, a
replicated step and config (the replicated ones exercise the comparison path of the merge).
"""

from __future__ import annotations

import pickle  # only to measure what torch's object collectives would send (they pickle)
import sys
import time
from typing import Any

import torch

from ckptstore.distributed import introduce, merge_introductions

REPLICATED = 8
SIZE_BYTES = 8  # one int64 size per object in torch's object collectives


def rank_state(rank: int, tensors: int) -> dict[str, Any]:
    """What rank `rank` passes to save: its own tensors plus replicated values."""
    own = {f"layers.{i // 8}.rank{rank}.param{i % 8}.weight": torch.zeros(8) for i in range(tensors - REPLICATED)}
    shared = {f"rotary.{j}": torch.ones(4) for j in range(REPLICATED)}
    return {"model": own, "shared": shared, "step": 1000, "config": {"lr": 3e-4, "betas": (0.9, 0.95)}}


def run(ranks: int = 256, tensors: int = 1000) -> dict[str, Any]:
    """Bytes each rank receives in phase 1 (before: all-gather; now: gather + scatter) and the
    seconds of rank 0's merge (wall and CPU: decoding the R skeletons, merging, assigning).
    `received_bytes[r]` is rank r's, now."""
    if tensors < REPLICATED or ranks < 2:
        raise ValueError(f"need ranks >= 2 and tensors >= {REPLICATED}")
    intros = [introduce(rank_state(rank, tensors), 7, []) for rank in range(ranks)]
    skeleton = max(len(pickle.dumps(intro)) for intro in intros)

    started, cpu = time.perf_counter(), time.process_time()
    merged = merge_introductions(intros)
    assignments = merged.assignments(ranks)
    merge_seconds, merge_cpu = time.perf_counter() - started, time.process_time() - cpu
    assignment = max(len(pickle.dumps(a)) for a in assignments)

    sizes = ranks * SIZE_BYTES  # gather_object's all-gather of sizes
    rank0 = sizes + (ranks - 1) * skeleton
    other = sizes + SIZE_BYTES + assignment + SIZE_BYTES
    before = sizes + (ranks - 1) * skeleton  # all_gather_object, on every rank
    return {
        "ranks": ranks,
        "tensors_per_rank": tensors,
        "merged_tensors": len(merged.owners),
        "skeleton_bytes": skeleton,
        "assignment_bytes": assignment,
        "received_bytes": [rank0] + [other] * (ranks - 1),
        "rank0_received_bytes": rank0,
        "other_rank_received_bytes": other,
        "total_received_bytes": rank0 + other * (ranks - 1),
        "rank0_merge_seconds": merge_seconds,
        "rank0_merge_cpu_seconds": merge_cpu,  # the same on a loaded machine
        "before_received_bytes_per_rank": before,
        "before_total_received_bytes": before * ranks,
    }


def main(argv: list[str]) -> int:
    ranks = int(argv[0]) if argv else 256
    tensors = int(argv[1]) if len(argv) > 1 else 1000
    result = run(ranks, tensors)
    mb = 1e6
    print(f"plain multi-rank save, phase 1: {ranks} ranks x {tensors} tensors "
          f"({result['merged_tensors']} merged; skeleton {result['skeleton_bytes']} B, "
          f"assignment {result['assignment_bytes']} B)")
    print("| | rank 0 receives | each other rank receives | all ranks | merge runs on |")
    print("|---|---|---|---|---|")
    before = result["before_received_bytes_per_rank"] / mb
    print(f"| before (all-gather) | {before:.2f} MB | {before:.2f} MB | "
          f"{result['before_total_received_bytes'] / mb:.0f} MB | every rank |")
    print(f"| now (gather + scatter) | {result['rank0_received_bytes'] / mb:.2f} MB | "
          f"{result['other_rank_received_bytes'] / 1e3:.1f} kB | {result['total_received_bytes'] / mb:.1f} MB | "
          f"rank 0: {result['rank0_merge_seconds']:.2f} s ({result['rank0_merge_cpu_seconds']:.2f} s CPU) |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
