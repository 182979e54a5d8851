"""OLMo-core's seed scenario on 2 gloo ranks: `--save_overwrite` given, and the save of step 0
must not die with "Checkpoint for step 0 already exists" (ckptstore.integrations.olmo_core).

Each rank is a spawned process (gloo on CPU) training a fully_shard-ed MLP with OLMo-core's
state-dict preparation; ranks write what they saw to JSON files, the test process checks them.
Interleavings are forced with HookBackend (a hook pauses or hangs a rank at a named backend
operation), never with sleeps.
"""

from __future__ import annotations

import io
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ranks
import torch
import torch.distributed as dist
from olmo_core.data import DataCollator, NumpyFSLDataLoader, NumpyFSLDataset
from olmo_core.distributed.parallel import DataParallelType
from olmo_core.nn.transformer import TransformerConfig
from olmo_core.optim import AdamWConfig
from olmo_core.train import Duration, LoadStrategy, TrainerConfig
from olmo_core.train.callbacks import Callback
from olmo_core.train.train_module import TransformerDataParallelConfig, TransformerTrainModuleConfig
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptstore
import ckptstore.dcp
from ckptstore import keys
from ckptstore.errors import FormatError, InvalidArgumentError, StepExistsError
from ckptstore.integrations import olmo_core as integration
from ckptstore.integrations.olmo_core import (
    StoreCheckpointer,
    StoreCheckpointerCallback,
    StoreCheckpointerConfig,
    load_model_and_optim_state,
    save_model_and_optim_state,
)
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


# -- OLMo-core's Trainer -----------------------------------------------------------------------
VOCAB, SEQ = 128, 16


@dataclass
class _Trained(Callback):
    """Records the steps this job trained."""

    steps: list[int] = field(default_factory=list)

    def post_step(self) -> None:
        self.steps.append(self.step)


def _fit(rank: int, tmp: str, url: str, name: str, max_steps: int, save_overwrite: bool = False,
         resume: bool = True) -> dict[str, Any]:
    """Fit OLMo-core's own Trainer (tiny llama-like transformer, FSDP, numpy token data) with
    StoreCheckpointer: a permanent checkpoint every 2 steps, an ephemeral one at the others.
    Without `resume` it starts from scratch (and saves step 0 again) whatever the store holds.
    What it trained, and its final weights or the StepExistsError that stopped it."""
    dataset = NumpyFSLDataset(f"{tmp}/tokens.npy", sequence_length=SEQ, pad_token_id=0, eos_token_id=0,
                              vocab_size=VOCAB)
    dataset.work_dir = Path(tmp, f"work-{name}")
    dataset.prepare()
    loader = NumpyFSLDataLoader.wrap_numpy_dataset(dataset, global_batch_size=4 * SEQ,
                                                   collator=DataCollator(pad_token_id=0), dp_world_size=ranks.WORLD,
                                                   dp_rank=rank, seed=0, work_dir=f"{tmp}/work-{name}")
    torch.manual_seed(rank + 100)  # the weights differ from the first job's until loaded
    model = TransformerConfig.llama_like(d_model=32, vocab_size=VOCAB, n_layers=2, n_heads=2).build(init_device="cpu")
    module = TransformerTrainModuleConfig(
        rank_microbatch_size=2 * SEQ, max_sequence_length=SEQ, optim=AdamWConfig(lr=1e-2),
        dp_config=TransformerDataParallelConfig(name=DataParallelType.fsdp)).build(model, device=torch.device("cpu"))
    trained = _Trained()
    trainer = TrainerConfig(
        save_folder=f"{tmp}/save", work_dir=f"{tmp}/work-{name}", device="cpu", metrics_collect_interval=1,
        max_duration=Duration.steps(max_steps), checkpointer=StoreCheckpointerConfig(store_url=url),
        save_overwrite=save_overwrite, load_strategy=LoadStrategy.if_available if resume else LoadStrategy.never,
        callbacks={"checkpointer": StoreCheckpointerCallback(save_interval=2, ephemeral_save_interval=1,
                                                             save_async=False),
                   "trained": trained}).build(module, loader)
    assert isinstance(trainer.checkpointer, StoreCheckpointer)
    try:
        trainer.fit()
    except StepExistsError as exc:
        return {"refused": _refusal(exc), "steps": trained.steps}
    return {"steps": trained.steps, "weights": {k: v.full_tensor().tolist() for k, v in model.state_dict().items()}}


def _trainer_job(rank: int, tmp: str, url: str, name: str, max_steps: int, save_overwrite: bool = False,
                 resume: bool = True) -> None:
    """One job: a process group, one Trainer (OLMo-core builds its world mesh once per process)."""
    os.environ["OLMO_SHARED_FS"] = "1"  # the ranks share tmp (OLMo-core asks before using a local save_folder)
    ranks.join_group(rank, tmp, name)
    ranks.report(tmp, name, rank, _fit(rank, tmp, url, name, max_steps, save_overwrite, resume))
    ranks.leave()


def test_olmo_core_trainer_resumes_from_the_store_as_if_uninterrupted(tmp_path: Path) -> None:
    tmp, url = str(tmp_path), str(tmp_path / "store")
    np.random.default_rng(0).integers(1, VOCAB, size=64 * SEQ, dtype=np.uint16).tofile(tmp_path / "tokens.npy")
    ranks.run(_trainer_job, tmp, url, "uninterrupted", 6)
    store = ckptstore.open(url, create=False)
    # step 0 before training, permanent 2, 4, 6; ephemeral 1 and 3 were deleted (OLMo-core's removal)
    # once the next checkpoint was saved; the last ephemeral one, 5, stays, as it does in OLMo-core
    assert store.steps() == [0, 2, 4, 5, 6], store.steps()
    assert not (tmp_path / "save" / "step2").exists()  # the checkpoints are in the store, not in save_folder

    for step in (5, 6):  # as if the job had died after step 4
        store.delete(step)
    ranks.run(_trainer_job, tmp, url, "resumed", 6)
    uninterrupted, resumed = ranks.reports(tmp, "uninterrupted"), ranks.reports(tmp, "resumed")
    for first, second in zip(uninterrupted, resumed, strict=True):
        assert first["steps"] == [1, 2, 3, 4, 5, 6] and second["steps"] == [5, 6]  # resumed after step 4
        assert second["weights"] == first["weights"], "the resumed run ended with other weights"


