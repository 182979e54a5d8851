"""Golden vectors: stored bytes of format version 1 and the exact values they decode to.

Every expected value here is a literal on purpose. If a change to ckptstore makes one of
these tests fail, the change altered the storage format: either revert it, or bump the
format version, regenerate with tests/golden/make_golden.py and document it in
docs/FORMAT.md ("Changes"). See tests/golden/README.md for what each file holds.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import math
import os
import pathlib
import shutil
import struct
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.chunkblob import (
    CODEC_NONE,
    CODEC_ZSTD,
    FILTER_SHUFFLE,
    HEADER_SIZE,
    ChunkHeader,
    Compression,
    ElementType,
    decode_chunk,
    decode_chunk_into,
    decode_header,
    encode_chunk,
)
from ckptstore.hashing import hasher
from ckptstore.manifest import (
    ChunkEntry,
    Marker,
    Ref,
    StepSummary,
    TensorEntry,
    decode_manifest,
    decode_marker,
    decode_ref,
    encode_manifest,
    encode_marker,
    encode_ref,
)
from ckptstore.tree import TensorRef, decode_tree, encode_tree

GOLDEN = Path(__file__).resolve().parent / "golden"
blake3_hex = hasher("blake3")

# ---------------------------------------------------------------------------------------
# Literal expectations (format version 1).
# ---------------------------------------------------------------------------------------
CHUNK_NONE_FILE = bytes.fromhex(
    "434b4342" "01" "00" "00" "00" "2000000000000000" "2000000000000000"  # CKCB v1 none, raw 32, payload 32
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
)
CHUNK_NONE_DIGEST = "e528e95798037df410543d9f31e396ecdd458d71b157d6014398bae32fb56c65"

CHUNK_ZSTD_HEADER = bytes.fromhex("434b4342" "01" "01" "00" "00" "0010000000000000" "1300000000000000")
CHUNK_ZSTD_DIGEST = "b6fb73fc46938c981e2b0b4b1ef282adcfc89854d01bfe3972fdc4785b41b2c7"

MARKER_FILE = bytes.fromhex(
    "84"                                   # map of 4
    "a6666f726d6174" "a9636b707473746f7265"  # "format": "ckptstore"
    "a17601"                               # "v": 1
    "a468617368" "a6626c616b6533"           # "hash": "blake3"
    "a763726561746564" "cb41d954fc40000000"  # "created": 1700000000.0 (float64)
)

REF_EXPECTED = Ref(
    manifest="0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    step=100,
    committed=1700000100.5,
    writer="trainer@node-0:1234",
    commit_id="fedcba9876543210fedcba9876543210",
    seq=2,
    replaces="fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210",
)
REF_FILE_SHA256 = "12b6a5d7181dfcef952301c037ad78f20fc1697b468e6a6943581e23842af643"
REF_SUMMARY_EXPECTED = replace(REF_EXPECTED, summary=StepSummary(tensors=4, logical_bytes=42, stored_bytes=138,
                                                                 new_bytes=106, chunks=4))
REF_SUMMARY_TAIL = bytes.fromhex(
    "a773756d6d617279" "85"             # "summary": map of 5
    "a774656e736f7273" "04"             # "tensors": 4
    "ad6c6f676963616c5f6279746573" "2a"  # "logical_bytes": 42
    "ac73746f7265645f6279746573" "cc8a"  # "stored_bytes": 138
    "a96e65775f6279746573" "6a"          # "new_bytes": 106
    "a66368756e6b73" "04"               # "chunks": 4
)

STORE_MANIFEST_DIGEST = "2c4371bc834aefe0c62dac2743d01d4f1daed3d278a8824eb45734e391b8923b"
STORE_REF = Ref(
    manifest=STORE_MANIFEST_DIGEST,
    step=7,
    committed=1700000001.5,
    writer="golden@ckptstore:0",
    commit_id="00112233445566778899aabbccddeeff",
    seq=1,
    replaces=None,
    # 4 tensors of 24 + 4 + 6 + 8 bytes in 4 chunk blobs of 40 + 32 + 34 + 32, all uploaded by the save
    summary=StepSummary(tensors=4, logical_bytes=42, stored_bytes=138, new_bytes=138, chunks=4),
)
STORE_TREE = bytes.fromhex(
    "85"                                  # map of 5, in the saved key order
    "a177" "d60200000000"                  # "w": ext 2, tensor 0
    "a162" "d60200000001"                  # "b": ext 2, tensor 1
    "a16e" "d60200000002"                  # "n": ext 2, tensor 2
    "a173" "d60200000003"                  # "s": ext 2, tensor 3
    "a46d657461" "82"                      # "meta": map of 2
    "a46e616d65" "a6676f6c64656e"           #   "name": "golden"
    "03" "c71101"                          #   3: ext 1 (tuple), 17 bytes
    "95" "01" "cb4004000000000000" "c0" "c3" "c4020001"  # [1, 2.5, nil, true, b"\x00\x01"]
)
STORE_TENSORS = (
    TensorEntry("torch", "float32", (2, 3), ((0, 0, 16), (1, 0, 8))),
    TensorEntry("torch", "bfloat16", (2,), ((2, 0, 4),)),
    TensorEntry("numpy", "<i2", (3,), ((2, 4, 6),)),
    TensorEntry("numpy-scalar", "<i8", (), ((3, 0, 8),)),
)
STORE_CHUNKS = (
    ChunkEntry("12f7aa1736c15f83d101f7e2d514716704176211198272d1bceba7218efa24ee", 16, 40),
    ChunkEntry("058e1aba5fcf701506a44c5c6e07884a75171bfda82d18a5ab68ce11a8a95d27", 8, 32),
    ChunkEntry("bab5e77c14040694782e91307a65a5c74f68cbe25fbf6b01b429a1f371600901", 10, 34),
    ChunkEntry("fc39e5ddecc876a9380066acaba1091a663557e352f99ebe903aa5202bdca74b", 8, 32),
)
# The raw payload of each chunk, little-endian.
STORE_CHUNK_RAW = {
    STORE_CHUNKS[0].digest: struct.pack("<4f", 0.0, 1.0, 2.0, 3.0),           # w[0:4]
    STORE_CHUNKS[1].digest: struct.pack("<2f", 4.0, 5.0),                     # w[4:6]
    STORE_CHUNKS[2].digest: bytes.fromhex("803f0040") + struct.pack("<3h", 0, 1, 2),  # b (bf16 1, 2) + n
    STORE_CHUNKS[3].digest: struct.pack("<q", -5),                            # s
}
STORE_FILES = {
    "CKPTSTORE",
    "chunks/05/058e1aba5fcf701506a44c5c6e07884a75171bfda82d18a5ab68ce11a8a95d27",
    "chunks/12/12f7aa1736c15f83d101f7e2d514716704176211198272d1bceba7218efa24ee",
    "chunks/ba/bab5e77c14040694782e91307a65a5c74f68cbe25fbf6b01b429a1f371600901",
    "chunks/fc/fc39e5ddecc876a9380066acaba1091a663557e352f99ebe903aa5202bdca74b",
    "manifests/2c/2c4371bc834aefe0c62dac2743d01d4f1daed3d278a8824eb45734e391b8923b",
    "refs/steps/00000000000000000007",
}


def _read(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def _files(root: Path) -> dict[str, tuple[int, int]]:
    # tmp/ holds the local backend's lock stripes (a load's lease creates them); loads may
    # come and go under locks/ but must leave nothing behind and change no stored object.
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and not p.relative_to(root).as_posix().startswith("tmp/")}


@pytest.fixture
def golden_store_path(tmp_path: Path) -> Path:
    """A private copy of the golden store, so no test ever writes into the repository."""
    dest = tmp_path / "store-v1"
    shutil.copytree(GOLDEN / "store-v1", dest)
    return dest


# ---------------------------------------------------------------------------------------
# Chunk blobs
# ---------------------------------------------------------------------------------------
def test_chunk_none_vector():
    blob = _read("chunk-none.blob")
    assert blob == CHUNK_NONE_FILE
    assert decode_header(blob) == ChunkHeader(codec=CODEC_NONE, filter=0, raw_length=32, payload_length=32)
    raw = decode_chunk(blob, expected_raw_length=32)
    assert bytes(raw) == bytes(range(32))
    assert blake3_hex(raw) == CHUNK_NONE_DIGEST
    # The encoder is deterministic: the same raw bytes give the same blob.
    assert b"".join(bytes(p) for p in encode_chunk(memoryview(bytes(range(32))), Compression("none"))) == blob
    # zstd cannot save 2% on 32 incompressible bytes, so the policy stores them raw, identically.
    assert b"".join(bytes(p) for p in encode_chunk(memoryview(bytes(range(32))), Compression("zstd", level=3))) == blob


def test_chunk_zstd_vector():
    blob = _read("chunk-zstd.blob")
    assert len(blob) == HEADER_SIZE + 19
    assert blob[:HEADER_SIZE] == CHUNK_ZSTD_HEADER
    assert blob[HEADER_SIZE:HEADER_SIZE + 4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    assert decode_header(blob) == ChunkHeader(codec=CODEC_ZSTD, filter=0, raw_length=4096, payload_length=19)
    raw = decode_chunk(blob, expected_raw_length=4096)
    assert bytes(raw) == bytes(4096)
    assert blake3_hex(raw) == CHUNK_ZSTD_DIGEST
    # Re-encoding need not give the same zstd bytes (they depend on the libzstd version), but
    # it must give a zstd blob with the same header fields that decodes to the same payload.
    again = b"".join(bytes(p) for p in encode_chunk(memoryview(bytes(4096)), Compression("zstd", level=3)))
    assert again[:8] == CHUNK_ZSTD_HEADER[:8]
    assert decode_header(again).raw_length == 4096
    assert bytes(decode_chunk(again, expected_raw_length=4096)) == bytes(4096)


CHUNK_SHUFFLE_HEADER = bytes.fromhex(
    "434b4342" "01" "01" "01" "04" "0010000000000000"  # CKCB v1 zstd, filter 1 (shuffle), element size 4, raw 4096
)
CHUNK_SHUFFLE_RAW = b"".join(i.to_bytes(4, "little") for i in range(1024))
CHUNK_SHUFFLE_DIGEST = "3500df96edea0c9d0d5d488b703177a37b39f880f81c76729ed847e2f3292f1f"


def test_chunk_shuffle_vector():
    blob = _read("chunk-shuffle.blob")
    assert blob[:16] == CHUNK_SHUFFLE_HEADER
    assert blob[HEADER_SIZE:HEADER_SIZE + 4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    header = decode_header(blob)
    assert header == ChunkHeader(codec=CODEC_ZSTD, filter=FILTER_SHUFFLE, raw_length=4096,
                                 payload_length=len(blob) - HEADER_SIZE, element_size=4)
    raw = decode_chunk(blob, expected_raw_length=4096)
    assert bytes(raw) == CHUNK_SHUFFLE_RAW
    assert blake3_hex(raw) == CHUNK_SHUFFLE_DIGEST
    target = bytearray(4096)
    decode_chunk_into(blob, memoryview(target))
    assert bytes(target) == CHUNK_SHUFFLE_RAW
    # The zstd bytes may differ with the libzstd version; the header fields and payload may not.
    again = b"".join(bytes(p) for p in encode_chunk(memoryview(CHUNK_SHUFFLE_RAW), Compression("zstd", level=1),
                                                    ElementType(4, integer=True)))
    assert again[:16] == CHUNK_SHUFFLE_HEADER
    assert bytes(decode_chunk(again, expected_raw_length=4096)) == CHUNK_SHUFFLE_RAW


# ---------------------------------------------------------------------------------------
# CKPTSTORE marker and ref
# ---------------------------------------------------------------------------------------
def test_marker_vector():
    data = _read("marker.msgpack")
    assert data == MARKER_FILE
    marker = decode_marker(data)
    assert marker == Marker(hash_algorithm="blake3", created=1700000000.0, version=1)
    assert type(marker.created) is float
    assert encode_marker(marker) == data


def test_ref_vector():
    import hashlib

    data = _read("ref.msgpack")
    assert hashlib.sha256(data).hexdigest() == REF_FILE_SHA256
    ref = decode_ref(data)
    assert ref == REF_EXPECTED
    assert type(ref.step) is int and type(ref.seq) is int and type(ref.committed) is float
    assert encode_ref(ref) == data
    assert encode_ref(REF_EXPECTED) == data


def test_ref_with_summary_vector():
    """A ref with a summary is the same map plus one trailing field: readers that predate
    the summary skip it (unknown fields are allowed in format version 1) and read the rest."""
    data = _read("ref-summary.msgpack")
    plain = _read("ref.msgpack")
    assert data[0] == plain[0] + 1  # fixmap of 9 fields instead of 8
    assert data[1:] == plain[1:] + REF_SUMMARY_TAIL
    assert decode_ref(data) == REF_SUMMARY_EXPECTED
    assert encode_ref(REF_SUMMARY_EXPECTED) == data
    assert decode_ref(plain).summary is None  # refs written before the summary have none


# ---------------------------------------------------------------------------------------
# The golden store
# ---------------------------------------------------------------------------------------
def test_golden_store_files_are_exactly_the_format_objects():
    assert set(_files(GOLDEN / "store-v1")) == STORE_FILES  # no tmp/, no lock files


def test_golden_store_marker_manifest_ref_chunks_decode(golden_store_path: Path):
    root = golden_store_path
    marker_bytes = (root / "CKPTSTORE").read_bytes()
    assert marker_bytes == MARKER_FILE
    assert encode_marker(decode_marker(marker_bytes)) == marker_bytes

    ref_bytes = (root / "refs/steps/00000000000000000007").read_bytes()
    ref = decode_ref(ref_bytes)
    assert ref == STORE_REF
    assert encode_ref(ref) == ref_bytes

    manifest_bytes = (root / "manifests/2c" / STORE_MANIFEST_DIGEST).read_bytes()
    assert len(manifest_bytes) == 388
    assert blake3_hex(manifest_bytes) == STORE_MANIFEST_DIGEST
    manifest = decode_manifest(manifest_bytes)
    assert manifest.step == 7
    assert manifest.created == 1700000001.5
    assert manifest.metadata == {"run": "golden"}
    assert manifest.tree == STORE_TREE
    assert manifest.tensors == STORE_TENSORS
    assert manifest.chunks == STORE_CHUNKS
    assert manifest.logical_bytes == 24 + 4 + 6 + 8
    assert manifest.stored_bytes == 40 + 32 + 34 + 32
    assert encode_manifest(manifest) == manifest_bytes

    tree = decode_tree(manifest.tree)
    assert tree == {
        "w": TensorRef(0), "b": TensorRef(1), "n": TensorRef(2), "s": TensorRef(3),
        "meta": {"name": "golden", 3: (1, 2.5, None, True, b"\x00\x01")},
    }
    assert list(tree) == ["w", "b", "n", "s", "meta"]
    assert list(tree["meta"]) == ["name", 3]
    assert type(tree["meta"][3]) is tuple

    for chunk in STORE_CHUNKS:
        blob = (root / "chunks" / chunk.digest[:2] / chunk.digest).read_bytes()
        assert len(blob) == chunk.stored_size
        assert decode_header(blob) == ChunkHeader(CODEC_NONE, 0, chunk.raw_size, chunk.raw_size)
        raw = decode_chunk(blob, expected_raw_length=chunk.raw_size)
        assert bytes(raw) == STORE_CHUNK_RAW[chunk.digest]
        assert blake3_hex(raw) == chunk.digest


def _assert_golden_state(state: object) -> None:
    assert type(state) is dict
    assert list(state) == ["w", "b", "n", "s", "meta"]

    w = state["w"]
    assert type(w) is torch.Tensor
    assert w.dtype == torch.float32 and tuple(w.shape) == (2, 3)
    assert w.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]

    b = state["b"]
    assert type(b) is torch.Tensor
    assert b.dtype == torch.bfloat16 and tuple(b.shape) == (2,)
    assert b.tolist() == [1.0, 2.0]
    assert bytes(b.view(torch.uint8).numpy()) == bytes.fromhex("803f0040")

    n = state["n"]
    assert type(n) is np.ndarray
    assert n.dtype == np.dtype("<i2") and n.shape == (3,)
    assert n.tolist() == [0, 1, 2]

    s = state["s"]
    assert type(s) is np.int64
    assert s == -5

    meta = state["meta"]
    assert type(meta) is dict and list(meta) == ["name", 3]
    assert meta["name"] == "golden"
    t = meta[3]
    assert type(t) is tuple
    assert [type(x) for x in t] == [int, float, type(None), bool, bytes]
    assert t == (1, 2.5, None, True, b"\x00\x01")


def test_golden_store_loads_step_7(golden_store_path: Path):
    before = _files(golden_store_path)
    with ckptstore.open(golden_store_path, create=False) as store:
        assert store.marker == Marker("blake3", 1700000000.0, 1)
        assert store.steps() == [7]
        assert store.latest() == 7
        assert store.ref(7) == STORE_REF
        info = store.info(7)
        assert info.ref == STORE_REF
        assert info.manifest.tensors == STORE_TENSORS
        assert info.manifest.chunks == STORE_CHUNKS
        _assert_golden_state(store.load(7))
        _assert_golden_state(store.load())  # latest
    # Opening and loading read only: nothing was created, changed or removed.
    assert _files(golden_store_path) == before


def test_golden_store_loads_into_existing_tensors(golden_store_path: Path):
    into = {"w": torch.full((2, 3), math.nan), "b": torch.zeros(2, dtype=torch.bfloat16), "n": np.zeros(3, "<i2"),
            "s": np.int64(0)}  # a numpy scalar is immutable: the state holds a new one
    ids = {k: id(v) for k, v in into.items() if k != "s"}
    with ckptstore.open(golden_store_path, create=False) as store:
        state = store.load(7, into=into)
    _assert_golden_state(state)
    assert {k: id(state[k]) for k in ids} == ids


def test_golden_store_loads_without_verify(golden_store_path: Path):
    with ckptstore.open(golden_store_path, create=False, verify=False) as store:
        _assert_golden_state(store.load(7))


# ---------------------------------------------------------------------------------------
# Config values in a state tree (ext types 3-8, added within format version 1)
# ---------------------------------------------------------------------------------------
TREE_VALUES_FILE = bytes.fromhex(
    "8c"                                                        # map of 12, in this key order
    "a56474797065" "d703" "62666c6f61743136"                    # "dtype": ext 3, "bfloat16"
    "a6646576696365" "c70704" "92" "a463756461" "01"            # "device": ext 4, ["cuda", 1]
    "a3637075" "c70604" "92" "a3637075" "c0"                    # "cpu": ext 4, ["cpu", nil]
    # "posix": ext 5, ["PurePosixPath", "/data/run1"]
    "a5706f736978" "c71a05" "92" "ad50757265506f73697850617468" "aa2f646174612f72756e31"
    # "windows": ext 5, ["PureWindowsPath", "C:\\ckpt\\run1"]
    "a777696e646f7773" "c71e05" "92" "af5075726557696e646f777350617468" "ac433a5c636b70745c72756e31"
    # "path": ext 5, ["PosixPath", "ckpts/exp1"]
    "a470617468" "c71605" "92" "a9506f73697850617468" "aa636b7074732f65787031"
    # "naive": ext 6, [2024, 5, 17, 13, 45, 30, 123456, fold 0, offset nil, zone name nil]
    "a56e61697665" "c71106" "9a" "cd07e8" "05" "11" "0d" "2d" "1e" "ce0001e240" "00" "c0" "c0"
    # "utc": ext 6, [2024, 5, 17, 13, 45, 30, 0, fold 0, offset 0 us, zone name nil]
    "a3757463" "c70d06" "9a" "cd07e8" "05" "11" "0d" "2d" "1e" "00" "00" "00" "c0"
    # "ist": ext 6, [2024, 5, 17, 19, 15, 30, 0, fold 0, offset 19800000000 us (+05:30), zone name "IST"]
    "a3697374" "c71806" "9a" "cd07e8" "05" "11" "13" "0f" "1e" "00" "00" "cf000000049c2c0600" "a3495354"
    # "fold": ext 6, [2021, 11, 7, 1, 30, 0, 0, fold 1, offset nil, zone name nil]
    "a4666f6c64" "c70d06" "9a" "cd07e5" "0b" "07" "01" "1e" "00" "00" "01" "c0" "c0"
    "a464617465" "c70607" "93" "cd07e8" "05" "11"               # "date": ext 7, [2024, 5, 17]
    "a974696d6564656c7461" "c70608" "93" "ff" "cd0e10" "05"     # "timedelta": ext 8, [days -1, seconds 3600, us 5]
)
IST = dt.timezone(dt.timedelta(hours=5, minutes=30), "IST")
TREE_VALUES = {
    "dtype": torch.bfloat16,
    "device": torch.device("cuda", 1),
    "cpu": torch.device("cpu"),
    "posix": pathlib.PurePosixPath("/data/run1"),
    "windows": pathlib.PureWindowsPath("C:\\ckpt\\run1"),
    "path": pathlib.PosixPath("ckpts/exp1"),
    "naive": dt.datetime(2024, 5, 17, 13, 45, 30, 123456),
    "utc": dt.datetime(2024, 5, 17, 13, 45, 30, tzinfo=dt.timezone.utc),
    "ist": dt.datetime(2024, 5, 17, 19, 15, 30, tzinfo=IST),
    "fold": dt.datetime(2021, 11, 7, 1, 30, fold=1),
    "date": dt.date(2024, 5, 17),
    "timedelta": dt.timedelta(days=-1, seconds=3600, microseconds=5),
}


def test_tree_values_vector():
    data = _read("tree-values.msgpack")
    assert data == TREE_VALUES_FILE
    tree = decode_tree(data)
    assert list(tree) == list(TREE_VALUES)
    for name, want in TREE_VALUES.items():
        got = tree[name]
        assert type(got) is type(want) and got == want, name
    assert tree["utc"].tzinfo is dt.timezone.utc
    assert repr(tree["ist"].tzinfo) == repr(IST) and tree["ist"].tzinfo.tzname(None) == "IST"
    assert tree["fold"].fold == 1 and tree["naive"].tzinfo is None
    assert (tree["timedelta"].days, tree["timedelta"].seconds, tree["timedelta"].microseconds) == (-1, 3600, 5)
    # Encoding the literal values reproduces the bytes exactly.
    assert encode_tree(TREE_VALUES, lambda _path, _value: None) == data


def test_make_golden_reproduces_the_golden_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The writer still produces exactly the golden bytes (zstd payloads aside)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ in tests/golden/
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    produced = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    expected = {p.relative_to(GOLDEN).as_posix() for p in GOLDEN.rglob("*")
                if p.is_file() and p.suffix not in (".py", ".md") and "__pycache__" not in p.parts}
    assert produced == expected
    for name in sorted(expected):
        ours, golden = (tmp_path / name).read_bytes(), (GOLDEN / name).read_bytes()
        if name in ("chunk-zstd.blob", "chunk-shuffle.blob"):
            assert ours[:16] == golden[:16]
            assert decode_chunk(ours, expected_raw_length=4096) == decode_chunk(golden, expected_raw_length=4096)
        else:
            assert ours == golden, f"{name} differs from the golden vector"
    assert not os.path.exists(tmp_path / "store-v1" / "tmp")


# -- manifest version 2 -----------------------------------------------------------------------
V2_PART_DIGEST = "00d8a05ca406ff9c3172ace93eca7cd53d570a57c6e14d729d32a8e99ad03e0b"
V2_TABLE_DIGEST = "591c02ccec818829552e659f79559a978a41a1a305af8a5523367936fb56561a"


def test_manifest_v2_vectors() -> None:
    """A v2 root, its one part and its chunk table (docs/FORMAT.md, "Manifest version 2")."""
    from ckptstore.dcpformat import parse_compact
    from ckptstore.manifest import ChunkEntry, TensorEntry
    from ckptstore.manifestv2 import (
        BlobRef,
        decode_chunk_table,
        decode_part,
        decode_root,
        encode_chunk_table,
        encode_part,
        encode_root,
        manifest_version,
    )
    from ckptstore.tree import decode_tree

    blake3 = hasher("blake3")
    part_bytes = _read("manifest-v2-part.msgpack")
    table_bytes = _read("chunk-table-v2.msgpack")
    root_bytes = _read("manifest-v2-root.msgpack")
    assert (blake3(part_bytes), blake3(table_bytes)) == (V2_PART_DIGEST, V2_TABLE_DIGEST)
    assert manifest_version(root_bytes) == 2 and manifest_version(part_bytes) == 1

    root = decode_root(root_bytes)
    assert (root.step, root.created, root.tensors, root.chunks, root.logical_bytes, root.stored_bytes) == (
        200, 1700000200.0, 3, 2, 64, 112)
    assert root.metadata == {"dcp": {"format": 2, "items": 3, "ranks": 1}}
    assert root.parts == (BlobRef(V2_PART_DIGEST, 252, 276, 3),)
    assert root.chunk_tables == (BlobRef(V2_TABLE_DIGEST, 132, 156, 2),)
    node = decode_tree(root.tree)["dcp"]
    assert node["format"] == 2 and node["part_ranks"] == [0]
    compact = parse_compact(node["metadata"], parts=1)
    assert [(e.fqn, e.is_bytes, e.size) for e in compact.entries] == [("w", False, (2, 4)), ("b", False, (4,)),
                                                                       ("cfg", True, ())]
    assert compact.layouts == [[((0, 0), (2, 4))], [((0,), (4,))]] and compact.partmaps == [[0]]
    assert compact.props == [("float32", "strided", False, "contiguous_format", False)]
    assert compact.storage_meta == {"checkpoint_id": "step-200", "save_id": "golden", "load_id": None, "modules": []}

    part = decode_part(part_bytes, 3)
    assert part.chunks == (ChunkEntry("11" * 32, 48, 72), ChunkEntry("22" * 32, 16, 40))
    assert part.tensors == (
        TensorEntry("torch", "float32", (2, 4), ((0, 0, 32),), {"fqn": "w", "offsets": [0, 0]}),
        TensorEntry("torch", "float32", (4,), ((0, 32, 16),), {"fqn": "b", "offsets": [0]}),
        TensorEntry("torch", "uint8", (16,), ((1, 0, 16),), {"fqn": "cfg", "bytes": True}))
    table = decode_chunk_table(table_bytes, 2)
    assert table.width == 32 and table.entries() == list(part.chunks)

    # Re-encoding the decoded values reproduces the bytes exactly.
    assert encode_root(root) == root_bytes
    assert encode_part(part.tensors, part.chunks) == part_bytes
    assert encode_chunk_table(table.entries()) == table_bytes
