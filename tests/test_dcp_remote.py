"""torch.distributed.checkpoint through StoreWriter / StoreReader on S3 (SeaweedFS) and GCS
(fake-gcs-server): several gloo ranks save a sharded DTensor, other world sizes load it
(resharded), and the OLMo rerun (same step again) fails on every rank until overwrite.

Workers are spawned processes; the fixtures export the servers' variables into os.environ,
which the workers inherit, so `ckptstore.open(url)` in a worker reaches the same server.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

import ckptstore
import ckptstore.dcp
from ckptstore.dcp import StoreReader, StoreWriter, unwrap
from ckptstore.errors import StepExistsError

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

# Small chunks, so every shard spans several chunks and loads fetch part of a stored item.
SMALL = ckptstore.ChunkingPolicy(chunk_size=48, small_tensor_limit=16, pack_size=64)
ROWS, COLS = 10, 3  # 10 rows over 3 ranks: uneven shards 4, 4, 2; over 2 ranks: 5, 5
SAVE_RANKS = 3


def _full(version: int) -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) * (version + 1)


def _state(mesh: Any, version: int) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    return {"model": {"w": distribute_tensor(_full(version), mesh, [Shard(0)]),
                      "bias": torch.full((4,), float(version))},  # replicated plain tensor
            "step": version}  # a bytes item


def _init(rank: int, world: int, tmp: str, name: str) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv-{name}", rank=rank, world_size=world)
    return init_device_mesh("cpu", (world,))


def _finish(tmp: str, name: str, rank: int, data: dict[str, Any]) -> None:
    """Report, then leave without gloo's C++ teardown (see tests/test_dcp.py, _exit_cleanly)."""
    Path(tmp, f"{name}-{rank}.json").write_text(json.dumps(data))
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _save_worker(rank: int, world: int, tmp: str, url: str) -> None:
    mesh = _init(rank, world, tmp, "save")
    store = ckptstore.open(url, chunking=SMALL)
    writer = StoreWriter(store, 0)
    dcp.save(_state(mesh, 0), storage_writer=writer)
    raised: list[dict[str, Any]] = []
    try:  # the OLMo rerun: the same step again, without overwrite
        dcp.save(_state(mesh, 1), storage_writer=StoreWriter(store, 0))
    except BaseException as exc:
        inner = unwrap(exc)
        raised.append({"type": type(inner).__name__, "step": getattr(inner, "step", None),
                       "writer": getattr(inner, "writer", None)})
    try:
        ckptstore.dcp.save(_state(mesh, 1), store, 0)
    except StepExistsError as exc:
        raised.append({"type": type(exc).__name__, "step": exc.step, "writer": exc.writer})
    between = store.ref(0).seq  # nothing was replaced by the refused reruns
    dist.barrier()
    dcp.save(_state(mesh, 1), storage_writer=StoreWriter(store, 0, overwrite=True))
    dcp.save(_state(mesh, 2), storage_writer=StoreWriter(store, 1))
    _finish(tmp, "save", rank, {"raised": raised, "new_chunks": writer.new_chunks, "between": between,
                                "seq": store.ref(0).seq})


def _load_worker(rank: int, world: int, tmp: str, url: str) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _init(rank, world, tmp, f"load{world}")
    store = ckptstore.open(url, create=False)
    out: dict[str, Any] = {}
    for step in (0, 1):
        target = {"model": {"w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)]),
                            "bias": torch.zeros(4)}, "step": -1}
        dcp.load(target, storage_reader=StoreReader(store, step))
        out[str(step)] = {"local": target["model"]["w"].to_local().tolist(),
                          "full": target["model"]["w"].full_tensor().tolist(),
                          "bias": target["model"]["bias"].tolist(), "step": target["step"]}
    _finish(tmp, f"load{world}", rank, out)


def _reports(tmp: str, name: str, world: int) -> list[dict[str, Any]]:
    return [json.loads(Path(tmp, f"{name}-{rank}.json").read_text()) for rank in range(world)]


@pytest.fixture(params=["s3", "gcs"])
def remote_url(request: pytest.FixtureRequest) -> str:
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/dcp"
    return f"gs://{request.getfixturevalue('gcs_bucket')}/dcp"


def test_multi_rank_save_reshard_load_and_rerun_on_object_storage(remote_url: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tmp = str(tmp_path)
    mp.spawn(_save_worker, args=(SAVE_RANKS, tmp, remote_url), nprocs=SAVE_RANKS, join=True)
    saved = _reports(tmp, "save", SAVE_RANKS)
    first = saved[0]["raised"]
    assert len(first) == 2 and all(r["type"] == "StepExistsError" and r["step"] == 0 for r in first)
    for report in saved:
        assert report["raised"] == first  # the coordinator's error, the same on every rank
        assert report["new_chunks"] > 0  # every rank wrote its own shard's chunks to the bucket
        assert report["between"] == 1 and report["seq"] == 2  # refused reruns replaced nothing

    store = ckptstore.open(remote_url, create=False)
    assert store.steps() == [0, 1]
    offsets = sorted(tuple(e.placement["offsets"]) for e in store.info(0).manifest.tensors
                     if e.placement and e.placement["fqn"] == "model.w")
    assert offsets == [(0, 0), (4, 0), (8, 0)]

    # Resharded: 3 ranks saved, 2 load.
    mp.spawn(_load_worker, args=(2, tmp, remote_url), nprocs=2, join=True)
    for rank, report in enumerate(_reports(tmp, "load2", 2)):
        for step, version in (("0", 1), ("1", 2)):  # step 0 holds the overwrite (version 1)
            assert report[step]["full"] == _full(version).tolist()
            assert report[step]["local"] == _full(version)[rank * 5:(rank + 1) * 5].tolist()
            assert report[step]["bias"] == [float(version)] * 4 and report[step]["step"] == version

    # One process, no process group: plain full tensors, the latest step by default.
    plain = {"model": {"w": torch.zeros(ROWS, COLS), "bias": torch.zeros(4)}, "step": -1}
    ckptstore.dcp.load(plain, store)
    assert torch.equal(plain["model"]["w"], _full(2)) and plain["step"] == 2

    # The 3-rank sharded step, exported from the bucket as a plain DCP directory, loads with
    # torch's own FileSystemReader.
    from ckptstore.interop import export_dcp

    export_dcp(store, 0, tmp_path / "exported")
    stock = {"model": {"w": torch.zeros(ROWS, COLS), "bias": torch.zeros(4)}, "step": -1}
    dcp.load(stock, checkpoint_id=str(tmp_path / "exported"))
    assert torch.equal(stock["model"]["w"], _full(1)) and torch.equal(stock["model"]["bias"], torch.ones(4))
    assert stock["step"] == 1
