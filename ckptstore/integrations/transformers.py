"""Hugging Face `transformers.Trainer`: every checkpoint the Trainer makes, committed as a step.

    store_callback = StoreCallback("s3://bucket/run")
    trainer = Trainer(model, args, train_dataset=data, callbacks=[store_callback])
    trainer.train(resume_from_checkpoint=restore_checkpoint("s3://bucket/run", args.output_dir))

Why a callback: the Trainer has no pluggable checkpoint I/O. It writes `checkpoint-N/`
itself (`_save_checkpoint`, private) and reads it back (`resume_from_checkpoint=DIR`); its
public hook is `TrainerCallback.on_save`, called right after each checkpoint directory is
complete. The callback reads that directory (ckptstore.interop.read_trainer_dir: model
weights, optimizer, scheduler, RNG states, trainer state, config, training args; the same
reader as `ckptstore import`) and commits it as step `global_step`, from the world-process-
zero only (`process_group=SINGLE_PROCESS`). Resume goes through the Trainer's own loading:
`restore_checkpoint` writes the step back as `checkpoint-N/`, byte-for-byte what the Trainer
reads, so the resumed run continues with exactly the losses of an uninterrupted one.

- Overwrite: a step that exists is replaced (`overwrite=True`), as the Trainer itself writes
  over an existing `checkpoint-N/` (a run resumed from an earlier step saves its steps again).
- `keep_local=False` deletes `checkpoint-N/` once the step is committed; the Trainer's
  `save_total_limit` and `load_best_model_at_end` then have no directories to work on
  (use store retention instead).
- Not supported: multi-process RNG files are stored (`rng_state_K.pth`), but only process
  zero saves, so every rank's file must be on its disk (a shared output_dir); DeepSpeed and
  FSDP checkpoints (subdirectories) are refused with InteropError.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import ckptstore
from ckptstore.distributed import SINGLE_PROCESS
from ckptstore.errors import StoreNotFoundError
from ckptstore.interop import read_trainer_dir, write_trainer_dir

__all__ = ["CHECKPOINT_PREFIX", "StoreCallback", "restore_checkpoint"]

#: The Trainer's checkpoint directory name, `checkpoint-<global_step>` (transformers' PREFIX_CHECKPOINT_DIR).
CHECKPOINT_PREFIX = "checkpoint"


class StoreCallback(TrainerCallback):
    """Commits each `checkpoint-N/` the Trainer writes as step N of the store at `url`
    (`open_kwargs` go to `ckptstore.open`). See the module docstring."""

    def __init__(self, url: str | os.PathLike[str], *, keep_local: bool = True, **open_kwargs: Any) -> None:
        self.url = os.fspath(url)
        self.keep_local = keep_local
        self.open_kwargs = open_kwargs
        self._store: ckptstore.Store | None = None

    @property
    def store(self) -> ckptstore.Store:
        if self._store is None:
            self._store = ckptstore.open(self.url, **self.open_kwargs)
        return self._store

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        directory = Path(str(args.output_dir)) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
        self.store.save(state.global_step, read_trainer_dir(directory), overwrite=True,
                        metadata={"transformers": {"checkpoint": directory.name}}, process_group=SINGLE_PROCESS)
        if not self.keep_local:
            shutil.rmtree(directory)


def restore_checkpoint(url: str | os.PathLike[str], output_dir: str | os.PathLike[str],
                       step: int | str | None = None, **open_kwargs: Any) -> str | None:
    """Write step `step` of the store (default: the latest; a str names a tag) as
    `output_dir/checkpoint-N/` and return its path, for `trainer.train(resume_from_checkpoint=...)`.
    Returns None when `step` is None and the store has no step yet (a fresh run)."""
    store = ckptstore.open(url, **open_kwargs)
    if step is None:
        try:
            step = store.latest()
        except StoreNotFoundError:
            step = None
        if step is None:
            return None
    number = store.ref(step).step  # a tag names its step; StepNotFoundError / TagNotFoundError otherwise
    files = store.load(number)
    return str(write_trainer_dir(files, Path(output_dir) / f"{CHECKPOINT_PREFIX}-{number}"))
