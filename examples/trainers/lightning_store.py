"""Lightning's ModelParallelStrategy (FSDP2) checkpointing into a ckptstore store: a runner for
`ckptstore.integrations.lightning.StoreModelParallelStrategy` (docs/INTEGRATIONS.md).

Run (CPU, gloo, 2 processes; `pip install 'ckptstore[lightning]'`):

    python examples/trainers/lightning_store.py /tmp/lightning-store

The strategy saves each ModelCheckpoint save as step `global_step` (model and optimizer
shards through StoreWriter), resumes with `ckpt_path="ckptstore:latest"` and deletes the step
of a removed path. The run checks its own result and prints it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

import ckptstore
import ckptstore.dcp
from ckptstore.integrations.lightning import PREFIX, StoreModelParallelStrategy


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        self.steps_run = 0  # training steps this process ran (not restored from a checkpoint)

    def configure_model(self) -> None:
        mesh: DeviceMesh = self.device_mesh["data_parallel"]
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        self.steps_run += 1
        return torch.nn.functional.mse_loss(self.net(x), torch.sin(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def make_trainer(store_url: str, max_steps: int, tmp: Path) -> L.Trainer:
    strategy = StoreModelParallelStrategy(store_url, data_parallel_size=2, tensor_parallel_size=1)
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp, every_n_train_steps=2, save_top_k=-1)
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, callbacks=[every],
                     logger=False, enable_progress_bar=False, enable_model_summary=False)


def main() -> None:
    store_url = sys.argv[1]
    tmp = Path(store_url).parent / "lightning-unused"  # ModelCheckpoint wants a dirpath; nothing lands there
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8)), batch_size=4)
    first = make_trainer(store_url, 4, tmp)
    first.fit(Tiny(), data)
    weights = {k: v.full_tensor().clone() for k, v in first.lightning_module.net.state_dict().items()}

    second = make_trainer(store_url, 6, tmp)
    model = Tiny()
    second.fit(model, data, ckpt_path=PREFIX + "latest")
    if second.global_rank == 0:
        store = ckptstore.open(store_url, create=False)
        print(f"steps in the store: {store.steps()}; second run: {model.steps_run} steps run, ended at "
              f"global step {second.global_step}; files under {tmp}: {sorted(p.name for p in tmp.glob('*'))}")
    # Check the resume itself: load step 4 into a fresh strategy-less copy and compare.
    plain = {"state_dict": {f"net.{k}": torch.zeros_like(v) for k, v in weights.items()}}
    if second.global_rank == 0:
        ckptstore.dcp.load(plain, ckptstore.open(store_url, create=False), 4, no_dist=True)
        same = all(torch.equal(plain["state_dict"][f"net.{k}"], v) for k, v in weights.items())
        print(f"step 4 in the store equals the first run's final weights: {same}")


if __name__ == "__main__":
    main()
