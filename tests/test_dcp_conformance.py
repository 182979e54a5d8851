"""DCP conformance: what PyTorch's own DCP tests cover for FileSystemWriter/FileSystemReader,
run against ckptstore.dcp.StoreWriter/StoreReader on a local store.

In one process (no process group) and on 2 gloo ranks. The 2-rank scenarios run in ONE spawn
for the whole module (`two_ranks`: ranks spawned as in tests/test_dcp.py); each reports into
a JSON file and a test per scenario checks its part, so the module stays well under a minute
of wall time on 2 cores. Covered: nested dicts and lists and non-tensor values, DTensor
resharding, optimizer state through get_state_dict/set_state_dict (FSDP2 on 2 ranks),
`dedup_save_to_lowest_rank` and `flatten_state_dict`, async_save in THREAD mode, the default
stager, `_load_state_dict_from_keys`, and a save aborted at each point DCP can abort it
(counting the save leases left).
"""

from __future__ import annotations

import gc
import io
import os
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from test_dcp import _exit_cleanly, _report, _reports
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

import ckptstore
import ckptstore.dcp
from ckptstore.backends.memory import drop_memory_space
from ckptstore.dcp import StoreReader, StoreWriter, unwrap
from ckptstore.errors import StepExistsError
from ckptstore.serverclock import CLOCK_RESOLUTION
from ckptstore.testing.wrappers import CountingBackend

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
              pytest.mark.filterwarnings("ignore:torch.distributed is unavailable:UserWarning")]

# Small chunks, so shards span several chunks and loads fetch part of a stored item.
SMALL = ckptstore.ChunkingPolicy(chunk_size=48, small_tensor_limit=16, pack_size=64)
LEASE_TTL = 1.0  # for the abort scenarios: a lease nobody refreshes is stale after ~2 s


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def store() -> Iterator[ckptstore.Store]:
    name = f"dcpc-{uuid.uuid4().hex}"
    opened = ckptstore.open(f"memory://{name}", chunking=SMALL, lease_ttl=LEASE_TTL)
    try:
        yield opened
    finally:
        opened.close()
        drop_memory_space(name)


# -- shared by both worlds -------------------------------------------------------------------
def _nested_state(version: int) -> dict[str, Any]:
    """Nested dicts and lists, tensors of several dtypes, and non-tensor values."""
    g = torch.Generator().manual_seed(version)
    return {
        "model": {"layers": [{"w": torch.randn(5, 3, generator=g), "b": torch.randn(5, generator=g)},
                             {"w": torch.randn(2, 5, generator=g).to(torch.bfloat16)}],
                  "scale": 0.5 + version},
        "tensors": [torch.arange(7) + version, torch.ones(2, 2, dtype=torch.float64) * version],
        "meta": {"name": f"run{version}", "epoch": version, "none": None, "pair": (version, "b"),
                 "ints": [1, 2, version], "flag": True},
        "loader": io.BytesIO(f"loader-{version}".encode()),
    }


def _plain(value: Any) -> Any:
    """Comparable plain data (JSON-able) for a state: tensors as dtype + values."""
    if isinstance(value, torch.Tensor):
        return {"dtype": str(value.dtype), "values": value.float().tolist()}
    if isinstance(value, io.BytesIO):
        return {"bytesio": value.getvalue().decode()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_plain(v) for v in value]]
    return value


