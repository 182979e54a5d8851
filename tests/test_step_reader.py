"""`Store.reader(step)`: a lazy, safetensors-like view of one step (ckptstore/stepreader.py).

Values are checked against the saved tensors on every backend; a byte-counting backend shows
what each call fetched: keys, metadata and tree read no chunk, `get_slice(name)[a:b]` of an
uncompressed tensor fetches the rows' bytes plus one header per chunk touched.
"""

from __future__ import annotations

import gc
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore import keys
from ckptstore.backends.base import OVERWRITE, Backend, GetResult
from ckptstore.backends.memory import MemoryBackend, drop_memory_space
from ckptstore.chunkblob import HEADER_SIZE, Compression
from ckptstore.chunking import ChunkingPolicy
from ckptstore.errors import (
    CkptStoreError,
    IntegrityError,
    InvalidArgumentError,
    InvalidStepError,
    PathNotFoundError,
    StepNotFoundError,
    StoreNotFoundError,
)
from ckptstore.stepreader import ReaderClosedError, TensorInfo, TensorNotFoundError
from ckptstore.store import Store
from ckptstore.testing.wrappers import ForwardingBackend

CHUNK = 4096
SMALL = ChunkingPolicy(chunk_size=CHUNK, small_tensor_limit=256, pack_size=1024)
ROWS, COLS = 256, 64  # float32: 256-byte rows, 16 rows per chunk, 16 chunks
ROW_BYTES = COLS * 4


def _state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model": {
            "embed.weight": torch.randn(ROWS, COLS, generator=gen),
            "bias": torch.arange(10, dtype=torch.bfloat16),  # packed with other small tensors
            "scale": torch.tensor(2.5),  # 0-d
            "empty": torch.zeros(0, 3),
        },
        "optim": {"state": {0: {"exp_avg": torch.randn(33, 7, generator=gen, dtype=torch.float64)}},
                  "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
        "ids": np.arange(3000, dtype=np.int64).reshape(300, 10),
        "seed": np.int32(7),
        "step": 100,
        "note": "hello",
    }


NAMES = ["model.embed.weight", "model.bias", "model.scale", "model.empty", "optim.state.0.exp_avg", "ids", "seed"]


def _saved(state: dict[str, Any], name: str) -> Any:
    node: Any = state
    for part in {"optim.state.0.exp_avg": ["optim", "state", 0, "exp_avg"]}.get(name, name.split(".", 1)):
        node = node[part]
    return node


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    return type(got) is type(want) and np.asarray(got).dtype == np.asarray(want).dtype and np.array_equal(got, want)


class ByteCountingBackend(ForwardingBackend):
    """Counts the bytes every read returned, per key, and the keys read."""

    def __init__(self, inner: Backend):
        super().__init__(inner)
        self.read_bytes: Counter[str] = Counter()

    def reset(self) -> None:
        self.read_bytes.clear()

    def chunk_bytes(self) -> int:
        return sum(n for key, n in self.read_bytes.items() if key.startswith(keys.CHUNKS))

    def get(self, key: str) -> GetResult:
        result = super().get(key)
        self.read_bytes[key] += len(result.data)
        return result

    def get_range(self, key: str, start: int, length: int) -> bytes:
        data = super().get_range(key, start, length)
        self.read_bytes[key] += len(data)
        return data

    def read_into(self, key: str, start: int, buffers: Sequence[memoryview]) -> int:
        n = super().read_into(key, start, buffers)
        self.read_bytes[key] += n
        return n


def _counted(url: str, **options: Any) -> tuple[Store, ByteCountingBackend]:
    """A store at `url` whose reads are counted."""
    backend = ByteCountingBackend(ckptstore.open(url).backend)
    return Store(backend, chunking=SMALL, **options), backend


@pytest.fixture
def space() -> Iterator[str]:
    name = uuid.uuid4().hex
    yield name
    drop_memory_space(name)


def _load_leases(store: Store) -> list[str]:
    return [lock.name for lock in store.locks() if lock.kind == "load"]


def _chunk_of(store: Store, name: str, segment: int = 0) -> str:
    """The key of the chunk holding segment `segment` of tensor `name` of step 1."""
    with store.reader(1) as r:
        index = r._index[name]
    manifest = store.info(1).manifest
    return keys.chunk_key(manifest.chunks[manifest.tensors[index].segments[segment][0]].digest)


