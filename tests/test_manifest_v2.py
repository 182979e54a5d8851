"""Manifest version 2 (docs/FORMAT.md, "Manifest version 2"): a DCP step is a small root, one
part per writing rank and compact chunk tables; readers fetch only the parts they need, gc
reads the tables, and version 1 stores still load."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import ckptstore
from ckptstore import keys
from ckptstore.dcp import StoreReader
from ckptstore.dcpformat import build_compact, parse_compact
from ckptstore.errors import FormatError, IntegrityError, UnsupportedFormatError
from ckptstore.manifest import ChunkEntry, Manifest
from ckptstore.manifestread import read_chunk_tables, read_parts
from ckptstore.manifestv2 import (
    BlobRef,
    RootManifest,
    build_chunk_tables,
    decode_chunk_table,
    decode_root,
    encode_root,
    manifest_version,
)
from ckptstore.testing import dcpsim
from ckptstore.testing.wrappers import CountingBackend
from ckptstore.verify import verify

FIXTURES = Path(__file__).parent / "fixtures"

MODEL: dcpsim.Model = {
    "model.w": ((16, 3), torch.float32), "model.b": ((16,), torch.float32), "model.e": ((2, 5), torch.bfloat16),
    "optim.step": ((), torch.float32), "optim.w.exp_avg": ((16, 3), torch.float32),
}


def _full() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: (torch.randn(shape, generator=gen).to(dt) if shape else torch.tensor(7.0))
            for k, (shape, dt) in MODEL.items()}


def _data(full: dict[str, torch.Tensor]) -> dcpsim.DataFn:
    def data(fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        t = full[fqn]
        for d, (o, s) in enumerate(zip(offsets, sizes, strict=True)):
            t = t.narrow(d, o, s)
        return t.clone()
    return data


def _root(store: Any, step: int) -> RootManifest:
    found = store.manifest_object(store.ref(step).manifest)
    assert isinstance(found, RootManifest)
    return found


def _keys(store: Any, prefix: str) -> set[str]:
    return {info.key for info in store.backend.list(prefix)}


@pytest.fixture
def saved() -> tuple[Any, dict[str, torch.Tensor], dcpsim.SimulatedSave]:
    store = ckptstore.open(f"memory://v2-{uuid.uuid4().hex}")  # a new space every time
    full = _full()
    done = dcpsim.save(store, 5, MODEL, 4, _data(full))
    return store, full, done


def test_a_dcp_save_is_a_root_with_one_part_per_rank_and_a_chunk_table(saved: Any) -> None:
    store, full, done = saved
    root = _root(store, 5)
    assert manifest_version(store.backend.get(keys.manifest_key(store.ref(5).manifest)).data) == 2
    assert len(root.parts) == 4 and [p.count for p in root.parts] == [len(p.items) for p in done.plans]
    parts = dict(read_parts(store.backend, store._hash, root, [0, 1, 2, 3], 4))
    from_parts = {c.digest: c for part in parts.values() for c in part.chunks}
    tables = list(read_chunk_tables(store.backend, store._hash, root, 2))
    listed = [c for table in tables for c in table.entries()]
    assert [c.digest for c in listed] == sorted(from_parts) and {c.digest: c for c in listed} == from_parts
    assert root.chunks == len(from_parts) and root.tensors == sum(len(p.tensors) for p in parts.values())
    # what DCP built is what the root gives back
    metadata = StoreReader(store, 5).read_metadata()
    assert set(metadata.state_dict_metadata) == set(done.metadata.state_dict_metadata)
    for fqn, md in done.metadata.state_dict_metadata.items():
        got = metadata.state_dict_metadata[fqn]
        assert isinstance(got, TensorStorageMetadata) and isinstance(md, TensorStorageMetadata)
        assert got.size == md.size and got.properties == md.properties and got.chunks == md.chunks
    # and a resharded load (4 ranks -> 1) returns the values
    target = {k: torch.zeros_like(v) for k, v in full.items()}
    dcp.load(target, storage_reader=StoreReader(store, 5), no_dist=True)
    assert all(torch.equal(target[k], full[k]) for k in full)


def test_store_load_verify_and_gc_see_every_part_and_table(saved: Any) -> None:
    store, full, _ = saved
    root = _root(store, 5)
    whole = store.load(5)["dcp"]
    assert whole["format"] == 1 and set(whole["items"]) == set(MODEL)  # the layout-1 view, assembled
    assert torch.equal(torch.cat([t for t in whole["items"]["model.w"]]), full["model.w"])
    assert verify(store, deep=True).ok
    report = store.gc(min_age=0)
    assert report.ok if hasattr(report, "ok") else not report.failed
    assert report.deleted_chunks == 0 and report.reachable_chunks == root.chunks + len(root.blobs)
    target = {k: torch.zeros_like(v) for k, v in full.items()}
    dcp.load(target, storage_reader=StoreReader(store, 5), no_dist=True)
    store.backend.delete(keys.step_ref_key(5))
    freed = store.gc(min_age=0)
    assert freed.deleted_chunks == root.chunks + len(root.blobs) and freed.deleted_manifests == 1
    assert _keys(store, "chunks/") == set() and _keys(store, "manifests/") == set()


@pytest.mark.parametrize("blob", ["part", "table"])
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_gc_sweeps_nothing_when_a_part_or_chunk_table_cannot_be_read(saved: Any, blob: str, damage: str) -> None:
    store, _, _ = saved
    root = _root(store, 5)
    # an orphan chunk that a working gc would free, to show this one frees nothing
    store.backend.put(keys.chunk_key("ab" * 32), b"orphan")
    victim = keys.chunk_key((root.chunk_tables[0] if blob == "table" else root.parts[0]).digest)
    if damage == "missing":
        store.backend.delete(victim)
    else:
        blob_bytes = bytearray(store.backend.get(victim).data)
        blob_bytes[30] ^= 0xFF  # a byte of the payload (the header is 24 bytes)
        store.backend.put(victim, bytes(blob_bytes))
    report = store.gc(min_age=0)
    if blob == "part":  # gc does not read parts: it keeps everything the tables list, and the part
        assert report.deleted_chunks == 1 and not report.broken_refs
        assert len(verify(store).problems) > 0  # verify reads the parts and reports the damage
        return
    assert report.broken_refs and report.deleted_chunks == 0 and keys.chunk_key("ab" * 32) in _keys(store, "chunks/")


def test_a_rank_reads_the_root_and_only_the_parts_its_plan_needs() -> None:
    store = ckptstore.open(f"memory://v2-partial-{uuid.uuid4().hex}")
    full = _full()
    dcpsim.save(store, 5, MODEL, 8, _data(full))
    root = _root(store, 5)
    counting = CountingBackend(store.backend)
    reader = StoreReader(store, 5)
    reader.store = _Wrapped(store, counting)
    metadata = reader.read_metadata()
    plan = dcpsim.read_plan(metadata, MODEL, 3, 8)  # rank 3 of 8, as saved
    reader._load_parts({item.storage_index for item in plan.items})
    part_keys = {keys.chunk_key(p.digest) for p in root.parts}
    fetched = [k for op, k in counting.log if op == "get" and k in part_keys]
    assert fetched == [keys.chunk_key(root.parts[3].digest)]
    assert not [k for op, k in counting.log if k.startswith("chunks/") and k not in part_keys]  # no data yet


class _Wrapped:
    """The store, with its backend replaced by a counting one (the reader uses store.backend)."""

    def __init__(self, store: Any, backend: Any):
        self._store, self.backend = store, backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def ref(self, step: Any) -> Any:
        return self._store.ref(step)

    def manifest_object(self, digest: str) -> Any:
        return self._store.manifest_object(digest)


def test_a_version_1_dcp_store_still_loads(tmp_path: Path) -> None:
    """tests/fixtures/dcp-store-v1 was written by the layout-1 writer (tests/fixtures/make_dcp_store_v1.py,
    run at commit 1421487; it cannot be rerun since the writer writes layout 2)."""
    shutil.copytree(FIXTURES / "dcp-store-v1", tmp_path / "s")
    store = ckptstore.open(str(tmp_path / "s"), create=False)
    assert isinstance(store.manifest_object(store.ref(7).manifest), Manifest)
    target: dict[str, Any] = {"w": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.int64),
                              "extra": {"epoch": 0, "name": ""}}
    dcp.load(target, storage_reader=StoreReader(store, 7), no_dist=True)
    assert torch.equal(target["w"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert target["b"].tolist() == [1, 2] and target["extra"] == {"epoch": 3, "name": "golden"}
    assert verify(store, deep=True).ok
    assert store.gc(min_age=0).deleted_chunks == 0


# -- hostile input ----------------------------------------------------------------------------
def _compact(**overrides: Any) -> dict[str, Any]:
    obj = build_compact([("w", ("float32", "strided", False, "contiguous_format", False), [4, 2],
                          [((0, 0), (2, 2)), ((2, 0), (2, 2))], [0, 1]),
                         ("b", None, [], [], [1])], planner_data=None, storage_meta=None, version="1")
    obj.update(overrides)
    return obj


def test_parse_compact_accepts_what_build_compact_writes_and_shares_equal_tables() -> None:
    parsed = parse_compact(_compact(), parts=2)
    assert [e.fqn for e in parsed.entries] == ["w", "b"] and parsed.layouts == [[((0, 0), (2, 2)), ((2, 0), (2, 2))]]
    same = build_compact([(f"l{i}", ("float32", "strided", False, "contiguous_format", False), [4], [((0,), (4,))],
                           [0]) for i in range(50)], planner_data=None, storage_meta=None, version=None)
    assert len(same["layouts"]) == 1 and len(same["partmaps"]) == 1 and len(same["props"]) == 1


@pytest.mark.parametrize("change", [
    {"partmaps": [[0, 5], [1]]},                      # a part the root does not have
    {"layouts": [[2, [0, 0, 3, 0], [2, 2, 2, 2]]]},   # a shard outside the tensor's size
    {"layouts": [[2, [0, 0, 2], [2, 2, 2]]]},         # offsets that do not pair up by ndim
    {"entries": [[0, 0, [4, 2], 0, 1], [1, -1, None, -1, 0]]},  # 2 shards, a part map of 1
    {"entries": [[0, 3, [4, 2], 0, 0], [1, -1, None, -1, 1]]},  # props row that does not exist
    {"fqns": ["w", "w"]},                                        # fqns not distinct
    {"props": [["float32", "strided", "no", "contiguous_format", False]]},
])
def test_parse_compact_refuses_malformed_metadata(change: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        parse_compact(_compact(**change), parts=2)


def _a_root(**overrides: Any) -> RootManifest:
    fields: dict[str, Any] = dict(step=1, created=1.0, metadata=None, tree=b"\xc0",
                                  parts=(BlobRef("aa" * 32, 100, 124, 3),),
                                  chunk_tables=(BlobRef("bb" * 32, 10, 34, 2),),
                                  tensors=3, chunks=2, logical_bytes=10, stored_bytes=20)
    fields.update(overrides)
    return RootManifest(**fields)


def test_root_round_trips_and_refuses_totals_its_lists_do_not_add_up_to() -> None:
    root = _a_root()
    assert decode_root(encode_root(root)) == root
    with pytest.raises(FormatError):
        encode_root(_a_root(tensors=4))
    with pytest.raises(FormatError):
        encode_root(_a_root(chunks=3))
    with pytest.raises(UnsupportedFormatError):
        decode_root(encode_root(root).replace(b"\xa1v\x02", b"\xa1v\x03", 1))


def test_chunk_table_round_trips_and_refuses_arrays_of_the_wrong_length() -> None:
    chunks = [ChunkEntry(f"{i:02x}" * 32, 100 + i, 24 + 50 + i) for i in (3, 1, 2, 1)]
    [data] = build_chunk_tables(chunks)
    table = decode_chunk_table(data, 3)
    assert [c.digest[:2] for c in table.entries()] == ["01", "02", "03"] and table.entries()[0].raw_size == 101
    with pytest.raises(FormatError):
        decode_chunk_table(data, 4)
    [bad] = build_chunk_tables([ChunkEntry("01" * 32, 10, 10)])  # stored under the header size
    with pytest.raises(FormatError):
        decode_chunk_table(bad, 1)


def test_a_missing_part_is_an_integrity_error_for_a_reader(saved: Any) -> None:
    store, full, _ = saved
    root = _root(store, 5)
    store.backend.delete(keys.chunk_key(root.parts[2].digest))
    target = {k: torch.zeros_like(v) for k, v in full.items()}
    with pytest.raises(IntegrityError, match="missing"):
        ckptstore.dcp.load(target, store, 5)


def test_results_in_another_order_than_the_metadata_still_map_each_shard_to_its_part() -> None:
    """The coordinator matches shards to parts by offsets when the write results do not come in
    the metadata's order (here: ranks reversed); the load then finds every shard's bytes."""
    store = ckptstore.open(f"memory://v2-reversed-{uuid.uuid4().hex}")
    full = _full()
    done = dcpsim.write_ranks(store, 5, MODEL, 4, _data(full))
    try:
        done.writers[0].finish(done.metadata, list(reversed(done.results)))
    finally:
        for writer in done.writers:
            writer.release()
    target = {k: torch.zeros_like(v) for k, v in full.items()}
    dcp.load(target, storage_reader=StoreReader(store, 5), no_dist=True)
    assert all(torch.equal(target[k], full[k]) for k in full)


def test_a_dcp_resave_of_unchanged_data_heads_no_chunk_its_rank_wrote_before() -> None:
    """The coordinator reads the epoch and the latest step once (prepare_global_plan) and hands
    each rank its part's digest: a rank then reads only that part, skips the head of every chunk
    it lists, and neither heads nor puts its unchanged part; its lease is deleted once, in the
    coordinator's batch. Only the chunk table is headed (and found)."""
    from ckptstore.chunking import ChunkingPolicy

    model: dcpsim.Model = {f"w{i}": ((64, 256), torch.float32) for i in range(4)}
    gen = torch.Generator().manual_seed(1)
    full = {k: torch.randn(shape, generator=gen) for k, (shape, _) in model.items()}
    policy = ChunkingPolicy(chunk_size=4096, small_tensor_limit=1024, pack_size=4096)
    store = ckptstore.open(f"memory://v2-resave-{uuid.uuid4().hex}", chunking=policy)
    dcpsim.save(store, 1, model, 2, _data(full))
    before = _root(store, 1)
    counting = CountingBackend(store.backend)
    store.backend = counting
    dcpsim.save(store, 2, model, 2, _data(full))
    log = list(counting.log)  # before the test reads anything itself
    root = _root(store, 2)
    assert before.chunks == 64 and root.parts == before.parts  # the same data: the same parts
    assert [k for op, k in log if op == "put" and k.startswith("chunks/")] == []
    assert [k for op, k in log if op == "head" and k.startswith("chunks/")] == \
        [keys.chunk_key(t.digest) for t in root.chunk_tables]  # not 64 chunks, not the 2 parts
    assert [k for op, k in log if op == "get" and k.startswith("chunks/")] == \
        [keys.chunk_key(p.digest) for p in before.parts]  # each rank its own part, once
    assert [op for op, k in log if k.startswith("refs/")].count("list") == 1  # the coordinator alone
    assert [op for op, k in log if k.startswith("manifests/")] == ["get", "put"]  # previous root once; new root
    leases = [k for op, k in log if op == "put" and k.startswith("locks/save-")]
    deletes = [k for op, k in log if op == "delete" and k.startswith("locks/save-")]
    assert len(set(leases)) == 2 and sorted(deletes) == sorted(set(leases))  # each deleted once
    requests = sum(1 for op, k in log if op in ("get", "head", "put", "list", "delete"))
    # 4 reads by the coordinator (epoch, refs listing, ref: one get_small, root); 3 a rank (lease,
    # its part, the epoch again); 7 to commit (table head, root, lease refresh, epoch, ref, one
    # batch of deletes: memory:// deletes key by key). 18 while get_small was a head and a get.
    assert requests == 17, log


