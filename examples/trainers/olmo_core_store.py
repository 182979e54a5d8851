"""OLMo-core's model+optimizer checkpoint, saved to and loaded from a ckptstore store.

Run (CPU, gloo, 2 ranks; `pip install 'ckptstore[olmo-core]'`):

    torchrun --standalone --nproc-per-node 2 examples/trainers/olmo_core_store.py /tmp/olmo-store

The integration is ckptstore.integrations.olmo_core (docs/INTEGRATIONS.md); this runner saves
step 1, shows the refusal without `save_overwrite`, replaces the step with it, and loads it into
a freshly built model. tests/integrations/test_olmo_core.py is the tested scenario.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptstore
from ckptstore.errors import StepExistsError
from ckptstore.integrations.olmo_core import load_model_and_optim_state, save_model_and_optim_state


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def main() -> None:
    dist.init_process_group("gloo")
    store = ckptstore.open(sys.argv[1])
    model, optim = build(seed=0)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    model(x).square().mean().backward()
    optim.step()
    save_model_and_optim_state(store, 1, model, optim, save_overwrite=True)
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
    if dist.get_rank() == 0:
        print(f"refused: {refused}")
        print(f"step 1 seq {store.ref(1).seq}; params equal after load: {same}")
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0 if same else 1)


if __name__ == "__main__":
    main()
