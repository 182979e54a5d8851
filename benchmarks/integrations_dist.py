"""First save and resume of the OLMo-core and torchtitan integrations, against each trainer's
own checkpointing, on the same fully_shard-ed model, 2 gloo ranks on CPU.

    python -m benchmarks.integrations_dist                 # width 512: ~8 MB of weights, 3 runs
    python -m benchmarks.integrations_dist --width 64 --runs 1 --json out.json

Rows (seconds; the slowest rank's time between two barriers; the median of --runs):
- olmo-core: `olmo_core.distributed.checkpoint.save_model_and_optim_state(dir, ...)` vs
  `ckptstore.integrations.olmo_core.save_model_and_optim_state(store, step, ...)`, and the
  matching `load_model_and_optim_state` into a freshly built model and optimizer.
- torchtitan: torchtitan's CheckpointManager (folder) vs StoreCheckpointManager (local store),
  `async_mode="async"`: `save(step)` + `maybe_wait_for_saving()`; resume is `load()` in a new
  manager over a freshly built model.
Each run saves into a fresh directory / store, so every save is a first save (no dedup); a
warm-up run at width 8 goes first and is not recorded. `register()` adds both to the registry
of `python -m benchmarks --integrations` (benchmarks/integrations.py) at width 64.

Needs `pip install 'ckptstore[olmo-core,torchtitan]'`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

WORLD = 2


def _model(width: int, seed: int) -> Any:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.ReLU(), torch.nn.Linear(4 * width, width))
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    return model


def _train_once(model: Any, step_optimizer: Callable[[], None], width: int) -> None:
    """One step, so that the optimizer has state to save."""
    import torch
    import torch.distributed as dist

    x = torch.randn(4, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    model(x).square().mean().backward()
    step_optimizer()


@contextmanager
def _timed(into: dict[str, float], name: str) -> Iterator[None]:
    """Time the block between two barriers; record the slowest rank's seconds."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    began = time.perf_counter()
    yield
    dist.barrier()
    took = torch.tensor([time.perf_counter() - began], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    into[name] = float(took.item())


def olmo_core_timings(width: int, where: Path) -> dict[str, float]:
    """OLMo-core's own functions to a directory vs the integration to a local store."""
    import torch
    from olmo_core.distributed import checkpoint as olmo

    import ckptstore
    from ckptstore.integrations import olmo_core as ours

    def built(seed: int) -> tuple[Any, Any]:
        model = _model(width, seed)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    model, optim = built(0)
    _train_once(model, optim.step, width)
    store = ckptstore.open(where / "store")
    out: dict[str, float] = {}
    with _timed(out, "trainer save"):
        olmo.save_model_and_optim_state(str(where / "dir"), model, optim)
    with _timed(out, "ckptstore save"):
        ours.save_model_and_optim_state(store, 1, model, optim)
    fresh, fresh_optim = built(1)
    with _timed(out, "trainer resume"):
        olmo.load_model_and_optim_state(str(where / "dir"), fresh, fresh_optim)
    fresh, fresh_optim = built(1)
    with _timed(out, "ckptstore resume"):
        ours.load_model_and_optim_state(store, 1, fresh, fresh_optim)
    return out


def torchtitan_timings(width: int, where: Path) -> dict[str, float]:
    """torchtitan's CheckpointManager to a folder vs StoreCheckpointManager to a local store."""
    from torchtitan.components.checkpointer.dcp import CheckpointManager
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig

    from ckptstore.integrations.torchtitan import StoreCheckpointManager

    def manager(kind: str, seed: int) -> Any:
        model = _model(width, seed)
        adamw = ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})
        optimizers = OptimizersContainer(OptimizersContainer.Config(param_groups=[adamw], implementation="for-loop"),
                                         model_parts=[model])
        _train_once(model, optimizers.step, width)
        schedulers = LRSchedulersContainer.Config(warmup_steps=1).build(optimizers=optimizers, training_steps=10)
        parts = {"dataloader": None, "model_parts": [model], "optimizers": optimizers, "lr_schedulers": schedulers,
                 "states": {}, "sd_adapter": None}
        if kind == "trainer":
            return CheckpointManager(CheckpointManager.Config(enable=True, interval=1, async_mode="async",
                                                              keep_latest_k=0, folder=str(where / "folder")), **parts)
        return StoreCheckpointManager(StoreCheckpointManager.Config(enable=True, interval=1, async_mode="async",
                                                                    keep_latest_k=0,
                                                                    store_url=str(where / "store")), **parts)

    out: dict[str, float] = {}
    for kind in ("trainer", "ckptstore"):
        saving = manager(kind, 0)
        with _timed(out, f"{kind} save"):
            saving.save(1)
            saving.maybe_wait_for_saving()
        saving.close()
        resuming = manager(kind, 1)
        with _timed(out, f"{kind} resume"):
            assert resuming.load()
        resuming.close()
    return out


