"""The store's small objects: the CKPTSTORE marker, manifests and refs (msgpack, versioned).

Pure functions: bytes in, dataclasses out, and back. Decoders treat their input as hostile:
anything malformed is a FormatError (UnsupportedFormatError for an unknown version) before
any large allocation. The byte layout is documented in docs/FORMAT.md.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ckptstore.dtypes import KIND_TORCH, KINDS, TORCH_DTYPE_SIZES
from ckptstore.errors import FormatError, UnsupportedFormatError
from ckptstore.hashing import algorithms
from ckptstore.keys import MAX_STEP

FORMAT_VERSION = 1
MARKER_MAGIC = "ckptstore"
MANIFEST_VERSION = 1
REF_VERSION = 1

# Bounds that keep a hostile manifest from asking for absurd work or memory.
MAX_MANIFEST_BYTES = 256 << 20
MAX_REF_BYTES = 64 << 10
MAX_TENSORS = 10_000_000
MAX_DIMS = 64
MAX_CHUNK_BYTES = 1 << 40
MAX_TENSOR_BYTES = 1 << 50
MAX_TIMESTAMP = 10**11


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack_map(data: bytes, what: str, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise FormatError(f"{what} is {len(data)} bytes, over the {limit}-byte limit")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise FormatError(f"corrupt {what}: {exc}") from exc
    if not isinstance(obj, dict):
        raise FormatError(f"corrupt {what}: top level is {type(obj).__name__}, not a map")
    return obj


def _field(obj: dict[str, Any], name: str, types: type | tuple[type, ...], what: str) -> Any:
    if name not in obj:
        raise FormatError(f"{what}: missing field {name!r}")
    value = obj[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise FormatError(f"{what}: field {name!r} has type bool")
    if not isinstance(value, types):
        raise FormatError(f"{what}: field {name!r} has type {type(value).__name__}")
    return value


def _time(obj: dict[str, Any], name: str, what: str) -> float:
    """A Unix timestamp field: finite, from 1970 to year ~5000 (so it can be formatted)."""
    value = _field(obj, name, (int, float), what)
    if not (math.isfinite(value) and 0 <= value < MAX_TIMESTAMP):
        raise FormatError(f"{what}: field {name!r} is not a plausible Unix time: {value!r}")
    return float(value)


def _check_version(obj: dict[str, Any], supported: int, what: str) -> None:
    version = _field(obj, "v", int, what)
    if version != supported:
        raise UnsupportedFormatError(
            f"{what} has format version {version}; this ckptstore reads version {supported}. "
            f"Upgrade ckptstore to read this store."
        )


# -- CKPTSTORE marker ---------------------------------------------------------------------
@dataclass(frozen=True)
class Marker:
    """The store marker: format version and hash algorithm."""

    hash_algorithm: str
    created: float
    version: int = FORMAT_VERSION


def encode_marker(marker: Marker) -> bytes:
    return _pack({"format": MARKER_MAGIC, "v": marker.version, "hash": marker.hash_algorithm,
                  "created": marker.created})


def decode_marker(data: bytes) -> Marker:
    what = "CKPTSTORE marker"
    obj = _unpack_map(data, what, MAX_REF_BYTES)
    if obj.get("format") != MARKER_MAGIC:
        raise FormatError(f"{what}: not a ckptstore marker")
    _check_version(obj, FORMAT_VERSION, what)
    algorithm = _field(obj, "hash", str, what)
    if algorithm not in algorithms():
        raise UnsupportedFormatError(f"{what}: hash algorithm {algorithm!r} unknown; known: {algorithms()}")
    return Marker(algorithm, _time(obj, "created", what))


# -- refs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ref:
    """A pointer to a manifest: what a step (or tag) resolves to."""

    manifest: str
    step: int
    committed: float
    writer: str
    commit_id: str = field(default_factory=lambda: secrets.token_hex(16))
    seq: int = 1
    replaces: str | None = None


def encode_ref(ref: Ref) -> bytes:
    return _pack({"v": REF_VERSION, "manifest": ref.manifest, "step": ref.step,
                  "committed": ref.committed, "writer": ref.writer, "commit_id": ref.commit_id,
                  "seq": ref.seq, "replaces": ref.replaces})


def decode_ref(data: bytes) -> Ref:
    what = "ref"
    obj = _unpack_map(data, what, MAX_REF_BYTES)
    _check_version(obj, REF_VERSION, what)
    replaces = obj.get("replaces")
    if replaces is not None and not isinstance(replaces, str):
        raise FormatError("ref: field 'replaces' is not a string")
    manifest = _field(obj, "manifest", str, what)
    _check_hex(manifest, what)
    if replaces is not None:
        _check_hex(replaces, what)
    return Ref(
        manifest=manifest,
        step=_int_in(obj.get("step"), 0, MAX_STEP, what),
        committed=_time(obj, "committed", what),
        writer=_field(obj, "writer", str, what),
        commit_id=_field(obj, "commit_id", str, what),
        seq=_int_in(obj.get("seq"), 1, 2**63, what),
        replaces=replaces,
    )


def _check_hex(value: str, what: str) -> None:
    if not 16 <= len(value) <= 128 or any(c not in "0123456789abcdef" for c in value):
        raise FormatError(f"{what}: {value[:80]!r} is not a hex digest")


# -- manifests ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkEntry:
    """One chunk a manifest references: its hash and sizes (raw = hashed, stored = blob)."""

    digest: str
    raw_size: int
    stored_size: int


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: kind, dtype, shape, and its bytes as (chunk index, offset, length) segments."""

    kind: str
    dtype: str
    shape: tuple[int, ...]
    segments: tuple[tuple[int, int, int], ...]
    placement: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        return sum(length for _, _, length in self.segments)


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild one saved state."""

    step: int
    created: float
    metadata: Any
    tree: bytes  # packed state tree, see ckptstore.tree
    tensors: tuple[TensorEntry, ...]
    chunks: tuple[ChunkEntry, ...]

    @property
    def logical_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(c.stored_size for c in self.chunks)


def encode_manifest(manifest: Manifest) -> bytes:
    return _pack({
        "v": MANIFEST_VERSION,
        "step": manifest.step,
        "created": manifest.created,
        "metadata": manifest.metadata,
        "tree": manifest.tree,
        "tensors": [
            [t.kind, t.dtype, list(t.shape), [list(s) for s in t.segments], t.placement]
            for t in manifest.tensors
        ],
        "chunks": [[bytes.fromhex(c.digest), c.raw_size, c.stored_size] for c in manifest.chunks],
    })


def _int_in(value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FormatError(f"{what}: {value!r} is not an int in [{low}, {high}]")
    return value


def decode_manifest(data: bytes) -> Manifest:
    """Decode and validate a manifest; every reference and size is checked before use."""
    what = "manifest"
    obj = _unpack_map(data, what, MAX_MANIFEST_BYTES)
    _check_version(obj, MANIFEST_VERSION, what)
    raw_chunks = _field(obj, "chunks", list, what)
    chunks = []
    for i, item in enumerate(raw_chunks):
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], bytes):
            raise FormatError(f"{what}: chunk entry {i} malformed")
        if not 8 <= len(item[0]) <= 64:
            raise FormatError(f"{what}: chunk entry {i} has a {len(item[0])}-byte digest")
        chunks.append(ChunkEntry(item[0].hex(), _int_in(item[1], 0, MAX_CHUNK_BYTES, what),
                                 _int_in(item[2], 0, MAX_CHUNK_BYTES, what)))
    raw_tensors = _field(obj, "tensors", list, what)
    if len(raw_tensors) > MAX_TENSORS:
        raise FormatError(f"{what}: {len(raw_tensors)} tensors is over the limit")
    tensors = [_decode_tensor(i, item, chunks) for i, item in enumerate(raw_tensors)]
    return Manifest(
        step=_int_in(obj.get("step"), 0, MAX_STEP, what),
        created=_time(obj, "created", what),
        metadata=obj.get("metadata"),
        tree=_field(obj, "tree", bytes, what),
        tensors=tuple(tensors),
        chunks=tuple(chunks),
    )


def _decode_tensor(i: int, item: Any, chunks: list[ChunkEntry]) -> TensorEntry:
    what = f"manifest tensor {i}"
    if not isinstance(item, list) or len(item) != 5:
        raise FormatError(f"{what}: malformed entry")
    kind, dtype, shape, segments, placement = item
    if kind not in KINDS or not isinstance(dtype, str) or len(dtype) > 64:
        raise FormatError(f"{what}: unknown kind {kind!r} or dtype {dtype!r}")
    if kind == KIND_TORCH and dtype not in TORCH_DTYPE_SIZES:
        raise UnsupportedFormatError(f"{what}: torch dtype {dtype!r} unknown to this reader")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise FormatError(f"{what}: malformed shape")
    dims = tuple(_int_in(d, 0, MAX_TENSOR_BYTES, what) for d in shape)
    if not isinstance(segments, list):
        raise FormatError(f"{what}: malformed segments")
    checked = []
    total = 0
    for seg in segments:
        if not isinstance(seg, list) or len(seg) != 3:
            raise FormatError(f"{what}: malformed segment")
        index = _int_in(seg[0], 0, len(chunks) - 1, what)
        offset = _int_in(seg[1], 0, MAX_CHUNK_BYTES, what)
        length = _int_in(seg[2], 0, MAX_CHUNK_BYTES, what)
        if offset + length > chunks[index].raw_size:
            raise FormatError(f"{what}: segment [{offset}, {offset + length}) past chunk end {chunks[index].raw_size}")
        checked.append((index, offset, length))
        total += length
    if total > MAX_TENSOR_BYTES:
        raise FormatError(f"{what}: {total} bytes is over the {MAX_TENSOR_BYTES}-byte limit per tensor")
    if kind == KIND_TORCH:
        expected = math.prod(dims) * TORCH_DTYPE_SIZES[dtype]
        if total != expected:
            raise FormatError(f"{what}: segments hold {total} bytes, shape {list(dims)} of {dtype} needs {expected}")
    if placement is not None and not isinstance(placement, dict):
        raise FormatError(f"{what}: malformed placement")
    return TensorEntry(kind, dtype, dims, tuple(checked), placement)