def test_olmo_core_trainer_save_overwrite_is_the_seed_bug_fixed(tmp_path: Path) -> None:
    """The seed: a Trainer started from scratch over existing checkpoints with --save_overwrite
    died with "Checkpoint for step 0 already exists". Here it replaces step 0; without the
    flag every rank gets StepExistsError naming it, and the store keeps the first run's steps."""
    tmp, url = str(tmp_path), str(tmp_path / "store")
    np.random.default_rng(0).integers(1, VOCAB, size=64 * SEQ, dtype=np.uint16).tofile(tmp_path / "tokens.npy")
    ranks.run(_trainer_job, tmp, url, "first", 1)
    store = ckptstore.open(url, create=False)
    first = {step: store.ref(step).manifest for step in store.steps()}
    assert sorted(first) == [0, 1]
    ranks.run(_trainer_job, tmp, url, "refused", 1, False, False)  # from scratch, no save_overwrite
    for report in ranks.reports(tmp, "refused"):
        assert report["refused"]["type"] == "StepExistsError" and report["refused"]["step"] == 0, report
        assert "save_overwrite=True" in report["refused"]["message"]
        assert report["steps"] == []  # refused at the pre-train checkpoint, before any step
    ranks.run(_trainer_job, tmp, url, "overwriting", 1, True, False)  # from scratch, --save_overwrite
    assert [report["steps"] for report in ranks.reports(tmp, "overwriting")] == [[1], [1]]
    assert store.steps() == [0, 1]
    for step in (0, 1):  # replaced by the --save_overwrite run; the refused run changed nothing
        ref = store.ref(step)
        assert ref.seq == 2 and ref.replaces == first[step], (step, ref)


def _async_checkpointer_job(rank: int, tmp: str, url: str) -> None:
    """StoreCheckpointer.save_async and load with OLMo-core's transformer train module, no Trainer."""
    ranks.join_group(rank, tmp, "async")
    torch.manual_seed(0)
    model = TransformerConfig.llama_like(d_model=32, vocab_size=VOCAB, n_layers=2, n_heads=2).build(init_device="cpu")
    module = TransformerTrainModuleConfig(
        rank_microbatch_size=2 * SEQ, max_sequence_length=SEQ, optim=AdamWConfig(lr=1e-2),
        dp_config=TransformerDataParallelConfig(name=DataParallelType.fsdp)).build(model, device=torch.device("cpu"))
    checkpointer = StoreCheckpointerConfig(store_url=url).build(process_group=dist.new_group(backend="gloo"),
                                                                 work_dir=f"{tmp}/work")
    train_state = {"global_step": 3, "rank": rank, "numpy": np.random.default_rng(rank).random(3)}
    saved = {k: v.full_tensor() for k, v in model.state_dict().items()}
    checkpointer.save_async(f"{tmp}/save/step3", module, train_state).result()
    refused = None
    try:
        checkpointer.save_async(f"{tmp}/save/step3", module, train_state).result()
    except StepExistsError as exc:
        refused = _refusal(exc)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    loaded = checkpointer.load(f"{tmp}/save/step3", module)
    assert loaded is not None
    ranks.report(tmp, "async", rank, {
        "refused": refused, "weights_restored": _equal({k: v.full_tensor() for k, v in model.state_dict().items()},
                                                       saved),
        "train_state": {"global_step": loaded["global_step"], "rank": loaded["rank"],
                        "numpy_equal": bool((loaded["numpy"] == train_state["numpy"]).all())},
        "found": [step for step, _ in checkpointer.find_checkpoints(f"{tmp}/save")],
        "latest": checkpointer.latest_checkpoint(f"{tmp}/save")})
    ranks.leave()


def test_store_checkpointer_save_async_commits_and_loads_each_ranks_trainer_state(tmp_path: Path) -> None:
    tmp, url = str(tmp_path), str(tmp_path / "store")
    ranks.run(_async_checkpointer_job, tmp, url)
    for rank, report in enumerate(ranks.reports(tmp, "async")):
        assert report["refused"] is not None and "save_overwrite=True" in report["refused"]["message"], report
        assert report["weights_restored"], report
        assert report["train_state"] == {"global_step": 3, "rank": rank, "numpy_equal": True}  # its own rank's
        assert report["found"] == [3] and report["latest"] == f"{tmp}/save/step3"


def test_a_stored_trainer_state_that_would_need_pickle_is_refused_with_a_format_error() -> None:
    state = {"rng": {"numpy": ("MT19937", np.arange(4, dtype=np.uint32), 0)}, "global_step": 4}
    assert integration._decode_train_state(integration._encode_train_state(state), "here")["global_step"] == 4
    buffer = io.BytesIO()
    torch.save({"path": Path("/")}, buffer)  # a global weights_only refuses: unpickling it would run code
    with pytest.raises(FormatError, match=r"step 4: .*weights_only"):
        integration._decode_train_state(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), "step 4")
    with pytest.raises(InvalidArgumentError, match="names no checkpoint step"):
        integration.step_of("/save/latest")
    assert integration.step_of("s3://bucket/run/step12/") == 12
