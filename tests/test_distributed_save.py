"""The plain API across ranks: `store.save(step, state)` on every rank of a gloo process group.

Workers are spawned processes (gloo on CPU) that write what they saw to JSON files; the test
process checks those. Every spawn is bounded: the process group has a short timeout and the
test joins each worker with a deadline, killing stragglers, so a hang fails instead of
blocking the suite.
"""

from __future__ import annotations

import datetime
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import ckptstore
from ckptstore import keys
from ckptstore.backends.base import OVERWRITE, Buffer, PutMode
from ckptstore.distributed import SINGLE_PROCESS, merge_states
from ckptstore.errors import DistributedSaveError, StateConflictError, StepExistsError
from ckptstore.testing.wrappers import ForwardingBackend
from ckptstore.tree import TensorRef, decode_tree, encode_tree

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

SMALL = ckptstore.ChunkingPolicy(chunk_size=4096, small_tensor_limit=256, pack_size=1024)
PG_TIMEOUT = datetime.timedelta(seconds=20)  # a dead rank fails the others' collectives by then at the latest
JOIN_DEADLINE = 150.0  # seconds for a whole group of workers


# -- spawning ----------------------------------------------------------------------------------
def _spawn(worker: Callable[..., None], world: int, *args: Any, stalled: tuple[int, ...] = ()) -> list[int | None]:
    """Run `worker(rank, world, *args)` in `world` spawned processes; their exit codes.

    Not mp.spawn: it kills every rank as soon as one exits non-zero, and the dying-rank test
    needs the survivors to finish and report. `stalled` ranks are expected to hang: they are
    killed once the others are done.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(rank, world, *args), daemon=True) for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + JOIN_DEADLINE
    for rank, proc in enumerate(procs):
        if rank not in stalled:
            proc.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive() and rank not in stalled]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    assert not hung, f"ranks {hung} did not finish within {JOIN_DEADLINE}s"
    return [proc.exitcode for proc in procs]


def _init(rank: int, world: int, tmp: str, name: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv-{name}", rank=rank, world_size=world,
                            timeout=PG_TIMEOUT)


def _done() -> None:
    """Leave without C++ teardown: gloo threads torn down at exit sometimes abort (see test_dcp)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _report(tmp: str, name: str, rank: int, data: dict[str, Any]) -> None:
    Path(tmp, f"{name}-{rank}.json").write_text(json.dumps(data))


def _finish(tmp: str, name: str, rank: int, data: dict[str, Any]) -> None:
    """A worker's last words: its report, then leave the group and the process."""
    _report(tmp, name, rank, data)
    dist.destroy_process_group()
    _done()


def _reports(tmp: str, name: str, ranks: range | list[int]) -> list[dict[str, Any]]:
    return [json.loads(Path(tmp, f"{name}-{rank}.json").read_text()) for rank in ranks]


def _error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc), "step": getattr(exc, "step", None),
            "writer": getattr(exc, "writer", None), "path": getattr(exc, "path", None),
            "ranks": list(getattr(exc, "ranks", ()))}


# -- states ------------------------------------------------------------------------------------
def _rank_state(rank: int, version: int) -> dict[str, Any]:
    """What rank `rank` passes: its own shard and optimizer state, plus replicated values."""
    return {
        "model": {f"layer{rank}.weight": torch.full((40, 8), float(100 * version + rank))},
        "optim": {f"layer{rank}.exp_avg": torch.arange(16, dtype=torch.float64) * (version + 1) + rank},
        "shared_embedding": torch.arange(300, dtype=torch.float32) * (version + 1),  # replicated tensor
        "step": version,  # replicated scalar
        "config": {"lr": 1e-3, "betas": (0.9, 0.95)},  # replicated dict of leaves
    }


def _merged(world: int, version: int) -> dict[str, Any]:
    merged: dict[str, Any] = {"model": {}, "optim": {}}
    for rank in range(world):
        state = _rank_state(rank, version)
        merged["model"].update(state["model"])
        merged["optim"].update(state["optim"])
        merged.update({k: v for k, v in state.items() if k not in ("model", "optim")})
    return merged