def _template(state: Any) -> Any:
    """The same structure with other values: what a trainer passes to dcp.load."""
    if isinstance(state, torch.Tensor):
        return torch.full_like(state, -1)
    if isinstance(state, dict):
        return {k: _template(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_template(v) for v in state]
    return None if not isinstance(state, io.BytesIO) else io.BytesIO()


def _model_and_optim(seed: int, mesh: Any = None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small MLP (FSDP2-sharded over `mesh` when given) after one AdamW step."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=0.01 * (seed + 1))
    model(torch.randn(3, 6)).sum().backward()
    optim.step()
    optim.zero_grad()
    return model, optim


def _full(value: Any) -> Any:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _optim_round_trip(store: ckptstore.Store, step: int, mesh: Any = None) -> dict[str, Any]:
    """Save model + optimizer via get_state_dict, load into a differently seeded model via
    set_state_dict; report whether parameters and every optimizer state tensor came back."""
    model, optim = _model_and_optim(0, mesh)
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, storage_writer=StoreWriter(store, step))
    model2, optim2 = _model_and_optim(7, mesh)
    msd2, osd2 = get_state_dict(model2, optim2)
    differed = not torch.equal(_full(msd2["0.weight"]), _full(msd["0.weight"]))
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, storage_reader=StoreReader(store, step))
    set_state_dict(model2, optim2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    after_m, after_o = get_state_dict(model2, optim2)
    params = all(torch.equal(_full(after_m[k]), _full(msd[k])) for k in msd)
    moments = [torch.equal(_full(after_o["state"][k][name]), _full(osd["state"][k][name]))
               for k in osd["state"] for name in ("exp_avg", "exp_avg_sq", "step")]
    lrs = [group["lr"] for group in after_o["param_groups"]]
    return {"params": params, "moments": moments, "lrs": lrs, "differed": differed}


class Planted(RuntimeError):
    """The error FailingPlanner raises."""


POINTS = ("set-up", "local plan", "global plan", "write", "finish")


class _RaisingMetadata(dict):  # type: ignore[type-arg]
    """state_dict_metadata that raises when the writer's finish() reads it."""

    def get(self, *args: Any, **kwargs: Any) -> Any:
        raise Planted("finish")

    def items(self) -> Any:
        raise Planted("finish")


class FailingPlanner(DefaultSavePlanner):
    """DCP's default planner that raises at `point` on rank `rank` (global plan and finish:
    only the coordinator gets there). At "finish" the global metadata it made raises when
    the writer's finish() reads it."""

    def __init__(self, point: str, rank: int):
        super().__init__()
        self.point, self.rank = point, rank

    def _maybe(self, point: str) -> None:
        me = dist.get_rank() if dist.is_initialized() else 0
        if point == self.point and me == self.rank:
            raise Planted(point)

    def set_up_planner(self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False) -> None:
        self._maybe("set-up")
        super().set_up_planner(state_dict, storage_meta, is_coordinator)

    def create_local_plan(self) -> Any:
        self._maybe("local plan")
        return super().create_local_plan()

    def create_global_plan(self, all_plans: Any) -> Any:
        self._maybe("global plan")
        plans, metadata = super().create_global_plan(all_plans)
        if self.point == "finish":
            metadata.state_dict_metadata = _RaisingMetadata(metadata.state_dict_metadata)
        return plans, metadata

    def resolve_data(self, write_item: Any) -> Any:
        self._maybe("write")
        return super().resolve_data(write_item)


def _save_leases(store: ckptstore.Store) -> list[int]:
    """[save lease objects under locks/, of which fresh]."""
    leases = [lock for lock in store.locks() if lock.kind == "save"]
    return [len(leases), sum(1 for lock in leases if not lock.stale and not lock.holder_dead)]


def _aborts(store: ckptstore.Store, world: int, step: int) -> dict[str, Any]:
    """Abort a save at each point, through plain dcp.save (writer kept) and through
    ckptstore.dcp.save; count the save leases after each (every rank, after a barrier)."""
    rank = dist.get_rank() if world > 1 else 0
    failing_rank = {"set-up": world - 1, "local plan": world - 1, "global plan": 0, "write": world - 1, "finish": 0}

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    out: dict[str, Any] = {}
    for point in POINTS:
        state = {"w": torch.arange(20.0) + rank, f"own{rank}": torch.ones(3) * rank}
        writer = StoreWriter(store, step)
        raised = ""
        try:
            dcp.save(state, storage_writer=writer, planner=FailingPlanner(point, failing_rank[point]))
        except CheckpointException as exc:
            raised = type(unwrap(exc) or exc).__name__ + ":" + ",".join(
                str(f[0]) for f in exc.failures.values())
        barrier()
        right_after = _save_leases(store)
        barrier()
        record: dict[str, Any] = {"raised": raised, "right_after": right_after}
        if point == "write" and world > 1:
            # The coordinator wrote before rank 1 failed: its lease is left, but nobody refreshes it.
            time.sleep(LEASE_TTL + CLOCK_RESOLUTION + 0.5)
            record["after_ttl"] = _save_leases(store)
            barrier()
            del writer  # dropping the writer ends it
            gc.collect()
            barrier()
            record["after_drop"] = _save_leases(store)
            barrier()
            writer = StoreWriter(store, step)
            with pytest.raises(CheckpointException):
                dcp.save(state, storage_writer=writer, planner=FailingPlanner(point, failing_rank[point]))
            barrier()
            record["again"] = _save_leases(store)
            barrier()
            writer.reset()  # so does reset()
            barrier()
            record["after_reset"] = _save_leases(store)
            barrier()
        try:
            ckptstore.dcp.save(state, store, step, planner=FailingPlanner(point, failing_rank[point]))
        except BaseException as exc:
            record["helper_raised"] = type(exc).__name__
        barrier()
        record["helper"] = _save_leases(store)
        barrier()
        del writer
        out[point] = record
    out["committed"] = step in store.steps()
    return out


def _check_aborts(report: dict[str, Any], world: int) -> None:
    for point in POINTS:
        record = report[point]
        assert record["raised"] == f"CheckpointException:{point}", (point, record)
        assert record["helper_raised"] == "CheckpointException", (point, record)
        # No lease left once DCP returns: an abort before write_data never took one, a rank
        # that fails in write_data ends its own, and finish() ends every rank's.
        if point == "write" and world > 1:
            assert record["right_after"] == [1, 1], record  # the coordinator's, no longer refreshed
            assert record["after_ttl"] == [1, 0], record  # stale one TTL later, the writer still alive
            assert record["after_drop"] == [0, 0] and record["again"][0] == 1, record
            assert record["after_reset"] == [0, 0], record
        else:
            assert record["right_after"] == [0, 0], (point, record)
        assert record["helper"] == [0, 0], (point, record)  # ckptstore.dcp.save ends them at once
    assert report["committed"] is False


# -- one process, no process group -----------------------------------------------------------
def test_nested_containers_and_non_tensor_values_round_trip(store: ckptstore.Store) -> None:
    saved = _nested_state(1)
    dcp.save(saved, storage_writer=StoreWriter(store, 1))
    target = _template(_nested_state(1))
    dcp.load(target, storage_reader=StoreReader(store, 1))  # without trust_pickle
    assert _plain(target) == _plain(saved)


def test_optimizer_state_through_get_and_set_state_dict(store: ckptstore.Store) -> None:
    result = _optim_round_trip(store, 2)
    assert result["differed"] and result["params"] and result["moments"] and all(result["moments"])
    assert result["lrs"] == [0.01]


def test_dedup_save_to_lowest_rank_and_flatten_state_dict_off(store: ckptstore.Store, tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    saved = _nested_state(3)
    saved["top"] = torch.arange(9.0)
    save_planner = {"flatten_state_dict": False, "dedup_save_to_lowest_rank": True}
    dcp.save(saved, storage_writer=StoreWriter(store, 3), planner=DefaultSavePlanner(**save_planner))
    # Unflattened, each top-level value is one item: the nested ones are pickled whole.
    metadata = StoreReader(store, 3).read_metadata()
    assert sorted(metadata.state_dict_metadata) == ["loader", "meta", "model", "tensors", "top"]
    ours = _template(saved)
    dcp.load(ours, storage_reader=StoreReader(store, 3), planner=DefaultLoadPlanner(flatten_state_dict=False))
    assert torch.equal(ours["top"], saved["top"])
    # Exactly what DCP's own file-system writer and reader give (top-level tensors load in
    # place; unflattened non-tensor values are not loaded back).
    dcp.save(saved, storage_writer=FileSystemWriter(tmp_path), planner=DefaultSavePlanner(**save_planner))
    stock = _template(saved)
    dcp.load(stock, storage_reader=FileSystemReader(tmp_path), planner=DefaultLoadPlanner(flatten_state_dict=False))
    assert _plain(ours) == _plain(stock)


def test_async_save_thread_mode_and_the_default_stager(store: ckptstore.Store) -> None:
    state = {"w": torch.zeros(16), "meta": {"epoch": 4}}
    future = ckptstore.dcp.async_save(state, store, 4)  # DCP's default stager copies the state first
    state["w"] += 1  # the trainer goes on at once
    metadata = future.result(timeout=120)
    assert metadata.storage_meta is not None and metadata.storage_meta.checkpoint_id == "step-4"
    target: dict[str, Any] = {"w": torch.full((16,), -1.0), "meta": {"epoch": -1}}
    dcp.load(target, storage_reader=StoreReader(store, 4))
    assert torch.equal(target["w"], torch.zeros(16)) and target["meta"]["epoch"] == 4

    with pytest.raises(StepExistsError, match="step 4 already exists"):  # raised as itself
        ckptstore.dcp.async_save(state, store, 4).result(timeout=120)
    plain = dcp.async_save(state, storage_writer=StoreWriter(store, 4))
    with pytest.raises(CheckpointException) as caught:
        plain.result(timeout=120)
    assert isinstance(unwrap(caught.value), StepExistsError)

    # An explicit DefaultStager staging in the background: DCP returns an AsyncSaveResponse.
    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False, use_async_staging=True,
                                          use_non_blocking_copy=False))
    try:
        writer = StoreWriter(store)
        future = ckptstore.dcp.async_save(state, storage_writer=writer, checkpoint_id="step-5", async_stager=stager)
        assert future.result(timeout=120).storage_meta.checkpoint_id == "step-5"  # type: ignore[union-attr]
    finally:
        stager.close()
    assert store.steps() == [4, 5] and _save_leases(store) == [0, 0]