# -- values, on every backend -------------------------------------------------------------------
def test_reader_gives_names_metadata_tree_tensors_and_slices_as_saved(store_url: str) -> None:
    store = ckptstore.open(store_url, chunking=SMALL)
    state = _state()
    store.save(1, state, metadata={"loss": 1.25, "tokens": [1, 2]})
    store.save(2, {"other": torch.ones(2)})
    with store.reader(1) as r:
        assert r.step == 1
        assert r.keys() == NAMES and len(r) == len(NAMES) and "ids" in r and "nope" not in r
        assert r.metadata == {"loss": 1.25, "tokens": [1, 2]}
        tree = r.tree
        assert tree["step"] == 100 and tree["note"] == "hello"
        assert tree["optim"]["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.99)}]
        assert tree["model"]["embed.weight"] == TensorInfo("model.embed.weight", "torch", "float32", (ROWS, COLS),
                                                            ROWS * ROW_BYTES)
        assert tree["ids"] == TensorInfo("ids", "numpy", "<i8", (300, 10), 24000)
        for name in NAMES:
            assert _same(r[name], _saved(state, name)), name
            assert _same(r.get_tensor(name), _saved(state, name)), name

        embed, ids = r.get_slice("model.embed.weight"), r.get_slice("ids")
        assert embed.get_shape() == [ROWS, COLS] and embed.get_dtype() == "float32"
        assert ids.get_shape() == [300, 10] and ids.get_dtype() == "<i8"
        want = state["model"]["embed.weight"]
        for key in (slice(30, 40), slice(0, ROWS), slice(5, 200), slice(-3, None), slice(None, 1), slice(9, 9),
                    slice(300, 400), 17, -1, (slice(30, 40), slice(2, 5)), (7, 3), (slice(1, 4), -1),
                    (slice(1, 4), ...), (..., 2), ...):
            assert _same(embed[key], want[key]), key
        for key in (slice(100, 250), 299, (slice(3, 9), slice(None, None, 2))):
            assert _same(ids[key], state["ids"][key]), key
        exp_avg = state["optim"]["state"][0]["exp_avg"]
        assert _same(r.get_slice("optim.state.0.exp_avg")[2:31], exp_avg[2:31])
        assert _same(r.get_slice("model.bias")[3:7], state["model"]["bias"][3:7])  # in a pack of small tensors
        assert _same(r.get_slice("model.scale")[()], state["model"]["scale"])
        assert _same(r.get_slice("model.empty")[0:0], state["model"]["empty"][0:0])
        for key in ((), ...):  # as numpy indexes a numpy scalar: [()] the scalar, [...] a 0-d array
            assert _same(r.get_slice("seed")[key], state["seed"][key]), key
    for newest in (None, "latest"):
        with store.reader(newest) as latest:
            assert latest.step == 2 and latest.keys() == ["other"] and latest.metadata is None
    for digits in ("1", "001"):  # a STEP as the CLI reads it, like load("1")
        with store.reader(digits) as first:
            assert first.step == 1 and first.metadata == {"loss": 1.25, "tokens": [1, 2]}


def test_names_are_the_ones_export_safetensors_writes(tmp_path: Path) -> None:
    from safetensors import safe_open

    from ckptstore.interop import export_safetensors

    store = ckptstore.open(f"memory://{uuid.uuid4().hex}", chunking=SMALL)
    shared = torch.arange(4.0)
    store.save(1, {"a.b": torch.ones(2), "a": {"b": torch.zeros(3)}, "list": [shared, shared], "t": (torch.ones(1),)})
    export_safetensors(store, 1, tmp_path / "out.safetensors")
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as exported, store.reader(1) as r:
        assert r.keys() == ["a.b", "a.b#2", "list.0", "list.1", "t.0"]
        assert sorted(r.keys()) == sorted(exported.keys())
        for name in r:
            assert torch.equal(r[name], exported.get_tensor(name)), name
    with store.reader(1) as r:  # a tensor held at two paths has both names
        assert torch.equal(r["list.0"], shared) and torch.equal(r["list.1"], shared)


def test_a_tag_names_the_step_it_points_at(store_url: str) -> None:
    store = ckptstore.open(store_url, chunking=SMALL)
    store.save(5, {"w": torch.ones(3)})
    store.save(6, {"w": torch.zeros(3)})
    store.tag("best", 5)
    with store.reader("best") as r:
        assert r.step == 5 and torch.equal(r["w"], torch.ones(3))
    with store.reader(6) as r:
        assert torch.equal(r["w"], torch.zeros(3))


# -- what is read -----------------------------------------------------------------------------
def test_opening_and_describing_read_no_chunk(store_url: str) -> None:
    store, counting = _counted(store_url)
    store.save(1, _state(), metadata={"m": 1})
    counting.reset()
    with store.reader(1) as r:
        assert r.keys() == NAMES and r.metadata == {"m": 1} and r.tree["step"] == 100
        assert r.get_slice("ids").get_shape() == [300, 10] and r.info("ids").nbytes == 24000
    read = set(counting.read_bytes)
    assert not {key for key in read if key.startswith(keys.CHUNKS)}, read
    assert {key.split("/", 1)[0] for key in read} <= {keys.MARKER, "refs", "manifests", "locks"}, read


def test_a_row_slice_of_an_uncompressed_tensor_fetches_only_its_rows(store_url: str) -> None:
    """Rows 30..40 lie in chunks 1 and 2 (16 rows a chunk): 10 rows plus two 24-byte headers
    are fetched, not the two whole chunks (8 KiB) that `read` would get."""
    store, counting = _counted(store_url)
    state = _state()
    store.save(1, state)
    with store.reader(1) as r:
        embed = r.get_slice("model.embed.weight")
        counting.reset()
        rows = embed[30:40]
        assert counting.chunk_bytes() == 10 * ROW_BYTES + 2 * HEADER_SIZE, counting.read_bytes
        assert len([k for k in counting.read_bytes if k.startswith(keys.CHUNKS)]) == 2
        assert torch.equal(rows, state["model"]["embed.weight"][30:40])
        counting.reset()
        row = embed[100]
        assert counting.chunk_bytes() == ROW_BYTES + HEADER_SIZE
        assert torch.equal(row, state["model"]["embed.weight"][100])
        counting.reset()
        whole = r["model.embed.weight"]  # whole chunks, each read once with its header
        assert counting.chunk_bytes() == ROWS * ROW_BYTES + 16 * HEADER_SIZE
        assert torch.equal(whole, state["model"]["embed.weight"])


def test_compressed_chunks_are_read_whole_and_checked(space: str) -> None:
    """zstd chunks are one frame: a slice reads each chunk it touches whole, verified."""
    inner = MemoryBackend(space)
    counting = ByteCountingBackend(inner)
    store = Store(counting, chunking=SMALL, compression=Compression("zstd", min_ratio=1.0))
    ids = np.arange(40000, dtype=np.int64).reshape(1000, 40)  # integers: always compressed
    store.save(1, {"ids": ids})
    manifest = store.info(1).manifest
    assert all(c.stored_size < HEADER_SIZE + c.raw_size for c in manifest.chunks)  # compressed
    touched, position = [], 0  # the chunks holding rows 100..120: bytes [32000, 38400)
    for chunk_index, _, length in manifest.tensors[0].segments:
        if position < 38400 and position + length > 32000:
            touched.append(manifest.chunks[chunk_index])
        position += length
    assert len(touched) == 3
    with store.reader(1) as r:
        counting.reset()
        part = r.get_slice("ids")[100:120]
        assert np.array_equal(part, ids[100:120])
        assert counting.chunk_bytes() == sum(chunk.stored_size for chunk in touched)
        # A flipped byte in a compressed chunk is caught: it is decoded and hash-checked.
        key = keys.chunk_key(touched[1].digest)
        blob = bytearray(inner.get(key).data)
        blob[-5] ^= 0xFF
        inner.put(key, bytes(blob), mode=OVERWRITE)
        with pytest.raises(IntegrityError, match=rf"step 1: chunk {key} of tensor ids is corrupt"):
            r.get_slice("ids")[100:120]


# -- gc, leases, errors -----------------------------------------------------------------------
def test_gc_during_an_open_reader_stands_down_and_its_chunks_stay(store_url: str) -> None:
    store = ckptstore.open(store_url, chunking=SMALL)
    state = _state()
    store.save(1, state)
    with store.reader(1) as r:
        assert len(_load_leases(store)) == 1
        store.delete(1)
        report = store.gc(min_age=0)
        assert not report.ran and report.deleted_chunks == 0, report
        assert _same(r["ids"], state["ids"])
        assert _same(r.get_slice("model.embed.weight")[3:9], state["model"]["embed.weight"][3:9])
    assert _load_leases(store) == []  # the lease went with the reader
    assert store.gc(min_age=0).deleted_chunks > 0


def test_a_reader_collected_unclosed_releases_its_lease(space: str) -> None:
    store = ckptstore.open(f"memory://{space}", chunking=SMALL)
    store.save(1, {"w": torch.ones(2)})
    r = store.reader(1)
    assert len(_load_leases(store)) == 1
    del r
    gc.collect()
    assert _load_leases(store) == []


def test_a_url_without_a_store_raises_and_creates_nothing(store_url: str) -> None:
    store = ckptstore.open(store_url)
    with pytest.raises(StoreNotFoundError, match="no ckptstore store at"):
        store.reader()
    with pytest.raises(StoreNotFoundError):
        store.reader(3)
    assert list(store.backend.list("")) == []
    if "://" not in store_url:
        assert not Path(store_url).exists()


def test_a_missing_step_raises_and_leaves_no_lease(store_url: str) -> None:
    store = ckptstore.open(store_url, chunking=SMALL)
    store.save(1, {"w": torch.ones(2)})
    with pytest.raises(StepNotFoundError, match="step 7 not found"):
        store.reader(7)
    with pytest.raises(StepNotFoundError, match="tag 'nope' not found"):
        store.reader("nope")
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidStepError, match="a step is an int"):
            store.reader(bad)  # type: ignore[arg-type]
    assert _load_leases(store) == []


