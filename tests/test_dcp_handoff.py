"""The DCP coordinator's handoff (ckptstore/knownchunks.py): `prepare_global_plan` reads the gc
epoch (E0) and then the latest step's ref and root once, and hands each rank E0 and the digest
of its own part, so that a rank's re-save costs a few requests instead of a listing of every
ref, a ref, a root and two epoch reads. Each interleaving below is forced with hooks on the
backend (docs/FORMAT.md, "Why a committed ref never points at a missing object")."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_gc_safety import _in_thread, _result
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

import ckptstore
from ckptstore import keys
from ckptstore.backends.base import OVERWRITE
from ckptstore.backends.memory import MemoryBackend, drop_memory_space
from ckptstore.chunking import ChunkingPolicy
from ckptstore.dcp import StoreReader, StoreWriter
from ckptstore.manifestv2 import RootManifest
from ckptstore.store import Store
from ckptstore.testing import dcpsim
from ckptstore.testing.interleave import Hook, HookBackend
from ckptstore.testing.wrappers import CountingBackend

POLICY = ChunkingPolicy(chunk_size=4096, small_tensor_limit=1024, pack_size=4096)
MODEL: dcpsim.Model = {f"w{i}": ((64, 256), torch.float32) for i in range(4)}
WAIT = 30.0


@pytest.fixture
def space() -> Iterator[str]:
    name = f"handoff-{uuid.uuid4().hex}"
    yield name
    drop_memory_space(name)


def _full() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {k: torch.randn(shape, generator=gen) for k, (shape, _) in MODEL.items()}


def _data(full: dict[str, torch.Tensor]) -> dcpsim.DataFn:
    def data(fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        return full[fqn].narrow(0, offsets[0], sizes[0]).clone()
    return data


def _store(backend: Any) -> Store:
    return Store(backend, chunking=POLICY)


def _root(store: Store, step: int) -> RootManifest:
    found = store.manifest_object(store.ref(step).manifest)
    assert isinstance(found, RootManifest)
    return found


def _loads_exactly(store: Store, step: int, full: dict[str, torch.Tensor]) -> bool:
    target = {k: torch.zeros_like(v) for k, v in full.items()}
    dcp.load(target, storage_reader=StoreReader(store, step), no_dist=True)
    return all(torch.equal(target[k], full[k]) for k in full)


def _every_object_present(inner: MemoryBackend, store: Store, step: int) -> bool:
    manifest = store.manifest(store.ref(step).manifest)  # assembled: data chunks, parts and tables
    return all(inner.exists(keys.chunk_key(c.digest)) for c in manifest.chunks)


def _hook_once(op_pattern: str, after: Any) -> list[Hook]:
    """The same `after` on the first get or ranged get of a key matching `op_pattern`."""
    fired = threading.Event()

    def once() -> None:
        if not fired.is_set():
            fired.set()
            after()
    return [Hook("get", op_pattern, after=once), Hook("get_range", op_pattern, after=once)]


def test_e0_is_read_before_the_latest_ref_so_a_gc_in_between_is_seen(space: str) -> None:
    """Right after the coordinator read step 1's ref and root, step 1 is deleted and a gc sweeps
    it entirely; then identical copies of its two parts are put back (a writer of the same parts
    that died before its commit), but not their chunks. Each rank reads its part (present),
    skips every chunk it lists, and settles against E0. E0 was read before the ref, so it
    predates that gc: the settle heads every chunk and puts them back, and the step loads. Read
    E0 after the ref and E1 equals E0: the commit names 64 missing chunks."""
    inner = MemoryBackend(space)
    store = _store(inner)
    full = _full()
    dcpsim.save(store, 1, MODEL, 2, _data(full))
    store.gc(min_age=3600)  # the epoch exists; nothing is garbage
    parts = {keys.chunk_key(p.digest): bytes(inner.get(keys.chunk_key(p.digest)).data) for p in _root(store, 1).parts}

    def delete_sweep_and_replant() -> None:
        plain = _store(inner)
        plain.delete(1)
        report = plain.gc(min_age=0)
        assert report.ran and report.deleted_chunks >= 64, report
        for key, data in parts.items():
            inner.put(key, data, mode=OVERWRITE)

    view = _store(HookBackend(inner, _hook_once(r"^manifests/", delete_sweep_and_replant)))
    dcpsim.save(view, 2, MODEL, 2, _data(full))
    assert _every_object_present(inner, store, 2)
    assert _loads_exactly(_store(inner), 2, full)


def test_an_unchanged_part_swept_during_the_save_is_put_back(space: str) -> None:
    """A gc lists the leases just before rank 0's lease exists and pauses. Rank 0 reads its
    previous part, then step 1 is deleted and the gc sweeps it, parts included. Rank 0's new
    part is byte for byte the previous one, which it would skip; its settle sees the sweep, so it
    puts the part back with the chunks. Skip the part regardless and the coordinator finds it
    missing: IntegrityError, nothing committed."""
    inner = MemoryBackend(space)
    store = _store(inner)
    full = _full()
    dcpsim.save(store, 1, MODEL, 2, _data(full))
    store.gc(min_age=3600)
    previous = _root(store, 1).parts[0]
    part0 = keys.chunk_key(previous.digest)
    listed, resume = threading.Event(), threading.Event()
    gc_view = HookBackend(inner, [Hook("list", r"^locks/$", after=lambda: (listed.set(), resume.wait(WAIT)))])
    gc: dict[str, Any] = {}

    def start_gc() -> None:  # right before rank 0's lease put: the gc will not see any lease
        gc["party"] = _in_thread(lambda: _store(gc_view).gc(min_age=0))
        assert listed.wait(WAIT)

    def drop_step_and_sweep() -> None:  # right after rank 0 read its previous part
        _store(inner).delete(1)
        resume.set()
        gc["report"] = _result(*gc["party"])

    view = _store(HookBackend(inner, [Hook("put", r"^locks/save-", before=start_gc),
                                      *_hook_once(f"^{part0}$", drop_step_and_sweep)]))
    dcpsim.save(view, 2, MODEL, 2, _data(full))
    assert gc["report"].ran and gc["report"].deleted_chunks >= 64, gc["report"]
    assert _root(store, 2).parts[0] == previous  # the same part, which the sweep had taken
    assert _every_object_present(inner, store, 2)
    assert _loads_exactly(_store(inner), 2, full)


@pytest.mark.parametrize("handoff", ["another-step", "malformed-epoch", "none"])
def test_a_rank_without_a_valid_handoff_reads_the_epoch_and_the_latest_step_itself(space: str, handoff: str) -> None:
    """A plan whose storage_data is another save's (DCP's plan cache hands a rank the final
    plan of an earlier save), malformed, or absent: the rank reads E0 and the latest step
    itself, as before the handoff existed, and the save is exact."""
    store = _store(MemoryBackend(space))
    full = _full()
    dcpsim.save(store, 1, MODEL, 2, _data(full))
    writers = [StoreWriter(store, 2) for _ in range(2)]
    for rank, writer in enumerate(writers):
        writer.set_up_storage_writer(rank == 0, rank=rank)
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
    plans, metadata = create_default_global_save_plan(dcpsim.local_plans(MODEL, 2))
    plans = writers[0].prepare_global_plan(plans)
    assert all(p.storage_data["step"] == 2 for p in plans)
    bad = {"another-step": {**plans[1].storage_data, "step": 1},
           "malformed-epoch": {**plans[1].storage_data, "epoch": [1, "no", "", 0]},
           "none": None}[handoff]
    plans[1] = type(plans[1])(plans[1].items, storage_data=bad)
    counting = CountingBackend(store.backend)
    store.backend = counting
    planner = dcpsim._Planner(_data(full))
    results = [w.write_data(p, planner).value() for w, p in zip(writers, plans, strict=True)]  # type: ignore[arg-type]
    writers[0].finish(metadata, results)
    listings = [k for op, k in counting.log if op == "list" and k.startswith("refs/")]
    assert len(listings) == 1  # rank 1 resolved the latest step itself (a handoff without its E0 is
    # not trusted at all); rank 0 used its handoff
    assert [k for op, k in counting.log if op == "put" and k.startswith("chunks/")] == []  # still all known
    # ...and known from its own part of step 1: no data chunk is headed, only rank 1's new part
    # (without a handoff it does not skip an identical part) and the coordinator's table.
    assert len([k for op, k in counting.log if op == "head" and k.startswith("chunks/")]) == 2
    assert _loads_exactly(store, 2, full)


def test_a_rank_without_a_handoff_after_a_plain_save_reads_its_manifest_once(space: str) -> None:
    """The latest step is a plain (v1) save of the same tensors, and no rank got a handoff: each
    rank reads that manifest once and skips every chunk it lists (its 4 KiB chunks are the DCP
    shards' chunks), neither heading nor putting one."""
    store = _store(MemoryBackend(space))
    full = _full()
    store.save(1, full)
    digest = store.ref(1).manifest
    writers = [StoreWriter(store, 2) for _ in range(2)]
    for rank, writer in enumerate(writers):
        writer.set_up_storage_writer(rank == 0, rank=rank)
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
    plans, metadata = create_default_global_save_plan(dcpsim.local_plans(MODEL, 2))
    plans = writers[0].prepare_global_plan(plans)
    plans = [type(p)(p.items, storage_data=None) for p in plans]
    counting = CountingBackend(store.backend)
    store.backend = counting
    planner = dcpsim._Planner(_data(full))
    results = [w.write_data(p, planner).value() for w, p in zip(writers, plans, strict=True)]  # type: ignore[arg-type]
    writers[0].finish(metadata, results)
    manifest_reads = [k for op, k in counting.log if op in ("get", "get_range") and k == keys.manifest_key(digest)]
    assert len(manifest_reads) == 2  # one a rank
    data_chunks = {keys.chunk_key(c.digest) for c in store.manifest(digest).chunks}
    assert [k for op, k in counting.log if op in ("head", "put") and k in data_chunks] == []
    assert _loads_exactly(store, 2, full)


def test_a_handoff_whose_part_is_gone_heads_every_chunk_and_saves(space: str) -> None:
    inner = MemoryBackend(space)
    store = _store(inner)
    full = _full()
    dcpsim.save(store, 1, MODEL, 2, _data(full))
    part1 = keys.chunk_key(_root(store, 1).parts[1].digest)
    view = _store(HookBackend(inner, _hook_once(r"^manifests/", lambda: inner.delete(part1))))
    counting = CountingBackend(view.backend)
    view.backend = counting
    dcpsim.save(view, 2, MODEL, 2, _data(full))
    heads = [k for op, k in counting.log if op == "head" and k.startswith("chunks/")]
    # rank 1 could not read its part: it heads its 32 chunks and its new part (and puts the part
    # back, not trusting the handoff), and the coordinator heads the table.
    assert len(heads) == 32 + 2
    assert _every_object_present(inner, store, 2)
    assert _loads_exactly(_store(inner), 2, full)


def test_dcp_plan_caching_saves_and_loads_every_step(tmp_path: Any) -> None:
    """DefaultSavePlanner(enable_plan_caching=True) hands unchanged ranks the final plan of the
    first save, handoff included; the rank sees it is another step's and reads for itself."""
    store = ckptstore.open(tmp_path / "s", chunking=POLICY)
    for step in (1, 2, 3):
        state = {"w": torch.arange(4096.0) + step, "b": torch.ones(3) * step}
        dcp.save(state, storage_writer=StoreWriter(store, step),
                 planner=DefaultSavePlanner(enable_plan_caching=True), no_dist=True)
        target = {"w": torch.zeros(4096), "b": torch.zeros(3)}
        dcp.load(target, storage_reader=StoreReader(store, step), no_dist=True)
        assert torch.equal(target["w"], state["w"]) and torch.equal(target["b"], state["b"])
    assert store.steps() == [1, 2, 3]