def test_load_state_dict_from_keys_without_a_model(store: ckptstore.Store) -> None:
    saved = _nested_state(6)
    dcp.save(saved, storage_writer=StoreWriter(store, 6))
    # torchtitan loads chosen keys of a checkpoint with no state dict to load into.
    some = _load_state_dict_from_keys({"model.layers.0.w", "meta.epoch"}, storage_reader=StoreReader(store, 6))
    assert torch.equal(some["model"]["layers"][0]["w"], saved["model"]["layers"][0]["w"])
    assert some["meta"]["epoch"] == 6 and "tensors" not in some
    everything = _load_state_dict_from_keys(storage_reader=StoreReader(store))
    assert _plain(everything) == _plain(saved)


def test_a_save_aborted_at_any_point_leaves_no_lease_one_rank(store: ckptstore.Store) -> None:
    _check_aborts(_aborts(store, 1, 9), 1)


# -- two gloo ranks, one spawn for the module ------------------------------------------------
ROWS, COLS = 6, 4


def _matrix(version: int) -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) + 100 * version


def _scenario_nested(store: ckptstore.Store, mesh: Any, rank: int) -> dict[str, Any]:
    saved = _nested_state(10)  # the same on both ranks: replicated, written once
    saved[f"rank{rank}"] = {"own": torch.full((3,), float(rank)), "note": f"from {rank}"}
    dcp.save(saved, storage_writer=StoreWriter(store, 10))
    target = _template(saved)
    dcp.load(target, storage_reader=StoreReader(store, 10))
    return {"equal": _plain(target) == _plain(saved)}


