"""ckptstore.integrations.lightning with a real Lightning Trainer on CPU, a tiny model.

Each resume test trains a run that stops at step 4 and saves through StoreCheckpointIO (a
local store, and a SeaweedFS bucket), resumes it with `ckpt_path="ckptstore:..."` to step 6,
and compares with one uninterrupted run of 6 steps: the same per-step losses, bit-identical
weights; and with a resume from Lightning's own .ckpt files: the same loops / callback /
optimizer / scheduler states.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import ckptstore
from ckptstore.errors import InvalidArgumentError, StepNotFoundError, UnsupportedValueError
from ckptstore.integrations.lightning import StoreCheckpointIO, parse_ckpt_path

torch.set_num_threads(1)
DATA = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.05, sizes: tuple[int, ...] = (6, 16, 1), extra: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(sizes[0], sizes[1]), torch.nn.Tanh(),
                                       torch.nn.Linear(sizes[1], sizes[2]))
        self.losses: list[float] = []  # this process's steps only

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        loss = torch.nn.functional.mse_loss(self.net(x), x.sum(dim=1, keepdim=True).sin())
        self.log("loss", loss)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)]


class Opaque:
    """An object the store cannot hold (only a pickle could)."""


def loader() -> torch.utils.data.DataLoader:
    # 2 batches an epoch: every checkpoint (each 2 steps) ends an epoch. Lightning restarts an
    # epoch from its first batch on resume unless the dataloader is resumable (stateful).
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(DATA), batch_size=4, shuffle=False,
                                       num_workers=0)


class RecordingIO(StoreCheckpointIO):
    """Keeps a copy of each dict Lightning passes to save_checkpoint, by global_step."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.saved: dict[int, dict[str, Any]] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.saved[checkpoint["global_step"]] = copy.deepcopy(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options)


def trainer(url: str | Path | None, max_steps: int, dirpath: Path, io: StoreCheckpointIO | None = None,
            **checkpoint: Any) -> L.Trainer:
    """A Trainer saving every 2 steps into the store at `url` (None: Lightning's own .ckpt files)."""
    every = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=2, **({"save_top_k": -1} | checkpoint))
    plugins = [io or StoreCheckpointIO(url)] if url is not None else []
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, plugins=plugins,
                     callbacks=[every], logger=False, enable_progress_bar=False, enable_model_summary=False,
                     deterministic=True)


def fresh_model(**hparams: Any) -> Tiny:
    L.seed_everything(7, verbose=False)
    return Tiny(**hparams)


