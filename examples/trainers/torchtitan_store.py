"""torchtitan's CheckpointManager saving to and loading from a ckptstore store.

Run (CPU, gloo, 2 ranks; in a venv with torchtitan and ckptstore installed):

    torchrun --standalone --nproc-per-node 2 examples/trainers/torchtitan_store.py /tmp/titan-store

torchtitan 0.3.0's CheckpointManager (torchtitan.components.checkpointer.dcp) calls
`dcp.save(state, checkpoint_id=<folder>/step-N)` in `dcp_save` and `dcp.load(state,
checkpoint_id=...)` in `dcp_load`, and finds the step to resume from by listing step-N folders
(`_find_load_step`, `_load`); it has no storage_writer option for its own format. The subclass
below overrides those hooks: saves go through StoreWriter (async_mode="async" keeps torchtitan's
`dcp.async_save` on its gloo group), `_load` resumes from the store's latest step, and the
folder-based purge is switched off (keep_latest_k=0; use store retention / ckptstore gc).
The model, optimizers, lr schedulers and the extra `states` are torchtitan's own Stateful
wrappers, unchanged.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torchtitan.components.checkpointer.dcp import AsyncMode, CheckpointManager
from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig

import ckptstore
import ckptstore.dcp
from ckptstore.dcp import StoreReader, StoreWriter


def step_of(checkpoint_id: str) -> int:
    return int(checkpoint_id.rsplit("step-", 1)[1])


class StoreCheckpointManager(CheckpointManager):
    """CheckpointManager whose checkpoints are steps of a ckptstore store."""

    def __init__(self, config: CheckpointManager.Config, *, store: ckptstore.Store, save_overwrite: bool = False,
                 **kwargs: Any) -> None:
        self.store = store
        self.save_overwrite = save_overwrite
        super().__init__(config, **kwargs)

    def dcp_save(self, state_dict: dict[str, Any], checkpoint_id: str, async_mode: AsyncMode,
                 enable_garbage_collection: bool = False, to_hf: bool = False) -> Any:
        assert not to_hf, "HF export is torchtitan's own writer; use `ckptstore export` instead"
        writer = StoreWriter(self.store, step_of(checkpoint_id), overwrite=self.save_overwrite)
        if async_mode == AsyncMode.ASYNC:
            return dcp.async_save(state_dict, storage_writer=writer, process_group=self.pg)
        assert async_mode == AsyncMode.DISABLED, "async_with_pinned_mem is not tried here"
        return dcp.save(state_dict, storage_writer=writer)

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        assert not from_hf
        dcp.load(state_dict, storage_reader=StoreReader(self.store, step_of(checkpoint_id)))
        if "model" in self.states:  # as torchtitan does: model states are flattened into state_dict
            self.states["model"].load_state_dict(state_dict)

    def _load(self, step: int = -1) -> bool:
        if step == -1:
            try:
                latest = self.store.latest()
            except ckptstore.StoreNotFoundError:  # nothing saved yet: a fresh run
                latest = None
            if latest is None:
                return False
            step = latest
        states = self._states_to_load(model_only=step == 0)
        self.dcp_load(states, checkpoint_id=f"step-{step}", from_hf=False, from_quantized=False)
        return True


def build(store: ckptstore.Store) -> tuple[torch.nn.Module, OptimizersContainer, StoreCheckpointManager]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    optimizers = OptimizersContainer(
        OptimizersContainer.Config(param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW",
                                                                  optimizer_kwargs={"lr": 1e-2})],
                                   implementation="for-loop"),
        model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=10)
    config = CheckpointManager.Config(enable=True, interval=2, async_mode="async", keep_latest_k=0,
                                      last_save_model_only=False)
    manager = StoreCheckpointManager(config, store=store, dataloader=None, model_parts=[model],
                                     optimizers=optimizers, lr_schedulers=schedulers, states={}, sd_adapter=None)
    return model, optimizers, manager


def train(store: ckptstore.Store, until: int) -> tuple[int, dict[str, torch.Tensor]]:
    model, optimizers, manager = build(store)
    manager.load()  # the latest step of the store, if any
    adamw = optimizers.optimizers[0]  # its per-parameter "step" says where the loaded state was saved
    start = int(next(iter(adamw.state.values()))["step"]) if adamw.state else 0
    for step in range(start + 1, until + 1):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step * 10 + dist.get_rank()))
        torch.nn.functional.mse_loss(model(x), torch.sin(x)).backward()
        optimizers.step()
        optimizers.zero_grad()
        manager.save(step, last_step=step == until)
    manager.maybe_wait_for_saving()
    manager.close()
    return start, {k: v.full_tensor() for k, v in model.state_dict().items()}


def main() -> None:
    dist.init_process_group("gloo")
    store = ckptstore.open(sys.argv[1])
    began = time.monotonic()
    start1, _ = train(store, 4)
    start2, final = train(store, 6)  # a new job: resumes from the store's latest step
    check = {k: torch.zeros_like(v) for k, v in final.items()}  # torchtitan saves model fqns at the top level
    ckptstore.dcp.load(check, store, 6)
    same = all(torch.equal(check[k], v) for k, v in final.items())
    if dist.get_rank() == 0:
        print(f"first job started at step {start1}, second at step {start2}; store steps {store.steps()}; "
              f"step 6 holds the final weights: {same} ({time.monotonic() - began:.1f}s)")
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0 if same and start2 == 4 else 1)


if __name__ == "__main__":
    main()
