"""Chunk blobs: a 24-byte self-describing header followed by the (maybe compressed) payload.

Header, little-endian (struct "<4sBBBBQQ"):

    magic           4 bytes  b"CKCB"
    version         u8       1
    codec           u8       0 = none, 1 = zstd
    filter          u8       0 = none (reserved for byte-shuffle and friends)
    flags           u8       0 (reserved)
    raw_length      u64      length of the uncompressed payload (what the key hashes)
    payload_length  u64      length of the bytes after the header, as stored

A reader needs nothing but the blob to decode it; the key (hash of the raw payload) lets it
check the result. Decoding never allocates more than the declared raw length, which the
caller bounds by what the manifest expects, so a lying header cannot exhaust memory.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any, Literal

from ckptstore.errors import FormatError, UnsupportedFormatError

MAGIC = b"CKCB"
VERSION = 1
HEADER = struct.Struct("<4sBBBBQQ")
HEADER_SIZE = HEADER.size  # 24
CODEC_NONE = 0
CODEC_ZSTD = 1
CODEC_NAMES = {CODEC_NONE: "none", CODEC_ZSTD: "zstd"}

# Compressed output must save at least this fraction, or the chunk is stored raw:
# decompression costs read time, so a 1% saving is not worth it.
MIN_SAVING = 0.02


@dataclass(frozen=True)
class Compression:
    """Chunk codec policy: `codec` "none" or "zstd", and the zstd `level`."""

    codec: Literal["none", "zstd"] = "none"
    level: int = 3

    def __post_init__(self) -> None:
        if self.codec not in ("none", "zstd"):
            raise ValueError(f"unknown codec {self.codec!r}; use 'none' or 'zstd'")
        if not -7 <= self.level <= 22:
            raise ValueError(f"zstd level must be in [-7, 22], got {self.level}")


@dataclass(frozen=True)
class ChunkHeader:
    """A decoded chunk header."""

    codec: int
    filter: int
    raw_length: int
    payload_length: int


_local = threading.local()


def _compressor(level: int) -> Any:
    # zstd contexts are not thread-safe; keep one per thread and level.
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        import zstandard

        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _decompressor() -> Any:
    if not hasattr(_local, "decompressor"):
        import zstandard

        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def encode_chunk(raw: memoryview, compression: Compression) -> list[bytes | memoryview]:
    """The blob for `raw` as parts to write back to back: [header, payload]."""
    raw = raw.cast("B") if raw.format != "B" or raw.ndim != 1 else raw
    codec, payload = CODEC_NONE, raw
    if compression.codec == "zstd" and raw.nbytes:
        packed = _compressor(compression.level).compress(raw)
        if len(packed) <= raw.nbytes * (1 - MIN_SAVING):
            codec, payload = CODEC_ZSTD, memoryview(packed)
    header = HEADER.pack(MAGIC, VERSION, codec, 0, 0, raw.nbytes, payload.nbytes)
    return [header, payload]


def decode_header(data: bytes | bytearray | memoryview) -> ChunkHeader:
    """Parse and check the first HEADER_SIZE bytes of a blob."""
    if len(data) < HEADER_SIZE:
        raise FormatError(f"chunk blob truncated: {len(data)} bytes, header needs {HEADER_SIZE}")
    magic, version, codec, filt, flags, raw_length, payload_length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FormatError(f"not a chunk blob (magic {bytes(magic)!r})")
    if version != VERSION:
        raise UnsupportedFormatError(f"chunk blob format version {version}; this reader knows {VERSION}")
    if codec not in CODEC_NAMES:
        raise UnsupportedFormatError(f"chunk codec {codec} unknown; this reader knows {CODEC_NAMES}")
    if filt != 0:
        raise UnsupportedFormatError(f"chunk filter {filt} unknown")
    if flags != 0:
        raise UnsupportedFormatError(f"chunk flags {flags:#x} unknown")
    if codec == CODEC_NONE and payload_length != raw_length:
        raise FormatError(f"uncompressed chunk claims payload {payload_length} != raw {raw_length}")
    return ChunkHeader(codec, filt, raw_length, payload_length)


def decode_chunk(blob: bytes | memoryview, *, expected_raw_length: int) -> memoryview:
    """The raw payload of `blob`, which must decode to exactly `expected_raw_length` bytes."""
    view = memoryview(blob).cast("B")
    header = decode_header(view)
    if header.raw_length != expected_raw_length:
        raise FormatError(
            f"chunk header says {header.raw_length} raw bytes, the manifest expects {expected_raw_length}"
        )
    payload = view[HEADER_SIZE:]
    if payload.nbytes != header.payload_length:
        raise FormatError(f"chunk blob truncated: payload {payload.nbytes} of {header.payload_length} bytes")
    if header.codec == CODEC_NONE:
        return payload
    import zstandard

    try:
        # A frame that declares its size would be allocated at that size: check it first.
        # max_output_size bounds frames that do not declare one.
        declared = zstandard.frame_content_size(payload)
        if declared not in (-1, expected_raw_length):
            raise FormatError(f"zstd frame declares {declared} bytes, expected {expected_raw_length}")
        raw = _decompressor().decompress(payload, max_output_size=expected_raw_length)
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd chunk payload: {exc}") from exc
    if len(raw) != expected_raw_length:
        raise FormatError(f"zstd chunk decoded to {len(raw)} bytes, expected {expected_raw_length}")
    return memoryview(raw)