def assert_same(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Deep equality: same types (tuples stay tuples), tensors bit-identical."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), (where, a, b)


def test_resume_from_the_store_matches_an_uninterrupted_run(trainer_store_url: str, tmp_path: Path) -> None:
    url = trainer_store_url
    ckpt_dir = tmp_path / "ckpt"  # ModelCheckpoint names paths here; nothing is written
    whole = trainer(tmp_path / "whole-store", 6, ckpt_dir)
    reference = fresh_model()
    whole.fit(reference, loader())

    recording = RecordingIO(url)
    first = trainer(url, 4, ckpt_dir, io=recording)
    first_model = fresh_model()
    first.fit(first_model, loader())
    assert ckptstore.open(url).steps() == [2, 4]

    second = trainer(url, 6, ckpt_dir)
    resumed = fresh_model(lr=0.05)
    second.fit(resumed, loader(), ckpt_path="ckptstore:latest")

    assert first_model.losses + resumed.losses == reference.losses and len(resumed.losses) == 2
    assert_same(reference.state_dict(), resumed.state_dict(), "weights")
    assert not ckpt_dir.exists()
    # Loops and callbacks continue exactly as after a resume from Lightning's own .ckpt file
    # (at the same dirpath: the callback's state names the same paths).
    files_first = trainer(None, 4, ckpt_dir)
    files_first.fit(fresh_model(), loader())
    files_second = trainer(None, 6, ckpt_dir)
    files_second.fit(fresh_model(), loader(), ckpt_path=ckpt_dir / "epoch=1-step=4.ckpt")
    assert_same(files_second._checkpoint_connector.dump_checkpoint(), second._checkpoint_connector.dump_checkpoint())
    # Lightning's whole dict round-trips: loops, callbacks, hparams (a tuple stays a tuple), optimizer.
    stored = StoreCheckpointIO(url).load_checkpoint("ckptstore:4")
    assert_same(recording.saved[4], stored)
    assert stored["hyper_parameters"] == {"lr": 0.05, "sizes": (6, 16, 1), "extra": None}
    assert ckptstore.open(url).steps() == [2, 4, 6]


def test_resume_from_a_step_a_tag_and_a_recorded_path(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    ckpt_dir = tmp_path / "ckpt"
    first = trainer(url, 6, ckpt_dir)
    first.fit(fresh_model(), loader())
    ckptstore.open(url).tag("warm", 2)
    for ckpt_path, step in [("ckptstore:4", 4), ("ckptstore:warm", 2), (str(ckpt_dir / "epoch=0-step=2.ckpt"), 2)]:
        again = trainer(url, step + 1, ckpt_dir)
        model = fresh_model()
        again.fit(model, loader(), ckpt_path=ckpt_path)
        assert len(model.losses) == 1, ckpt_path  # resumed at `step`, ran one more
    with pytest.raises(InvalidArgumentError, match=r"no step of .* was saved under this path"):
        StoreCheckpointIO(url).load_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(StepNotFoundError):
        StoreCheckpointIO(url).load_checkpoint("ckptstore:99")


def test_save_top_k_deletes_steps_and_keeps_last(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    ckpt_dir = tmp_path / "ckpt"
    run = trainer(url, 8, ckpt_dir, save_top_k=1, monitor="loss", mode="max", save_last=True)
    model = fresh_model()
    run.fit(model, loader())
    callback = run.checkpoint_callback
    assert isinstance(callback, ModelCheckpoint)
    best_step = int(Path(callback.best_model_path).stem.rsplit("=", 1)[1])
    losses_at = {2: model.losses[1], 4: model.losses[3], 6: model.losses[5], 8: model.losses[7]}
    assert best_step == max(losses_at, key=losses_at.__getitem__)
    # top-1 kept only the best step; last.ckpt keeps step 8; the others were deleted.
    assert ckptstore.open(url).steps() == sorted({best_step, 8})
    assert StoreCheckpointIO(url).load_checkpoint(callback.best_model_path)["global_step"] == best_step
    # A new process (no in-memory record) maps paths through the steps' metadata.
    io = StoreCheckpointIO(url)
    io.remove_checkpoint(callback.best_model_path)
    assert ckptstore.open(url).steps() == [8]  # last.ckpt names step 8 (best or not)
    io.remove_checkpoint(callback.last_model_path)
    assert ckptstore.open(url).steps() == []


def test_two_paths_at_one_step_delete_it_only_when_both_are_removed(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    io = StoreCheckpointIO(url)
    state = {"global_step": 3, "state_dict": {"w": torch.ones(2)}}
    io.save_checkpoint(state, tmp_path / "epoch=0-step=3.ckpt")
    io.save_checkpoint(state, tmp_path / "last.ckpt")  # the same step again: overwritten, both names kept
    assert ckptstore.open(url).info(3).manifest.metadata == {
        "lightning": {"paths": sorted([str(tmp_path / "epoch=0-step=3.ckpt"), str(tmp_path / "last.ckpt")])}}
    StoreCheckpointIO(url).remove_checkpoint(tmp_path / "epoch=0-step=3.ckpt")
    assert ckptstore.open(url).steps() == [3]  # last.ckpt still names it
    io.remove_checkpoint(tmp_path / "epoch=0-step=3.ckpt")
    io.remove_checkpoint(tmp_path / "last.ckpt")
    assert ckptstore.open(url).steps() == []
    io.remove_checkpoint(tmp_path / "never-saved.ckpt")  # like removing a missing file: nothing to do


def test_an_hparam_the_store_cannot_hold_is_named_with_the_fix(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    run = trainer(url, 2, tmp_path / "ckpt")
    with pytest.raises(UnsupportedValueError, match=r"hparam 'extra'.*save_hyperparameters\(ignore=\['extra'\]\)") \
            as caught:
        run.fit(fresh_model(extra=Opaque()), loader())
    assert caught.value.path == "state['hyper_parameters']['extra']"
    assert "never pickles" in str(caught.value)
    assert ckptstore.open(url).steps() == []


def test_parse_ckpt_path() -> None:
    assert parse_ckpt_path("ckptstore:latest") == (True, None)
    assert parse_ckpt_path("ckptstore:12") == (True, 12)
    assert parse_ckpt_path(Path(os.getcwd()) / "ckptstore:best") == (True, "best")
    assert parse_ckpt_path("/x/epoch=0-step=2.ckpt") == (False, None)
    with pytest.raises(InvalidArgumentError, match="names nothing"):
        parse_ckpt_path("ckptstore:")


def ddp_trainer(url: str, max_steps: int, dirpath: Path) -> L.Trainer:
    every = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=2, save_top_k=-1)
    return L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=max_steps,
                     plugins=[StoreCheckpointIO(url)], callbacks=[every], logger=False, enable_progress_bar=False,
                     enable_model_summary=False, deterministic=True)


@pytest.mark.slow
def test_ddp_two_processes_save_from_rank_0_and_resume(tmp_path: Path, s3_bucket: str) -> None:
    """2 gloo processes (ddp_spawn on CPU): rank 0 saves alone (a collective save would hang
    the rank Lightning does not call), both ranks load. The run resumed from step 2 re-saves
    step 4 (overwrite) bit-identical to the uninterrupted run's step 4."""
    url = f"s3://{s3_bucket}/ddp"
    ddp_trainer(url, 4, tmp_path / "ckpt").fit(fresh_model(), loader())
    store = ckptstore.open(url)
    assert store.steps() == [2, 4]
    uninterrupted, first_commit = store.load(4), store.ref(4).commit_id
    resumed = fresh_model()
    ddp_trainer(url, 4, tmp_path / "ckpt").fit(resumed, loader(), ckpt_path="ckptstore:2")
    again = store.load(4)
    assert store.ref(4).commit_id != first_commit  # saved again by the resumed run
    for part in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_same(uninterrupted[part], again[part], part)
    assert_same(uninterrupted["state_dict"], dict(resumed.state_dict()), "weights")
    assert not torch.equal(again["state_dict"]["net.0.weight"], fresh_model().state_dict()["net.0.weight"])


@pytest.mark.slow
def test_fsdp2_strategy_runner_resumes_from_the_store(tmp_path: Path) -> None:
    """StoreModelParallelStrategy (FSDP2, DTensor) through examples/trainers/lightning_store.py:
    2 gloo processes save steps 2 and 4; a second Trainer resumes at step 4, runs 2 steps; the
    stored step 4 equals the first run's final (gathered) weights."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(repo / "examples/trainers/lightning_store.py"), str(tmp_path / "store")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=540,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps in the store: [2, 4, 6]; second run: 2 steps run, ended at global step 6" in proc.stdout
    assert "step 4 in the store equals the first run's final weights: True" in proc.stdout
