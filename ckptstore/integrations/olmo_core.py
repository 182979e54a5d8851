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

import contextlib
import io
import re
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dist_cp_sd
from olmo_core.distributed.checkpoint import _prepare_state_dict
from olmo_core.distributed.utils import get_rank, is_distributed
from olmo_core.io import join_path
from olmo_core.train.callbacks import CheckpointerCallback
from olmo_core.train.checkpoint import Checkpointer, CheckpointerConfig
from olmo_core.train.train_module import TrainModule
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

import ckptstore.dcp
from ckptstore.errors import FormatError, InvalidArgumentError, StepExistsError, StepNotFoundError, StoreNotFoundError
from ckptstore.store import Store
from ckptstore.store import open as open_store

__all__ = ["StoreCheckpointer", "StoreCheckpointerCallback", "StoreCheckpointerConfig", "load_model_and_optim_state",
           "save_model_and_optim_state"]

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
    _save(state, store, step, save_overwrite=save_overwrite, process_group=process_group)


def _save(state: dict[str, Any], store: Store, step: int, *, save_overwrite: bool,
          process_group: dist.ProcessGroup | None) -> None:
    """OLMo-core's planner, through ckptstore.dcp; a refusal names save_overwrite."""
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


# -- the Trainer's Checkpointer -----------------------------------------------------------------
_STEP_DIR = re.compile(r"(?:^|/)step([0-9]+)/*$")
_NDARRAY = "__ckptstore_ndarray__"  # marks a numpy array stored as a tensor in the trainer state
TRAIN = "train"  # the DCP key of the per-rank trainer states: train.rank<N>


def step_of(checkpoint_dir: str | Path) -> int:
    """The step of an OLMo-core checkpoint directory `<save_folder>/step<N>`."""
    match = _STEP_DIR.search(str(checkpoint_dir))
    if match is None:
        raise InvalidArgumentError(f"{str(checkpoint_dir)!r} names no checkpoint step: OLMo-core's checkpoint "
                                   f"directories end in step<N> (Checkpointer.checkpoint_dirname)")
    return int(match[1])


def _tensors_for_numpy(value: Any) -> Any:
    """The trainer state with numpy arrays (the numpy RNG state) as tensors, so that it loads
    with torch.load(weights_only=True): no pickle of numpy objects is ever unpickled."""
    if isinstance(value, np.ndarray):
        return {_NDARRAY: torch.from_numpy(value.copy())}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _tensors_for_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors_for_numpy(v) for v in value)
    return value


def _numpy_for_tensors(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_NDARRAY}:
            return value[_NDARRAY].numpy()
        return {k: _numpy_for_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_numpy_for_tensors(v) for v in value)
    return value


def _encode_train_state(train_state: dict[str, Any]) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(_tensors_for_numpy(train_state), buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _decode_train_state(blob: torch.Tensor, where: str) -> dict[str, Any]:
    try:  # weights_only: a store's bytes never run code here
        state = torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)
    except Exception as exc:
        raise FormatError(f"{where}: the trainer state does not load with torch.load(weights_only=True): "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]) from exc
    return _numpy_for_tensors(state)


