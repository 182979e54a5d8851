"""Hostile stored objects are refused before any large allocation (complements test_format_errors).

Each case asserts the typed error, and where the attack is about memory, a tracemalloc peak
far below what decoding the object in full would take.
"""

from __future__ import annotations

import os
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest

import ckptstore
from ckptstore import keys, manifest, tree
from ckptstore.backends.base import OVERWRITE, PutMode
from ckptstore.backends.memory import drop_memory_space
from ckptstore.chunkblob import HEADER_SIZE
from ckptstore.commit import commit_ref, read_ref
from ckptstore.errors import CommitConflictError, FormatError, UnsupportedFormatError
from ckptstore.manifest import (
    MAX_FREEFORM_ITEMS,
    MAX_LOGICAL_BYTES,
    MAX_REF_BYTES,
    Ref,
    decode_manifest,
    decode_ref,
    encode_ref,
)
from ckptstore.testing.wrappers import HeadHookBackend
from ckptstore.tree import decode_tree

T = TypeVar("T")
MiB = 1 << 20


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def peak_of(fn: Callable[[], T]) -> tuple[T | BaseException, int]:
    """`fn()`'s result (or the exception it raised) and the peak of Python allocations."""
    tracemalloc.start()
    try:
        try:
            result: T | BaseException = fn()
        except Exception as exc:  # returned for the caller to check the type
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


DIGEST = bytes(range(32))


def manifest_obj(**changes: Any) -> dict[str, Any]:
    obj = {
        "v": 1, "step": 1, "created": 1.5, "metadata": None,
        "tree": pack({"w": msgpack.ExtType(2, (0).to_bytes(4, "big"))}),
        "tensors": [["torch", "float32", [2, 2], [[0, 0, 16]], None]],
        "chunks": [[DIGEST, 16, 16 + HEADER_SIZE]],
    }
    obj.update(changes)
    return obj


def test_base_manifest_is_valid():
    assert decode_manifest(pack(manifest_obj())).tensors[0].shape == (2, 2)


# -- counts claimed in headers are checked before anything is allocated -------------------
def _with_raw_field(name: str, raw: bytes) -> bytes:
    """A manifest whose field `name` is the raw bytes `raw` (e.g. a lying array header)."""
    obj = manifest_obj()
    del obj[name]
    head = pack(obj)
    # fixmap header 0x8N: one more field, then the raw one at the end.
    return bytes([head[0] + 1]) + head[1:] + pack(name) + raw


@pytest.mark.parametrize("field", ["tensors", "chunks", "metadata"])
def test_array_header_claiming_2_32_entries(field: str):
    data = _with_raw_field(field, b"\xdd\xff\xff\xff\xff" + b"\xc0" * 64)
    result, peak = peak_of(lambda: decode_manifest(data))
    assert isinstance(result, FormatError), result
    assert peak < MiB


def test_segment_list_claiming_2_32_segments():
    entry = pack(["torch", "float32", [2, 2]]) [1:]  # items without the array header
    data = _with_raw_field("tensors", b"\x91\x95" + entry + b"\xdd\xff\xff\xff\xff" + b"\x93\x00\x00\x10" * 8)
    result, peak = peak_of(lambda: decode_manifest(data))
    assert isinstance(result, FormatError), result
    assert peak < MiB


