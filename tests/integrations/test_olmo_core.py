"""OLMo-core's seed scenario on 2 gloo ranks: `--save_overwrite` given, and the save of step 0
must not die with "Checkpoint for step 0 already exists" (ckptstore.integrations.olmo_core).

Each rank is a spawned process (gloo on CPU) training a fully_shard-ed MLP with OLMo-core's
state-dict preparation; ranks write what they saw to JSON files, the test process checks them.
Interleavings are forced with HookBackend (a hook pauses or hangs a rank at a named backend
operation), never with sleeps.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import ranks
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptstore
import ckptstore.dcp
from ckptstore import keys
from ckptstore.errors import StepExistsError
from ckptstore.integrations.olmo_core import load_model_and_optim_state, save_model_and_optim_state
from ckptstore.store import Store
from ckptstore.testing.interleave import Hook, HookBackend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

# -- the model ---------------------------------------------------------------------------------
def _build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    fully_shard(model, mesh=init_device_mesh("cpu", (ranks.WORLD,)))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + dist.get_rank()))
    torch.nn.functional.mse_loss(model(x), torch.sin(x)).backward()
    optim.step()
    optim.zero_grad()


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters; a collective: every rank calls it."""
    return {name: param.full_tensor() for name, param in model.named_parameters()}


