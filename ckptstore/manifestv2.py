"""Manifest format version 2: a small root, per-writer parts, and compact chunk tables.

A version 1 manifest lists every tensor and chunk in one object, which grows with ranks x
fields (a 70B model's DCP step over 1024 ranks: 311 MiB, past the reader's cap). Version 2
splits it (docs/FORMAT.md, "Manifest version 2"):

- the *root* (at manifests/<digest>, like a v1 manifest): step, created, metadata, tree,
  totals, and the digests of its parts and chunk tables;
- *parts*: one per writer (a DCP rank), each a v1-encoded manifest body holding that
  writer's tensors and their chunks, stored as a chunk blob (content-addressed, hash-checked,
  protected by the chunk protocol like any chunk);
- *chunk tables*: every data chunk of the step once, sorted by digest, with its sizes, in
  fixed-width binary arrays, also stored as chunk blobs. gc, `ls`, `du` and `verify` read them
  without the parts.

Pure functions, as ckptstore.manifest: bytes in, dataclasses out. Decoders treat input as
hostile: FormatError before any large allocation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ckptstore.chunkblob import HEADER_SIZE
from ckptstore.errors import FormatError
from ckptstore.keys import MAX_STEP
from ckptstore.manifest import (
    MAX_CHUNK_BYTES,
    MAX_LOGICAL_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_TENSORS,
    ChunkEntry,
    Manifest,
    _field,
    _int_in,
    _items,
    _pack,
    _small_value,
    _time,
    _unpack_map,
    _within,
    decode_manifest,
    encode_manifest,
)
from ckptstore.tree import decode_tree, encode_tree

ROOT_VERSION = 2
TABLE_VERSION = 1
#: Bounds a reader enforces on a root.
MAX_ROOT_BYTES = 64 << 20
MAX_PARTS = 1 << 20
MAX_CHUNK_TABLES = 1 << 12
#: Entries per chunk table (a writer splits at this; a reader refuses more): 48 MiB of a table
#: with 32-byte digests, so 10^7 chunks are 10 tables.
TABLE_ENTRIES = 1 << 20
MAX_TABLE_BYTES = TABLE_ENTRIES * (64 + 16) + 4096
_U64 = "<u8"


@dataclass(frozen=True)
class BlobRef:
    """A part or chunk table the root names: a chunk blob, and how many entries it holds
    (tensors of a part, chunks of a table)."""

    digest: str
    raw_size: int
    stored_size: int
    count: int

    @property
    def entry(self) -> ChunkEntry:
        return ChunkEntry(self.digest, self.raw_size, self.stored_size)


@dataclass(frozen=True)
class RootManifest:
    """A version 2 manifest: what every reader needs, and where the rest is."""

    step: int
    created: float
    metadata: Any
    tree: bytes
    parts: tuple[BlobRef, ...]
    chunk_tables: tuple[BlobRef, ...]
    tensors: int          # sum of the parts' tensors
    chunks: int           # data chunks (the chunk tables' entries)
    logical_bytes: int
    stored_bytes: int     # of the data chunks

    @property
    def blobs(self) -> tuple[ChunkEntry, ...]:
        """The chunk blobs the root itself names: its parts, then its chunk tables."""
        return tuple(b.entry for b in self.parts + self.chunk_tables)


def _blob_list(blobs: tuple[BlobRef, ...]) -> list[list[Any]]:
    return [[bytes.fromhex(b.digest), b.raw_size, b.stored_size, b.count] for b in blobs]


def encode_root(root: RootManifest) -> bytes:
    """The root's bytes, checked against every limit decode_root enforces
    (ObjectTooLargeError: nothing is written)."""
    data = _pack({
        "v": ROOT_VERSION, "step": root.step, "created": root.created, "metadata": root.metadata,
        "tree": root.tree, "parts": _blob_list(root.parts), "chunk_tables": _blob_list(root.chunk_tables),
        "tensors": root.tensors, "chunks": root.chunks, "logical_bytes": root.logical_bytes,
        "stored_bytes": root.stored_bytes,
    })
    what = f"the manifest root of step {root.step}"
    _within(what, len(data), MAX_ROOT_BYTES, "bytes")
    _within(what, len(root.parts), MAX_PARTS, "parts")
    _within(what, len(root.chunk_tables), MAX_CHUNK_TABLES, "chunk tables")
    _within(what, root.tensors, MAX_TENSORS * MAX_PARTS, "tensors")
    _within(f"{what}: its metadata", _items(root.metadata), 1 << 20, "values",
            advice="keep large values out of `metadata`")
    decode_root(data)  # the tree's budgets, the totals' bounds: whatever a reader refuses
    return data


def _read_blobs(raw: Any, what: str, limit: int, max_raw: int, max_count: int) -> tuple[BlobRef, ...]:
    if not isinstance(raw, list) or len(raw) > limit:
        raise FormatError(f"{what}: malformed or over {limit} entries")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, list) or len(item) != 4 or not isinstance(item[0], bytes):
            raise FormatError(f"{what}: entry {i} malformed")
        if not 8 <= len(item[0]) <= 64:
            raise FormatError(f"{what}: entry {i} has a {len(item[0])}-byte digest")
        raw_size = _int_in(item[1], 1, max_raw, f"{what} entry {i} size")
        stored = _int_in(item[2], HEADER_SIZE, HEADER_SIZE + raw_size, f"{what} entry {i} stored size")
        out.append(BlobRef(item[0].hex(), raw_size, stored, _int_in(item[3], 0, max_count, f"{what} entry {i}")))
    return tuple(out)


def decode_root(data: bytes) -> RootManifest:
    """Decode and validate a version 2 root."""
    what = "manifest root"
    blob_entry = _small_value(5)
    obj = _unpack_map(data, what, MAX_ROOT_BYTES, ROOT_VERSION, arrays={
        "parts": (MAX_PARTS, blob_entry), "chunk_tables": (MAX_CHUNK_TABLES, blob_entry)})
    tree = _field(obj, "tree", bytes, what)
    decode_tree(tree)  # FormatError past its budgets
    root = RootManifest(
        step=_int_in(obj.get("step"), 0, MAX_STEP, what),
        created=_time(obj, "created", what),
        metadata=obj.get("metadata"),
        tree=tree,
        parts=_read_blobs(obj.get("parts"), f"{what} parts", MAX_PARTS, MAX_MANIFEST_BYTES, MAX_TENSORS),
        chunk_tables=_read_blobs(obj.get("chunk_tables"), f"{what} chunk tables", MAX_CHUNK_TABLES,
                                 MAX_TABLE_BYTES, TABLE_ENTRIES),
        tensors=_int_in(obj.get("tensors"), 0, MAX_TENSORS * MAX_PARTS, what),
        chunks=_int_in(obj.get("chunks"), 0, TABLE_ENTRIES * MAX_CHUNK_TABLES, what),
        logical_bytes=_int_in(obj.get("logical_bytes"), 0, MAX_LOGICAL_BYTES, what),
        stored_bytes=_int_in(obj.get("stored_bytes"), 0, 2**63, what),
    )
    if sum(p.count for p in root.parts) != root.tensors:
        raise FormatError(f"{what}: its parts hold {sum(p.count for p in root.parts)} tensors, not {root.tensors}")
    if sum(t.count for t in root.chunk_tables) != root.chunks:
        raise FormatError(f"{what}: its chunk tables hold {sum(t.count for t in root.chunk_tables)} chunks, "
                          f"not {root.chunks}")
    return root


def manifest_version(data: bytes) -> int:
    """The `v` of a manifest object (writers put it first), read without decoding the rest;
    FormatError when it is not there."""
    import msgpack

    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(data), 1), max_str_len=16,
                                max_bin_len=0, max_array_len=0, max_map_len=0, max_ext_len=0)
    unpacker.feed(data[:64])
    try:
        count = unpacker.read_map_header()
        if count < 1 or unpacker.unpack() != "v":
            raise FormatError("manifest: its first field is not `v`")
        version = unpacker.unpack()
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(f"corrupt manifest: {exc}") from None
    if isinstance(version, bool) or not isinstance(version, int):
        raise FormatError(f"manifest: field 'v' is {version!r}")
    return version


# -- parts ----------------------------------------------------------------------------------
#: A part is a v1 manifest body with these fixed fields, so identical tensors and chunks give
#: an identical part (and an unchanged rank's part is deduplicated like any chunk).
_EMPTY_TREE = encode_tree(None, lambda _path, _value: None)


def encode_part(tensors: tuple[Any, ...], chunks: tuple[ChunkEntry, ...]) -> bytes:
    """A part: `tensors` (TensorEntry, segments indexing `chunks`) and their chunks."""
    return encode_manifest(Manifest(0, 0.0, None, _EMPTY_TREE, tensors, chunks))


def decode_part(data: bytes, expected_tensors: int) -> Manifest:
    part = decode_manifest(data)
    if part.step != 0 or part.metadata is not None or part.tree != _EMPTY_TREE:
        raise FormatError("manifest part: not a part (step, metadata or tree set)")
    if len(part.tensors) != expected_tensors:
        raise FormatError(f"manifest part: {len(part.tensors)} tensors, its root says {expected_tensors}")
    return part


# -- chunk tables ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkTable:
    """Chunks as fixed-width arrays: `digests` (count x width raw bytes, sorted), and numpy
    uint64 arrays of raw and stored sizes."""

    width: int
    digests: bytes
    raw: Any
    stored: Any

    def __len__(self) -> int:
        return len(self.digests) // self.width if self.width else 0

    def hex_digests(self) -> list[str]:
        w = self.width
        return [self.digests[i:i + w].hex() for i in range(0, len(self.digests), w)]

    def entries(self) -> list[ChunkEntry]:
        return [ChunkEntry(d, r, s) for d, r, s in zip(self.hex_digests(), self.raw.tolist(), self.stored.tolist(),
                                                      strict=True)]


def build_chunk_tables(chunks: list[ChunkEntry]) -> list[bytes]:
    """Encoded chunk tables holding `chunks` once each, sorted by digest, TABLE_ENTRIES a table."""
    unique = sorted({c.digest: c for c in chunks}.values(), key=lambda c: c.digest)
    return [encode_chunk_table(unique[i:i + TABLE_ENTRIES]) for i in range(0, len(unique), TABLE_ENTRIES)]


def encode_chunk_table(chunks: list[ChunkEntry]) -> bytes:
    import numpy as np

    width = len(bytes.fromhex(chunks[0].digest)) if chunks else 32
    return _pack({
        "v": TABLE_VERSION, "width": width,
        "digests": b"".join(bytes.fromhex(c.digest) for c in chunks),
        "raw": np.array([c.raw_size for c in chunks], dtype=_U64).tobytes(),
        "stored": np.array([c.stored_size for c in chunks], dtype=_U64).tobytes(),
    })


def decode_chunk_table(data: bytes, expected: int) -> ChunkTable:
    """Decode and validate a chunk table that its root says holds `expected` chunks."""
    import numpy as np

    what = "chunk table"
    obj = _unpack_map(data, what, MAX_TABLE_BYTES, TABLE_VERSION)
    width = _int_in(obj.get("width"), 8, 64, what)
    digests = _field(obj, "digests", bytes, what)
    raw_bytes, stored_bytes = _field(obj, "raw", bytes, what), _field(obj, "stored", bytes, what)
    if len(digests) != expected * width or len(raw_bytes) != 8 * expected or len(stored_bytes) != 8 * expected:
        raise FormatError(f"{what}: arrays do not hold the {expected} chunks its root names")
    raw = np.frombuffer(raw_bytes, dtype=_U64)
    stored = np.frombuffer(stored_bytes, dtype=_U64)
    if expected and (int(raw.max()) > MAX_CHUNK_BYTES or bool((stored < HEADER_SIZE).any())
                     or bool((stored > raw + HEADER_SIZE).any())):
        raise FormatError(f"{what}: a chunk's sizes are out of bounds")
    return ChunkTable(width, digests, raw, stored)

