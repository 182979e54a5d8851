"""Builds the stores `python -m benchmarks --scale` measures, through `Store.save`.

    python -m benchmarks.scale_build steps URL --first A --count N [--worker I --workers P]
    python -m benchmarks.scale_build chunks URL --step S --chunks N --offset O
    python -m benchmarks.scale_build mirror URL --source DIR

`mirror` copies every object of the local store DIR into URL (S3): a byte copy of a store
Store.save built, because 10,000 saves on SeaweedFS take ~80 ms each here (13 min; threads do
not help on 2 cores) while 30k puts from 16 threads take ~1-2 min.

`steps`: saves steps A..A+N-1 (this worker's share: step % P == I). Each state holds a
tensor every step shares, one shared by a window of 10 steps and one of its own (each over
the small-tensor limit, so a chunk of its own), plus the step number: ~1.1 new chunks a
step, the rest deduplicated. `chunks`: one step of N distinct 64-byte chunks (a tensor cut
with chunk_size=64), for the gc store.

Only the build is made faster, never what is measured: this process turns os.fsync into a
no-op (this machine's ext4 takes ~1.3 ms to create a file and the stores are scratch), and
skips the save's read of the previous step's chunk list when the code has one (it lists
refs/steps/ on every save; the save then HEADs its few chunks instead). The objects written
are exactly those Store.save writes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

STEP_POLICY = dict(chunk_size=4096, small_tensor_limit=64, pack_size=4096)
CHUNK_BYTES = 64


def _fast_build() -> None:
    os.fsync = lambda fd: None  # scratch store: durability is not what this process measures
    from ckptstore.store import Store

    if hasattr(Store, "previous_chunks"):
        Store.previous_chunks = lambda self: {}  # type: ignore[method-assign]


def step_state(step: int) -> dict[str, Any]:
    import torch

    return {"shared": torch.arange(256, dtype=torch.float32),
            "group": torch.full((128,), float(step // 10), dtype=torch.float32),
            "own": torch.full((64,), float(step), dtype=torch.float32),
            "step": step}


def save_steps(url: str, first: int, count: int, worker: int = 0, workers: int = 1) -> int:
    import ckptstore

    store = ckptstore.open(url, chunking=ckptstore.ChunkingPolicy(**STEP_POLICY), threads=4)
    n = 0
    for step in range(first, first + count):
        if step % workers == worker:
            store.save(step, step_state(step))
            n += 1
    store.close()
    return n


def save_chunks(url: str, step: int, chunks: int, offset: int) -> None:
    """One step of `chunks` distinct chunks: int32 values offset.. (16 values a chunk).

    A local URL is built through memory:// and then written out as files at the local
    backend's layout (<root>/<key>): the objects Store.save wrote, without the local put's
    staging file, link and unlink (~300 us a chunk on tmpfs, 10^6 chunks: 5 min on 2 cores).
    Only chunks/, manifests/, refs/ and the marker are written (the marker only if absent).
    """
    import torch

    import ckptstore

    per = CHUNK_BYTES // 4
    local = "://" not in url
    target = f"memory://scale-build-{os.getpid()}-{step}" if local else url
    store = ckptstore.open(target, chunking=ckptstore.ChunkingPolicy(
        chunk_size=CHUNK_BYTES, small_tensor_limit=0, pack_size=CHUNK_BYTES), threads=4)
    store.save(step, {"w": torch.arange(offset * per, (offset + chunks) * per, dtype=torch.int32)})
    if local:
        write_files(store.backend, url)
    store.close()


def write_files(backend: Any, root: str) -> int:
    """Write every chunks/, manifests/, refs/ object and the marker of `backend` under `root`."""
    made: set[str] = set()
    n = 0
    for info in backend.list(""):
        key = info.key
        if not key.startswith(("chunks/", "manifests/", "refs/", "CKPTSTORE")):
            continue
        path = os.path.join(root, *key.split("/"))
        folder = os.path.dirname(path)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue  # the marker another builder wrote (the same hash algorithm)
        try:
            os.write(fd, bytes(backend.get(key).data))
        finally:
            os.close(fd)
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_build")
    p.add_argument("what", choices=["steps", "chunks", "mirror"])
    p.add_argument("url")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--step", type=int, default=0)
    p.add_argument("--chunks", type=int, default=0)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--source", default="", help="mirror: the local store to copy into URL")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if args.what == "mirror":
        from benchmarks.scale_op import mirror
        from ckptstore.url import open_backend

        mirror(args.source, open_backend(args.url))
        return 0
    if args.fast:
        _fast_build()
    if args.what == "steps":
        save_steps(args.url, args.first, args.count, args.worker, args.workers)
    else:
        save_chunks(args.url, args.step, args.chunks, args.offset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
