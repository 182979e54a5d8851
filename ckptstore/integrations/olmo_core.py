"""OLMo-core's model and optimizer checkpoints as steps of a ckptstore store.

    from ckptstore.integrations.olmo_core import save_model_and_optim_state, load_model_and_optim_state

    save_model_and_optim_state(store, step, model, optim, save_overwrite=True)   # on every rank
    load_model_and_optim_state(store, step, model, optim)                        # any world size

OLMo-core 3.0's `olmo_core.distributed.checkpoint.save_model_and_optim_state` /
`load_model_and_optim_state` build their RemoteFileSystemWriter / Reader inside and take no
storage_writer. These functions do what they do with a store instead: the same state dict
(OLMo-core's `_prepare_state_dict`: sharded model and optimizer state, CPU-offloaded), the same
planner (`DefaultSavePlanner(dedup_save_to_lowest_rank=True)`), the same `set_model_state_dict` /
`set_optimizer_state_dict` after loading. OLMo-core's `save_overwrite` is ckptstore's
`overwrite`: the step is replaced by one atomic commit (the old step stays readable until it),
and without the flag a second save of a step raises StepExistsError on every rank, naming
`save_overwrite` (OLMo-core's own function raises FileExistsError for a non-empty directory,
which is also what a killed save leaves behind; a store has no such leftover). docs/INTEGRATIONS.md.

Importing this module imports torch and olmo_core (`pip install 'ckptstore[olmo-core]'`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dist_cp_sd
from olmo_core.distributed.checkpoint import _prepare_state_dict
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

import ckptstore.dcp
from ckptstore.errors import StepExistsError
from ckptstore.store import Store

__all__ = ["load_model_and_optim_state", "save_model_and_optim_state"]

#: OLMo-core's name for ckptstore's `overwrite`; the StepExistsError of a refused save names it.
OVERWRITE_FLAG = "save_overwrite"


def _naming_the_flag(exc: StepExistsError) -> StepExistsError:
    """The same StepExistsError, telling an OLMo-core user which of their flags replaces the step."""
    renamed = StepExistsError(exc.step, exc.committed_at, exc.writer)
    existing = str(exc).split("; pass overwrite=", 1)[0]
    renamed.args = (f"{existing}; pass {OVERWRITE_FLAG}=True (OLMo-core's flag; ckptstore's overwrite) "
                    f"to replace it atomically",)
    return renamed


def save_model_and_optim_state(store: Store, step: int, model: torch.nn.Module,
                               optim: torch.optim.Optimizer | None = None, *, save_overwrite: bool = False,
                               process_group: dist.ProcessGroup | None = None,
                               flatten_optimizer_state: bool = False) -> None:
    """Save `model` (and `optim`) as `step` of `store`, on every rank, as OLMo-core's function of
    the same name does to a directory. StepExistsError on every rank when the step exists and not
    `save_overwrite`; the store is then unchanged."""
    state = _prepare_state_dict(model, optim, flatten_optimizer_state=flatten_optimizer_state)
    planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)
    try:
        ckptstore.dcp.save(state, store, step, overwrite=save_overwrite, planner=planner, process_group=process_group)
    except StepExistsError as exc:
        raise _naming_the_flag(exc) from exc


def load_model_and_optim_state(store: Store, step: int | str | None, model: torch.nn.Module,
                               optim: torch.optim.Optimizer | None = None, *,
                               process_group: dist.ProcessGroup | None = None, strict: bool = True,
                               flatten_optimizer_state: bool = False) -> None:
    """Load `step` of `store` (None: the latest; or a tag) into `model` (and `optim`) in place,
    whatever the world size it was saved with, as OLMo-core's function of the same name does."""
    state: dict[str, Any] = _prepare_state_dict(model, optim, flatten_optimizer_state=flatten_optimizer_state)
    ckptstore.dcp.load(state, store, step, process_group=process_group)
    dist_cp_sd.set_model_state_dict(model, state["model"], options=dist_cp_sd.StateDictOptions(strict=strict))
    if optim is not None:
        options = dist_cp_sd.StateDictOptions(strict=strict, flatten_optimizer_state_dict=flatten_optimizer_state)
        dist_cp_sd.set_optimizer_state_dict(model, optim, state["optim"], options=options)
