"""ckptstore.integrations.transformers with a real Hugging Face Trainer on CPU: a 2-layer GPT-2
built from a config (no download), 6 steps, a checkpoint every 2 steps.

The interrupted run (configured for 6 steps) stops after step 4 (its checkpoints go to a local store, and to a SeaweedFS
bucket); its checkpoint directories are deleted, and the resumed run starts from what
`restore_checkpoint` writes back from the store. Its losses must equal the uninterrupted run's
exactly, and so must its final weights.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import ckptstore
from ckptstore.errors import TagNotFoundError
from ckptstore.integrations.transformers import StoreCallback, restore_checkpoint
from ckptstore.interop import import_checkpoint

torch.set_num_threads(1)


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (24, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Losses(TrainerCallback):
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.by_step[state.global_step] = logs["loss"]


class StopAfter(TrainerCallback):
    """Interrupts a run after `step` (the run is configured for more: same LR schedule)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def make_trainer(out: Path, max_steps: int, callbacks: list[TrainerCallback]) -> Trainer:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2, logging_steps=1,
                             save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, seed=3,
                             dataloader_num_workers=0, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=Data(), callbacks=callbacks)


def test_resume_from_the_store_matches_an_uninterrupted_run(trainer_store_url: str, tmp_path: Path) -> None:
    url = trainer_store_url
    whole_losses = Losses()
    whole = make_trainer(tmp_path / "whole", 6, [whole_losses])
    whole.train()

    first_losses = Losses()
    make_trainer(tmp_path / "run", 6, [first_losses, StoreCallback(url), StopAfter(4)]).train()
    store = ckptstore.open(url)
    assert store.steps() == [2, 4]
    step_4 = store.load(4)
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(step_4)
    assert step_4["trainer_state.json"]["global_step"] == 4
    assert isinstance(step_4["rng_state.pth"]["numpy"][1], np.ndarray)
    shutil.rmtree(tmp_path / "run")  # the resume reads the store, nothing local

    second_losses = Losses()
    second = make_trainer(tmp_path / "run", 6, [second_losses, StoreCallback(url)])
    second.train(resume_from_checkpoint=restore_checkpoint(url, tmp_path / "run"))

    assert {**first_losses.by_step, **second_losses.by_step} == whole_losses.by_step
    assert sorted(second_losses.by_step) == [5, 6]
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    assert store.steps() == [2, 4, 6]


def test_restore_a_tag_and_a_fresh_store(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    assert restore_checkpoint(url, tmp_path / "out") is None  # nothing saved yet: train from scratch
    make_trainer(tmp_path / "run", 2, [StoreCallback(url, keep_local=False)]).train()
    assert not (tmp_path / "run" / "checkpoint-2").exists()
    ckptstore.open(url).tag("first", 2)
    path = restore_checkpoint(url, tmp_path / "out", "first")
    assert path == str(tmp_path / "out" / "checkpoint-2")
    assert json.loads((Path(path) / "trainer_state.json").read_text())["global_step"] == 2
    with pytest.raises(TagNotFoundError):
        restore_checkpoint(url, tmp_path / "out", "missing")


def test_import_reads_a_trainer_checkpoint_directory(tmp_path: Path) -> None:
    """`ckptstore import checkpoint-N/`: rng_state.pth (numpy's RNG state) is admitted by the
    numpy globals ckptstore allows; the step holds every file, tensors equal to the files'."""
    random.seed(1)
    np.random.seed(1)
    make_trainer(tmp_path / "run", 2, []).train()
    directory = tmp_path / "run" / "checkpoint-2"
    store = ckptstore.open(tmp_path / "store")
    import_checkpoint(store, 2, directory)
    state = store.load(2)
    rng = torch.load(directory / "rng_state.pth", weights_only=False)
    assert state["rng_state.pth"]["python"] == rng["python"]
    assert state["rng_state.pth"]["numpy"][0] == "MT19937"
    assert np.array_equal(state["rng_state.pth"]["numpy"][1], rng["numpy"][1])
    assert torch.equal(state["rng_state.pth"]["cpu"], rng["cpu"])
    optimizer = torch.load(directory / "optimizer.pt", weights_only=True)
    assert torch.equal(state["optimizer.pt"]["state"][0]["exp_avg"], optimizer["state"][0]["exp_avg"])
    assert state["trainer_state.json"] == json.loads((directory / "trainer_state.json").read_text())