def test_unknown_names_bad_indices_and_a_closed_reader_raise_typed_errors(space: str) -> None:
    store = ckptstore.open(f"memory://{space}", chunking=SMALL)
    store.save(1, _state())
    r = store.reader(1)
    with pytest.raises(TensorNotFoundError, match=r"step 1 has no tensor named 'model\.nope'; it has model\.embed"):
        r["model.nope"]
    with pytest.raises(KeyError):  # a KeyError, as for a dict
        r.get_slice("nope")
    assert issubclass(TensorNotFoundError, PathNotFoundError) and issubclass(TensorNotFoundError, CkptStoreError)
    embed = r.get_slice("model.embed.weight")
    for key, message in [(slice(0, 10, 2), "slice steps other than 1"), (ROWS, "out of range for dim 0"),
                         (-ROWS - 1, "out of range"), (1.5, "ints, slices and ..., not 1.5"),
                         ((None, 1), "not None"), ((torch.tensor([1, 2]),), "not tensor")]:
        with pytest.raises(InvalidArgumentError, match=message):
            embed[key]
    r.close()
    r.close()  # idempotent
    assert r.closed and _load_leases(store) == []
    for use in (r.keys, lambda: r.metadata, lambda: r.tree, lambda: r["ids"], lambda: r.get_slice("ids"),
                lambda: embed[0:2], lambda: "ids" in r):
        with pytest.raises(ReaderClosedError, match=f"the reader of step 1 in memory://{space} is closed"):
            use()


