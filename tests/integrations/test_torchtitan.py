"""torchtitan's CheckpointManager into a store (ckptstore.integrations.torchtitan), on 2 gloo ranks.

A first job trains a fully_shard-ed MLP with torchtitan's OptimizersContainer and
LRSchedulersContainer, saving every 2 steps through StoreCheckpointManager, and then trains
on without saving: that is the uninterrupted run. A second job, in a new process group, builds
the model from another seed, resumes from the store's latest step and trains the same steps:
its resumed model, optimizer and scheduler state must equal what the first job had at that
step, and its losses must equal the uninterrupted run's, exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ranks
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig

import ckptstore
from ckptstore.errors import InvalidArgumentError
from ckptstore.integrations.torchtitan import StoreCheckpointManager

SAVED_UNTIL = 6  # the first job's last saved step
STEPS = 8


def _build(url: str, async_mode: str, keep: int, seed: int) -> tuple[torch.nn.Module, OptimizersContainer,
                                                          LRSchedulersContainer, StoreCheckpointManager]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    fully_shard(model, mesh=init_device_mesh("cpu", (ranks.WORLD,)))
    adamw = ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})
    optimizers = OptimizersContainer(OptimizersContainer.Config(param_groups=[adamw], implementation="for-loop"),
                                     model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=3).build(optimizers=optimizers, training_steps=STEPS)
    config = StoreCheckpointManager.Config(enable=True, interval=2, async_mode=async_mode, keep_latest_k=keep,
                                           store_url=url)
    manager = config.build(dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
                           states={}, sd_adapter=None)
    assert isinstance(manager, StoreCheckpointManager)
    return model, optimizers, schedulers, manager


def _train_step(model: torch.nn.Module, optimizers: OptimizersContainer, schedulers: LRSchedulersContainer,
                step: int) -> float:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + torch.distributed.get_rank()))
    loss = torch.nn.functional.mse_loss(model(x), torch.sin(x))
    loss.backward()
    optimizers.step()
    optimizers.zero_grad()
    schedulers.step()
    return loss.item()


def _state(model: torch.nn.Module, optimizers: OptimizersContainer,
           schedulers: LRSchedulersContainer) -> dict[str, Any]:
    """Full (unsharded) weights and Adam state, and the schedulers' position; a collective."""
    adamw = optimizers.optimizers[0]
    return {"weights": [p.full_tensor().tolist() for p in model.parameters()],
            "exp_avg": [adamw.state[p]["exp_avg"].full_tensor().tolist() for p in model.parameters()],
            "adam_step": [float(adamw.state[p]["step"]) for p in model.parameters()],
            "lr": [group["lr"] for group in adamw.param_groups],
            "scheduler": [s.last_epoch for s in schedulers.schedulers]}


def _first_job(rank: int, tmp: str, url: str, async_mode: str, keep: int) -> None:
    ranks.join_group(rank, tmp, "first")
    model, optimizers, schedulers, manager = _build(url, async_mode, keep, seed=0)
    fresh = manager.load()
    losses = {}
    for step in range(1, STEPS + 1):
        losses[step] = _train_step(model, optimizers, schedulers, step)
        if step <= SAVED_UNTIL:
            manager.save(step)  # every `interval` steps; later steps are the uninterrupted run's only
        if step == SAVED_UNTIL:
            manager.maybe_wait_for_saving()
            at_saved_step = _state(model, optimizers, schedulers)
    manager.close()
    ranks.report(tmp, "first", rank, {"loaded": fresh, "losses": losses, "state": at_saved_step})
    ranks.leave()


def _resumed_job(rank: int, tmp: str, url: str, async_mode: str, keep: int) -> None:
    ranks.join_group(rank, tmp, "resumed")
    model, optimizers, schedulers, manager = _build(url, async_mode, keep, seed=1)  # other weights until loaded
    loaded = manager.load()
    state = _state(model, optimizers, schedulers)
    start = state["scheduler"][0]  # the step the loaded state was saved at
    losses = {step: _train_step(model, optimizers, schedulers, step) for step in range(start + 1, STEPS + 1)}
    manager.close()
    ranks.report(tmp, "resumed", rank, {"loaded": loaded, "losses": losses, "state": state})
    ranks.leave()


@pytest.mark.parametrize(("backend", "async_mode", "keep"),
                         [("local", "async", 2), ("local", "disabled", 2), ("s3", "async", 10)])
def test_a_resumed_job_has_the_saved_state_and_the_uninterrupted_runs_losses(
        backend: str, async_mode: str, keep: int, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = str(tmp_path / "store") if backend == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/titan"
    tmp = str(tmp_path)
    ranks.run(_first_job, tmp, url, async_mode, keep)
    # keep_latest_k is store retention: with 2, step 2 was deleted once step 6 committed
    assert ckptstore.open(url, create=False).steps() == ([4, 6] if keep == 2 else [2, 4, 6])
    ranks.run(_resumed_job, tmp, url, async_mode, keep)

    for first, resumed in zip(ranks.reports(tmp, "first"), ranks.reports(tmp, "resumed"), strict=True):
        assert first["loaded"] is False and resumed["loaded"] is True  # a fresh start, then a resume
        assert resumed["state"]["scheduler"] == [SAVED_UNTIL], resumed["state"]["scheduler"]
        assert resumed["state"] == first["state"], "the resumed state differs from the saved one"
        uninterrupted = {step: loss for step, loss in first["losses"].items() if int(step) > SAVED_UNTIL}
        assert resumed["losses"] == uninterrupted and len(uninterrupted) == STEPS - SAVED_UNTIL


def test_unsupported_settings_are_refused_up_front() -> None:
    def config(**overrides: Any) -> StoreCheckpointManager.Config:
        return StoreCheckpointManager.Config(**{"enable": True, "store_url": "memory://titan", **overrides})

    cases = {"async_with_pinned_mem": config(async_mode="async_with_pinned_mem"),
             "last_save_in_hf": config(last_save_in_hf=True, last_save_model_only=True),
             "needs a store": config(store_url="")}
    for expected, bad in cases.items():
        with pytest.raises(InvalidArgumentError, match=expected):
            StoreCheckpointManager(bad, dataloader=None, model_parts=[], optimizers=None,  # type: ignore[arg-type]
                                   lr_schedulers=None, states={}, sd_adapter=None)  # type: ignore[arg-type]