def test_tensor_count_is_checked_before_any_entry(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(manifest, "MAX_TENSORS", 2)
    # The entries are garbage too: the count must be what is reported.
    with pytest.raises(FormatError, match="3 entries is over the limit of 2"):
        decode_manifest(pack(manifest_obj(tensors=[[], [], []])))


def test_segment_count_limit(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(manifest, "MAX_SEGMENTS", 3)
    segments = [[0, 0, 4]] * 4
    with pytest.raises(FormatError, match="4 segments is over the limit of 3"):
        decode_manifest(pack(manifest_obj(tensors=[["torch", "float32", [2, 2], segments, None]])))


# -- free-form parts are decoded within an item budget -------------------------------------
def test_metadata_of_millions_of_empty_lists_stops_early():
    count = 4 * MAX_FREEFORM_ITEMS  # decoded in full: >= 4M x 56-byte lists, over 224 MiB
    data = pack(manifest_obj(metadata=[[]] * count))
    result, peak = peak_of(lambda: decode_manifest(data))
    assert isinstance(result, FormatError) and "nested values" in str(result), result
    assert peak < 100 * MiB, f"peak {peak / MiB:.0f} MiB"


def test_metadata_budget_is_shared_by_unknown_fields():
    half = [0] * (MAX_FREEFORM_ITEMS // 2 + 1)
    assert decode_manifest(pack(manifest_obj(metadata=half))).metadata == half
    with pytest.raises(FormatError, match="nested values"):
        decode_manifest(pack(manifest_obj(metadata=half, extra=half)))


def test_placement_bomb_is_refused():
    placement = {"fqn": "w", "junk": [[]] * 10_000}
    with pytest.raises(FormatError, match="nested values"):
        decode_manifest(pack(manifest_obj(tensors=[["torch", "float32", [2, 2], [[0, 0, 16]], placement]])))


def test_dcp_style_placement_is_accepted():
    placement = {"fqn": "model.w", "offsets": [0] * 64, "global_shape": [2] * 64}
    decoded = decode_manifest(pack(manifest_obj(tensors=[["torch", "float32", [2, 2], [[0, 0, 16]], placement]])))
    assert decoded.tensors[0].placement == placement


def test_tree_item_budget(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tree, "MAX_TREE_ITEMS", 10_000)
    assert len(decode_tree(pack([[]] * 4_000))) == 4_000  # 1 + 4000 + 4000 items
    with pytest.raises(FormatError, match="more than 10000 values"):
        decode_tree(pack([[]] * 6_000))
    # Tuples (decoded by nested unpackers) spend the same budget.
    inner = msgpack.ExtType(1, pack([[]] * 3_000))
    with pytest.raises(FormatError, match="more than 10000 values"):
        decode_tree(pack([inner, inner]))


def test_tree_bomb_stops_early(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tree, "MAX_TREE_ITEMS", 100_000)
    data = pack([{}] * 1_000_000)  # decoded in full: 1M x 64-byte dicts + an 8 MB list
    result, peak = peak_of(lambda: decode_tree(data))
    assert isinstance(result, FormatError), result
    assert peak < 24 * MiB, f"peak {peak / MiB:.0f} MiB"


# -- shapes and sizes that do not add up ----------------------------------------------------
@pytest.mark.parametrize(("kind", "dtype", "shape", "segments"), [
    ("numpy", "<f4", [2**31, 2**31], []),          # 2**62 elements, no bytes
    ("numpy", "<f4", [2**40, 2**40], [[0, 0, 8]]),
    ("numpy", "<f4", [3], [[0, 0, 8]]),             # 12 bytes needed, 8 stored
    ("numpy", "<U2", [2], [[0, 0, 8]]),             # UCS-4: 16 bytes needed
    ("numpy-scalar", "<f8", [1], [[0, 0, 8]]),      # a scalar has shape []
    ("torch", "float32", [2**31, 2**31], []),
    ("torch", "uint8", [1, 2**50, 2**50], []),      # 2**100 elements, no bytes
])
def test_shapes_that_do_not_match_their_bytes(kind: str, dtype: str, shape: list[int], segments: list[Any]):
    obj = manifest_obj(tensors=[[kind, dtype, shape, segments, None]])
    with pytest.raises(FormatError):
        decode_manifest(pack(obj))


def test_numpy_shapes_that_match_are_accepted():
    obj = manifest_obj(tensors=[["numpy", "<U2", [2], [[0, 0, 16]], None],
                                ["numpy-scalar", "<f8", [], [[0, 0, 8]], None]])
    assert [t.nbytes for t in decode_manifest(pack(obj)).tensors] == [16, 8]


@pytest.mark.parametrize("stored", [0, HEADER_SIZE - 1, HEADER_SIZE + 17, 2**40])
def test_chunk_stored_size_outside_header_plus_raw(stored: int):
    with pytest.raises(FormatError, match="stored size"):
        decode_manifest(pack(manifest_obj(chunks=[[DIGEST, 16, stored]])))


def test_total_logical_bytes_over_the_limit():
    # Two tensors of 2**49 + 2**40 bytes each, from 513 segments over one (dedup) 1 TiB chunk:
    # each is under the per-tensor limit, together they are over MAX_LOGICAL_BYTES.
    segments = [[0, 0, 2**40]] * 513
    entry = ["torch", "uint8", [513 * 2**40], segments, None]
    chunks = [[DIGEST, 2**40, HEADER_SIZE + 2**40]]
    assert decode_manifest(pack(manifest_obj(tensors=[entry], chunks=chunks))).logical_bytes < MAX_LOGICAL_BYTES
    with pytest.raises(FormatError, match="in total"):
        decode_manifest(pack(manifest_obj(tensors=[entry, entry], chunks=chunks)))


# -- map structure ---------------------------------------------------------------------------
def test_duplicate_field_is_refused():
    data = pack(manifest_obj())
    dup = bytes([data[0] + 1]) + data[1:] + pack("step") + pack(2)
    with pytest.raises(FormatError, match="not a new string"):
        decode_manifest(dup)


def test_too_many_fields():
    with pytest.raises(FormatError, match="fields"):
        decode_manifest(pack(manifest_obj(**{f"x{i}": 0 for i in range(100)})))


def test_newer_version_with_an_unreadable_layout_is_unsupported():
    # A newer writer may nest entries deeper than this reader's budgets: `v` comes first.
    deep = [[[[[0] * 100] * 100]]]
    with pytest.raises(UnsupportedFormatError):
        decode_manifest(pack({"v": 2, "tensors": deep, "chunks": {"new": "layout"}}))


# -- refs are never read whole ---------------------------------------------------------------
@pytest.fixture
def memory_url() -> Iterator[str]:
    name = uuid.uuid4().hex
    yield f"memory://{name}"
    drop_memory_space(name)


def _ref(step: int) -> Ref:
    return Ref(manifest="ab" * 32, step=step, committed=1.0, writer="test@host:1")


def test_oversized_ref_is_refused_without_reading_it(store_url: str):
    store = ckptstore.open(store_url)
    store.marker  # noqa: B018 - create the store (opening no longer does)
    key = keys.step_ref_key(7)
    store.backend.put(key, encode_ref(_ref(7)) + b"\x00" * (8 * MiB), mode=OVERWRITE)
    result, peak = peak_of(lambda: read_ref(store.backend, key))
    assert isinstance(result, FormatError) and "limit" in str(result), result
    assert peak < MiB, f"peak {peak / MiB:.1f} MiB"
    with pytest.raises(FormatError):
        store.load(7)


def test_sparse_10_gib_ref_on_local_disk(tmp_path: Path):
    store = ckptstore.open(tmp_path / "store")
    store.save(1, {"x": 1})
    path = tmp_path / "store" / keys.step_ref_key(1)
    os.truncate(path, 10 << 30)  # sparse: costs no disk, but a whole read would take 10 GiB
    result, peak = peak_of(lambda: store.ref(1))
    assert isinstance(result, FormatError), result
    assert peak < MiB
    report, peak = peak_of(lambda: store.gc(min_age=0))  # fails closed, reading no more than the ref's limit
    assert report.failed and not report.ran and report.deleted_chunks == 0, report
    assert report.broken_refs[0].startswith(f"{keys.step_ref_key(1)}: FormatError"), report.broken_refs
    assert peak < MiB


def test_ref_at_exactly_the_limit_is_read(memory_url: str):
    store = ckptstore.open(memory_url)
    key = keys.step_ref_key(3)
    base = encode_ref(_ref(3))
    obj = msgpack.unpackb(base)
    pad = MAX_REF_BYTES - len(base) - 4  # str8/16 header growth: trim to hit the limit exactly
    obj["writer"] = "w" * pad
    data = pack(obj)
    data = pack(obj | {"writer": "w" * (pad - (len(data) - MAX_REF_BYTES))})
    assert len(data) == MAX_REF_BYTES
    store.backend.put(key, data, mode=OVERWRITE)
    found = read_ref(store.backend, key)
    assert found is not None and found[0] == decode_ref(data)
    store.backend.put(key, data + b"\x00", mode=OVERWRITE)
    with pytest.raises(FormatError):
        read_ref(store.backend, key)


def test_ref_replaced_between_head_and_read_is_a_conflict_not_a_clobber(store_url: str):
    inner = ckptstore.open(store_url).backend
    key = keys.step_ref_key(1)
    commit_ref(inner, key, _ref(1), overwrite=False)
    intruder = _ref(1)

    def replace_it() -> None:  # another writer commits right after our head
        current = read_ref(inner, key)
        assert current is not None
        inner.put(key, encode_ref(intruder), mode=PutMode.update(current[1]))

    backend = HeadHookBackend(inner, key=key, after=replace_it)
    with pytest.raises(CommitConflictError):
        commit_ref(backend, key, _ref(1), overwrite=True)
    assert backend.fired
    stored = read_ref(inner, key)
    assert stored is not None and stored[0].commit_id == intruder.commit_id, "the winner must not be clobbered"


def test_a_load_larger_than_the_machine_is_refused_before_allocating(memory_url: str,
                                                                     monkeypatch: pytest.MonkeyPatch):
    """Declared sizes are checked against RAM + swap before any tensor is allocated;
    load(into=...) allocates nothing and is not limited."""
    import torch

    import ckptstore
    from ckptstore import sysmem, tensors

    store = ckptstore.open(memory_url)
    state = {"w": torch.arange(4096, dtype=torch.float32)}
    store.save(1, state)
    allocated: list[str] = []
    real_allocate = tensors.allocate
    monkeypatch.setattr(tensors, "allocate", lambda *a, **k: allocated.append(a[1]) or real_allocate(*a, **k))
    monkeypatch.setattr(sysmem, "machine_memory_bytes", lambda: 16 * 1024 - 1)
    with pytest.raises(ckptstore.InsufficientMemoryError, match="16384 bytes"):
        store.load(1)
    assert allocated == []
    target = {"w": torch.zeros(4096)}
    assert torch.equal(store.load(1, into=target)["w"], state["w"])
    monkeypatch.setattr(sysmem, "machine_memory_bytes", lambda: 16 * 1024)
    assert torch.equal(store.load(1)["w"], state["w"])


def test_a_failed_allocation_is_a_typed_error(memory_url: str, monkeypatch: pytest.MonkeyPatch):
    import torch

    import ckptstore
    from ckptstore import tensors

    store = ckptstore.open(memory_url)
    store.save(1, {"w": torch.ones(8)})

    def fail(*_: Any, **__: Any) -> Any:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1125899906842624 bytes")

    monkeypatch.setattr(tensors, "allocate", fail)
    with pytest.raises(ckptstore.InsufficientMemoryError, match=r"state\['w'\]"):
        store.load(1)
