"""Lightning's ModelParallelStrategy (FSDP2) checkpointing into a ckptstore store.

Run (CPU, gloo, 2 processes; in a venv with lightning and ckptstore installed):

    python examples/trainers/lightning_store.py /tmp/lightning-store

Lightning 2.6's FSDPStrategy and ModelParallelStrategy save a distributed checkpoint with
`torch.distributed.checkpoint.save(state, checkpoint_id=path)` inside `save_checkpoint` and
do not use a CheckpointIO plugin (they raise TypeError for storage_options), so the hook is a
strategy subclass that overrides `save_checkpoint`, `load_checkpoint` and `remove_checkpoint`:

- the checkpoint "path" Lightning passes is ignored for saving; the step is Lightning's
  `global_step`, and the model and optimizer states (DTensor shards) go through StoreWriter.
  The rest of Lightning's checkpoint dict (loops, callbacks, epoch, versions) goes along as one
  pickled item (a tuple, which DCP stores as a single bytes item).
- `trainer.fit(..., ckpt_path="ckptstore:latest")` (or "ckptstore:STEP") loads through StoreReader
  into the already sharded model and optimizers.
- `remove_checkpoint` does nothing: keep or drop steps with store retention / `ckptstore gc`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

import ckptstore
import ckptstore.dcp
from ckptstore.dcp import StoreReader

PREFIX = "ckptstore:"


class StoreStrategy(ModelParallelStrategy):
    """ModelParallelStrategy whose distributed checkpoints live in a ckptstore store."""

    def __init__(self, store_url: str, *, save_overwrite: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.store_url = store_url
        self.save_overwrite = save_overwrite
        self._store: ckptstore.Store | None = None

    @property
    def store(self) -> ckptstore.Store:
        if self._store is None:
            self._store = ckptstore.open(self.store_url)
        return self._store

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        step = int(checkpoint["global_step"])
        state = {"state_dict": checkpoint.pop("state_dict"),
                 **{f"optimizer_{i}": o for i, o in enumerate(checkpoint.pop("optimizer_states", []))},
                 "lightning": (checkpoint,)}  # a tuple: one pickled item, not flattened by DCP
        ckptstore.dcp.save(state, self.store, step, overwrite=self.save_overwrite)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        where = str(checkpoint_path).rsplit("/", 1)[-1]  # Lightning may make the string a path
        if not where.startswith(PREFIX):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        name = where.removeprefix(PREFIX)
        step = None if name == "latest" else int(name)
        module = self.model
        assert module is not None
        state: dict[str, Any] = {"state_dict": get_model_state_dict(module),
                                 **{f"optimizer_{i}": get_optimizer_state_dict(module, o)
                                    for i, o in enumerate(self.optimizers)},
                                 "lightning": None}
        # Lightning's loops/callbacks state is pickled; in this run it passes StoreReader's
        # torch.load(weights_only=True) check. Objects it refuses need trust_pickle=True.
        dcp.load(state, storage_reader=StoreReader(self.store, step, trust_pickle=False))
        module.load_state_dict(state["state_dict"], strict=True)
        for i, optim in enumerate(self.optimizers):
            set_optimizer_state_dict(module, optim, optim_state_dict=state[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        (metadata,) = state["lightning"]
        return metadata

    def remove_checkpoint(self, filepath: Any) -> None:
        pass  # steps are kept or dropped by store retention / ckptstore gc, not by path


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
    strategy = StoreStrategy(store_url, data_parallel_size=2, tensor_parallel_size=1)
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
