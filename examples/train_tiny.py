"""A tiny trainer that checkpoints into a ckptstore store through torch.distributed.checkpoint.

Runs on CPU with gloo, on one process or under torchrun on several:

    python examples/train_tiny.py --store /tmp/run1 --steps 20 --save-every 5
    torchrun --standalone --nproc-per-node 2 examples/train_tiny.py --store s3://bucket/run1

- The model is sharded with FSDP2 (`fully_shard`) over all ranks, so each rank saves only its
  shards (DTensors); a run can resume at another world size (DCP reshards on load).
- Every `--save-every` steps the model, optimizer and step counter are saved as that step with
  `dcp.async_save(..., storage_writer=StoreWriter(store, step))`: DCP copies the state first
  (training goes on at once) and writes it in a background thread; at most one save is in
  flight (the next save, and the end of training, wait for the previous one). `--sync` saves
  with `dcp.save` instead.
- On start it resumes from the latest committed step (`--resume latest`, the default); a
  killed run loses at most the steps since its last committed save. `--resume none` trains
  from scratch, and then saving over a step that exists raises StepExistsError unless
  `--save-overwrite` is given, which replaces such a step atomically.
- Batches depend only on (seed, step, rank), so a resumed run computes the same model as an
  uninterrupted one (tests/test_examples.py checks that bit for bit).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptstore
import ckptstore.dcp
from ckptstore.dcp import StoreWriter, unwrap
from ckptstore.errors import StepExistsError

DIM, HIDDEN = 16, 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="checkpoints", help="store URL or local directory (default: ./checkpoints)")
    p.add_argument("--steps", type=int, default=20, help="train until this step (total, not per run)")
    p.add_argument("--save-every", type=int, default=5, help="save every N steps")
    p.add_argument("--resume", default="latest", help="'latest' (default), 'none', or a step number")
    p.add_argument("--save-overwrite", action="store_true",
                   help="replace a step that already exists (default: StepExistsError)")
    p.add_argument("--sync", action="store_true", help="save synchronously (dcp.save) instead of async_save")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--kill-after", type=int, default=None, metavar="STEP",
                   help="testing: end the process abruptly (os._exit) right after this step, like a kill")
    return p.parse_args(argv)


def init_distributed() -> None:
    """gloo from torchrun's environment, or a one-process group when run without torchrun."""
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        fd, rendezvous = tempfile.mkstemp(prefix="train_tiny-")
        os.close(fd)
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(args.seed)  # the same initial weights on every rank before sharding
    model = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, DIM))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=args.lr)


def batch(seed: int, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank)
    x = torch.randn(8, DIM, generator=g)
    return x, torch.sin(x)


def checkpoint_state(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optim)  # DTensor shards, optimizer state by fqn
    return {"model": model_sd, "optim": optim_sd, "train": {"step": step}}


def resume_step(store: ckptstore.Store, how: str) -> int | None:
    """The step to resume from, decided on rank 0 and broadcast (a save committing meanwhile
    cannot make ranks disagree)."""
    choice: list[int | None] = [None]
    if dist.get_rank() == 0:
        if how == "latest":
            try:
                choice[0] = store.latest()
            except ckptstore.StoreNotFoundError:  # the first run: no store yet, train from scratch
                choice[0] = None
        elif how != "none":
            choice[0] = int(how)
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def load(store: ckptstore.Store, step: int, model: torch.nn.Module, optim: torch.optim.Optimizer) -> int:
    state = checkpoint_state(model, optim, -1)
    ckptstore.dcp.load(state, store, step)  # in place into the shards; resharded if the world size changed
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["train"]["step"])


class Saver:
    """At most one checkpoint in flight; errors of an async save surface at the next wait."""

    def __init__(self, store: ckptstore.Store, *, overwrite: bool, sync: bool):
        self.store, self.overwrite, self.sync = store, overwrite, sync
        self.pending: Future[Any] | None = None
        self.pending_step: int | None = None
        # async_save runs DCP's collectives in a background thread: give it its own group, so
        # they never interleave with the training collectives on the default group.
        self.group = None if sync else dist.new_group(backend="gloo")

    def save(self, state: dict[str, Any], step: int) -> None:
        self.wait()
        writer = StoreWriter(self.store, step, overwrite=self.overwrite)
        if self.sync:
            self._check(lambda: dcp.save(state, storage_writer=writer), step)
        else:
            self.pending = dcp.async_save(state, storage_writer=writer, process_group=self.group)
            self.pending_step = step

    def wait(self) -> None:
        if self.pending is not None:
            pending, step = self.pending, self.pending_step
            self.pending = self.pending_step = None
            assert step is not None
            self._check(pending.result, step)

    def _check(self, run: Any, step: int) -> None:
        started = time.monotonic()
        try:
            run()
        except BaseException as exc:
            inner = unwrap(exc)  # DCP wraps the coordinator's error; raise ckptstore's own
            if isinstance(inner, StepExistsError):
                if dist.get_rank() == 0:
                    print(f"train_tiny: step {step} already exists in {self.store.url}: rerun with "
                          f"--save-overwrite to replace it, or with --resume latest to continue from the "
                          f"latest step", file=sys.stderr, flush=True)
                raise inner from exc
            if inner is not None and inner is not exc:
                raise inner from exc
            raise
        log(f"saved step {step} ({time.monotonic() - started:.2f}s waited)")


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"train_tiny: {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    init_distributed()
    try:
        rank = dist.get_rank()
        store = ckptstore.open(args.store)
        model, optim = build(args)
        start = 0
        step = resume_step(store, args.resume)
        if step is not None:
            start = load(store, step, model, optim)
            log(f"resumed from step {start} of {store.url} at world size {dist.get_world_size()}")
        saver = Saver(store, overwrite=args.save_overwrite, sync=args.sync)
        for step in range(start + 1, args.steps + 1):
            x, y = batch(args.seed, step, rank)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optim.step()
            optim.zero_grad()
            if step % args.save_every == 0:
                saver.save(checkpoint_state(model, optim, step), step)
            if args.kill_after == step:
                log(f"killed after step {step}")
                os._exit(137)  # no cleanup, no wait for an in-flight save: as a SIGKILL would
        saver.wait()
        log(f"done at step {args.steps}, loss {loss.item() if args.steps > start else float('nan'):.5f}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gloo's threads destroyed at exit sometimes abort (tests/test_dcp.py).
    os._exit(code)