#: Integration name -> timing function(width, scratch dir) run on every rank; seconds by row.
TIMINGS: dict[str, Callable[[int, Path], dict[str, float]]] = {
    "olmo-core": olmo_core_timings,
    "torchtitan": torchtitan_timings,
}


def _rank(rank: int, rdzv: str, names: list[str], width: int, runs: int, scratch: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD)
    for name in names:  # warm-up, not recorded: first imports and first collectives of each path
        TIMINGS[name](8, Path(scratch, f"{name}-warmup"))
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for run in range(runs):
        for name in names:
            where = Path(scratch, f"{name}-{run}")
            results[name].append(TIMINGS[name](width, where))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    sys.stdout.flush()
    os._exit(0)  # no gloo teardown at exit (it sometimes aborts)


def measure(names: list[str], *, width: int, runs: int, scratch: Path) -> dict[str, dict[str, float]]:
    """Run the timings on WORLD spawned gloo ranks; the median seconds per integration and row."""
    out = scratch / "timings.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(rank, str(scratch / "rdzv"), names, width, runs, str(scratch), str(out)))
             for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    codes = [proc.exitcode for proc in procs]
    if codes != [0] * WORLD:
        raise RuntimeError(f"benchmark ranks exited with {codes}")
    raw: dict[str, list[dict[str, float]]] = json.loads(out.read_text())
    return {name: {row: statistics.median(run[row] for run in runs_) for row in runs_[0]}
            for name, runs_ in raw.items()}


# -- the registry of `python -m benchmarks --integrations` (benchmarks/integrations.py) --------
#: Width of the model the registry times: the tiny one of the other integrations' rows.
REGISTRY_WIDTH = 64
_WHAT = {
    "olmo-core": "2 gloo ranks; save: OLMo-core's save_model_and_optim_state to a dir vs the integration's to a "
                 "store; resume: load_model_and_optim_state into a fresh FSDP model",
    "torchtitan": "2 gloo ranks; save: CheckpointManager (folder) vs StoreCheckpointManager, async, save + wait; "
                  "resume: load() in a new manager",
}
_REQUIRES = {"olmo-core": ("olmo_core",), "torchtitan": ("torchtitan",)}


def _registry_measure(name: str) -> Callable[[Path], dict[str, float]]:
    """The registry's measure(tmp) for `name`: one run on WORLD spawned ranks, its four ops."""

    def measure_one(tmp: Path) -> dict[str, float]:
        rows = measure([name], width=REGISTRY_WIDTH, runs=1, scratch=Path(tempfile.mkdtemp(dir=tmp)))[name]
        return {"own_save": rows["trainer save"], "store_save": rows["ckptstore save"],
                "own_resume": rows["trainer resume"], "store_resume": rows["ckptstore resume"]}

    return measure_one


def register() -> None:
    """Add olmo-core and torchtitan to benchmarks/integrations.py's REGISTRY."""
    from benchmarks.integrations import integration

    for name in TIMINGS:
        integration(name, requires=_REQUIRES[name], what=_WHAT[name])(_registry_measure(name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.integrations_dist", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(TIMINGS), help=f"comma list of {', '.join(TIMINGS)}")
    p.add_argument("--width", type=int, default=512, help="model width: Linear(w, 4w), Linear(4w, w) (default 512)")
    p.add_argument("--runs", type=int, default=3, help="runs; the median is reported (default 3)")
    p.add_argument("--json", type=Path, help="also write the medians here")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(TIMINGS))
    if unknown:
        p.error(f"unknown integrations {unknown}; choose from {', '.join(TIMINGS)}")
    with tempfile.TemporaryDirectory(prefix="ckptstore-integrations-") as scratch:
        medians = measure(names, width=args.width, runs=args.runs, scratch=Path(scratch))
    weights_mb = 2 * 4 * args.width * args.width * 4 / 1e6
    print(f"{WORLD} gloo ranks, width {args.width} (~{weights_mb:.1f} MB of weights, 3x with AdamW state), "
          f"median of {args.runs}")
    print(f"{'integration':<12} {'op':<8} {'trainer s':>10} {'ckptstore s':>12}")
    for name, rows in medians.items():
        for op in ("save", "resume"):
            print(f"{name:<12} {op:<8} {rows[f'trainer {op}']:>10.3f} {rows[f'ckptstore {op}']:>12.3f}")
    if args.json:
        args.json.write_text(json.dumps(medians, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
