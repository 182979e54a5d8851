"""Moving chunks between tensors and a backend: hash, dedup, compress, put; get, check, land.

Both directions are a bounded pipeline on a thread pool: each task takes one chunk through
every stage (save: slice or pack -> hash -> known to the previous step, or exists-check ->
compress -> put; load: get -> decompress -> land -> hash-check), and at most 2 x threads chunks are in flight, so memory
stays at a few chunks beyond the state itself. One task per chunk, rather than a thread per
stage, because every stage releases the GIL (blake3, zstd, numpy copies, file and socket
I/O) and a chunk's bytes stay hot in that core's cache from hash to put.

Loads land bytes in the target tensor's memory: an uncompressed chunk holding one tensor
slice is read straight into it, a compressed one is read into a per-thread buffer that is
reused from chunk to chunk and decompressed straight into it (a shuffled one in 1 MiB
blocks scattered into the byte planes). Only packs of small tensors go through a
decompressed copy.

Partial reads (`ChunkReader.read_ranges`, for a slice of a tensor) fetch only the byte ranges
they need from an uncompressed chunk: its header once, then each range at header size +
offset. Those bytes are not hash-checked (the hash covers the whole chunk). A compressed
chunk is one zstd frame, so it is read and checked whole.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ckptstore.backends.base import CREATE, Backend, Buffer, total_length
from ckptstore.chunkblob import (
    BYTES,
    CODEC_NONE,
    HEADER_SIZE,
    Compression,
    ElementType,
    decode_chunk,
    decode_chunk_into,
    decode_header,
    encode_chunk,
)
from ckptstore.chunking import ChunkPlan, PlannedChunk
from ckptstore.errors import (
    AlreadyExistsError,
    ChunkVanishedError,
    FormatError,
    IntegrityError,
    ObjectNotFoundError,
    UnsupportedFormatError,
)
from ckptstore.keys import chunk_key
from ckptstore.manifest import ChunkEntry
from ckptstore.threads import bounded_map

T = TypeVar("T")
R = TypeVar("R")


#: How many create-only puts one chunk gets when each reports AlreadyExists and the `head`
#: after it finds the key gone (gc swept another writer's copy in between, every time), before
#: `put_chunk` gives up with ChunkVanishedError. One such race is rare; five in a row means a
#: gc is sweeping that very chunk over and over.
CHUNK_PUT_ATTEMPTS = 5


def put_chunk(backend: Backend, key: str, encode: Callable[[], Sequence[Buffer]]) -> tuple[int, bool]:
    """Make sure chunk `key` is stored: returns (its stored size, whether this call put it).

    `head` first: a stored chunk is reused. Otherwise `encode()` (called at most once) is put
    create-only; AlreadyExists means another writer stored the same bytes, whose size a second
    `head` reads. A chunk that vanishes between those two checks (a gc swept that writer's
    orphan) is a missing chunk again: it is put again, up to CHUNK_PUT_ATTEMPTS puts, then
    ChunkVanishedError. A chunk that vanishes after this returns is the save's epoch re-check's
    business (docs/FORMAT.md, "Garbage collection")."""
    parts: Sequence[Buffer] | None = None
    puts = 0
    while True:
        try:
            return backend.head(key).size, False
        except ObjectNotFoundError as exc:
            if puts >= CHUNK_PUT_ATTEMPTS:
                raise ChunkVanishedError(key, puts) from exc
        if parts is None:
            parts = encode()
        puts += 1
        try:
            backend.put(key, parts, mode=CREATE)
        except AlreadyExistsError:  # a concurrent writer stored the same bytes first: head it
            continue
        return total_length(parts), True


@dataclass(frozen=True)
class WrittenChunk:
    """A chunk after the write pass; `written` is False when it was already stored."""

    entry: ChunkEntry
    written: bool


class ChunkWriter:
    """Writes planned chunks of source tensors, skipping chunks the backend already has.

    `elements` (one per source tensor, optional) lets compression byte-shuffle by the
    tensor's element size and always compress integer data; without it chunks are bytes.

    `known` (digest -> ChunkEntry, optional: `knownchunks.previous_chunks`, the chunks of the
    store's latest step read after the save's lease exists) are taken as stored without a
    request: neither `head`ed nor put, their stored size taken from the entry. Only a caller
    whose settle then runs `restore_missing` may pass it (docs/FORMAT.md, "The protocol").
    """

    def __init__(self, backend: Backend, hash_fn: Callable[[Any], str], compression: Compression, threads: int,
                 *, elements: Sequence[ElementType] | None = None, known: Mapping[str, ChunkEntry] | None = None):
        self.backend = backend
        self.hash_fn = hash_fn
        self.compression = compression
        self.threads = threads
        self.elements = list(elements) if elements is not None else None
        self.known: Mapping[str, ChunkEntry] = known if known is not None else {}
        self.skipped = 0  # planned chunks taken from `known` without a request
        self._lock = threading.Lock()

    def write(self, plan: ChunkPlan, sources: list[memoryview], *, use_known: bool = True) -> list[WrittenChunk]:
        """Write every chunk of `plan`; returns one result per planned chunk, in order.
        `use_known=False` checks every chunk with the backend (`restore_missing` does)."""
        known = self.known if use_known else {}
        return list(bounded_map(lambda chunk: self._write_one(chunk, sources, known), plan.chunks, self.threads))

    def _write_one(self, chunk: PlannedChunk, sources: list[memoryview],
                   known: Mapping[str, ChunkEntry]) -> WrittenChunk:
        raw = _materialize(chunk, sources)
        digest = self.hash_fn(raw)
        entry = known.get(digest)
        if entry is not None and entry.raw_size == chunk.size:  # sizes that disagree: not trusted, head it
            with self._lock:
                self.skipped += 1
            return WrittenChunk(ChunkEntry(digest, chunk.size, entry.stored_size), written=False)
        key = chunk_key(digest)
        size, written = put_chunk(self.backend, key,
                                  lambda: encode_chunk(raw, self.compression, self._element(chunk)))
        return WrittenChunk(ChunkEntry(digest, chunk.size, size), written=written)

    def _element(self, chunk: PlannedChunk) -> ElementType:
        # A pack of tensors with one element type keeps it; a mixed pack is plain bytes.
        if self.elements is None or self.compression.codec == "none":
            return BYTES
        kinds = {self.elements[index] for index, _, _ in chunk.pieces}
        return kinds.pop() if len(kinds) == 1 else BYTES


def restore_missing(writer: ChunkWriter, plan: ChunkPlan, written: list[WrittenChunk],
                    sources: list[memoryview]) -> int:
    """Re-upload the planned chunks whose objects are gone (a gc swept them after this save
    deduplicated, wrote or skipped them as known); returns how many planned chunks were
    re-written. Every chunk of `written` is `head`ed, the ones the writer took from its
    `known` mapping too, and a missing one is put from `sources`, never skipped again.

    Their entries in `written` are replaced by the new ones: a chunk first deduplicated
    against another writer's copy (another compression, another stored size) is now stored as
    this writer encoded it, and the manifest built afterwards must say so."""
    backend = writer.backend
    digests = sorted({r.entry.digest for r in written})
    present = dict(zip(digests, bounded_map(lambda d: backend.exists(chunk_key(d)), digests, writer.threads),
                       strict=True))
    slots = [slot for slot, r in enumerate(written) if not present[r.entry.digest]]
    if slots:
        again = writer.write(ChunkPlan([plan.chunks[slot] for slot in slots], []), sources, use_known=False)
        for slot, result in zip(slots, again, strict=True):
            written[slot] = result
    return len(slots)


def _materialize(chunk: PlannedChunk, sources: list[memoryview]) -> memoryview:
    if len(chunk.pieces) == 1:  # a slice of one tensor: no copy
        index, start, length = chunk.pieces[0]
        return sources[index][start:start + length]
    buffer = bytearray(chunk.size)
    pos = 0
    for index, start, length in chunk.pieces:
        buffer[pos:pos + length] = sources[index][start:start + length]
        pos += length
    return memoryview(buffer)


@dataclass(frozen=True)
class Landing:
    """Where `length` bytes at `offset` in a chunk go: `target` (a flat byte view)."""

    offset: int
    length: int
    target: memoryview
    label: str  # the tensor's path, for error messages


class ChunkReader:
    """Fetches chunks, checks them against their hash, and lands their bytes in tensors."""

    def __init__(self, backend: Backend, hash_fn: Callable[[Any], str], threads: int, verify: bool = True):
        self.backend = backend
        self.hash_fn = hash_fn
        self.threads = threads
        self.verify = verify
        self._scratch = threading.local()

    def _buffer(self, size: int) -> memoryview:
        """This thread's reusable read buffer, at least `size` bytes. Reused because fresh
        chunk-sized bytes per read fragment the allocator's per-thread arenas (measured: a
        1 GB compressed load held ~120 MB extra RSS with one allocation per chunk)."""
        buffer: memoryview | None = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.nbytes < size:
            import numpy as np

            # np.empty does not touch the pages: RSS grows only by the bytes actually read.
            buffer = np.empty(size, np.uint8).data
            self._scratch.buffer = buffer
        return buffer

    def read(self, jobs: list[tuple[ChunkEntry, list[Landing]]], context: str) -> None:
        """Land every chunk's bytes; raises IntegrityError naming `context`, the tensor and key."""
        for _ in bounded_map(lambda job: self._read_one(job[0], job[1], context), jobs, self.threads):
            pass

    def read_ranges(self, jobs: list[tuple[ChunkEntry, list[Landing]]], context: str) -> None:
        """Like `read`, but a chunk stored uncompressed whose landings take fewer bytes than it
        holds is fetched by byte range: its header, then each landing's bytes, which are not
        hash-checked. Other chunks, and compressed ones (one zstd frame: always read whole),
        are read and checked as `read` does."""
        for _ in bounded_map(lambda job: self._read_one(job[0], job[1], context, ranged=True), jobs, self.threads):
            pass

    def _read_one(self, chunk: ChunkEntry, landings: list[Landing], context: str, ranged: bool = False) -> None:
        key = chunk_key(chunk.digest)
        label = landings[0].label if landings else "?"
        try:
            # Ranges only when they fetch less than the chunk: else read it whole, and check it.
            wanted = sum(landing.length for landing in landings)
            if ranged and wanted < chunk.raw_size and self._read_ranges(key, chunk, landings):
                return
            if not self._read_direct(key, chunk, landings):
                self._read_buffered(key, chunk, landings)
        except ObjectNotFoundError as exc:
            raise IntegrityError(f"{context}: chunk {key} of tensor {label} is missing") from exc
        except UnsupportedFormatError:
            raise
        except FormatError as exc:
            raise IntegrityError(f"{context}: chunk {key} of tensor {label} is corrupt: {exc}") from exc

    def _read_direct(self, key: str, chunk: ChunkEntry, landings: list[Landing]) -> bool:
        """Zero-copy path: an uncompressed chunk holding one tensor slice is read into the tensor."""
        if not _whole_chunk(chunk, landings):
            return False
        if chunk.stored_size != HEADER_SIZE + chunk.raw_size:
            return False
        target = landings[0].target
        header = bytearray(HEADER_SIZE)
        got = self.backend.read_into(key, 0, [memoryview(header), target])
        parsed = decode_header(header) if got >= HEADER_SIZE else None
        if parsed is None or parsed.codec != 0 or parsed.filter != 0 or parsed.raw_length != chunk.raw_size:
            return False  # not what the sizes suggested: take the general path
        if got != HEADER_SIZE + chunk.raw_size:
            raise FormatError(f"chunk blob truncated: {got} of {HEADER_SIZE + chunk.raw_size} bytes")
        self._check(key, chunk, target)
        return True

    def _read_ranges(self, key: str, chunk: ChunkEntry, landings: list[Landing]) -> bool:
        """Ranged path: an uncompressed chunk's header (checked once), then only the landings'
        bytes, at header size + offset. False when the chunk is not stored uncompressed."""
        if chunk.stored_size != HEADER_SIZE + chunk.raw_size:
            return False  # compressed (a valid zstd blob is smaller): read and decode it whole
        header = decode_header(self.backend.get_range(key, 0, HEADER_SIZE))
        if header.codec != CODEC_NONE or header.raw_length != chunk.raw_size:
            return False  # not what the sizes suggested: the general path reads and judges it
        for landing in landings:
            got = self.backend.read_into(key, HEADER_SIZE + landing.offset, [landing.target])
            if got != landing.length:
                raise FormatError(f"chunk blob truncated: {got} of the {landing.length} bytes at raw offset "
                                  f"{landing.offset} are present")
        return True

    def _read_buffered(self, key: str, chunk: ChunkEntry, landings: list[Landing]) -> None:
        # A valid blob is never longer than header + raw: read one byte more to catch junk
        # without letting a hostile object make us allocate more than that.
        limit = HEADER_SIZE + chunk.raw_size
        buffer = self._buffer(limit + 1)
        blob = buffer[:self.backend.read_into(key, 0, [buffer[:limit + 1]])]
        if len(blob) > limit:
            raise FormatError(f"chunk blob longer than header + {chunk.raw_size} raw bytes")
        if _whole_chunk(chunk, landings):  # one tensor slice: decompress straight into it
            target = landings[0].target
            decode_chunk_into(blob, target)
            self._check(key, chunk, target)
            return
        raw = decode_chunk(blob, expected_raw_length=chunk.raw_size)
        self._check(key, chunk, raw)
        for landing in landings:
            landing.target[:] = raw[landing.offset:landing.offset + landing.length]

    def _check(self, key: str, chunk: ChunkEntry, raw: memoryview) -> None:
        if self.verify:
            actual = self.hash_fn(raw)
            if actual != chunk.digest:
                raise FormatError(f"content hash {actual[:16]}... does not match its key")


def _whole_chunk(chunk: ChunkEntry, landings: list[Landing]) -> bool:
    """Whether the chunk's bytes all go, in order, to one target."""
    return len(landings) == 1 and landings[0].offset == 0 and landings[0].length == chunk.raw_size
