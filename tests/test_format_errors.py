"""Hostile and broken stored bytes give typed errors (FormatError or a subclass), never others.

Decoders are fed truncated, garbage, mistyped, out-of-range and lying inputs, then random
bytes and random mutations of valid objects (hypothesis). Unknown versions must be an
UnsupportedFormatError with a message that says which object and which version.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptstore
from ckptstore import keys
from ckptstore.backends.memory import drop_memory_space
from ckptstore.chunkblob import HEADER, HEADER_SIZE, MAGIC, Compression, decode_chunk, decode_header, encode_chunk
from ckptstore.errors import FormatError, UnsupportedFormatError
from ckptstore.hashing import hasher
from ckptstore.manifest import (
    MAX_CHUNK_BYTES,
    MAX_DIMS,
    MAX_REF_BYTES,
    MAX_TENSOR_BYTES,
    Marker,
    decode_manifest,
    decode_marker,
    decode_ref,
    encode_marker,
)
from ckptstore.tree import decode_tree

GOLDEN = Path(__file__).resolve().parent / "golden"
blake3_hex = hasher("blake3")
DELETE = object()

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def ext(code: int, data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(code, data)


def tensor_ref(index: int) -> msgpack.ExtType:
    return ext(2, index.to_bytes(4, "big"))


# ---------------------------------------------------------------------------------------
# Valid objects that the cases below break one field at a time.
# ---------------------------------------------------------------------------------------
DIGEST_A = bytes(range(32))
DIGEST_B = bytes(range(32, 64))
VALID_TREE_OBJ = {"w": tensor_ref(0), "opt": {0: [tensor_ref(1), ext(1, pack([1, 2.5, None, b"x"]))]}, "s": "x"}
VALID_TREE = pack(VALID_TREE_OBJ)


def manifest_obj() -> dict[str, Any]:
    return {
        "v": 1,
        "step": 5,
        "created": 1.5,
        "metadata": {"k": 1},
        "tree": VALID_TREE,
        "tensors": [
            ["torch", "float32", [2, 3], [[0, 0, 16], [1, 0, 8]], None],
            ["numpy", "<i2", [4], [[1, 8, 8]], None],
        ],
        "chunks": [[DIGEST_A, 16, 40], [DIGEST_B, 16, 40]],
    }


def ref_obj() -> dict[str, Any]:
    return {"v": 1, "manifest": "ab" * 32, "step": 5, "committed": 2.5, "writer": "w@h:1",
            "commit_id": "cd" * 16, "seq": 1, "replaces": None}


def marker_obj() -> dict[str, Any]:
    return {"format": "ckptstore", "v": 1, "hash": "blake3", "created": 1.0}


VALID_MANIFEST = pack(manifest_obj())
VALID_REF = pack(ref_obj())
VALID_MARKER = pack(marker_obj())
CHUNK_RAW = bytes(range(256)) * 2 + bytes(512)
VALID_CHUNK_NONE = b"".join(bytes(p) for p in encode_chunk(memoryview(CHUNK_RAW), Compression("none")))
VALID_CHUNK_ZSTD = b"".join(bytes(p) for p in encode_chunk(memoryview(CHUNK_RAW), Compression("zstd", level=3)))


def test_valid_bases_decode():
    """The cases below break valid objects: make sure the objects are valid to begin with."""
    manifest = decode_manifest(VALID_MANIFEST)
    assert manifest.step == 5 and len(manifest.tensors) == 2 and len(manifest.chunks) == 2
    assert decode_ref(VALID_REF).manifest == "ab" * 32
    assert decode_marker(VALID_MARKER).hash_algorithm == "blake3"
    assert decode_tree(VALID_TREE)["opt"][0][1] == (1, 2.5, None, b"x")
    assert decode_header(VALID_CHUNK_ZSTD).codec == 1
    assert bytes(decode_chunk(VALID_CHUNK_NONE, expected_raw_length=len(CHUNK_RAW))) == CHUNK_RAW
    assert bytes(decode_chunk(VALID_CHUNK_ZSTD, expected_raw_length=len(CHUNK_RAW))) == CHUNK_RAW


def mutate(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A deep copy of `obj` with the item at `path` replaced by `value` (or deleted)."""
    out = copy.deepcopy(obj)
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


# ---------------------------------------------------------------------------------------
# Bytes that are not a msgpack map at all: every msgpack decoder must say FormatError.
# ---------------------------------------------------------------------------------------
NOT_A_MAP = {
    "empty": b"",
    "reserved-byte": b"\xc1",
    "garbage": b"\xff\x00garbage\x13\x37" * 3,
    "list-top-level": pack([1, 2, 3]),
    "int-top-level": pack(5),
    "nil-top-level": pack(None),
    "str-top-level": pack("ckptstore"),
    "bytes-top-level": pack(b"\x00" * 8),
    "truncated-map-header": b"\x87",
    "map32-claims-4g-entries": b"\xdf\xff\xff\xff\xff",
    "array32-claims-4g-items": b"\xdd\xff\xff\xff\xff",
    "bin32-claims-4g-bytes": b"\xc6\xff\xff\xff\xff\x00",
    "str32-claims-4g-bytes": b"\xdb\xff\xff\xff\xff\x00",
    "unhashable-key": b"\x81\x91\x01\x02",
    "deep-nesting": b"\x91" * 100_000 + b"\xc0",
    "bad-timestamp-ext": b"\xd6\xff\x00",
}