def _moments(model: torch.nn.Module, optim: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [optim.state[param]["exp_avg"].full_tensor() for param in model.parameters()]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stored_weights(store: ckptstore.Store, step: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `step` holds for the model, read by this process alone (no collectives)."""
    model = {name: torch.zeros_like(tensor) for name, tensor in like.items()}
    ckptstore.dcp.load({"model": model}, store, step, no_dist=True)
    return model


def _manifests(store: ckptstore.Store) -> set[str]:
    return {info.key for info in store.backend.list(keys.MANIFESTS)}


def _refusal(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc), "step": getattr(exc, "step", None)}


# -- save_overwrite ----------------------------------------------------------------------------
def _overwrite_worker(rank: int, tmp: str, url: str) -> None:
    ranks.join_group(rank, tmp, "overwrite")
    store = ckptstore.open(url)
    model, optim = _build(seed=0)
    _train(model, optim, 1)
    save_model_and_optim_state(store, 0, model, optim)
    first = _weights(model)
    first_ref = store.ref(0)

    _train(model, optim, 2)
    second = _weights(model)
    refused: dict[str, Any] | None = None
    try:
        save_model_and_optim_state(store, 0, model, optim)  # as OLMo-core without --save_overwrite
    except StepExistsError as exc:
        refused = _refusal(exc)

    # With save_overwrite, rank 0 (DCP's coordinator, which commits) pauses right before it
    # writes the step's ref: every chunk and the new manifest are stored by then. Another
    # handle reads step 0 there.
    seen: dict[str, Any] = {}
    manifests_before = _manifests(store)

    def before_commit() -> None:
        reader = ckptstore.open(url, create=False)
        seen["new_manifests"] = sorted(_manifests(reader) - manifests_before)
        seen["ref_unchanged"] = reader.ref(0).commit_id == first_ref.commit_id
        seen["old_step_readable"] = _equal(_stored_weights(reader, 0, first), first)

    saver = store
    if rank == 0:
        saver = Store(HookBackend(store.backend, [Hook("put", "^" + keys.STEP_REFS, before=before_commit)]))
    save_model_and_optim_state(saver, 0, model, optim, save_overwrite=True)
    after_commit = _equal(_stored_weights(store, 0, second), second)
    if rank == 0:
        seen["committed_that_manifest"] = keys.manifest_key(store.ref(0).manifest) in seen["new_manifests"]

    fresh, fresh_optim = _build(seed=1)  # other weights, no optimizer state
    load_model_and_optim_state(store, 0, fresh, fresh_optim)
    seen_by_rank = {"refused": refused, "seen": seen, "after_commit": after_commit, "seq": store.ref(0).seq,
              "changed": not _equal(first, second),
              "loaded_weights": _equal(_weights(fresh), second),
              "loaded_moments": all(torch.equal(a, b) for a, b in zip(_moments(model, optim),
                                                                      _moments(fresh, fresh_optim), strict=True))}
    ranks.report(tmp, "overwrite", rank, seen_by_rank)
    ranks.leave()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_save_overwrite_replaces_step_0_atomically_and_without_it_every_rank_is_refused(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = str(tmp_path / "store") if backend == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/olmo"
    ranks.run(_overwrite_worker, str(tmp_path), url)
    reports = ranks.reports(str(tmp_path), "overwrite")
    for rank, report in enumerate(reports):
        refused = report["refused"]
        assert refused is not None, f"rank {rank}: a second save of step 0 without save_overwrite succeeded"
        assert refused["type"] == "StepExistsError" and refused["step"] == 0, refused
        assert "save_overwrite=True" in refused["message"], refused["message"]
        assert report["changed"], "the second training step did not change the weights: the test proves nothing"
        assert report["after_commit"], f"rank {rank}: step 0 does not hold the overwriting save's weights"
        assert report["seq"] == 2, report  # committed twice: the refused save changed nothing
        assert report["loaded_weights"] and report["loaded_moments"], report
    seen = reports[0]["seen"]  # rank 0, paused right before its commit
    assert len(seen["new_manifests"]) == 1, seen  # the overwriting save's manifest is stored ...
    assert seen["ref_unchanged"] and seen["old_step_readable"], seen  # ... and step 0 is still the old one
    assert seen["committed_that_manifest"], seen  # and then the commit made that manifest step 0
    assert reports[1]["seen"] == {}  # rank 1 never paused


# -- a killed save -----------------------------------------------------------------------------
def _killed_worker(rank: int, tmp: str, url: str) -> None:
    """Save step 0, then start saving step 1: rank 1 hangs at its first chunk write (the test
    SIGKILLs it there, as a node failure would)."""
    ranks.join_group(rank, tmp, "killed")
    store = ckptstore.open(url)
    model, optim = _build(seed=0)
    _train(model, optim, 1)
    save_model_and_optim_state(store, 0, model, optim)
    ranks.report(tmp, "killed", rank, {"step0": {k: v.tolist() for k, v in _weights(model).items()}})
    _train(model, optim, 2)

    def hang() -> None:
        Path(tmp, "rank1-mid-save").write_text("")
        time.sleep(ranks.DEADLINE)

    saver = Store(HookBackend(store.backend, [Hook("put", "^" + keys.CHUNKS, before=hang)])) if rank == 1 else store
    save_model_and_optim_state(saver, 1, model, optim)
    ranks.leave()  # not reached on rank 1; rank 0 fails in a collective with the dead rank


def _rerun_worker(rank: int, tmp: str, url: str) -> None:
    """The job restarted: resume from step 0, train step 2 again, save step 1 (no save_overwrite)."""
    ranks.join_group(rank, tmp, "rerun")
    store = ckptstore.open(url)
    model, optim = _build(seed=1)
    load_model_and_optim_state(store, 0, model, optim)
    resumed = _weights(model)
    _train(model, optim, 2)
    save_model_and_optim_state(store, 1, model, optim)
    saved = _equal(_stored_weights(store, 1, resumed), _weights(model))
    ranks.report(tmp, "rerun", rank, {"resumed": {k: v.tolist() for k, v in resumed.items()}, "saved": saved})
    ranks.leave()


def test_a_save_killed_midway_leaves_nothing_to_clean_up(tmp_path: Path) -> None:
    tmp, url = str(tmp_path), str(tmp_path / "store")
    procs = ranks.start(_killed_worker, tmp, url)
    marker = tmp_path / "rank1-mid-save"
    deadline = time.monotonic() + ranks.DEADLINE
    while not marker.exists() and time.monotonic() < deadline and procs[1].is_alive():
        procs[1].join(0.1)
    assert marker.exists(), "rank 1 never reached its first chunk write of step 1"
    assert procs[1].pid is not None
    os.kill(procs[1].pid, signal.SIGKILL)
    codes = ranks.finish(procs)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, codes  # the survivor's collective failed

    store = ckptstore.open(url, create=False)
    assert store.steps() == [0]  # the killed save committed nothing
    step0 = ranks.reports(tmp, "killed")[0]["step0"]

    ranks.run(_rerun_worker, tmp, url)  # no cleanup, no save_overwrite
    for report in ranks.reports(tmp, "rerun"):
        assert report["resumed"] == step0, "step 0 changed under the killed save"
        assert report["saved"]
    assert store.steps() == [0, 1]
    assert store.ref(1).seq == 1  # a first commit of step 1: the killed save left no step behind
