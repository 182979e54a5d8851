"""Store.save_async and DCP's async_save with a StoreWriter.

Single-process tests run on local stores (and S3 where marked); the multi-rank ones spawn
gloo workers like tests/test_distributed_save.py.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import ckptstore
from ckptstore import keys
from ckptstore.backends.base import OVERWRITE, Buffer, PutMode
from ckptstore.dcp import StoreReader, StoreWriter, unwrap
from ckptstore.errors import StepExistsError, TransientError
from ckptstore.testing.wrappers import ForwardingBackend, SlowPutBackend
from ckptstore.url import open_backend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

MiB = 1 << 20
CHUNKS = ckptstore.ChunkingPolicy(chunk_size=1 * MiB, small_tensor_limit=64 * 1024, pack_size=256 * 1024)
PUT_DELAY = 0.15  # seconds per chunk put in the slowed backend


def _state(version: int, tensors: int = 8, mib: int = 2) -> dict[str, Any]:
    n = mib * MiB // 4
    return {
        "model": {f"w{i}": torch.arange(n, dtype=torch.float32) + float(version * 100 + i) for i in range(tensors)},
        "optim": [{"step": version, "lr": 0.1}],
        "small": torch.arange(10) + version,
    }


def _equal(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(_equal(got[k], want[k]) for k in want)
    if isinstance(want, (list, tuple)):
        return len(got) == len(want) and all(_equal(a, b) for a, b in zip(got, want, strict=True))
    return bool(got == want)


def _clone(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone(v) for v in state]
    return state


@pytest.fixture
def slow_store(tmp_path: Path) -> Iterator[ckptstore.Store]:
    """A local store whose chunk puts each take PUT_DELAY seconds longer."""
    backend = SlowPutBackend(open_backend(tmp_path / "store"), prefix=keys.CHUNKS, delay=PUT_DELAY)
    store = ckptstore.Store(backend, chunking=CHUNKS)
    yield store
    store.close()


class FailingChunkPuts(ForwardingBackend):
    """Chunk puts fail (after a short delay) while `failing` is set."""

    failing = False

    def put(self, key: str, data: Buffer | Any, *, mode: PutMode = OVERWRITE) -> str:
        if self.failing and key.startswith(keys.CHUNKS):
            time.sleep(0.05)
            raise TransientError("injected: upload failed", key=key, operation="put")
        return super().put(key, data, mode=mode)


class GatedChunkPuts(ForwardingBackend):
    """Chunk puts wait until `gate` is set (the first at most GATE_TIMEOUT s: a save_async
    that waited for its uploads is seen, not hung); `finished` counts the chunk puts done."""

    GATE_TIMEOUT = 30.0

    def __init__(self, inner: Any):
        super().__init__(inner)
        self.gate, self.waited_out, self._lock, self.finished = threading.Event(), False, threading.Lock(), 0

    def put(self, key: str, data: Buffer | Any, *, mode: PutMode = OVERWRITE) -> str:
        if not key.startswith(keys.CHUNKS):
            return super().put(key, data, mode=mode)
        if not self.waited_out and not self.gate.wait(timeout=self.GATE_TIMEOUT):
            self.waited_out = True
        version = super().put(key, data, mode=mode)
        with self._lock:
            self.finished += 1
        return version


# -- the blocking part is the staging copy -------------------------------------------------------
def test_save_async_returns_before_the_upload_with_a_snapshot(tmp_path: Path) -> None:
    backend = GatedChunkPuts(open_backend(tmp_path / "store"))
    backend.gate.set()
    with ckptstore.Store(backend, chunking=CHUNKS) as store:
        store.save(0, _state(0))
        backend.gate.clear()
        backend.finished = 0
        live = _state(1)
        want = _clone(live)

        future = store.save_async(1, live)
        # Every chunk put of step 1 waits for the gate, which opens only now: the call returned
        # with no chunk uploaded and nothing committed, whatever the machine's speed.
        uploaded_at_return, done_at_return, latest_at_return = backend.finished, future.done(), store.latest()
        # Training goes on: change every live tensor and container in place.
        for tensor in live["model"].values():
            tensor.add_(1000.0)
        live["optim"][0]["step"] = 99
        live["small"].zero_()
        backend.gate.set()
        info = future.result(timeout=120)

        assert not backend.waited_out, "save_async waited for its own chunk uploads"
        assert (uploaded_at_return, done_at_return, latest_at_return) == (0, False, 0)
        assert backend.finished >= 16 and info.chunks >= 16  # 8 tensors of 2 MiB in 1 MiB chunks: uploaded later
        assert info.step == 1 and store.latest() == 1
        assert _equal(store.load(1), want)  # the snapshot at the call, not the mutated state


def test_a_failing_upload_raises_from_the_future_and_latest_stays(tmp_path: Path) -> None:
    backend = FailingChunkPuts(open_backend(tmp_path / "store"))
    with ckptstore.Store(backend, chunking=CHUNKS) as store:
        store.save(0, _state(0))
        backend.failing = True
        future = store.save_async(1, _state(1))
        with pytest.raises(TransientError, match="injected"):
            future.result(timeout=60)
        assert store.steps() == [0] and store.latest() == 0
        assert _equal(store.load(), _state(0))
        assert [lock for lock in store.locks() if lock.kind == "save"] == []
        # The saver keeps working: the next save goes through.
        backend.failing = False
        assert store.save_async(1, _state(1)).result(timeout=60).step == 1
        # A step that exists: StepExistsError from the future, nothing touched.
        ref = store.ref(1)
        with pytest.raises(StepExistsError):
            store.save_async(1, _state(2)).result(timeout=60)
        assert store.ref(1) == ref


def test_a_second_save_async_waits_for_the_first(slow_store: ckptstore.Store) -> None:
    first = slow_store.save_async(1, _state(1))
    assert not first.done()
    started = time.perf_counter()
    second = slow_store.save_async(2, _state(2))
    waited = time.perf_counter() - started
    # The second call returned only once the first save had committed.
    assert slow_store.steps()[:1] == [1] and first.result(timeout=0).step == 1
    assert waited > PUT_DELAY
    assert slow_store._async_saver.last_wait_seconds > PUT_DELAY
    assert second.result(timeout=120).step == 2
    assert _equal(slow_store.load(2), _state(2))


def test_staging_buffers_are_reused_and_bounded(tmp_path: Path) -> None:
    with ckptstore.open(tmp_path / "store", chunking=CHUNKS) as store:
        store.save_async(1, _state(1)).result(timeout=60)
        pool = store._async_saver.pool
        first = {id(b): b.data_ptr() for b in pool.free_buffers()}
        assert len(first) == 9 and pool.allocated == 9  # 8 model tensors + "small"

        store.save_async(2, _state(2)).result(timeout=60)
        second = {id(b): b.data_ptr() for b in pool.free_buffers()}
        assert second == first and pool.allocated == 9 and pool.reused == 9  # the same buffers, same memory
        assert _equal(store.load(2), _state(2))

        # Other shapes: new buffers for them, and the ones this save did not use are dropped.
        store.save_async(3, {"other": torch.ones(5, 5), "small": torch.arange(10)}).result(timeout=60)
        third = pool.free_buffers()
        assert len(third) == 2 and pool.allocated == 10
        assert {tuple(b.shape) for b in third} == {(5, 5), (10,)}


def test_close_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    backend = SlowPutBackend(open_backend(tmp_path / "store"), prefix=keys.CHUNKS, delay=PUT_DELAY)
    store = ckptstore.Store(backend, chunking=CHUNKS)
    future = store.save_async(5, _state(5))
    store.close()
    assert future.done() and future.result().step == 5
    assert ckptstore.open(tmp_path / "store", create=False).steps() == [5]


def test_numpy_and_shared_tensors_are_staged(tmp_path: Path) -> None:
    import numpy as np

    shared = torch.arange(6.0)
    array = np.arange(4, dtype=np.int32)
    state = {"a": shared, "b": shared, "np": array, "view": torch.arange(12.0).reshape(3, 4).t(), "s": np.float32(2)}
    with ckptstore.open(tmp_path / "store") as store:
        future = store.save_async(1, state)
        shared.zero_()
        array[:] = -1
        future.result(timeout=60)
        loaded = store.load(1)
    assert torch.equal(loaded["a"], torch.arange(6.0)) and torch.equal(loaded["b"], torch.arange(6.0))
    assert loaded["np"].tolist() == [0, 1, 2, 3] and loaded["s"] == np.float32(2)
    assert torch.equal(loaded["view"], torch.arange(12.0).reshape(3, 4).t())


# -- DCP's async_save with a StoreWriter ---------------------------------------------------------
def test_dcp_async_save_with_a_store_writer(tmp_path: Path) -> None:
    store = ckptstore.open(tmp_path / "store", chunking=CHUNKS)
    state = {"w": torch.randn(64, 64), "n": 3}
    want = {"w": state["w"].clone(), "n": 3}
    future = dcp.async_save(state, storage_writer=StoreWriter(store, 1))
    state["w"].zero_()  # DCP staged a copy before returning
    future.result(timeout=60)
    assert store.steps() == [1]
    target = {"w": torch.empty(64, 64), "n": 0}
    dcp.load(target, storage_reader=StoreReader(store, 1))
    assert torch.equal(target["w"], want["w"]) and target["n"] == 3
    # The coordinator's StepExistsError arrives through the future.
    with pytest.raises(BaseException) as caught:
        dcp.async_save(want, storage_writer=StoreWriter(store, 1)).result(timeout=60)
    assert isinstance(unwrap(caught.value), StepExistsError)
    assert [lock for lock in store.locks() if lock.kind == "save"] == []


# -- across ranks ----------------------------------------------------------------------------------
def _async_worker(rank: int, world: int, tmp: str, url: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    backend = GatedChunkPuts(open_backend(url))  # this rank's chunk puts wait until it returned
    store = ckptstore.Store(backend, chunking=CHUNKS)
    mine = {f"rank{rank}": torch.full((MiB // 4,), float(rank)), "step": 1}
    started = time.perf_counter()
    future = store.save_async(1, mine)
    returned = time.perf_counter() - started
    at_return = {"uploaded": backend.finished, "done": future.done(), "steps": store.steps()}
    backend.gate.set()
    mine[f"rank{rank}"].add_(7.0)  # training goes on
    # Training collectives on the default group while the save's collectives run on its own group.
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    info = future.result(timeout=120)
    done = time.perf_counter() - started
    loaded = store.load(1)
    # DCP's async_save through a StoreWriter, on every rank (its collectives: the default group).
    dcp_state = {"x": torch.full((8,), float(rank))}
    dcp.async_save({"x": torch.full((8,), 5.0)}, storage_writer=StoreWriter(store, 2)).result(timeout=120)
    dcp.load(dcp_state, storage_reader=StoreReader(store, 2))
    Path(tmp, f"async-{rank}.json").write_text(json.dumps({
        "returned": returned, "done": done, "at_return": at_return, "waited_out": backend.waited_out,
        "manifest": info.manifest, "all_reduce": total.item(),
        "loaded": {k: (v.tolist()[:2] if isinstance(v, torch.Tensor) else v) for k, v in loaded.items()},
        "dcp": dcp_state["x"].tolist()}))
    store.close()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.slow
def test_save_async_across_ranks(tmp_path: Path) -> None:
    world, url = 2, str(tmp_path / "store")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_async_worker, args=(rank, world, str(tmp_path), url), daemon=True)
             for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + 150
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for proc in alive:
        proc.kill()
    assert not alive and [p.exitcode for p in procs] == [0, 0]
    reports = [json.loads(Path(tmp_path, f"async-{rank}.json").read_text()) for rank in range(world)]
    print("\n" + "; ".join(f"rank {r}: returned {rep['returned'] * 1000:.1f} ms, committed after {rep['done']:.2f} s"
                           for r, rep in enumerate(reports)))
    assert reports[0]["manifest"] == reports[1]["manifest"]
    for rep in reports:
        assert rep["all_reduce"] == 1.0
        assert rep["loaded"] == {"rank0": [0.0, 0.0], "rank1": [1.0, 1.0], "step": 1}  # the staged values
        # save_async returned before this rank uploaded anything (its chunk puts waited for a gate
        # opened after the return), so nothing could be committed yet either.
        assert rep["at_return"] == {"uploaded": 0, "done": False, "steps": []} and not rep["waited_out"]
        assert rep["dcp"] == [5.0] * 8
    assert ckptstore.open(url, create=False).steps() == [1, 2]


# -- S3 --------------------------------------------------------------------------------------------
def test_save_async_on_s3(s3_bucket: str) -> None:
    with ckptstore.open(f"s3://{s3_bucket}/run", chunking=CHUNKS) as store:
        store.save(0, _state(0, tensors=2))
        live = _state(1, tensors=2)
        want = _clone(live)
        future = store.save_async(1, live)
        for tensor in live["model"].values():
            tensor.zero_()
        assert future.result(timeout=120).step == 1
        assert _equal(store.load(), want)
        # A failure from the future leaves latest alone.
        with pytest.raises(StepExistsError):
            store.save_async(1, live).result(timeout=120)
        assert store.latest() == 1 and _equal(store.load(), want)


def test_save_async_staging_is_thread_safe_with_one_in_flight(tmp_path: Path) -> None:
    # Two threads calling save_async at once: the saves run one after the other, both commit.
    with ckptstore.open(tmp_path / "store", chunking=CHUNKS) as store:
        futures: list[Any] = []
        threads = [threading.Thread(target=lambda s=s: futures.append(store.save_async(s, _state(s, tensors=2))))
                   for s in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(f.result(timeout=60).step for f in futures) == [1, 2]
        assert _equal(store.load(1), _state(1, tensors=2)) and _equal(store.load(2), _state(2, tensors=2))