MAP_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "manifest": decode_manifest,
    "ref": decode_ref,
    "marker": decode_marker,
}


@pytest.mark.parametrize("decoder", sorted(MAP_DECODERS))
@pytest.mark.parametrize("data", list(NOT_A_MAP.values()), ids=list(NOT_A_MAP))
def test_not_a_map(decoder: str, data: bytes):
    with pytest.raises(FormatError):
        MAP_DECODERS[decoder](data)


@pytest.mark.parametrize(("decoder", "valid"), [("manifest", VALID_MANIFEST), ("ref", VALID_REF),
                                                ("marker", VALID_MARKER)])
def test_truncated_and_padded(decoder: str, valid: bytes):
    decode = MAP_DECODERS[decoder]
    for cut in sorted({1, 2, len(valid) // 3, len(valid) // 2, len(valid) - 1}):
        with pytest.raises(FormatError):
            decode(valid[:cut])
    with pytest.raises(FormatError):  # trailing bytes after the object
        decode(valid + b"\x00")


def test_oversized_ref_and_marker():
    with pytest.raises(FormatError, match="limit"):
        decode_ref(pack(mutate(ref_obj(), ("writer",), "x" * (MAX_REF_BYTES + 1))))
    with pytest.raises(FormatError, match="limit"):
        decode_marker(pack(mutate(marker_obj(), ("pad",), b"x" * (MAX_REF_BYTES + 1))))


# ---------------------------------------------------------------------------------------
# Manifests: one broken field at a time.
# ---------------------------------------------------------------------------------------
MANIFEST_CASES: dict[str, tuple[tuple[Any, ...], Any]] = {
    # top-level fields: missing or of the wrong type
    "v-missing": (("v",), DELETE),
    "v-str": (("v",), "1"),
    "v-bool": (("v",), True),
    "v-float": (("v",), 1.0),
    "step-missing": (("step",), DELETE),
    "step-str": (("step",), "5"),
    "step-bool": (("step",), True),
    "step-float": (("step",), 5.0),
    "step-negative": (("step",), -1),
    "created-missing": (("created",), DELETE),
    "created-str": (("created",), "now"),
    "created-nil": (("created",), None),
    "tree-missing": (("tree",), DELETE),
    "tree-str": (("tree",), "not bytes"),
    "tree-nil": (("tree",), None),
    "tensors-missing": (("tensors",), DELETE),
    "tensors-map": (("tensors",), {}),
    "tensors-str": (("tensors",), "x"),
    "chunks-missing": (("chunks",), DELETE),
    "chunks-map": (("chunks",), {"a": 1}),
    "chunks-nil": (("chunks",), None),
    # chunk entries
    "chunk-entry-str": (("chunks", 0), "x"),
    "chunk-entry-short": (("chunks", 0), [DIGEST_A, 16]),
    "chunk-entry-long": (("chunks", 0), [DIGEST_A, 16, 40, 0]),
    "chunk-digest-hex-str": (("chunks", 0, 0), "00" * 32),
    "chunk-digest-too-short": (("chunks", 0, 0), b"\x01" * 4),
    "chunk-digest-too-long": (("chunks", 0, 0), b"\x01" * 65),
    "chunk-raw-negative": (("chunks", 0, 1), -1),
    "chunk-raw-bool": (("chunks", 0, 1), True),
    "chunk-raw-float": (("chunks", 0, 1), 16.0),
    "chunk-raw-nil": (("chunks", 0, 1), None),
    "chunk-raw-too-large": (("chunks", 0, 1), MAX_CHUNK_BYTES + 1),
    "chunk-stored-negative": (("chunks", 0, 2), -40),
    "chunk-stored-bool": (("chunks", 0, 2), False),
    "chunk-stored-too-large": (("chunks", 0, 2), 2**64 - 1),
    # tensor entries
    "tensor-entry-str": (("tensors", 0), "x"),
    "tensor-entry-short": (("tensors", 0), ["torch", "float32", [2, 3], [[0, 0, 16], [1, 0, 8]]]),
    "tensor-entry-long": (("tensors", 0), ["torch", "float32", [2, 3], [[0, 0, 16], [1, 0, 8]], None, 1]),
    "tensor-entry-map": (("tensors", 0), {"kind": "torch"}),
    "kind-unknown": (("tensors", 0, 0), "jax"),
    "kind-int": (("tensors", 0, 0), 1),
    "kind-nil": (("tensors", 0, 0), None),
    "dtype-int": (("tensors", 0, 1), 4),
    "dtype-bytes": (("tensors", 0, 1), b"float32"),
    "dtype-too-long": (("tensors", 1, 1), "<" + "i" * 64),
    "shape-str": (("tensors", 0, 2), "2x3"),
    "shape-map": (("tensors", 0, 2), {"0": 2}),
    "shape-negative-dim": (("tensors", 0, 2), [2, -3]),
    "shape-bool-dim": (("tensors", 0, 2), [True, 6]),
    "shape-float-dim": (("tensors", 0, 2), [2, 3.0]),
    "shape-nil-dim": (("tensors", 0, 2), [2, None]),
    "shape-too-many-dims": (("tensors", 0, 2), [1] * (MAX_DIMS + 1)),
    "shape-dim-over-limit": (("tensors", 0, 2), [2**60]),
    "shape-dim-2**64-1": (("tensors", 0, 2), [2**64 - 1]),
    "shape-2**60-elements": (("tensors", 0, 2), [2**30, 2**30]),
    "shape-2**64-elements": (("tensors", 0, 2), [2**32, 2**32]),
    "shape-byte-size-mismatch": (("tensors", 0, 2), [2, 2]),
    "shape-empty-but-bytes": (("tensors", 0, 2), [0, 3]),
    "numpy-shape-negative": (("tensors", 1, 2), [-4]),
    "segments-str": (("tensors", 0, 3), "x"),
    "segments-map": (("tensors", 0, 3), {}),
    "segment-not-list": (("tensors", 0, 3), [0, 0, 24]),
    "segment-short": (("tensors", 0, 3), [[0, 0]]),
    "segment-long": (("tensors", 0, 3), [[0, 0, 16, 0], [1, 0, 8]]),
    "segment-chunk-index-out-of-range": (("tensors", 0, 3), [[0, 0, 16], [2, 0, 8]]),
    "segment-chunk-index-huge": (("tensors", 0, 3), [[0, 0, 16], [2**63, 0, 8]]),
    "segment-chunk-index-negative": (("tensors", 0, 3), [[0, 0, 16], [-1, 0, 8]]),
    "segment-chunk-index-bool": (("tensors", 0, 3), [[False, 0, 16], [True, 0, 8]]),
    "segment-negative-offset": (("tensors", 0, 3), [[0, -8, 16], [1, 0, 8], [1, 0, 8]]),
    "segment-negative-length": (("tensors", 0, 3), [[0, 0, 16], [1, 0, 16], [1, 0, -8]]),
    "segment-offset-bool": (("tensors", 0, 3), [[0, True, 15], [1, 0, 9]]),
    "segment-length-float": (("tensors", 0, 3), [[0, 0, 16.0], [1, 0, 8]]),
    "segment-past-chunk-end": (("tensors", 0, 3), [[0, 8, 16], [1, 0, 8]]),
    "segment-offset-past-chunk-end": (("tensors", 0, 3), [[0, 17, 0], [0, 0, 16], [1, 0, 8]]),
    "segment-offset-huge": (("tensors", 0, 3), [[0, 2**63, 16], [1, 0, 8]]),
    "segments-hold-too-few-bytes": (("tensors", 0, 3), [[0, 0, 16]]),
    "segments-hold-too-many-bytes": (("tensors", 0, 3), [[0, 0, 16], [1, 0, 16]]),
    "numpy-segment-chunk-out-of-range": (("tensors", 1, 3), [[5, 0, 8]]),
    "numpy-segment-past-end": (("tensors", 1, 3), [[1, 9, 8]]),
    "placement-list": (("tensors", 0, 4), [1]),
    "placement-str": (("tensors", 0, 4), "rank0"),
}


@pytest.mark.parametrize(("path", "value"), list(MANIFEST_CASES.values()), ids=list(MANIFEST_CASES))
def test_manifest_broken_field(path: tuple[Any, ...], value: Any):
    data = pack(mutate(manifest_obj(), path, value))
    with pytest.raises(FormatError):
        decode_manifest(data)


def test_manifest_chunk_entries_without_tensors_still_checked():
    with pytest.raises(FormatError):
        decode_manifest(pack(mutate(manifest_obj(), ("chunks",), [[DIGEST_A, -1, 0]])))


def test_manifest_segment_check_holds_at_the_exact_boundary():
    # Accepted: a segment ending exactly at the chunk end, and a zero-length segment there.
    ok = mutate(manifest_obj(), ("tensors", 0, 3), [[0, 0, 16], [1, 8, 8], [1, 16, 0]])
    assert decode_manifest(pack(ok)).tensors[0].nbytes == 24
    # Rejected: one byte further.
    with pytest.raises(FormatError):
        decode_manifest(pack(mutate(manifest_obj(), ("tensors", 0, 3), [[0, 0, 16], [1, 9, 8]])))


def test_manifest_tensor_over_max_tensor_bytes_is_rejected():
    # 2**51 bytes of float32, consistently described by 2048 segments of 2**40 bytes each:
    # a 25 KB manifest that asks the reader for 2 PiB.
    obj = mutate(manifest_obj(), ("chunks",), [[DIGEST_A, MAX_CHUNK_BYTES, MAX_CHUNK_BYTES]])
    obj["tensors"] = [["torch", "float32", [2**49], [[0, 0, MAX_CHUNK_BYTES]] * 2048, None]]
    assert MAX_TENSOR_BYTES < 2**49 * 4
    with pytest.raises(FormatError):
        decode_manifest(pack(obj))


# ---------------------------------------------------------------------------------------
# Refs and markers
# ---------------------------------------------------------------------------------------
REF_CASES: dict[str, tuple[tuple[Any, ...], Any]] = {
    "v-missing": (("v",), DELETE),
    "v-bool": (("v",), True),
    "v-str": (("v",), "1"),
    "manifest-missing": (("manifest",), DELETE),
    "manifest-int": (("manifest",), 5),
    "manifest-bytes": (("manifest",), b"\xab" * 32),
    "manifest-not-hex": (("manifest",), "zz" * 32),
    "manifest-uppercase": (("manifest",), "AB" * 32),
    "manifest-too-short": (("manifest",), "ab" * 4),
    "manifest-too-long": (("manifest",), "ab" * 65),
    "manifest-path-escape": (("manifest",), "../../../../etc/passwd"),
    "step-missing": (("step",), DELETE),
    "step-str": (("step",), "5"),
    "step-bool": (("step",), True),
    "step-float": (("step",), 5.0),
    "step-negative": (("step",), -1),
    "committed-missing": (("committed",), DELETE),
    "committed-str": (("committed",), "yesterday"),
    "committed-nil": (("committed",), None),
    "writer-int": (("writer",), 5),
    "writer-missing": (("writer",), DELETE),
    "commit-id-nil": (("commit_id",), None),
    "commit-id-bytes": (("commit_id",), b"\x00" * 16),
    "seq-missing": (("seq",), DELETE),
    "seq-float": (("seq",), 1.0),
    "seq-bool": (("seq",), True),
    "seq-str": (("seq",), "1"),
    "replaces-int": (("replaces",), 5),
    "replaces-bytes": (("replaces",), b"\xab" * 32),
}


@pytest.mark.parametrize(("path", "value"), list(REF_CASES.values()), ids=list(REF_CASES))
def test_ref_broken_field(path: tuple[Any, ...], value: Any):
    with pytest.raises(FormatError):
        decode_ref(pack(mutate(ref_obj(), path, value)))


MARKER_CASES: dict[str, tuple[tuple[Any, ...], Any]] = {
    "format-missing": (("format",), DELETE),
    "format-wrong": (("format",), "ckptstorf"),
    "format-bytes": (("format",), b"ckptstore"),
    "v-missing": (("v",), DELETE),
    "v-str": (("v",), "1"),
    "v-bool": (("v",), True),
    "hash-missing": (("hash",), DELETE),
    "hash-int": (("hash",), 3),
    "created-missing": (("created",), DELETE),
    "created-str": (("created",), "now"),
}


@pytest.mark.parametrize(("path", "value"), list(MARKER_CASES.values()), ids=list(MARKER_CASES))
def test_marker_broken_field(path: tuple[Any, ...], value: Any):
    with pytest.raises(FormatError):
        decode_marker(pack(mutate(marker_obj(), path, value)))


def test_marker_unknown_hash_algorithm_is_unsupported():
    with pytest.raises(UnsupportedFormatError, match="md5"):
        decode_marker(pack(mutate(marker_obj(), ("hash",), "md5")))


# ---------------------------------------------------------------------------------------
# Unknown versions: UnsupportedFormatError (a FormatError) with a clear message.
# ---------------------------------------------------------------------------------------
def test_unsupported_format_error_is_a_format_error():
    assert issubclass(UnsupportedFormatError, FormatError)
    assert ckptstore.UnsupportedFormatError is UnsupportedFormatError


@pytest.mark.parametrize("version", [0, 2, 255, 2**32])
@pytest.mark.parametrize(("what", "obj", "decode"), [
    ("CKPTSTORE marker", marker_obj, decode_marker),
    ("ref", ref_obj, decode_ref),
    ("manifest", manifest_obj, decode_manifest),
])
def test_unknown_object_version(what: str, obj: Callable[[], dict[str, Any]], decode: Callable[[bytes], Any],
                                version: int):
    with pytest.raises(UnsupportedFormatError) as info:
        decode(pack(mutate(obj(), ("v",), version)))
    message = str(info.value)
    assert what in message and f"version {version}" in message


def test_unknown_version_checked_before_other_fields():
    # A future version may change every other field: the reader must say "newer version",
    # not "malformed".
    with pytest.raises(UnsupportedFormatError):
        decode_manifest(pack({"v": 2, "tensors": "a new layout"}))
    with pytest.raises(UnsupportedFormatError):
        decode_ref(pack({"v": 2, "target": {"manifest": "ab" * 32}}))
    with pytest.raises(UnsupportedFormatError):
        decode_marker(pack({"format": "ckptstore", "v": 2, "hash": "blake5"}))


def test_unknown_torch_dtype_is_unsupported():
    with pytest.raises(UnsupportedFormatError, match="float7"):
        decode_manifest(pack(mutate(manifest_obj(), ("tensors", 0, 1), "float7")))


def _chunk_header(*, magic: bytes = MAGIC, version: int = 1, codec: int = 0, filt: int = 0, flags: int = 0,
                  raw: int = 32, payload: int = 32) -> bytes:
    return HEADER.pack(magic, version, codec, filt, flags, raw, payload)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_chunk_version(version: int):
    blob = _chunk_header(version=version) + bytes(32)
    with pytest.raises(UnsupportedFormatError) as info:
        decode_chunk(blob, expected_raw_length=32)
    assert "chunk" in str(info.value) and f"version {version}" in str(info.value)
    with pytest.raises(UnsupportedFormatError):
        decode_header(blob)


@pytest.mark.parametrize(("field", "value"), [("codec", 2), ("codec", 255), ("filt", 1), ("flags", 1)])
def test_unknown_chunk_codec_filter_flags(field: str, value: int):
    blob = _chunk_header(**{field: value}) + bytes(32)
    with pytest.raises(UnsupportedFormatError):
        decode_chunk(blob, expected_raw_length=32)


@pytest.fixture
def memory_url() -> Iterator[str]:
    name = f"fmt-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    drop_memory_space(name)


@pytest.mark.parametrize("create", [True, False])
def test_open_store_with_marker_version_2(memory_url: str, create: bool):
    backend_store = ckptstore.open(memory_url)
    future = encode_marker(Marker("blake3", 1700000000.0, version=2))
    backend_store.backend.put(keys.MARKER, future)
    with pytest.raises(UnsupportedFormatError, match="version 2"):
        ckptstore.open(memory_url, create=create)
    assert backend_store.backend.get(keys.MARKER).data == future  # never "repaired"


def test_open_local_golden_copy_with_marker_version_2(tmp_path: Path):
    root = tmp_path / "store"
    shutil.copytree(GOLDEN / "store-v1", root)
    marker = msgpack.unpackb((root / "CKPTSTORE").read_bytes())
    marker["v"] = 2
    (root / "CKPTSTORE").write_bytes(pack(marker))
    for create in (False, True):
        with pytest.raises(UnsupportedFormatError, match="version 2"):
            ckptstore.open(root, create=create)
    assert msgpack.unpackb((root / "CKPTSTORE").read_bytes())["v"] == 2


def _plant_manifest(store: ckptstore.Store, obj: dict[str, Any], step: int = 1, ref_version: int = 1) -> None:
    """Store `obj` as a manifest and commit a ref to it, bypassing the writer."""
    store.marker  # noqa: B018 - creates the store, as the writer's first write would
    data = pack(obj)
    digest = blake3_hex(data)
    store.backend.put(keys.manifest_key(digest), data)
    ref = ref_obj() | {"manifest": digest, "step": step, "v": ref_version}
    store.backend.put(keys.step_ref_key(step), pack(ref))


def test_load_ref_and_manifest_of_version_2(memory_url: str):
    store = ckptstore.open(memory_url)
    _plant_manifest(store, manifest_obj() | {"step": 1}, step=1, ref_version=2)
    with pytest.raises(UnsupportedFormatError, match="ref"):
        store.load(1)
    _plant_manifest(store, manifest_obj() | {"step": 2, "v": 3}, step=2)  # 2 is the DCP root (manifestv2)
    with pytest.raises(UnsupportedFormatError, match="manifest has format version 3"):
        store.load(2)
    _plant_manifest(store, manifest_obj() | {"step": 3, "v": 2}, step=3)  # a v1 body claiming to be a root
    with pytest.raises(FormatError):
        store.load(3)


def test_load_chunk_of_version_2(memory_url: str):
    store = ckptstore.open(memory_url, chunking=ckptstore.ChunkingPolicy(64, 16, 128))
    import torch

    store.save(1, {"w": torch.arange(8, dtype=torch.float32)})
    (chunk,) = store.info(1).manifest.chunks
    key = keys.chunk_key(chunk.digest)
    blob = bytearray(store.backend.get(key).data)
    blob[4] = 2
    store.backend.put(key, bytes(blob))
    with pytest.raises(UnsupportedFormatError, match="version 2"):
        store.load(1)


# ---------------------------------------------------------------------------------------
# Chunk blobs
# ---------------------------------------------------------------------------------------
CHUNK_CASES: dict[str, tuple[bytes, int]] = {
    "empty": (b"", 0),
    "header-truncated": (VALID_CHUNK_NONE[:10], len(CHUNK_RAW)),
    "header-only-23-bytes": (VALID_CHUNK_NONE[:HEADER_SIZE - 1], len(CHUNK_RAW)),
    "bad-magic": (b"XXXX" + VALID_CHUNK_NONE[4:], len(CHUNK_RAW)),
    "magic-lowercase": (b"ckcb" + VALID_CHUNK_NONE[4:], len(CHUNK_RAW)),
    "zstd-frame-without-header": (VALID_CHUNK_ZSTD[HEADER_SIZE:], len(CHUNK_RAW)),
    "payload-truncated": (VALID_CHUNK_NONE[:-1], len(CHUNK_RAW)),
    "payload-missing": (VALID_CHUNK_NONE[:HEADER_SIZE], len(CHUNK_RAW)),
    "payload-extra-byte": (VALID_CHUNK_NONE + b"\x00", len(CHUNK_RAW)),
    "zstd-payload-truncated": (VALID_CHUNK_ZSTD[:-1], len(CHUNK_RAW)),
    "zstd-payload-extra-byte": (VALID_CHUNK_ZSTD + b"\x00", len(CHUNK_RAW)),
    "expected-length-differs": (VALID_CHUNK_NONE, len(CHUNK_RAW) - 1),
    "expected-length-larger": (VALID_CHUNK_NONE, len(CHUNK_RAW) + 1),
    "zstd-expected-length-differs": (VALID_CHUNK_ZSTD, len(CHUNK_RAW) + 1),
    "header-lies-raw-length": (_chunk_header(raw=33, payload=32) + bytes(32), 32),
    "header-lies-raw-length-huge": (_chunk_header(raw=2**63, payload=32) + bytes(32), 32),
    "header-lies-payload-length": (_chunk_header(raw=32, payload=31) + bytes(32), 32),
    "header-lies-payload-length-huge": (_chunk_header(raw=32, payload=2**64 - 1) + bytes(32), 32),
    "none-payload-differs-from-raw": (_chunk_header(raw=32, payload=16) + bytes(16), 32),
    "zstd-garbage-payload": (_chunk_header(codec=1, raw=32, payload=16) + b"\x28\xb5\x2f\xfd" + bytes(12), 32),
    "zstd-not-a-frame": (_chunk_header(codec=1, raw=32, payload=16) + b"not a zstd frame", 32),
    "zstd-empty-payload": (_chunk_header(codec=1, raw=32, payload=0), 32),
    "zstd-empty-payload-raw-0": (_chunk_header(codec=1, raw=0, payload=0), 0),
}


@pytest.mark.parametrize(("blob", "expected"), list(CHUNK_CASES.values()), ids=list(CHUNK_CASES))
def test_chunk_broken(blob: bytes, expected: int):
    with pytest.raises(FormatError):
        decode_chunk(blob, expected_raw_length=expected)


def test_chunk_zstd_declared_size_differs():
    frame = zstandard.ZstdCompressor(level=1).compress(bytes(100))  # declares 100
    blob = _chunk_header(codec=1, raw=64, payload=len(frame)) + frame
    with pytest.raises(FormatError, match="declares 100"):
        decode_chunk(blob, expected_raw_length=64)


def test_chunk_zstd_undeclared_size_decodes_short():
    frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(100))
    blob = _chunk_header(codec=1, raw=200, payload=len(frame)) + frame
    with pytest.raises(FormatError):
        decode_chunk(blob, expected_raw_length=200)


def _zstd_zero_run(total: int, *, declare_size: bool) -> bytes:
    """A valid zstd frame of `total` zero bytes, built from RLE blocks (4 bytes per 128 KiB).

    Crafted by hand so the test never holds the decompressed size in memory.
    """
    block = 1 << 17
    if declare_size:  # single segment, 8-byte Frame_Content_Size
        parts = [b"\x28\xb5\x2f\xfd", bytes([0xE0]), total.to_bytes(8, "little")]
    else:  # no content size; window descriptor 2**17
        parts = [b"\x28\xb5\x2f\xfd", bytes([0x00]), bytes([7 << 3])]
    remaining = total
    while remaining:
        n = min(block, remaining)
        remaining -= n
        last = 1 if remaining == 0 else 0
        parts.append((last | (1 << 1) | (n << 3)).to_bytes(3, "little") + b"\x00")  # RLE block of zeros
    return b"".join(parts)


def test_zstd_zero_run_helper_is_a_valid_frame():
    for declare in (True, False):
        frame = _zstd_zero_run(300_000, declare_size=declare)
        assert zstandard.frame_content_size(frame) == (300_000 if declare else -1)
        assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == bytes(300_000)


@pytest.mark.parametrize("declare_size", [True, False], ids=["declared-size", "undeclared-size"])
def test_chunk_zstd_decompression_bomb(declare_size: bool):
    """16 GiB of zeros in a 512 KiB frame, in a blob whose header claims 4096 raw bytes."""
    frame = _zstd_zero_run(16 << 30, declare_size=declare_size)
    assert len(frame) < 1 << 20
    blob = _chunk_header(codec=1, raw=4096, payload=len(frame)) + frame
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            decode_chunk(blob, expected_raw_length=4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"decoding a bomb allocated {peak} bytes"


def test_chunk_header_matching_bomb_is_refused_by_expected_length():
    frame = _zstd_zero_run(16 << 30, declare_size=True)
    blob = _chunk_header(codec=1, raw=16 << 30, payload=len(frame)) + frame
    with pytest.raises(FormatError, match="manifest expects 4096"):
        decode_chunk(blob, expected_raw_length=4096)


# ---------------------------------------------------------------------------------------
# State trees
# ---------------------------------------------------------------------------------------
TREE_CASES: dict[str, bytes] = {
    "empty": b"",
    "truncated": VALID_TREE[:-1],
    "garbage": b"\xc1\xc1\xc1",
    "trailing-bytes": VALID_TREE + b"\xc0",
    "unknown-ext-type": pack({"x": ext(9, b"\x00")}),
    "ext-type-0": pack(ext(0, b"")),
    "ext-type-127": pack([ext(127, b"\x00" * 4)]),
    "tensor-ref-3-bytes": pack({"x": ext(2, b"\x00\x00\x01")}),
    "tensor-ref-5-bytes": pack({"x": ext(2, b"\x00\x00\x00\x00\x01")}),
    "tensor-ref-empty": pack({"x": ext(2, b"")}),
    "tuple-holds-map": pack(ext(1, pack({"a": 1}))),
    "tuple-holds-int": pack(ext(1, pack(3))),
    "tuple-holds-garbage": pack(ext(1, b"\xc1")),
    "tuple-holds-truncated-array": pack(ext(1, b"\x93\x01")),
    "tuple-holds-trailing-bytes": pack(ext(1, pack([1]) + b"\x01")),
    "tuple-holds-unknown-ext": pack(ext(1, pack([ext(9, b"")]))),
    "unhashable-list-key": b"\x81\x91\x01\x02",
    "unhashable-map-key": b"\x81\x81\x01\x02\x03",
    "msgpack-nesting-5000": b"\x91" * 5000 + b"\xc0",
    "list-nesting-over-max-depth": b"\x91" * 1000 + b"\xc0",
    "map-nesting-over-max-depth": b"\x81\xa1k" * 1000 + b"\xc0",
    "bad-timestamp": b"\xd6\xff\x00",
    "float-key": pack({1.5: 1}),
    "bytes-key": pack({b"k": 1}),
    "bool-key": pack({True: 1}),
    "nil-key": pack({None: 1}),
}


@pytest.mark.parametrize("data", list(TREE_CASES.values()), ids=list(TREE_CASES))
def test_tree_broken(data: bytes):
    with pytest.raises(FormatError):
        decode_tree(data)


def _run_isolated(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter: for inputs that may crash the process outright."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_tree_deeply_nested_tuples_do_not_crash():
    result = _run_isolated("""
        import msgpack
        from ckptstore.errors import FormatError
        from ckptstore.tree import decode_tree
        data = msgpack.packb([])
        for _ in range(400):
            data = msgpack.packb(msgpack.ExtType(1, data))
        try:
            decode_tree(data)
        except FormatError:
            print("FormatError")
    """)
    assert result.returncode == 0, f"interpreter died with {result.returncode}: {result.stderr[-500:]}"
    assert "FormatError" in result.stdout


# ---------------------------------------------------------------------------------------
# Hostile manifests at the store level: load() must raise typed errors too.
# ---------------------------------------------------------------------------------------
def _numpy_manifest(dtype: str, shape: list[int], nbytes: int) -> dict[str, Any]:
    obj = manifest_obj()
    obj["tree"] = pack({"a": tensor_ref(0)})
    obj["chunks"] = [[DIGEST_A, max(nbytes, 1), max(nbytes, 1) + HEADER_SIZE]]
    obj["tensors"] = [["numpy", dtype, shape, [[0, 0, nbytes]] if nbytes else [], None]]
    obj["step"] = 1
    return obj


@pytest.mark.parametrize(("dtype", "shape", "nbytes"), [
    ("|O", [1], 8),              # object arrays would unpickle/point anywhere
    ("<f4,<i4", [1], 8),         # structured
    ("(2,)<i4", [1], 8),         # subarray: would load with another shape
    ("|V8", [1], 8),             # void
    (">i4", [2], 8),             # the format is little-endian
    ("not-a-dtype", [1], 8),
    ("<f4", [3], 8),             # bytes do not match shape x itemsize
    ("<f4", [2**40, 2**40], 8),  # absurd shape
])
def test_load_rejects_hostile_numpy_entries(memory_url: str, dtype: str, shape: list[int], nbytes: int):
    store = ckptstore.open(memory_url)
    _plant_manifest(store, _numpy_manifest(dtype, shape, nbytes))
    with pytest.raises(FormatError):
        store.load(1)


@pytest.mark.parametrize("dtype", ["(-1,)i4", "(99999999999,)i4", "M8[s/3]"])
def test_load_rejects_numpy_dtype_strings_numpy_refuses_with_valueerror(memory_url: str, dtype: str):
    store = ckptstore.open(memory_url)
    _plant_manifest(store, _numpy_manifest(dtype, [1], 8))
    with pytest.raises(FormatError):
        store.load(1)


def test_load_numpy_dtype_that_crashes_numpy_is_rejected_before_numpy_sees_it():
    result = _run_isolated(f"""
        import msgpack, uuid
        import ckptstore
        from ckptstore import keys
        from ckptstore.hashing import hasher
        manifest = msgpack.packb({_numpy_manifest("<M8[Y/0]", [1], 8)!r}, use_bin_type=True)
        store = ckptstore.open("memory://" + uuid.uuid4().hex)
        store.marker  # creates the store, as the writer's first write would
        digest = hasher("blake3")(manifest)
        store.backend.put(keys.manifest_key(digest), manifest)
        store.backend.put(keys.step_ref_key(1), msgpack.packb({ref_obj()!r} | {{"manifest": digest, "step": 1}}))
        try:
            store.load(1)
        except ckptstore.FormatError:
            print("FormatError")
    """)
    assert result.returncode == 0, f"interpreter died with {result.returncode}: {result.stderr[-500:]}"
    assert "FormatError" in result.stdout


def test_load_tree_referencing_missing_tensor(memory_url: str):
    store = ckptstore.open(memory_url)
    obj = _numpy_manifest("<f4", [2], 8)
    obj["tree"] = pack({"a": tensor_ref(0), "b": tensor_ref(1)})
    _plant_manifest(store, obj)
    with pytest.raises(FormatError, match="tensor 1"):
        store.load(1)


def test_load_deeply_nested_tree(memory_url: str):
    store = ckptstore.open(memory_url)
    obj = manifest_obj() | {"step": 1, "tensors": [], "chunks": [], "tree": b"\x91" * 1000 + b"\xc0"}
    _plant_manifest(store, obj)
    with pytest.raises(FormatError):
        store.load(1)


@pytest.mark.parametrize("committed", [math.inf, math.nan, 1e300])
def test_save_over_ref_with_absurd_commit_time(memory_url: str, committed: float):
    store = ckptstore.open(memory_url)
    store.backend.put(keys.step_ref_key(3), pack(ref_obj() | {"step": 3, "committed": committed}))
    with pytest.raises(ckptstore.CkptStoreError):
        store.save(3, {})


# ---------------------------------------------------------------------------------------
# Fuzzing: arbitrary bytes and random mutations of valid objects.
# ---------------------------------------------------------------------------------------
def _expect_only_format_errors(fn: Callable[[], Any]) -> None:
    """Run `fn`; success and FormatError (or a subclass) are fine, anything else fails the test."""
    with contextlib.suppress(FormatError):
        fn()


@st.composite
def mutated_bytes(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "flip", "insert", "delete", "truncate", "splice"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            data[pos:pos + 8] = draw(st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"\xcf" + b"\xff" * 8,
                                                      b"\xd3\x80" + b"\x00" * 7, b"\xdd\xff\xff\xff\xff"]))
    return bytes(data)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=40) | st.builds(ext, st.integers(0, 127), st.binary(max_size=8)),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=4) | st.integers(-(2**63), 2**64 - 1), inner, max_size=4),
    max_leaves=12,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield (*prefix, i)
            yield from _paths(value, (*prefix, i))


