"""examples/train_tiny.py under torchrun (2 gloo ranks on CPU): periodic async saves through
DCP's StoreWriter, resume after a kill computes the same model as an uninterrupted run, a rerun
over existing steps fails with StepExistsError unless --save-overwrite, resume at 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptstore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TRAINER = ROOT / "examples" / "train_tiny.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def train(store: Path, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(TRAINER), "--store", str(store),
           *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    if expect_ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def stored_items(store: ckptstore.Store, step: int) -> dict[str, list[torch.Tensor]]:
    """Every saved item (model and optimizer shards, pickled counters) of a DCP step."""
    items = store.load(step)["dcp"]["items"]
    assert any(k.startswith("model.") for k in items) and any(k.startswith("optim.state.") for k in items)
    return items


def assert_same_items(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> None:
    assert sorted(a) == sorted(b)
    for fqn in a:
        assert len(a[fqn]) == len(b[fqn]), fqn
        for x, y in zip(a[fqn], b[fqn], strict=True):
            assert x.dtype == y.dtype and torch.equal(x, y), fqn


def test_kill_resume_overwrite_and_another_world_size(tmp_path: Path) -> None:
    # One sequence of runs (each torchrun start costs seconds on a small machine).
    common = ("--steps", "6", "--save-every", "2")
    train(tmp_path / "straight", *common, "--sync")
    straight = ckptstore.open(tmp_path / "straight", create=False)
    assert straight.steps() == [2, 4, 6]

    killed = train(tmp_path / "resumed", *common, "--kill-after", "5", expect_ok=False)
    assert killed.returncode != 0 and "killed after step 5" in killed.stdout
    resumed = ckptstore.open(tmp_path / "resumed", create=False)
    latest = resumed.latest()
    assert latest in (2, 4)  # the async save of step 4 may or may not have committed before the kill
    assert 6 not in resumed.steps()

    again = train(tmp_path / "resumed", *common)
    assert f"resumed from step {latest} of" in again.stdout and "at world size 2" in again.stdout
    assert resumed.steps() == [2, 4, 6]
    # Model shards, optimizer state and counters of the resumed run: bit for bit the same.
    assert_same_items(stored_items(straight, 6), stored_items(resumed, 6))

    # Rerun from scratch over existing steps: refused on the first save, nothing replaced.
    before = {step: straight.ref(step) for step in (2, 4, 6)}
    refused = train(tmp_path / "straight", "--steps", "2", "--save-every", "2", "--resume", "none",
                    expect_ok=False)
    assert refused.returncode != 0
    assert "StepExistsError: step 2 already exists" in refused.stderr
    assert "rerun with --save-overwrite to replace it" in refused.stderr
    assert {step: straight.ref(step) for step in (2, 4, 6)} == before

    # One process without torchrun resumes the 2-rank checkpoint of step 4 (DCP reshards) and,
    # with --save-overwrite, replaces step 6 (its one-rank batches give another model).
    one = run_plain(tmp_path / "straight", "--steps", "6", "--save-every", "2", "--resume", "4", "--save-overwrite")
    assert "resumed from step 4 of" in one.stdout and "at world size 1" in one.stdout
    replaced = straight.ref(6)
    assert replaced.seq == before[6].seq + 1 and replaced.manifest != before[6].manifest
    assert straight.ref(4) == before[4]


def run_plain(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, str(TRAINER), "--store", str(store), *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