def _scenario_dtensor(store: ckptstore.Store, mesh: Any, rank: int) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dcp.save({"w": distribute_tensor(_matrix(1), mesh, [Shard(0)]),
              "r": distribute_tensor(_matrix(2), mesh, [Replicate()])}, storage_writer=StoreWriter(store, 20))
    # Resharded on load: rows -> columns, replicated -> sharded.
    target = {"w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(1)]),
              "r": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)])}
    dcp.load(target, storage_reader=StoreReader(store, 20))
    return {"w_local": target["w"].to_local().tolist(), "r_local": target["r"].to_local().tolist()}


def _scenario_optim(store: ckptstore.Store, mesh: Any, rank: int) -> dict[str, Any]:
    return _optim_round_trip(store, 30, mesh)


def _scenario_planner_options(store: ckptstore.Store, mesh: Any, rank: int) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    state = {"shared": torch.arange(40.0), "sharded": distribute_tensor(_matrix(3), mesh, [Shard(0)])}
    writer = StoreWriter(store, 31)
    dcp.save(state, storage_writer=writer, planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
    target = {"shared": torch.zeros(40), "sharded": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)])}
    dcp.load(target, storage_reader=StoreReader(store, 31))
    nested = {"cfg": {"depth": 3, "w": torch.ones(2)}, "t": torch.ones(2)}
    dcp.save(nested, storage_writer=StoreWriter(store, 32), planner=DefaultSavePlanner(flatten_state_dict=False))
    back: dict[str, Any] = {"cfg": {"depth": -1}, "t": torch.zeros(2)}
    dcp.load(back, storage_reader=StoreReader(store, 32), planner=DefaultLoadPlanner(flatten_state_dict=False))
    metadata = StoreReader(store, 32).read_metadata()
    return {"new_chunks": writer.new_chunks, "shared": torch.equal(target["shared"], torch.arange(40.0)),
            "sharded": target["sharded"].full_tensor().tolist(), "items": sorted(metadata.state_dict_metadata),
            "t": back["t"].tolist()}