@st.composite
def mutated_objects(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(obj))
        path = draw(st.sampled_from(paths))
        choice = draw(st.sampled_from(["value", "value", "delete", "int", "neg"]))
        if choice == "delete":
            obj = mutate(obj, path, DELETE)
        elif choice == "int":
            obj = mutate(obj, path, draw(st.sampled_from([0, 1, -1, 2**31, 2**40, 2**63, 2**64 - 1, -(2**63)])))
        elif choice == "neg":
            obj = mutate(obj, path, draw(st.sampled_from([True, False, None, 0.5, math.nan, "", b""])))
        else:
            obj = mutate(obj, path, draw(msgpack_values))
        if not isinstance(obj, dict) or not obj:
            break
    return pack(obj)


DECODE: dict[str, Callable[[bytes], Any]] = {
    "manifest": decode_manifest,
    "ref": decode_ref,
    "marker": decode_marker,
    "tree": decode_tree,
}
VALID_BYTES = {"manifest": VALID_MANIFEST, "ref": VALID_REF, "marker": VALID_MARKER, "tree": VALID_TREE}
VALID_OBJS: dict[str, Callable[[], Any]] = {"manifest": manifest_obj, "ref": ref_obj, "marker": marker_obj,
                                            "tree": lambda: msgpack.unpackb(VALID_TREE, strict_map_key=False)}


