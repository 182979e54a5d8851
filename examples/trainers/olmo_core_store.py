"""OLMo-core's model+optimizer checkpoint, saved to and loaded from a ckptstore store.

Run (CPU, gloo, 2 ranks; in a venv with ai2-olmo-core and ckptstore installed):

    torchrun --standalone --nproc-per-node 2 examples/trainers/olmo_core_store.py /tmp/olmo-store

OLMo-core 3.0.0's `save_model_and_optim_state` / `load_model_and_optim_state`
(olmo_core.distributed.checkpoint) build their RemoteFileSystemWriter/Reader inside and take no
storage_writer, so this does what they do with a StoreWriter/StoreReader instead: the same state
dict (OLMo-core's `_prepare_state_dict`, a private helper: sharded model and optimizer state,
CPU-offloaded), the same planner (`DefaultSavePlanner(dedup_save_to_lowest_rank=True)`), the same
`set_model_state_dict` / `set_optimizer_state_dict` after loading. OLMo-core's
`save_overwrite` becomes StoreWriter's `overwrite`: without it a second save of a step raises
StepExistsError on every rank (instead of OLMo-core's FileExistsError for a non-empty dir).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.state_dict as dist_cp_sd
from olmo_core.distributed.checkpoint import _prepare_state_dict
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptstore
import ckptstore.dcp
from ckptstore.dcp import StoreReader
from ckptstore.errors import StepExistsError


def save_model_and_optim_state(store: ckptstore.Store, step: int, model: torch.nn.Module,
                               optim: torch.optim.Optimizer, *, save_overwrite: bool = False) -> None:
    state = _prepare_state_dict(model, optim)
    ckptstore.dcp.save(state, store, step, overwrite=save_overwrite,
                       planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))


def load_model_and_optim_state(store: ckptstore.Store, step: int, model: torch.nn.Module,
                               optim: torch.optim.Optimizer) -> None:
    state = _prepare_state_dict(model, optim)
    dcp.load(state, storage_reader=StoreReader(store, step))
    dist_cp_sd.set_model_state_dict(model, state["model"], options=dist_cp_sd.StateDictOptions(strict=True))
    dist_cp_sd.set_optimizer_state_dict(model, optim, state["optim"],
                                        options=dist_cp_sd.StateDictOptions(strict=True))


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def main() -> None:
    dist.init_process_group("gloo")
    store = ckptstore.open(sys.argv[1])
    model, optim = build(seed=0)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    model(x).square().mean().backward()
    optim.step()
    save_model_and_optim_state(store, 1, model, optim)
    try:
        save_model_and_optim_state(store, 1, model, optim)
        raise AssertionError("a second save of step 1 without save_overwrite succeeded")
    except StepExistsError as exc:
        refused = str(exc)
    save_model_and_optim_state(store, 1, model, optim, save_overwrite=True)

    fresh, fresh_optim = build(seed=1)  # other weights, empty optimizer state
    load_model_and_optim_state(store, 1, fresh, fresh_optim)
    same = all(torch.equal(a.full_tensor(), b.full_tensor())
               for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
    moments = all(torch.equal(optim.state[a]["exp_avg"].full_tensor(), fresh_optim.state[b]["exp_avg"].full_tensor())
                  for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
    if dist.get_rank() == 0:
        print(f"refused: {refused}")
        print(f"step 1 seq {store.ref(1).seq}; params equal after load: {same}; exp_avg equal: {moments}")
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0 if same and moments else 1)


if __name__ == "__main__":
    main()