def _scenario_async_thread(store: ckptstore.Store, mesh: Any, rank: int) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    group = dist.new_group(backend="gloo")  # async collectives never interleave with the trainer's
    state = {"w": distribute_tensor(_matrix(4), mesh, [Shard(0)]), "c": torch.zeros(5)}
    future = ckptstore.dcp.async_save(state, store, 40, process_group=group)
    state["c"] += 1  # changed right after the call: the default stager copied it first
    future.result(timeout=120)
    refused = ""
    try:
        ckptstore.dcp.async_save(state, store, 40, process_group=group).result(timeout=120)
    except StepExistsError as exc:
        refused = f"{type(exc).__name__}:{exc.step}"
    writer = StoreWriter(store)  # one writer, many steps
    for step in (41, 42):
        dcp.async_save(state, storage_writer=writer, checkpoint_id=f"/ckpt/step-{step}",
                       process_group=group).result(timeout=120)
    target = {"w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)]), "c": torch.full((5,), -1.0)}
    dcp.load(target, storage_reader=StoreReader(store, 40))
    dist.barrier()
    return {"refused": refused, "w": target["w"].full_tensor().tolist(), "c": target["c"].tolist(),
            "leases": _save_leases(store)}


def _scenario_aborts(store: ckptstore.Store, mesh: Any, rank: int) -> dict[str, Any]:
    fast = ckptstore.open(store.url, lease_ttl=LEASE_TTL, create=False)
    return _aborts(fast, 2, 90)


def _stop_checkpoint_process() -> None:
    """End DCP's PROCESS-mode checkpoint process (it lives as long as this one otherwise)."""
    from torch.distributed.checkpoint import _async_process_executor as executor

    process, executor._CHECKPOINT_PROCESS = executor._CHECKPOINT_PROCESS, None
    if process is not None:
        process.__del__()  # asks it to terminate, joins it


def _scenario_process(store: ckptstore.Store, mesh: Any, rank: int) -> dict[str, Any]:
    """PROCESS-mode async_save: the writer (and its store) is pickled into DCP's checkpoint
    process, which reopens the store and saves."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    from torch.distributed.tensor import Shard, distribute_tensor

    world = dist.get_world_size()
    process = AsyncCheckpointerType.PROCESS
    state = {"w": distribute_tensor(_matrix(5), mesh, [Shard(0)]), "c": torch.arange(4.0),
             "meta": {"epoch": 5, "loader": io.BytesIO(b"pos=5")}}
    out: dict[str, Any] = {}
    try:
        ckptstore.dcp.async_save(state, store, 50, async_checkpointer_type=process).result(timeout=300)
        try:  # the same step again: the child's StepExistsError reaches us as itself
            ckptstore.dcp.async_save(state, store, 50, async_checkpointer_type=process).result(timeout=300)
        except StepExistsError as exc:
            out["refused"] = f"{type(exc).__name__}:{exc.step}"
        try:
            dcp.async_save(state, storage_writer=StoreWriter(store, 50),
                           async_checkpointer_type=process).result(timeout=300)
        except CheckpointException as exc:
            out["plain"] = type(unwrap(exc)).__name__
        # Rank world-1 fails writing in its child after the coordinator's child wrote: the
        # helper ends the lease the coordinator's child left.
        try:
            ckptstore.dcp.async_save(state, store, 51, async_checkpointer_type=process,
                                     planner=FailingPlanner("write", world - 1)).result(timeout=300)
        except CheckpointException as exc:
            out["aborted"] = ",".join(str(f[0]) for f in exc.failures.values())
        if world > 1:
            dist.barrier()
        out["leases"] = _save_leases(store)
    finally:
        _stop_checkpoint_process()
    target = {"w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)]), "c": torch.zeros(4),
              "meta": {"epoch": -1, "loader": io.BytesIO()}}
    dcp.load(target, storage_reader=StoreReader(store, 50))
    out.update(w=target["w"].full_tensor().tolist(), c=target["c"].tolist(), epoch=target["meta"]["epoch"],
               loader=target["meta"]["loader"].getvalue().decode(), steps=store.steps())
    return out


def _scenario_latest(store: ckptstore.Store, mesh: Any, rank: int) -> dict[str, Any]:
    """ckptstore.dcp.load(step=None): rank 0 alone lists the steps; every rank loads its answer."""
    from torch.distributed.tensor import Shard, distribute_tensor

    ckptstore.dcp.save({"w": distribute_tensor(_matrix(6), mesh, [Shard(0)])}, store, 60)  # the newest step
    reading = ckptstore.open(store.url, create=False)
    counting = CountingBackend(reading.backend)
    reading.backend = counting
    target = {"w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)])}
    ckptstore.dcp.load(target, reading)
    listings = sum(1 for op, key in counting.log if op == "list" and key.startswith("refs/steps"))
    counting.log.clear()
    latest = ckptstore.dcp.latest_step(reading)  # what the torchtitan integration resumes from
    return {"listings": listings, "w": target["w"].full_tensor().tolist(), "latest": latest,
            "latest_listings": sum(1 for op, key in counting.log if op == "list" and key.startswith("refs/steps"))}


SCENARIOS: dict[str, Callable[[ckptstore.Store, Any, int], dict[str, Any]]] = {
    "nested": _scenario_nested,
    "dtensor": _scenario_dtensor,
    "optim": _scenario_optim,
    "planner_options": _scenario_planner_options,
    "async_thread": _scenario_async_thread,
    "aborts": _scenario_aborts,
    "process": _scenario_process,
    "latest": _scenario_latest,
}


def _worker(rank: int, world: int, tmp: str, names: list[str]) -> None:
    import datetime

    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv-conf{world}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (world,))
    store = ckptstore.open(Path(tmp, f"store{world}"), chunking=SMALL)
    out: dict[str, Any] = {}
    for name in names:
        scenario = SCENARIOS[name]
        started = time.monotonic()
        try:
            out[name] = scenario(store, mesh, rank)
        except BaseException:
            out[name] = {"error": traceback.format_exc()}
        out[name]["seconds"] = round(time.monotonic() - started, 2)
        dist.barrier()
    _report(tmp, f"conf{world}", rank, out)
    dist.destroy_process_group()
    _exit_cleanly()


def _spawn(tmp: Path, world: int, names: list[str]) -> tuple[Path, list[dict[str, Any]]]:
    saved = {var: os.environ.pop(var) for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
             if var in os.environ}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        mp.spawn(_worker, args=(world, str(tmp), names), nprocs=world, join=True)
    finally:
        os.environ.update(saved)
    return tmp / f"store{world}", _reports(str(tmp), f"conf{world}", world)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    return _spawn(tmp_path_factory.mktemp("dcp-conformance"), 2, list(SCENARIOS))


def _scenario(two_ranks: tuple[Path, list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    reports = [report[name] for report in two_ranks[1]]
    for report in reports:
        assert "error" not in report, report["error"]
    return reports


@pytest.mark.slow
def test_two_ranks_nested_containers_and_non_tensor_values(two_ranks: Any) -> None:
    assert all(r["equal"] for r in _scenario(two_ranks, "nested"))
    # One process without a process group reads the 2-rank step whole.
    store = ckptstore.open(two_ranks[0], create=False)
    want = _nested_state(10)
    for rank in (0, 1):
        want[f"rank{rank}"] = {"own": torch.full((3,), float(rank)), "note": f"from {rank}"}
    target = _template(want)
    dcp.load(target, storage_reader=StoreReader(store, 10))
    assert _plain(target) == _plain(want)


@pytest.mark.slow
def test_two_ranks_dtensor_resharding(two_ranks: Any) -> None:
    for rank, report in enumerate(_scenario(two_ranks, "dtensor")):
        half = COLS // 2
        assert report["w_local"] == _matrix(1)[:, rank * half:(rank + 1) * half].tolist()
        assert report["r_local"] == _matrix(2)[rank * ROWS // 2:(rank + 1) * ROWS // 2].tolist()
    store = ckptstore.open(two_ranks[0], create=False)
    plain = {"w": torch.zeros(ROWS, COLS), "r": torch.zeros(ROWS, COLS)}
    dcp.load(plain, storage_reader=StoreReader(store, 20))
    assert torch.equal(plain["w"], _matrix(1)) and torch.equal(plain["r"], _matrix(2))


@pytest.mark.slow
def test_two_ranks_optimizer_state_through_get_and_set_state_dict(two_ranks: Any) -> None:
    for report in _scenario(two_ranks, "optim"):
        assert report["differed"] and report["params"] and report["moments"] and all(report["moments"])
        assert report["lrs"] == [0.01]


@pytest.mark.slow
def test_two_ranks_dedup_save_to_lowest_rank_and_flatten_state_dict_off(two_ranks: Any) -> None:
    reports = _scenario(two_ranks, "planner_options")
    # The replicated tensor (4 chunks) is written by rank 0 only, beside its own shard (1 chunk);
    # each rank also writes its manifest part (one blob).
    assert [r["new_chunks"] for r in reports] == [5 + 1, 1 + 1]
    for report in reports:
        assert report["shared"] and report["sharded"] == _matrix(3).tolist()
        assert report["items"] == ["cfg", "t"] and report["t"] == [1.0, 1.0]  # "cfg" one item, pickled whole


@pytest.mark.slow
def test_two_ranks_async_save_thread_mode(two_ranks: Any) -> None:
    for report in _scenario(two_ranks, "async_thread"):
        assert report["refused"] == "StepExistsError:40"  # from the coordinator, as itself on every rank
        assert report["w"] == _matrix(4).tolist() and report["c"] == [0.0] * 5
        assert report["leases"] == [0, 0]
    store = ckptstore.open(two_ranks[0], create=False)
    assert {40, 41, 42} <= set(store.steps())


@pytest.mark.slow
def test_two_ranks_load_state_dict_from_keys(two_ranks: Any) -> None:
    _scenario(two_ranks, "nested")
    store = ckptstore.open(two_ranks[0], create=False)
    got = _load_state_dict_from_keys({"rank1.own", "model.scale"}, storage_reader=StoreReader(store, 10))
    assert set(got) == {"rank1", "model"} and set(got["rank1"]) == {"own"} and got["model"] == {"scale": 10.5}
    assert torch.equal(got["rank1"]["own"], torch.ones(3))


@pytest.mark.slow
def test_two_ranks_a_save_aborted_at_any_point_leaves_no_lease(two_ranks: Any) -> None:
    reports = _scenario(two_ranks, "aborts")
    _check_aborts(reports[0], 2)
    assert reports[0] == {**reports[1], "seconds": reports[0]["seconds"]}  # both ranks counted the same


def _check_process(report: dict[str, Any]) -> None:
    assert report["refused"] == "StepExistsError:50" and report["plain"] == "StepExistsError", report
    assert report["leases"] == [0, 0], report
    assert report["w"] == _matrix(5).tolist() and report["c"] == [0.0, 1.0, 2.0, 3.0], report
    assert report["epoch"] == 5 and report["loader"] == "pos=5" and 50 in report["steps"], report
    assert 51 not in report["steps"]


@pytest.mark.slow
def test_one_rank_async_save_process_mode(tmp_path: Path) -> None:
    # PROCESS mode needs a process group (DCP sets its checkpoint process up through it): one rank.
    _, reports = _spawn(tmp_path, 1, ["process"])
    report = _scenario((tmp_path, reports), "process")[0]
    _check_process(report)
    assert report["aborted"] == "write"  # its own write failed in the child


@pytest.mark.slow
def test_two_ranks_async_save_process_mode(two_ranks: Any) -> None:
    reports = _scenario(two_ranks, "process")
    for report in reports:
        _check_process(report)
        assert report["aborted"] == "write"


@pytest.mark.slow
def test_two_ranks_resolve_latest_once_and_load_the_same_step(two_ranks: Any) -> None:
    reports = _scenario(two_ranks, "latest")
    assert [r["listings"] for r in reports] == [1, 0]  # per rank: before, each rank listed the steps itself
    assert all(r["w"] == _matrix(6).tolist() for r in reports)
    assert [(r["latest"], r["latest_listings"]) for r in reports] == [(60, 1), (60, 0)]