@pytest.mark.parametrize("name", sorted(DECODE))
@FUZZ
@given(data=st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(name: str, data: bytes):
    _expect_only_format_errors(lambda: DECODE[name](data))


@pytest.mark.parametrize("name", sorted(DECODE))
@FUZZ
@given(data=st.data())
def test_fuzz_byte_mutations(name: str, data: st.DataObject):
    blob = data.draw(mutated_bytes(VALID_BYTES[name]))
    _expect_only_format_errors(lambda: DECODE[name](blob))


@pytest.mark.parametrize("name", sorted(DECODE))
@FUZZ
@given(data=st.data())
def test_fuzz_structure_mutations(name: str, data: st.DataObject):
    blob = data.draw(mutated_objects(VALID_OBJS[name]()))
    _expect_only_format_errors(lambda: DECODE[name](blob))


@FUZZ
@given(data=st.binary(max_size=600), expected=st.integers(0, 4096))
def test_fuzz_chunk_arbitrary_bytes(data: bytes, expected: int):
    _expect_only_format_errors(lambda: decode_chunk(data, expected_raw_length=expected))


@FUZZ
@given(data=st.data(), zstd=st.booleans(), expected_delta=st.sampled_from([0, 0, 0, -1, 1]))
def test_fuzz_chunk_mutations(data: st.DataObject, zstd: bool, expected_delta: int):
    blob = data.draw(mutated_bytes(VALID_CHUNK_ZSTD if zstd else VALID_CHUNK_NONE))
    expected = len(CHUNK_RAW) + expected_delta
    _expect_only_format_errors(lambda: decode_chunk(blob, expected_raw_length=expected))


@FUZZ
@given(data=st.data())
def test_fuzz_chunk_header_fields(data: st.DataObject):
    header = _chunk_header(
        magic=data.draw(st.sampled_from([MAGIC, b"CKCA", b"\x00" * 4])),
        version=data.draw(st.integers(0, 255)),
        codec=data.draw(st.integers(0, 255)),
        filt=data.draw(st.sampled_from([0, 0, 1, 255])),
        flags=data.draw(st.sampled_from([0, 0, 1, 128])),
        raw=data.draw(st.sampled_from([0, 1, len(CHUNK_RAW), 2**40, 2**64 - 1])),
        payload=data.draw(st.sampled_from([0, 1, len(CHUNK_RAW), len(VALID_CHUNK_ZSTD) - HEADER_SIZE, 2**64 - 1])),
    )
    body = data.draw(st.sampled_from([VALID_CHUNK_NONE[HEADER_SIZE:], VALID_CHUNK_ZSTD[HEADER_SIZE:], b""]))
    _expect_only_format_errors(lambda: decode_chunk(header + body, expected_raw_length=len(CHUNK_RAW)))