def _plain(value: Any) -> Any:
    """A JSON-able form of a loaded state, for comparing across processes."""
    if isinstance(value, torch.Tensor):
        return {"dtype": str(value.dtype), "shape": list(value.shape), "data": value.reshape(-1).tolist()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class LeaseCountingBackend(ForwardingBackend):
    """Records how many save leases exist whenever a manifest is put (only the coordinator puts one)."""

    def __init__(self, inner: Any, seen: list[int]):
        super().__init__(inner)
        self.seen = seen

    def put(self, key: str, data: Buffer | Any, *, mode: PutMode = OVERWRITE) -> str:
        if key.startswith(keys.MANIFESTS):
            self.seen.append(sum(1 for info in self.inner.list(keys.LOCKS) if "save-" in info.key))
        return super().put(key, data, mode=mode)


def _open(url: str, wrap: Callable[[Any], Any] | None = None) -> ckptstore.Store:
    from ckptstore.url import open_backend

    backend = open_backend(url)
    return ckptstore.Store(wrap(backend) if wrap else backend, chunking=SMALL)


# -- the OLMo scenario ---------------------------------------------------------------------------
def _olmo_worker(rank: int, world: int, tmp: str, url: str) -> None:
    _init(rank, world, tmp, "olmo")
    seen: list[int] = []
    store = _open(url, lambda b: LeaseCountingBackend(b, seen))
    first = store.save(0, _rank_state(rank, 0))
    raised = []
    try:  # the rerun: every rank must raise the coordinator's StepExistsError
        store.save(0, _rank_state(rank, 1))
    except StepExistsError as exc:
        raised.append(_error(exc))
    # The rerun with overwrite: decided on rank 0 from its one argument. The other ranks
    # "forget" the flag (OLMo's bug) and the overwrite still happens, everywhere the same.
    second = store.save(0, _rank_state(rank, 1), overwrite=(rank == 0), metadata={"run": "olmo"})
    loaded = store.load()  # every rank: the latest, i.e. step 0 as overwritten
    own = _rank_state(rank, 0)  # load(into=...) fills this rank's own tensors in place
    filled = store.load(0, into=own, strict=False).state  # not strict: the step holds the other ranks' too
    _report(tmp, "olmo", rank, {
        "first": [first.manifest, first.commit_id], "second": [second.manifest, second.commit_id, second.seq],
        "replaced": second.replaced, "raised": raised, "loaded": _plain(loaded),
        "into_same_object": filled["model"][f"layer{rank}.weight"] is own["model"][f"layer{rank}.weight"],
        "own_now": own["model"][f"layer{rank}.weight"].reshape(-1)[:1].tolist(), "leases_at_manifest": seen,
        "metadata": store.info(0).manifest.metadata, "tensors": second.tensors,
    })
    dist.destroy_process_group()
    _done()


def _check_olmo(tmp: str, world: int, url: str) -> None:
    reports = _reports(tmp, "olmo", range(world))
    assert {tuple(r["first"]) for r in reports} == {tuple(reports[0]["first"])}  # one commit, seen everywhere
    for r in reports:
        assert len(r["raised"]) == 1 and r["raised"][0]["type"] == "StepExistsError" and r["raised"][0]["step"] == 0
        assert r["raised"] == reports[0]["raised"]  # same commit time and writer in every rank's error
        assert r["second"] == reports[0]["second"] and r["second"][2] == 2  # seq 2: a replace
        assert r["replaced"] == reports[0]["first"][0]
        assert r["loaded"] == _plain(_merged(world, 1))  # every rank loads the new union
        assert r["into_same_object"] and r["own_now"] == [float(100 + reports.index(r))]
        assert r["metadata"] == {"run": "olmo"}
        # 2 tensors per rank + the replicated one, stored once
        assert r["tensors"] == 2 * world + 1
    # Rank 0 put the manifests while all ranks still held their save leases: the first save's
    # and the overwrite's. The refused rerun put none (it is refused before any write).
    assert reports[0]["leases_at_manifest"] == [world, world]
    assert all(r["leases_at_manifest"] == [] for r in reports[1:])
    store = ckptstore.open(url, create=False)
    assert store.steps() == [0] and store.ref(0).seq == 2
    assert [lock for lock in store.locks() if lock.kind == "save"] == []  # every lease closed
    loaded = store.load(0)
    assert torch.equal(loaded["shared_embedding"], _merged(world, 1)["shared_embedding"])
    # The replicated tensor is stored once: one manifest entry, not one per rank.
    assert len(store.info(0).manifest.tensors) == 2 * world + 1


@pytest.mark.slow
def test_olmo_scenario_on_4_ranks_local(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    assert _spawn(_olmo_worker, 4, str(tmp_path), url) == [0, 0, 0, 0]
    _check_olmo(str(tmp_path), 4, url)


@pytest.mark.slow
def test_olmo_scenario_on_4_ranks_s3(tmp_path: Path, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/run"  # the workers find the server through the exported AWS_* variables
    assert _spawn(_olmo_worker, 4, str(tmp_path), url) == [0, 0, 0, 0]
    _check_olmo(str(tmp_path), 4, url)


# -- conflicts, bad arguments, single-process saves inside a group ------------------------------
def _conflict_worker(rank: int, world: int, tmp: str, url: str) -> None:
    _init(rank, world, tmp, "conflict")
    store = _open(url)
    results: dict[str, Any] = {}
    cases = {
        "scalar": {"lr": 0.1 * (rank + 1)},  # replicated key with different values
        "tensor": {"w": torch.full((64,), float(rank))},  # same dtype/shape, different bytes
        "shape": {"w": torch.zeros(4 + rank)},
        "dict_vs_leaf": {"opt": {"a": 1} if rank == 0 else 5},
        # Rank 0 holds no part of these: it decides the conflict of ranks 1 and 2 (a shape at the
        # merge, different bytes at the commit) and every rank raises it.
        "not_rank_0": {"mine": 0} if rank == 0 else {"theirs": {"x": torch.full((4,), float(rank))}},
        "not_rank_0_shape": {"mine": 0} if rank == 0 else {"theirs": {"x": torch.zeros(rank)}},
        "steps": None,
        "metadata": None,
    }
    for name, state in cases.items():
        try:
            if name == "steps":
                store.save(10 + rank, {"x": rank})
            elif name == "metadata":  # only rank 1's argument is bad: every rank raises it
                store.save(11, {"x": 1}, metadata=object() if rank == 1 else None)
            else:
                store.save(1, state)
            results[name] = None
        except Exception as exc:
            results[name] = _error(exc)
    # Inside the group, rank 0 alone saves with SINGLE_PROCESS (the others take no part).
    if rank == 0:
        results["single"] = store.save(7, {"only": torch.ones(2)}, process_group=SINGLE_PROCESS).step
    dist.barrier()
    results["steps_after"] = store.steps()
    _finish(tmp, "conflict", rank, results)


@pytest.mark.slow
def test_conflicting_states_raise_the_same_typed_error_on_every_rank(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    assert _spawn(_conflict_worker, 3, str(tmp_path), url) == [0, 0, 0]
    reports = _reports(str(tmp_path), "conflict", range(3))
    for name, path, ranks in [("scalar", "state['lr']", [0, 1]), ("tensor", "state['w']", [0, 1]),
                              ("shape", "state['w']", [0, 1]), ("dict_vs_leaf", "state['opt']", [0, 1]),
                              ("not_rank_0", "state['theirs']['x']", [1, 2]),
                              ("not_rank_0_shape", "state['theirs']['x']", [1, 2])]:
        for r in reports:
            assert r[name]["type"] == "StateConflictError", (name, r[name])
            assert r[name]["path"] == path and r[name]["ranks"] == ranks
            assert r[name] == reports[0][name]
    assert "tensors of different contents" in reports[0]["tensor"]["message"]
    assert "tensors of different contents" in reports[0]["not_rank_0"]["message"]
    for r in reports:
        assert r["steps"]["type"] == "InvalidArgumentError" and "different steps" in r["steps"]["message"]
        assert r["metadata"]["type"] == "UnsupportedValueError" and r["metadata"]["path"] == "metadata"
        assert r["steps_after"] == [7]  # no conflicting save committed anything
    assert reports[0]["single"] == 7


def test_merge_rules_without_processes() -> None:
    def skeleton(state: dict[str, Any]) -> tuple[Any, list[Any]]:
        from ckptstore.distributed import _Described

        found: list[Any] = []

        def on_tensor(_p: tuple[Any, ...], v: Any) -> int | None:
            if isinstance(v, torch.Tensor):
                found.append(_Described("torch", str(v.dtype).removeprefix("torch."), tuple(v.shape)))
                return len(found) - 1
            return None

        return decode_tree(encode_tree(state, on_tensor)), found

    a = skeleton({"m": {"a": torch.zeros(2)}, "step": 3, "shared": [torch.ones(1), "x"]})
    b = skeleton({"m": {"b": torch.zeros(3)}, "step": 3, "shared": [torch.ones(1), "x"]})
    merged = merge_states([a[0], b[0]], [a[1], b[1]])
    # Merged tensors are numbered in merged-tree order; the replicated one is rank 0's.
    assert merged.tree == {"m": {"a": TensorRef(0), "b": TensorRef(1)}, "step": 3, "shared": [TensorRef(2), "x"]}
    assert merged.owners == [(0, 0), (1, 0), (0, 1)] and merged.replicas == {2: [(1, 1)]}
    assert merged.path(1) == "state['m']['b']"
    c = skeleton({"m": {"a": torch.zeros(2)}, "step": 3, "shared": [torch.ones(1), "y"]})
    with pytest.raises(StateConflictError, match=r"state\['shared'\].*ranks 0, 1"):
        merge_states([a[0], c[0]], [a[1], c[1]])
    nan = [skeleton({"x": float("nan")}) for _ in range(2)]  # NaN == NaN here: the same bytes
    assert math.isnan(merge_states([n[0] for n in nan], [n[1] for n in nan]).tree["x"])


# -- only rank 0 receives the ranks' trees ------------------------------------------------------
OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "scatter_object_list", "broadcast_object_list")


def _tally_collectives(rank: int) -> list[list[Any]]:
    """Wrap torch.distributed's object collectives in this process (they stay the real ones);
    each call appends [name, pickled bytes this rank received from the others]."""
    import pickle

    calls: list[list[Any]] = []

    def received(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        if name in ("all_gather_object", "gather_object"):
            out = args[0] if name == "all_gather_object" else (args[1] if len(args) > 1 else kwargs.get(
                "object_gather_list"))
            return sum(len(pickle.dumps(obj)) for i, obj in enumerate(out or []) if i != rank)
        return 0 if rank == 0 else len(pickle.dumps(args[0][0]))  # scatter, broadcast: from rank 0

    for name in OBJECT_COLLECTIVES:
        real = getattr(dist, name)

        def wrapper(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> None:
            _real(*args, **kwargs)
            calls.append([_name, received(_name, args, kwargs)])

        setattr(dist, name, wrapper)
    return calls


def _wide_state(rank: int) -> dict[str, Any]:
    """Rank 0: 400 tensors with long names (a skeleton of tens of kB); the others: two tensors."""
    if rank == 0:
        own = {f"model.layers.{i}.self_attention.linear_qkv.layer_norm_weight": torch.ones(2) for i in range(400)}
    else:
        own = {f"model.rank{rank}.weight": torch.full((3,), float(rank))}
    return {"model": own, "shared": torch.arange(5.0), "step": 3}


def _traffic_worker(rank: int, world: int, tmp: str, url: str) -> None:
    _init(rank, world, tmp, "traffic")
    store = _open(url)
    calls = _tally_collectives(rank)
    info = store.save(0, _wide_state(rank))
    _finish(tmp, "traffic", rank, {"calls": calls, "tensors": info.tensors})


@pytest.mark.slow
def test_only_rank_0_receives_the_ranks_trees(tmp_path: Path) -> None:
    """Before, phase 1 was an all-gather: rank 1 and 2 each received rank 0's 400-tensor tree
    (about 30 kB). Now they receive a few hundred bytes in all: their assignments and the outcome."""
    url, world = str(tmp_path / "store"), 3
    assert _spawn(_traffic_worker, world, str(tmp_path), url) == [0] * world
    reports = _reports(str(tmp_path), "traffic", range(world))
    for r in reports[1:]:
        names = [name for name, _ in r["calls"]]
        assert "all_gather_object" not in names, names
        received = sum(size for _, size in r["calls"])
        assert received < 2_000, r["calls"]  # a tenth of rank 0's tree: nothing of it arrived
    from ckptstore.distributed import introduce  # (after the checks above, which fail on the all-gather)

    assert len(__import__("pickle").dumps(introduce(_wide_state(0), 0, []))) > 20_000  # rank 0's tree
    # Rank 0 received the other ranks' trees (and their partial manifests).
    assert reports[0]["calls"][0][0] == "gather_object" and reports[0]["calls"][0][1] > 0
    assert all(r["tensors"] == 400 + 2 + 1 for r in reports)  # every rank's tensors, "shared" once
    loaded = ckptstore.open(url, create=False).load(0)
    assert len(loaded["model"]) == 402 and torch.equal(loaded["model"]["model.rank2.weight"], torch.full((3,), 2.0))


def test_each_rank_is_assigned_only_its_own_tensors_at_any_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulation of benchmarks/multirank_sim.py on the library's merge: a rank other than
    0 receives its own assignment (the same size at 4 or 24 ranks) and 8 B per rank of sizes,
    while what an all-gather delivered grew with the ranks' trees."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))  # the benchmarks package
    from benchmarks.multirank_sim import run

    small, large = run(ranks=4, tensors=40), run(ranks=24, tensors=40)
    assert small["assignment_bytes"] == large["assignment_bytes"] < small["skeleton_bytes"]
    assert large["other_rank_received_bytes"] - small["other_rank_received_bytes"] == (24 - 4) * 8
    assert large["merged_tensors"] == 24 * (40 - 8) + 8  # the replicated tensors once
    assert large["before_received_bytes_per_rank"] > 20 * large["other_rank_received_bytes"]
    assert large["received_bytes"][0] == large["rank0_received_bytes"] >= 23 * large["skeleton_bytes"]


# -- a rank dies mid-save ------------------------------------------------------------------------
class FailRankOnChunkPut(ForwardingBackend):
    """Once armed, at this process's second chunk put: SIGKILL it (a rank lost mid-upload), or
    stall forever (a rank that stops answering)."""

    mode: str | None = None
    puts = 0

    def put(self, key: str, data: Buffer | Any, *, mode: PutMode = OVERWRITE) -> str:
        if self.mode and key.startswith(keys.CHUNKS):
            self.puts += 1
            if self.puts == 2 and self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.puts == 2 and self.mode == "stall":
                time.sleep(3600)
        return super().put(key, data, mode=mode)


def _failing_rank_worker(rank: int, world: int, tmp: str, url: str, mode: str, timeout: float) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv-{mode}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    backend = FailRankOnChunkPut(_open(url).backend)
    store = ckptstore.Store(backend, chunking=SMALL)
    store.save(0, _rank_state(rank, 0))  # step 0 commits normally
    backend.mode = mode if rank == world - 1 and mode in ("kill", "stall") else None
    if mode == "kill-at-gather" and rank == world - 1:  # dies as it joins phase 1: rank 0 waits for its tree
        def die(*_args: Any, **_kwargs: Any) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        dist.gather_object = die  # type: ignore[assignment]  # torch.distributed's, in this process only
    started = time.monotonic()
    try:
        store.save(1, _rank_state(rank, 1))
        outcome: dict[str, Any] = {"type": None}
    except Exception as exc:
        outcome = _error(exc)
    outcome["seconds"] = time.monotonic() - started
    _report(tmp, mode, rank, outcome)
    _done()  # no destroy_process_group: the group is broken


def _next_run_worker(rank: int, world: int, tmp: str, url: str) -> None:
    _init(rank, world, tmp, "next")
    store = _open(url)
    info = store.save(1, _rank_state(rank, 1))
    _finish(tmp, "next", rank, {"seq": info.seq, "loaded": _plain(store.load(1))})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill", "stall", "kill-at-gather"])
def test_a_rank_that_dies_or_stalls_mid_save_commits_nothing_and_the_next_run_saves(tmp_path: Path,
                                                                                     mode: str) -> None:
    """kill: the rank is SIGKILLed while it writes its chunks (gloo sees its sockets close);
    stall: it stops answering there and the others give up after the process group's timeout
    (5 s here); kill-at-gather: it is SIGKILLed as it joins the gather of trees, while rank 0
    waits for them and the others wait for their assignments."""
    url, world, timeout = str(tmp_path / "store"), 3, 5.0
    codes = _spawn(_failing_rank_worker, world, str(tmp_path), url, mode, timeout, stalled=(world - 1,))
    assert codes[:-1] == [0] * (world - 1) and codes[-1] == -signal.SIGKILL  # stalled: killed by _spawn
    survivors = _reports(str(tmp_path), mode, range(world - 1))
    print(f"{mode}: survivors raised after {[round(r['seconds'], 2) for r in survivors]} s: "
          f"{survivors[0]['message'][:160]}")
    for r in survivors:
        assert r["type"] == "DistributedSaveError", r
        assert r["seconds"] < timeout + 15  # bounded by the group's timeout
    store = ckptstore.open(url, create=False)
    assert store.steps() == [0]  # no commit of step 1
    assert store.load()["step"] == 0 and torch.equal(store.load()["shared_embedding"],
                                                      _merged(world, 0)["shared_embedding"])
    # The job restarts (a new process group) and saves step 1.
    assert _spawn(_next_run_worker, world, str(tmp_path), url) == [0] * world
    for r in _reports(str(tmp_path), "next", range(world)):
        assert r["seq"] == 1 and r["loaded"] == _plain(_merged(world, 1))
    assert store.steps() == [0, 1]


def test_distributed_save_error_is_a_ckptstore_error() -> None:
    assert issubclass(DistributedSaveError, ckptstore.CkptStoreError)
    assert issubclass(StateConflictError, ckptstore.UnsupportedValueError)


# -- gc while the ranks save -------------------------------------------------------------------
ORPHAN = torch.arange(40, dtype=torch.float32) * 7  # one pack chunk of its own under SMALL


def _gc_race_worker(rank: int, world: int, tmp: str, url: str, orphan_key: str) -> None:
    from ckptstore.testing.wrappers import CountingBackend, HeadHookBackend

    _init(rank, world, tmp, "gcrace")
    # Rank 1 dedupes against the orphan chunk that a running gc is about to delete; its head
    # of that chunk releases the gc's delete (through a file the test process watches).
    backend = CountingBackend(HeadHookBackend(_open(url).backend, key=orphan_key,
                                              after=lambda: Path(tmp, "headed").touch()))
    store = ckptstore.Store(backend, chunking=SMALL)
    state = {"w": ORPHAN.clone()} if rank == 1 else {"other": torch.ones(8)}
    info = store.save(2, state)
    _report(tmp, "gcrace", rank, {"step": info.step, "reput": ("put", orphan_key) in backend.log,
                                  "headed": ("head", orphan_key) in backend.log})
    dist.destroy_process_group()
    _done()


@pytest.mark.slow
def test_gc_sweeping_a_chunk_a_rank_deduplicated_is_undone_before_the_commit(tmp_path: Path) -> None:
    """The epoch protocol on every rank: a gc that listed leases before rank 1's lease existed
    deletes an orphan chunk right after rank 1 decided to reuse it; rank 1 puts it back
    before rank 0 commits, and the committed step loads."""
    import threading

    from ckptstore.testing.wrappers import GatedDeleteBackend

    url = str(tmp_path / "store")
    base = _open(url)
    base.save(1, {"w": ORPHAN.clone()})
    (orphan,) = [info.key for info in base.backend.list(keys.CHUNKS)]
    base.delete(1)  # the chunk is garbage now

    gate = threading.Event()
    gc_backend = GatedDeleteBackend(base.backend, key=orphan, gate=gate)
    gc_store = ckptstore.Store(gc_backend, chunking=SMALL)
    reports: list[Any] = []
    gc_thread = threading.Thread(target=lambda: reports.append(gc_store.gc(min_age=0)))
    gc_thread.start()
    assert gc_backend.reached.wait(30), "gc should reach the orphan's delete"

    def open_gate_when_headed() -> None:
        deadline = time.monotonic() + 120
        while not Path(tmp_path, "headed").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        gate.set()

    opener = threading.Thread(target=open_gate_when_headed)
    opener.start()
    codes = _spawn(_gc_race_worker, 2, str(tmp_path), url, orphan)
    opener.join(5)
    gc_thread.join(30)
    assert codes == [0, 0]
    assert reports and reports[0].ran and reports[0].deleted_chunks >= 1
    rank0, rank1 = _reports(str(tmp_path), "gcrace", range(2))
    assert rank1["headed"] and rank1["reput"], "rank 1 must re-upload the chunk gc deleted"
    assert rank0["step"] == rank1["step"] == 2
    loaded = ckptstore.open(url, create=False).load(2)
    assert torch.equal(loaded["w"], ORPHAN) and torch.equal(loaded["other"], torch.ones(8))


# -- retention after the commit ------------------------------------------------------------------
def _retention_worker(rank: int, world: int, tmp: str, url: str) -> None:
    from ckptstore.errors import PermissionDeniedError
    from ckptstore.testing.faults import Fault, FaultInjectingBackend

    _init(rank, world, tmp, "retention")
    store = _open(url, lambda b: FaultInjectingBackend(b, [Fault("delete", key=r"^refs/steps/", times=None,
                                                                 error=PermissionDeniedError("AccessDenied"))]))
    store.save(1, _rank_state(rank, 1))
    result: dict[str, Any] = {}
    try:
        info = store.save(2, _rank_state(rank, 2), keep_last=1)
        result = {"step": info.step, "deleted": list(info.retention_deleted), "errors": list(info.retention_errors)}
    except Exception as exc:
        result = {"raised": _error(exc)}
    result["steps"] = store.steps()
    _finish(tmp, "retention", rank, result)


@pytest.mark.slow
def test_a_failed_retention_delete_is_reported_the_same_on_every_rank(tmp_path: Path) -> None:
    """The commit stands: every rank gets the committed SaveInfo with the same retention
    errors (before the fix every rank raised after the commit, and a retry got StepExistsError)."""
    url = str(tmp_path / "store")
    assert _spawn(_retention_worker, 2, str(tmp_path), url) == [0, 0]
    reports = _reports(str(tmp_path), "retention", range(2))
    for r in reports:
        assert "raised" not in r, r
        assert r["step"] == 2 and r["deleted"] == [] and r["steps"] == [1, 2]
        assert len(r["errors"]) == 1 and "step 1" in r["errors"][0] and "AccessDenied" in r["errors"][0]
    assert reports[0] == reports[1]


# -- a committed step is refused before any chunk is written --------------------------------------
class ChunkPutCounter(ForwardingBackend):
    """Counts this rank's puts under chunks/."""

    def __init__(self, inner: Any):
        super().__init__(inner)
        self.chunk_puts = 0

    def put(self, key: str, data: Buffer | Any, *, mode: PutMode = OVERWRITE) -> str:
        if key.startswith(keys.CHUNKS):
            self.chunk_puts += 1
        return super().put(key, data, mode=mode)


def _refused_worker(rank: int, world: int, tmp: str, url: str) -> None:
    _init(rank, world, tmp, "refused")
    store = _open(url, ChunkPutCounter)
    counter = store.backend
    assert isinstance(counter, ChunkPutCounter)
    store.save(0, _rank_state(rank, 0))
    counter.chunk_puts = 0
    raised = None
    try:  # new tensor values: a save that got as far as writing chunks would put some
        store.save(0, _rank_state(rank, 1))
    except StepExistsError as exc:
        raised = _error(exc)
    refused_puts = counter.chunk_puts
    replaced = store.save(0, _rank_state(rank, 1), overwrite=True)
    _finish(tmp, "refused", rank, {"raised": raised, "refused_puts": refused_puts,
                                   "overwrite_puts": counter.chunk_puts, "seq": replaced.seq})


@pytest.mark.slow
def test_an_existing_step_is_refused_on_every_rank_before_any_chunk_is_put(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    assert _spawn(_refused_worker, 2, str(tmp_path), url) == [0, 0]
    reports = _reports(str(tmp_path), "refused", range(2))
    for r in reports:
        assert r["raised"] is not None and r["raised"]["type"] == "StepExistsError" and r["raised"]["step"] == 0
        assert r["refused_puts"] == 0, r  # no rank wrote a chunk for the refused save
        assert r["seq"] == 2  # overwrite=True still replaces the step
    assert sum(r["overwrite_puts"] for r in reports) > 0  # the overwrite did write the new values
    store = ckptstore.open(url, create=False)
    assert torch.equal(store.load(0)["model"]["layer1.weight"], _rank_state(1, 1)["model"]["layer1.weight"])
