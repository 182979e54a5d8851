"""Lightning (`lightning.pytorch`): checkpoints of `Trainer.fit` in a ckptstore store.

Default, single-device and DDP strategies: a CheckpointIO plug-in::

    trainer = Trainer(plugins=[StoreCheckpointIO("s3://bucket/run")],
                      callbacks=[ModelCheckpoint(dirpath="ckpt", every_n_train_steps=100)])
    trainer.fit(model, data, ckpt_path="ckptstore:latest")   # or "ckptstore:1200", "ckptstore:best-val"

- Step: the checkpoint's `global_step`. The whole Lightning checkpoint dict is one tree saved
  with `Store.save` (never pickled): a value the tree cannot hold is an UnsupportedValueError
  naming it (for `save_hyperparameters()` values: the hparam) and how to make it storable.
- Path -> step: ModelCheckpoint still names a file per save ("epoch=0-step=100.ckpt",
  "last.ckpt"); nothing is written there. Each step records, in its metadata, the paths it was
  saved under, and a path names the step it was last saved as. `remove_checkpoint(path)`
  deletes that step once no other path names it (so `save_top_k` works while `last.ckpt` is
  kept); a save that moves a path (last.ckpt) off a step no other path names deletes that
  step, as overwriting the file would; `load_checkpoint(path)` of a recorded path loads its
  step (`ckpt_path="best"`).
- Overwrite: a save replaces a step that exists (`overwrite=True`), as Lightning's own
  TorchCheckpointIO overwrites a file: `save_last` saves the same global_step twice (the top-k
  file, then last.ckpt), and a run resumed from an earlier step saves its steps again.
- A dict without `global_step` is not a training checkpoint (ddp_spawn hands the final weights
  to the main process through a temporary file with the CheckpointIO): it goes to Lightning's
  own TorchCheckpointIO, as does loading or removing a path no step was saved under that is
  an existing file (a .ckpt file written by Lightning).
- Saves run on global rank 0 alone (Lightning calls the plug-in there only), so they pass
  `process_group=SINGLE_PROCESS`; every rank loads.

FSDP2 (`ModelParallelStrategy`) does not use a CheckpointIO: use `StoreModelParallelStrategy`.
See docs/INTEGRATIONS.md.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from lightning.fabric.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

import ckptstore
from ckptstore.distributed import SINGLE_PROCESS
from ckptstore.errors import InvalidArgumentError, StepNotFoundError, StoreNotFoundError, UnsupportedValueError

__all__ = ["PREFIX", "StoreCheckpointIO", "StoreModelParallelStrategy", "parse_ckpt_path"]

#: `ckpt_path` values that name a step of the store: "ckptstore:latest", "ckptstore:STEP", "ckptstore:TAG".
PREFIX = "ckptstore:"
_HPARAMS = "state['hyper_parameters']"


def parse_ckpt_path(path: str | os.PathLike[str]) -> tuple[bool, int | str | None]:
    """(is a ckptstore: path, what it names): None for latest, an int step, or a tag name.
    Lightning may have made the string a path ("/cwd/ckptstore:latest"): its last part counts."""
    last = os.fspath(path).replace("\\", "/").rsplit("/", 1)[-1]
    if not last.startswith(PREFIX):
        return False, None
    name = last.removeprefix(PREFIX)
    if not name:
        raise InvalidArgumentError(f"ckpt_path {os.fspath(path)!r} names nothing: use {PREFIX}latest, "
                                   f"{PREFIX}STEP or {PREFIX}TAG")
    if name == "latest":
        return True, None
    return True, int(name) if name.isdigit() else name


class _PathSteps:
    """Which step each checkpoint path Lightning passed was last saved as. Built from the
    store's step metadata on first use (paths saved by earlier processes count), then kept."""

    def __init__(self, store: ckptstore.Store) -> None:
        self.store = store
        self._steps: dict[str, int] | None = None

    def _known(self) -> dict[str, int]:
        if self._steps is None:
            self._steps = {}
            try:
                steps = self.store.steps()
            except StoreNotFoundError:
                steps = []
            for step in steps:  # ascending: a path saved again later names the later step
                for path in _recorded_paths(self.store, step):
                    self._steps[path] = step
        return self._steps

    def names_of(self, step: int) -> set[str]:
        return {path for path, at in self._known().items() if at == step}

    def step_of(self, path: str) -> int | None:
        return self._known().get(path)

    def record(self, path: str, step: int) -> int | None:
        """`path` now names `step`; the step it named before if no path names that one any more
        (a file overwritten under the same name, e.g. last.ckpt, is gone too)."""
        before = self._known().get(path)
        self._known()[path] = step
        return None if before is None or before == step or self.names_of(before) else before

    def forget(self, path: str) -> int | None:
        """Drop `path`; the step it named if no other path names that step any more."""
        step = self._known().pop(path, None)
        return None if step is None or self.names_of(step) else step


