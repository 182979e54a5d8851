"""torchtitan's CheckpointManager, with each checkpoint a step of a ckptstore store.

    from ckptstore.integrations.torchtitan import StoreCheckpointManager

    config = StoreCheckpointManager.Config(enable=True, interval=100, async_mode="async", store_url="s3://b/run")
    manager = config.build(dataloader=..., model_parts=[model], optimizers=optimizers,
                           lr_schedulers=schedulers, states={}, sd_adapter=None)
    manager.load()            # the store's latest step, if any
    manager.save(step)        # every `interval` steps, as torchtitan's own manager

torchtitan 0.3's CheckpointManager saves with `dcp.save` / `dcp.async_save(state,
checkpoint_id=<folder>/step-N)` in `dcp_save`, and finds the step to resume from by listing
step-N folders in `_load`. This subclass keeps its policy (interval, last step, model-only step
0, `exclude_from_loading`) and its Stateful wrappers (model, OptimizersContainer,
LRSchedulersContainer, dataloader, extra `states`), and sends the bytes to the store: step N of
`<folder>/step-N` is step N of the store, each save one atomic commit (StoreWriter),
`async_mode="async"` runs ckptstore.dcp.async_save on torchtitan's gloo group, `_load`
resumes from the store's latest step, and `keep_latest_k` is store retention (rank 0 deletes
the refs of older untagged steps after each commit; gc frees their data). A step that already
exists is replaced only with `overwrite=True` (StepExistsError otherwise). What is not
supported is refused when the manager is built, with InvalidArgumentError (docs/INTEGRATIONS.md).

Importing this module imports torch and torchtitan (`pip install 'ckptstore[torchtitan]'`).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torchtitan.components.checkpointer.base import MODEL
from torchtitan.components.checkpointer.dcp import AsyncMode, CheckpointManager

import ckptstore.dcp
from ckptstore.errors import CkptStoreError, InvalidArgumentError, StoreNotFoundError
from ckptstore.store import Store
from ckptstore.store import open as open_store

__all__ = ["StoreCheckpointManager"]

log = logging.getLogger(__name__)


def step_of(checkpoint_id: str) -> int:
    """The step of torchtitan's checkpoint id `<folder>/step-N`."""
    step = ckptstore.dcp.parse_checkpoint_id(checkpoint_id)
    assert isinstance(step, int)
    return step


class StoreCheckpointManager(CheckpointManager):
    """A CheckpointManager whose checkpoints are steps of a ckptstore store (module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        store_url: str = ""
        """The store (a path or URL) that holds the checkpoints; or pass `store=` to the manager."""

        overwrite: bool = False
        """Replace a step that already exists (one atomic commit); otherwise StepExistsError."""

    def __init__(self, config: CheckpointManager.Config, *, store: Store | None = None, **kwargs: Any) -> None:
        url = getattr(config, "store_url", "")
        if store is None and not url:
            raise InvalidArgumentError("StoreCheckpointManager needs a store: pass store=ckptstore.open(url), or "
                                       "store_url in its Config")
        if config.enable and config.async_mode == AsyncMode.ASYNC_WITH_PINNED_MEM:
            raise InvalidArgumentError('async_mode="async_with_pinned_mem" is not supported by '
                                       'StoreCheckpointManager (CUDA pinned-memory staging, untested); use "async"')
        if config.enable and config.last_save_in_hf:
            raise InvalidArgumentError("last_save_in_hf: torchtitan's HF writer writes to a folder, not a store; "
                                       "export the step with `ckptstore export` instead")
        self.store = store if store is not None else open_store(url)
        self.overwrite = bool(getattr(config, "overwrite", False))
        super().__init__(config, **kwargs)

    def dcp_save(self, state_dict: dict[str, Any], checkpoint_id: str, async_mode: AsyncMode,
                 enable_garbage_collection: bool = False, to_hf: bool = False) -> Any:
        step = step_of(checkpoint_id)
        if async_mode != AsyncMode.ASYNC:
            ckptstore.dcp.save(state_dict, self.store, step, overwrite=self.overwrite)
            self._keep_latest(step)
            return None
        # A concurrent.futures.Future (typed as torch's Future by ckptstore.dcp).
        upload: Any = ckptstore.dcp.async_save(state_dict, self.store, step, overwrite=self.overwrite,
                                               process_group=self.pg)
        done: Future[Any] = Future()  # completes after retention, so a waiter sees the store as it stays

        def committed(future: Future[Any]) -> None:
            exc = future.exception()
            if exc is not None:
                done.set_exception(exc)
                return
            self._keep_latest(step)
            done.set_result(future.result())

        upload.add_done_callback(committed)
        return done

    def _should_purge(self) -> bool:
        return False  # torchtitan's purge deletes step-N folders; a store keeps keep_latest_k itself

    def _keep_latest(self, step: int) -> None:
        """keep_latest_k as store retention, on rank 0 after a commit: the refs of older untagged
        steps are deleted (gc frees their data). A failure is logged; the commit stands."""
        if self.keep_latest_k <= 0 or (dist.is_initialized() and dist.get_rank() != 0):
            return
        try:
            self.store.apply_retention(keep_last=self.keep_latest_k, protect=(step,))
        except CkptStoreError as exc:
            log.warning("step %d is committed, but keep_latest_k=%d retention failed: %s", step,
                        self.keep_latest_k, exc)

    def _load(self, step: int = -1) -> bool:
        if step == -1:
            latest = self._latest_step()
            if latest is None:
                if self.initial_load_path or self.initial_load_in_hf:
                    return bool(super()._load(step))  # torchtitan's first load, from its folder or HF files
                return False  # a fresh run
            step = latest
        # As torchtitan does: step 0 (its seed checkpoint) holds the model only; the model's
        # states are flattened into the loaded dict, so the model wrapper loads them after.
        states = self._states_to_load(model_only=step == 0)
        ckptstore.dcp.load(states, self.store, step)
        if MODEL in self.states:
            self.states[MODEL].load_state_dict(states)
        return True

    def _latest_step(self) -> int | None:
        """Resolved by rank 0 and broadcast (every rank loads, collectively, the same step even
        if another job commits meanwhile)."""
        try:
            return ckptstore.dcp.latest_step(self.store)
        except StoreNotFoundError:  # nothing saved yet: opening a store never creates it
            return None