def test_damaged_uncompressed_chunks_raise_integrity_errors_naming_step_tensor_and_key(space: str) -> None:
    """A ranged read past a truncation, a chunk cut inside its header, a flipped byte in a
    chunk read whole: IntegrityError. A flipped byte inside a partial range is not seen
    (ranges are not hash-checked, as documented)."""
    inner = MemoryBackend(space)
    store = Store(inner, chunking=SMALL)
    state = _state()
    store.save(1, state)
    key = _chunk_of(store, "model.embed.weight", segment=2)  # rows 32..48
    blob = inner.get(key).data
    with store.reader(1) as r:
        embed = r.get_slice("model.embed.weight")
        inner.put(key, blob[:HEADER_SIZE + 5 * ROW_BYTES], mode=OVERWRITE)  # rows 32..37 left
        assert torch.equal(embed[33:36], state["model"]["embed.weight"][33:36])  # within what is left
        with pytest.raises(IntegrityError, match=rf"step 1: chunk {key} of tensor model.embed.weight is corrupt: "
                                                 r"chunk blob truncated"):
            embed[33:40]
        inner.put(key, blob[:10], mode=OVERWRITE)
        with pytest.raises(IntegrityError, match=rf"step 1: chunk {key} of tensor model.embed.weight is corrupt"):
            embed[33:40]
        flipped = bytearray(blob)
        flipped[HEADER_SIZE + 10 * ROW_BYTES] ^= 0xFF  # in row 42
        inner.put(key, bytes(flipped), mode=OVERWRITE)
        assert not torch.equal(embed[40:44], state["model"]["embed.weight"][40:44])  # a range: not checked
        with pytest.raises(IntegrityError, match="does not match its key"):
            embed[32:48]  # the whole chunk: read whole and checked
        with pytest.raises(IntegrityError, match="does not match its key"):
            r["model.embed.weight"]
        inner.delete(key)
        with pytest.raises(IntegrityError, match=rf"step 1: chunk {key} of tensor model.embed.weight is missing"):
            embed[33:40]