def _recorded_paths(store: ckptstore.Store, step: int) -> list[str]:
    try:
        metadata = store.info(step).manifest.metadata
    except StepNotFoundError:  # deleted since it was listed
        return []
    lightning = metadata.get("lightning") if isinstance(metadata, dict) else None
    paths = lightning.get("paths") if isinstance(lightning, dict) else None
    return [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []


def _delete_step(store: ckptstore.Store, step: int) -> None:
    with contextlib.suppress(StepNotFoundError):  # already gone (by hand, by retention): what remove wanted
        store.delete(step)


def _storable_error(exc: UnsupportedValueError, step: int, path: str) -> UnsupportedValueError:
    """The store's error with what to do about it in a Lightning checkpoint."""
    reason = str(exc).split(": ", 1)[-1]
    if exc.path.startswith(_HPARAMS + "["):
        hparam = exc.path[len(_HPARAMS):].split("]", 1)[0].strip("[]'\"")
        advice = (f"hparam {hparam!r} from save_hyperparameters() cannot be stored; pass plain values "
                  f"(str, int, float, bool, None, list, tuple, dict, tensor), convert it (dataclasses.asdict, "
                  f"vars(namespace), str(path)) or leave it out with save_hyperparameters(ignore=[{hparam!r}])")
    else:
        advice = ("Lightning's checkpoint dict holds a value the store cannot hold; make the state_dict() of "
                  "the callback/module/optimizer that returns it return plain values, tensors or numpy arrays")
    return UnsupportedValueError(exc.path, f"{reason}; {advice} (ckptstore never pickles; "
                                           f"checkpoint for global_step {step}, path {path})")


class StoreCheckpointIO(CheckpointIO):
    """A Lightning CheckpointIO that saves each checkpoint as step `global_step` of the store
    at `url` (`open_kwargs` go to `ckptstore.open`). See the module docstring."""

    def __init__(self, url: str | os.PathLike[str], **open_kwargs: Any) -> None:
        self.url = os.fspath(url)
        self.open_kwargs = open_kwargs
        self._store: ckptstore.Store | None = None
        self._paths: _PathSteps | None = None
        self._files = TorchCheckpointIO()

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles the plug-in: each process opens its own
        return {**self.__dict__, "_store": None, "_paths": None}

    @property
    def store(self) -> ckptstore.Store:
        if self._store is None:
            self._store = ckptstore.open(self.url, **self.open_kwargs)
        return self._store

    @property
    def paths(self) -> _PathSteps:
        if self._paths is None:
            self._paths = _PathSteps(self.store)
        return self._paths

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise InvalidArgumentError(f"StoreCheckpointIO takes no storage_options (got {storage_options!r}); "
                                       f"pass the store's options to StoreCheckpointIO(url, **open_kwargs)")
        if "global_step" not in checkpoint:  # not a training checkpoint: ddp_spawn's weights hand-over
            self._files.save_checkpoint(checkpoint, path)
            return
        step = int(checkpoint["global_step"])
        name = os.fspath(path)
        names = sorted(self.paths.names_of(step) | {name})
        try:
            self.store.save(step, checkpoint, overwrite=True, metadata={"lightning": {"paths": names}},
                            process_group=SINGLE_PROCESS)
        except UnsupportedValueError as exc:
            raise _storable_error(exc, step, name) from exc
        orphan = self.paths.record(name, step)
        if orphan is not None:
            _delete_step(self.store, orphan)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        is_ours, where = parse_ckpt_path(path)
        if not is_ours:
            where = self.paths.step_of(os.fspath(path))
            if where is None:
                if os.path.isfile(path):  # a file Lightning wrote: read it as Lightning would
                    return self._files.load_checkpoint(path, map_location, weights_only)
                raise InvalidArgumentError(
                    f"ckpt_path {os.fspath(path)!r}: no step of {self.store.url} was saved under this path; "
                    f"pass ckpt_path='{PREFIX}latest', '{PREFIX}STEP' or '{PREFIX}TAG'")
        checkpoint = self.store.load(where)
        return _map_tensors(checkpoint, map_location) if map_location is not None else checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        step = self.paths.forget(os.fspath(path))
        if step is not None:
            _delete_step(self.store, step)
        elif os.path.isfile(path):  # a file this plug-in handed to Lightning's own CheckpointIO
            self._files.remove_checkpoint(path)

    def teardown(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
            self._paths = None


def _map_tensors(value: Any, device: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _map_tensors(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, device) for v in value)
    return value


class StoreModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2, DTensor) whose distributed checkpoints live in
    the store at `store_url`. FSDPStrategy and ModelParallelStrategy call DCP themselves inside
    `save_checkpoint` and never use a CheckpointIO, hence a strategy subclass:

    - save: the step is `global_step`; model and optimizer states (DTensor shards) go through
      `ckptstore.dcp.save` from every rank; the rest of Lightning's checkpoint dict (loops,
      callbacks, epoch, hparams) goes along as one DCP bytes item, which DCP pickles with
      torch.save and StoreReader only admits through `torch.load(weights_only=True)`.
    - load: `ckpt_path="ckptstore:latest"` / `"ckptstore:STEP"` / `"ckptstore:TAG"` loads
      through StoreReader into the already sharded model and optimizers.
    - remove: deletes the step a path was saved as by this process, once no other path names
      it (so `save_top_k` works), from rank 0.
    - `save_overwrite`: replace a step that exists (default True, as for StoreCheckpointIO).
    """

    def __init__(self, store_url: str | os.PathLike[str], *, save_overwrite: bool = True,
                 open_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store_url = os.fspath(store_url)
        self.save_overwrite = save_overwrite
        self.open_kwargs = open_kwargs or {}
        self._store: ckptstore.Store | None = None
        # Path -> the step it was last saved as, for remove_checkpoint (paths of this process only).
        self._path_steps: dict[str, int] = {}

    @property
    def store(self) -> ckptstore.Store:
        if self._store is None:
            self._store = ckptstore.open(self.store_url, **self.open_kwargs)
        return self._store

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        import ckptstore.dcp

        if storage_options is not None:
            raise InvalidArgumentError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")

        step = int(checkpoint["global_step"])
        rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        state = {"state_dict": checkpoint["state_dict"],
                 **{f"optimizer_{i}": o for i, o in enumerate(checkpoint.get("optimizer_states", []))},
                 "lightning": (rest,)}  # a tuple: one bytes item, not flattened by DCP
        ckptstore.dcp.save(state, self.store, step, overwrite=self.save_overwrite)
        self._path_steps[os.fspath(filepath)] = step

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from ckptstore.dcp import StoreReader

        is_ours, where = parse_ckpt_path(checkpoint_path)
        if not is_ours:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        module = self.model
        if module is None:
            raise InvalidArgumentError("StoreModelParallelStrategy.load_checkpoint needs the model set up first")
        state: dict[str, Any] = {"state_dict": get_model_state_dict(module),
                                 **{f"optimizer_{i}": get_optimizer_state_dict(module, o)
                                    for i, o in enumerate(self.optimizers)},
                                 "lightning": None}
        dcp.load(state, storage_reader=StoreReader(self.store, where, trust_pickle=False))
        module.load_state_dict(state["state_dict"], strict=True)
        for i, optim in enumerate(self.optimizers):
            set_optimizer_state_dict(module, optim, optim_state_dict=state[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        (rest,) = state["lightning"]
        return dict(rest)

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            step = self._path_steps.pop(os.fspath(filepath), None)
            if step is not None and step not in self._path_steps.values():
                _delete_step(self.store, step)
