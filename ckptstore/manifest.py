"""The store's small objects: the CKPTSTORE marker, manifests and refs (msgpack, versioned).

Pure functions: bytes in, dataclasses out, and back. Decoders treat their input as hostile:
anything malformed is a FormatError (UnsupportedFormatError for an unknown version) before
any large allocation. The byte layout is documented in docs/FORMAT.md.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ckptstore.chunkblob import HEADER_SIZE
from ckptstore.dtypes import KIND_NUMPY_SCALAR, KIND_TORCH, KINDS, TORCH_DTYPE_SIZES, numpy_itemsize
from ckptstore.errors import FormatError, ObjectTooLargeError, UnsupportedFormatError
from ckptstore.hashing import algorithms
from ckptstore.keys import MAX_STEP
from ckptstore.tree import decode_tree

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
# Decoding caps (docs/FORMAT.md, "Reader validation"). msgpack spends at least one byte per
# object, but one byte can become a 56-232 byte Python object (an empty list or a dict), so
# counts are capped per field before the objects exist, not after.
MAX_CHUNKS = MAX_TENSORS
MAX_SEGMENTS = 1 << 22          # per tensor: 4M segments of 16 MiB chunks is 64 TiB
MAX_LOGICAL_BYTES = 1 << 50     # sum of all tensors' bytes in one manifest
MAX_FREEFORM_ITEMS = 1 << 20    # containers + their items in `metadata` (and in unknown fields)
MAX_PLACEMENT_ITEMS = 4 * MAX_DIMS + 64
MAX_MAP_ITEMS = MAX_FREEFORM_ITEMS
MAX_FIELDS = 64                 # top-level fields of a manifest, ref or marker


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class _ItemBudget:
    """msgpack list/map hooks that count containers and their items against a limit.

    The hooks run as each container is completed, so at most one container past the limit
    (itself capped by the Unpacker's max_array_len / max_map_len) exists before we stop.
    """

    def __init__(self) -> None:
        self.left = 0
        self.what = ""

    def allow(self, items: int, what: str) -> None:
        self.left, self.what = items, what

    def _spend(self, container: Any) -> Any:
        self.left -= 1 + len(container)
        if self.left < 0:
            raise FormatError(f"{self.what} holds more nested values than this reader allows")
        return container


def _unpacker(size: int, budget: _ItemBudget) -> msgpack.Unpacker:
    """An Unpacker whose every length is capped, for `size` bytes of input.

    Array lengths are capped by the input size only (each entry takes a byte): the arrays
    that may be long are read entry by entry, with their own limits, by _unpack_array.
    """
    size = max(size, 1)
    return msgpack.Unpacker(
        raw=False, strict_map_key=False, use_list=True, max_buffer_size=size,
        max_str_len=size, max_bin_len=size, max_ext_len=size,
        max_array_len=size, max_map_len=min(size, MAX_MAP_ITEMS),
        list_hook=budget._spend, object_hook=budget._spend,
    )


# Reads one entry of an array field from the stream, within the budget.
EntryReader = Callable[[msgpack.Unpacker, _ItemBudget, str], Any]


def _unpack_map(data: bytes, what: str, limit: int, version: int, *,
                arrays: dict[str, tuple[int, EntryReader]] | None = None) -> dict[str, Any]:
    """Decode a top-level msgpack map with capped lengths and nesting budgets.

    `arrays` names fields that are arrays of many entries: name -> (max entries, reader).
    All other fields share MAX_FREEFORM_ITEMS. A `v` other than `version` is an
    UnsupportedFormatError as soon as it is read (writers put `v` first), so a newer
    layout is reported as newer, not as malformed.
    """
    if len(data) > limit:
        raise FormatError(f"{what} is {len(data)} bytes, over the {limit}-byte limit")
    arrays = arrays or {}
    budget = _ItemBudget()
    unpacker = _unpacker(len(data), budget)
    try:
        unpacker.feed(data)
        try:
            count = unpacker.read_map_header()
        except ValueError:
            raise FormatError(f"corrupt {what}: top level is not a map") from None
        if count > MAX_FIELDS:
            raise FormatError(f"corrupt {what}: {count} fields")
        obj: dict[str, Any] = {}
        freeform_left = MAX_FREEFORM_ITEMS  # shared by all free-form fields
        for _ in range(count):
            budget.allow(0, what)
            name = unpacker.unpack()
            if not isinstance(name, str) or name in obj:
                raise FormatError(f"corrupt {what}: field name {name!r} is not a new string")
            if name in arrays:
                obj[name] = _unpack_array(unpacker, budget, f"{what} field {name!r}", *arrays[name])
            else:
                budget.allow(freeform_left, f"{what} field {name!r}")
                obj[name] = unpacker.unpack()
                freeform_left = budget.left
            if name == "v":
                _check_version(obj, version, what)
        if unpacker.tell() != len(data):
            raise FormatError(f"corrupt {what}: {len(data) - unpacker.tell()} bytes after the map")
    except FormatError:
        raise
    except msgpack.OutOfData:
        raise FormatError(f"corrupt {what}: truncated") from None
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise FormatError(f"corrupt {what}: {exc}") from exc
    _check_version(obj, version, what)
    return obj


def _unpack_array(unpacker: msgpack.Unpacker, budget: _ItemBudget, what: str, max_entries: int,
                  read_entry: EntryReader) -> Any:
    """An array of entries, its length checked before any entry is decoded."""
    count = _array_header(unpacker, budget, what)
    if count is None:
        return unpacker.unpack()
    if count > max_entries:
        raise FormatError(f"{what}: {count} entries is over the limit of {max_entries}")
    return [read_entry(unpacker, budget, what) for _ in range(count)]


def _array_header(unpacker: msgpack.Unpacker, budget: _ItemBudget, what: str) -> int | None:
    """The length of the array that comes next, or None when the next value is not an array:
    the caller then reads it whole (budgeted as small) for the type check after the version check."""
    try:
        return int(unpacker.read_array_header())
    except ValueError as exc:
        if "Unexpected type" not in str(exc):
            raise
        budget.allow(MAX_PLACEMENT_ITEMS, what)
        return None


def _small_value(items: int) -> EntryReader:
    """Reader of one value holding at most `items` containers and items."""

    def read(unpacker: msgpack.Unpacker, budget: _ItemBudget, what: str) -> Any:
        budget.allow(items, what)
        return unpacker.unpack()

    return read


def _read_tensor_entry(unpacker: msgpack.Unpacker, budget: _ItemBudget, what: str) -> Any:
    """[kind, dtype, shape, segments, placement], each part within its own budget, so no
    part (a placement, say) can spend what the segments of a huge tensor are allowed.
    Hot path (once per tensor): budgets are set per part, not per value."""
    count = _array_header(unpacker, budget, what)
    if count is None:
        return unpacker.unpack()
    if count != 5:
        raise FormatError(f"{what}: {count} fields, not 5")
    unpack = unpacker.unpack
    budget.allow(1 + MAX_DIMS, what)  # kind, dtype, shape: only the shape is a container
    kind, dtype, shape = unpack(), unpack(), unpack()
    n = _array_header(unpacker, budget, what)
    if n is None:
        segments = unpack()
    else:
        if n > MAX_SEGMENTS:
            raise FormatError(f"{what}: {n} segments is over the limit of {MAX_SEGMENTS}")
        budget.allow(4 * n, what)  # n arrays of 3 ints
        segments = [unpack() for _ in range(n)]
    budget.allow(MAX_PLACEMENT_ITEMS, what)
    return [kind, dtype, shape, segments, unpack()]


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
    obj = _unpack_map(data, what, MAX_REF_BYTES, FORMAT_VERSION)
    if obj.get("format") != MARKER_MAGIC:
        raise FormatError(f"{what}: not a ckptstore marker")
    algorithm = _field(obj, "hash", str, what)
    if algorithm not in algorithms():
        raise UnsupportedFormatError(f"{what}: hash algorithm {algorithm!r} unknown; known: {algorithms()}")
    return Marker(algorithm, _time(obj, "created", what))


# -- refs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepSummary:
    """What `ls` shows of a step, kept in its ref so no manifest is read for it.
    new_bytes: stored bytes of the chunks the writer uploaded ("new when saved")."""

    tensors: int
    logical_bytes: int
    stored_bytes: int
    new_bytes: int
    chunks: int


SUMMARY_FIELDS = ("tensors", "logical_bytes", "stored_bytes", "new_bytes", "chunks")


def summarize(manifest: Manifest, new_bytes: int, stored_bytes: int | None = None) -> StepSummary:
    """The summary of a step committed with `manifest` (whose chunks are stored as
    `stored_bytes`, default the manifest's own sizes) that uploaded `new_bytes`."""
    stored = manifest.stored_bytes if stored_bytes is None else stored_bytes
    return StepSummary(len(manifest.tensors), manifest.logical_bytes, stored, new_bytes, len(manifest.chunks))


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
    summary: StepSummary | None = None  # absent in refs written before it existed


def encode_ref(ref: Ref) -> bytes:
    """The ref's bytes; ObjectTooLargeError (nothing is written) if readers would refuse them.
    The summary is an extra field: readers that predate it skip unknown fields (format v1)."""
    obj: dict[str, Any] = {"v": REF_VERSION, "manifest": ref.manifest, "step": ref.step,
                           "committed": ref.committed, "writer": ref.writer, "commit_id": ref.commit_id,
                           "seq": ref.seq, "replaces": ref.replaces}
    if ref.summary is not None:
        obj["summary"] = {name: getattr(ref.summary, name) for name in SUMMARY_FIELDS}
    data = _pack(obj)
    _within(f"the ref of step {ref.step}", len(data), MAX_REF_BYTES, "bytes",
            advice="use a shorter writer identity")
    return data


def decode_ref(data: bytes) -> Ref:
    what = "ref"
    obj = _unpack_map(data, what, MAX_REF_BYTES, REF_VERSION)
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
        summary=_decode_summary(obj.get("summary"), what),
    )


def _decode_summary(value: Any, what: str) -> StepSummary | None:
    """The ref's summary, or None when absent; fields other than SUMMARY_FIELDS are ignored
    (a later writer may add some)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FormatError(f"{what}: field 'summary' is not a map")
    limits = {"tensors": MAX_TENSORS, "chunks": MAX_CHUNKS}
    return StepSummary(*(_int_in(value.get(name), 0, limits.get(name, 2**63), f"{what} summary {name}")
                         for name in SUMMARY_FIELDS))


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
    """The manifest's bytes, checked against every limit decode_manifest enforces, so that no
    writer (save, DCP, cp, import) stores a manifest that cannot be read back: ObjectTooLargeError."""
    data = _pack({
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
    check_manifest_limits(manifest, len(data))
    return data


def _within(what: str, size: int, limit: int, unit: str, advice: str = "") -> None:
    if size > limit:
        raise ObjectTooLargeError(what, size, limit, unit, advice)


def _items(value: Any) -> int:
    """Containers plus their items, as the decoders' budgets count them (_ItemBudget)."""
    if isinstance(value, dict):
        return 1 + len(value) + sum(_items(k) + _items(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return 1 + len(value) + sum(_items(v) for v in value)
    return 0


def check_manifest_limits(manifest: Manifest, size: int) -> None:
    """Every cap decode_manifest (and decode_tree) applies, checked on the writer's side.
    The limits are read at call time: the module constants are the single source."""
    what = f"the manifest of step {manifest.step}"
    _within(what, size, MAX_MANIFEST_BYTES, "bytes")
    _within(what, len(manifest.tensors), MAX_TENSORS, "tensors")
    _within(what, len(manifest.chunks), MAX_CHUNKS, "chunks")
    _within(f"{what}: its metadata", _items(manifest.metadata), MAX_FREEFORM_ITEMS, "values",
            advice="keep large values out of `metadata`")
    logical = 0
    for i, tensor in enumerate(manifest.tensors):
        _within(f"{what}: tensor {i}", len(tensor.segments), MAX_SEGMENTS, "segments",
                advice="save it with a larger chunk size")
        _within(f"{what}: tensor {i}", len(tensor.shape), MAX_DIMS, "dimensions")
        _within(f"{what}: tensor {i}'s placement", _items(tensor.placement), MAX_PLACEMENT_ITEMS, "values")
        _within(f"{what}: tensor {i}", tensor.nbytes, MAX_TENSOR_BYTES, "bytes")
        logical += tensor.nbytes
    _within(what, logical, MAX_LOGICAL_BYTES, "tensor bytes")
    try:
        decode_tree(manifest.tree)  # its item and depth budgets live in ckptstore.tree
    except FormatError as exc:
        raise ObjectTooLargeError(f"{what}: its state tree", len(manifest.tree), MAX_MANIFEST_BYTES,
                                  reason=f"is refused by readers ({exc})") from None


def _int_in(value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FormatError(f"{what}: {value!r} is not an int in [{low}, {high}]")
    return value


def decode_manifest(data: bytes) -> Manifest:
    """Decode and validate a manifest; every reference and size is checked before use."""
    what = "manifest"
    obj = _unpack_map(data, what, MAX_MANIFEST_BYTES, MANIFEST_VERSION, arrays={
        "tensors": (MAX_TENSORS, _read_tensor_entry),
        "chunks": (MAX_CHUNKS, _small_value(4)),
    })
    raw_chunks = _field(obj, "chunks", list, what)
    chunks = []
    for i, item in enumerate(raw_chunks):
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], bytes):
            raise FormatError(f"{what}: chunk entry {i} malformed")
        if not 8 <= len(item[0]) <= 64:
            raise FormatError(f"{what}: chunk entry {i} has a {len(item[0])}-byte digest")
        raw_size = _int_in(item[1], 0, MAX_CHUNK_BYTES, what)
        # A blob is its header plus at most the raw bytes (zstd output is kept only if smaller).
        stored_size = _int_in(item[2], HEADER_SIZE, HEADER_SIZE + raw_size, f"{what} chunk entry {i} stored size")
        chunks.append(ChunkEntry(item[0].hex(), raw_size, stored_size))
    raw_tensors = _field(obj, "tensors", list, what)
    if len(raw_tensors) > MAX_TENSORS:
        raise FormatError(f"{what}: {len(raw_tensors)} tensors is over the limit")
    tensors = []
    logical = 0
    for i, item in enumerate(raw_tensors):
        tensors.append(_decode_tensor(i, item, chunks))
        # What load allocates: bound the total, not only each tensor.
        logical += tensors[-1].nbytes
        if logical > MAX_LOGICAL_BYTES:
            raise FormatError(f"{what}: tensors hold over {MAX_LOGICAL_BYTES} bytes in total")
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
    # Every element takes at least one byte (numpy "S0"-like dtypes aside): a shape with more
    # elements than the byte limit cannot be real, whatever the dtype.
    elements = math.prod(dims)
    if elements > MAX_TENSOR_BYTES:
        raise FormatError(f"{what}: shape {list(dims)[:8]} has {elements} elements, over the limit")
    if kind == KIND_NUMPY_SCALAR and dims:
        raise FormatError(f"{what}: a numpy scalar has shape [], not {list(dims)[:8]}")
    if not isinstance(segments, list) or len(segments) > MAX_SEGMENTS:
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
    itemsize = TORCH_DTYPE_SIZES[dtype] if kind == KIND_TORCH else numpy_itemsize(dtype)
    # numpy dtypes outside the allowlist have no itemsize here; load refuses them.
    if itemsize is not None:
        expected = elements * itemsize
        if total != expected:
            raise FormatError(f"{what}: segments hold {total} bytes, shape {list(dims)} of {dtype} needs {expected}")
    if placement is not None and not isinstance(placement, dict):
        raise FormatError(f"{what}: malformed placement")
    return TensorEntry(kind, dtype, dims, tuple(checked), placement)
