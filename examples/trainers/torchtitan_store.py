"""torchtitan's CheckpointManager saving to and loading from a ckptstore store.

Run (CPU, gloo, 2 ranks; `pip install 'ckptstore[torchtitan]'`):

    torchrun --standalone --nproc-per-node 2 examples/trainers/torchtitan_store.py /tmp/titan-store

The integration is ckptstore.integrations.torchtitan.StoreCheckpointManager
(docs/INTEGRATIONS.md). This runner trains 4 steps with async saves every 2, then starts a
second job that resumes from the store's latest step and trains to step 6.
tests/integrations/test_torchtitan.py checks the resumed state and losses.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig

import ckptstore
import ckptstore.dcp
from ckptstore.integrations.torchtitan import StoreCheckpointManager


def train(url: str, until: int) -> tuple[int, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    adamw = ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})
    optimizers = OptimizersContainer(OptimizersContainer.Config(param_groups=[adamw], implementation="for-loop"),
                                     model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=10)
    config = StoreCheckpointManager.Config(enable=True, interval=2, async_mode="async", store_url=url,
                                           last_save_model_only=False)  # the last step resumes too
    manager = config.build(dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
                           states={}, sd_adapter=None)
    manager.load()  # the latest step of the store, if any
    start = schedulers.schedulers[0].last_epoch  # where the loaded state was saved
    for step in range(start + 1, until + 1):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step * 10 + dist.get_rank()))
        torch.nn.functional.mse_loss(model(x), torch.sin(x)).backward()
        optimizers.step()
        optimizers.zero_grad()
        schedulers.step()
        manager.save(step, last_step=step == until)
    manager.maybe_wait_for_saving()
    manager.close()
    return start, {k: v.full_tensor() for k, v in model.state_dict().items()}


def main() -> None:
    dist.init_process_group("gloo")
    url = sys.argv[1]
    start1, _ = train(url, 4)
    start2, final = train(url, 6)  # a new job: resumes from the store's latest step
    check = {k: torch.zeros_like(v) for k, v in final.items()}  # torchtitan saves model fqns at the top level
    store = ckptstore.open(url)
    ckptstore.dcp.load(check, store, 6)
    same = all(torch.equal(check[k], v) for k, v in final.items())
    if dist.get_rank() == 0:
        print(f"first job started at step {start1}, second at step {start2}; store steps {store.steps()}; "
              f"step 6 holds the final weights: {same}")
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0 if same and start2 == 4 else 1)


if __name__ == "__main__":
    main()