@dataclass
class StoreCheckpointer(Checkpointer):
    """OLMo-core's Trainer Checkpointer with each checkpoint a step of `store`.

    The Trainer's checkpoint directory `<save_folder>/step<N>` is step N: one commit holds the
    train module's model and optimizer state (`state_dict_to_save`) and every rank's trainer
    state (data loader position, RNG states, callbacks). `save_overwrite` is `overwrite`.
    Finding checkpoints (`dir_is_checkpoint`, `find_checkpoints`, `latest_checkpoint`) asks
    the store, whatever directory the Trainer names. Build it with StoreCheckpointerConfig.
    """

    store: Store | None = None

    def __post_init__(self) -> None:
        if self.store is None:
            raise InvalidArgumentError("StoreCheckpointer needs store=ckptstore.open(url) "
                                       "(or StoreCheckpointerConfig(store_url=...))")
        super().__post_init__()

    @property
    def _store(self) -> Store:
        assert self.store is not None
        return self.store

    def _state_to_save(self, train_module: TrainModule, train_state: dict[str, Any]) -> dict[str, Any]:
        if hasattr(train_module, "save_state_dict_direct"):
            raise InvalidArgumentError(f"{type(train_module).__name__} saves its checkpoints itself "
                                       "(save_state_dict_direct); StoreCheckpointer cannot route it")
        state = dict(train_module.state_dict_to_save())
        state[TRAIN] = {f"rank{get_rank()}": _encode_train_state(train_state)}
        return state

    def save(self, checkpoint_dir: str | Path, train_module: TrainModule, train_state: dict[str, Any],  # type: ignore[override]
             ephemeral: bool = False) -> None:
        state = self._state_to_save(train_module, train_state)
        _save(state, self._store, step_of(checkpoint_dir), save_overwrite=self.save_overwrite,
              process_group=self.process_group)

    def save_async(self, checkpoint_dir: str | Path, train_module: TrainModule,  # type: ignore[override]
                   train_state: dict[str, Any], ephemeral: bool = False) -> Future[None]:
        if is_distributed() and self.process_group is None:
            raise InvalidArgumentError("async checkpointing needs the checkpointer's process group "
                                       "(OLMo-core's CheckpointerCallback creates one)")
        state = self._state_to_save(train_module, train_state)
        planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)
        upload: Any = ckptstore.dcp.async_save(state, self._store, step_of(checkpoint_dir),
                                               overwrite=self.save_overwrite, planner=planner,
                                               process_group=self.process_group)
        done: Future[None] = Future()

        def committed(future: Future[Any]) -> None:
            exc = future.exception()
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(_naming_the_flag(exc) if isinstance(exc, StepExistsError) else exc)

        upload.add_done_callback(committed)
        return done

    def load(self, checkpoint_dir: str | Path, train_module: TrainModule, *,  # type: ignore[override]
             load_trainer_state: bool | None = None, load_optim_state: bool | None = None,
             reset_optimizer_states_on_load: bool | None = None) -> dict[str, Any] | None:
        if hasattr(train_module, "load_state_dict_direct"):
            raise InvalidArgumentError(f"{type(train_module).__name__} loads its checkpoints itself "
                                       "(load_state_dict_direct); StoreCheckpointer cannot route it")
        step = step_of(checkpoint_dir)
        metadata = ckptstore.dcp.StoreReader(self._store, step).read_metadata()
        state = train_module.state_dict_to_load(metadata, optim=load_optim_state)
        stored = metadata.state_dict_metadata
        # As OLMo-core: this rank's trainer state, else rank 0's (another world size).
        train_key = next((key for key in (f"rank{get_rank()}", "rank0") if f"{TRAIN}.{key}" in stored), None)
        if load_trainer_state is True and train_key is None:
            raise InvalidArgumentError(f"step {step} of {self._store.url} holds no trainer state")
        if load_trainer_state is not False and train_key is not None:
            size = stored[f"{TRAIN}.{train_key}"].size  # type: ignore[union-attr]
            state[TRAIN] = {train_key: torch.empty(tuple(size), dtype=torch.uint8)}
        ckptstore.dcp.load(state, self._store, step, process_group=self.process_group)
        blobs = state.pop(TRAIN, None)
        train_module.load_state_dict(state)
        if blobs is None:
            return None
        return _decode_train_state(blobs[train_key], f"step {step} of {self._store.url}, {TRAIN}.{train_key}")

    def dir_is_checkpoint(self, checkpoint_dir: str | Path) -> bool:  # type: ignore[override]
        try:
            self._store.ref(step_of(checkpoint_dir))
        except (InvalidArgumentError, StepNotFoundError, StoreNotFoundError):
            return False
        return True

    def find_checkpoints(self, checkpoint_dir: str | Path, ephemeral: bool | None = None  # type: ignore[override]
                         ) -> Iterator[tuple[int, str]]:
        if ephemeral is not None:
            raise InvalidArgumentError("StoreCheckpointer.find_checkpoints: filtering by ephemeral is not supported")
        try:
            steps = self._store.steps()
        except StoreNotFoundError:
            steps = []
        for step in steps:
            yield step, str(join_path(checkpoint_dir, self.checkpoint_dirname(step)))

    def contains_checkpoint(self, checkpoint_dir: str | Path) -> bool:  # type: ignore[override]
        return self.dir_is_checkpoint(checkpoint_dir) or next(self.find_checkpoints(checkpoint_dir), None) is not None

    def latest_checkpoint(self, checkpoint_dir: str | Path) -> str:  # type: ignore[override]
        try:
            latest = self._store.latest()
        except StoreNotFoundError:
            latest = None
        if latest is None:  # what the Trainer expects when there is nothing to resume
            raise FileNotFoundError(f"No checkpoints found in '{self._store.url}'")
        return str(join_path(checkpoint_dir, self.checkpoint_dirname(latest)))


@dataclass
class StoreCheckpointerConfig(CheckpointerConfig):
    """CheckpointerConfig building a StoreCheckpointer: `TrainerConfig(checkpointer=
    StoreCheckpointerConfig(store_url=URL), save_overwrite=...)`."""

    store_url: str | None = None

    def build(self, process_group: dist.ProcessGroup | None = None, **kwargs: Any) -> StoreCheckpointer:
        kwargs = {**self.as_dict(exclude_none=True, recurse=False), **kwargs}
        url = kwargs.pop("store_url", None)
        work_dir = kwargs.pop("work_dir", None)
        if not url:
            raise InvalidArgumentError("StoreCheckpointerConfig needs store_url")
        if work_dir is None:
            raise InvalidArgumentError("StoreCheckpointerConfig needs work_dir (the TrainerConfig sets it)")
        return StoreCheckpointer(work_dir=Path(work_dir), process_group=process_group, store=open_store(url), **kwargs)


@dataclass
class StoreCheckpointerCallback(CheckpointerCallback):
    """OLMo-core's CheckpointerCallback whose removal of an old checkpoint (ephemeral ones,
    `max_checkpoints`) deletes that step of the store (rank 0; gc frees its data)."""

    def _remove_checkpoint(self, path: str) -> None:
        checkpointer = self.checkpointer
        if not isinstance(checkpointer, StoreCheckpointer):
            super()._remove_checkpoint(path)
            return
        if get_rank() == 0:
            with contextlib.suppress(StepNotFoundError):  # deleted meanwhile
                checkpointer._store.delete(step_of(path))