class _SlicePlanner:
    """What read_data asks of a LoadPlanner, landing into one local shard per fqn."""

    def __init__(self, local: dict[str, torch.Tensor]):
        self.local = local

    def resolve_tensor(self, item: Any) -> torch.Tensor:
        t = self.local[item.dest_index.fqn]
        for d, (o, n) in enumerate(zip(item.dest_offsets, item.lengths, strict=True)):
            t = t.narrow(d, o, n)
        return t

    def commit_tensor(self, item: Any, tensor: torch.Tensor) -> None:
        pass


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_a_resharded_load_fetches_only_the_rows_it_needs_of_uncompressed_chunks(codec: str) -> None:
    """Saved on 2 ranks (32 rows each, one 32 KiB chunk), loaded as rank 1 of 4 (rows 16..32):
    half of rank 0's shard. An uncompressed chunk is read by byte range (half its bytes); a
    compressed one whole."""
    from ckptstore.chunkblob import Compression
    from ckptstore.chunking import ChunkingPolicy

    model: dcpsim.Model = {"w": ((64, 256), torch.float32)}
    full = {"w": torch.arange(64 * 256, dtype=torch.float32).reshape(64, 256)}
    store = ckptstore.open(f"memory://v2-ranged-{codec}-{uuid.uuid4().hex}", compression=Compression(codec),
                           chunking=ChunkingPolicy(chunk_size=32768, small_tensor_limit=1024, pack_size=8192))
    dcpsim.save(store, 1, model, 2, _data(full))
    counting = CountingBackend(store.backend)
    reader = StoreReader(store, 1)
    metadata = reader.read_metadata()
    reader.store = _Wrapped(store, counting)
    local = {"w": torch.zeros(16, 256)}
    reader.read_data(dcpsim.read_plan(metadata, model, 1, 4), _SlicePlanner(local)).wait()  # type: ignore[arg-type]
    assert torch.equal(local["w"], full["w"][16:32])
    read = {k for op, k in counting.log if op == "get"}
    assert [p.digest for p in _root(store, 1).parts if keys.chunk_key(p.digest) in read] == \
        [_root(store, 1).parts[0].digest]  # rank 0's part: rows 0..32
    data = counting.read_bytes["chunks"] - _root(store, 1).parts[0].stored_size
    if codec == "none":
        assert data == 24 + 16 * 1024  # the chunk's header, then the 16 rows
    else:
        [chunk] = read - {keys.chunk_key(_root(store, 1).parts[0].digest)}
        assert data == store.backend.head(chunk).size  # compressed: the whole zstd frame, hash-checked


def test_a_plain_save_after_a_dcp_step_reads_its_chunk_tables_not_its_parts(saved: Any) -> None:
    store, full, _ = saved
    root = _root(store, 5)
    counting = CountingBackend(store.backend)
    store.backend = counting
    store.save(6, {"w": full["model.w"]})
    gets = {k for op, k in counting.log if op == "get" and k.startswith("chunks/")}
    assert gets == {keys.chunk_key(t.digest) for t in root.chunk_tables}  # and no part
