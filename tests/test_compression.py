"""Adaptive chunk compression: byte shuffle, the sample decision, hostile headers with a filter."""

from __future__ import annotations

import tracemalloc
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import zstandard

import ckptstore
from ckptstore.backends.memory import drop_memory_space
from ckptstore.chunkblob import (
    BYTES,
    CODEC_NONE,
    CODEC_ZSTD,
    FILTER_NONE,
    FILTER_SHUFFLE,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    Compression,
    ElementType,
    choose_filter,
    decode_chunk,
    decode_chunk_into,
    decode_header,
    encode_chunk,
    shuffle_into,
    unshuffle_into,
)
from ckptstore.chunking import ChunkingPolicy
from ckptstore.errors import FormatError, UnsupportedFormatError
from ckptstore.hashing import hasher
from ckptstore.keys import chunk_key

ZSTD = Compression("zstd")
blake3 = hasher("blake3")


def _blob(raw: bytes | memoryview, compression: Compression = ZSTD, element: ElementType = BYTES) -> bytes:
    return b"".join(bytes(p) for p in encode_chunk(memoryview(raw), compression, element))


def _weights(n: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.02).to(dtype)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


# -- byte shuffle -----------------------------------------------------------------------------
@pytest.mark.parametrize("element_size", [2, 4, 8, 16])
@pytest.mark.parametrize("length", [0, 1, 15, 64, 1001, 4096])
def test_shuffle_round_trips_with_a_tail(element_size: int, length: int) -> None:
    raw = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    shuffled = bytearray(length)
    shuffle_into(memoryview(raw), memoryview(shuffled), element_size)
    count = length // element_size
    # Plane layout: byte b of element i sits at b * count + i; the tail stays in place.
    for i in range(min(count, 3)):
        for b in range(element_size):
            assert shuffled[b * count + i] == raw[i * element_size + b]
    assert shuffled[count * element_size:] == raw[count * element_size:]
    back = bytearray(length)
    unshuffle_into(memoryview(bytes(shuffled)), memoryview(back), element_size)
    assert bytes(back) == raw


# -- round trips for every dtype, through encode/decode and through a store --------------------
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.complex64]


def _sample_tensor(dtype: torch.dtype, n: int = 50_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.7
    if dtype.is_floating_point or dtype.is_complex:
        return (torch.randn(n, generator=g) * 0.02).to(dtype)
    return torch.randint(0, 100, (n,), generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_through_a_blob(dtype: torch.dtype) -> None:
    tensor = _sample_tensor(dtype)
    raw = _bytes_of(tensor)
    element = ElementType(tensor.element_size(), not (dtype.is_floating_point or dtype.is_complex))
    blob = _blob(raw, ZSTD, element)
    assert bytes(decode_chunk(blob, expected_raw_length=raw.nbytes)) == bytes(raw)
    target = torch.empty_like(tensor)
    decode_chunk_into(blob, _bytes_of(target))
    assert torch.equal(target, tensor)


@pytest.fixture
def memory_url() -> Iterator[str]:
    name = f"compression-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    drop_memory_space(name)


def test_every_dtype_round_trips_through_a_store(memory_url: str) -> None:
    state = {str(dtype): _sample_tensor(dtype) for dtype in DTYPES}
    state["np_f4"] = np.random.default_rng(0).standard_normal(30_000).astype("<f4")
    state["np_i8"] = np.arange(30_000, dtype="<i8")
    store = ckptstore.open(memory_url, compression=ZSTD, chunking=ChunkingPolicy(chunk_size=64 << 10,
                                                                                    small_tensor_limit=16 << 10,
                                                                                    pack_size=64 << 10))
    info = store.save(1, state)
    assert info.new_bytes < info.logical_bytes  # something compressed
    loaded = store.load(1)
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
        else:
            assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value), name
    # The filters the writer chose are recorded in the headers, and shuffle was used.
    filters = {decode_header(store.backend.get(o.key).data[:HEADER_SIZE]).filter
               for o in store.backend.list("chunks/")}
    assert FILTER_SHUFFLE in filters


# -- the decision ---------------------------------------------------------------------------
def test_bf16_weights_are_shuffled_and_compressed() -> None:
    raw = _bytes_of(_weights(1 << 20, torch.bfloat16))
    blob = _blob(raw, ZSTD, ElementType(2, False))
    header = decode_header(blob)
    assert (header.codec, header.filter, header.element_size) == (CODEC_ZSTD, FILTER_SHUFFLE, 2)
    plain = _blob(raw, Compression("zstd", shuffle=False), ElementType(2, False))
    assert len(blob) < len(plain) < raw.nbytes  # shuffle pays on bf16
    assert bytes(decode_chunk(blob, expected_raw_length=raw.nbytes)) == bytes(raw)


def test_fp32_plain_ratio_is_below_the_threshold_shuffled_is_above() -> None:
    raw = _bytes_of(_weights(1 << 20, torch.float32))
    # zstd-1 gets ~1.08 on fp32 weights: below min_ratio 1.1, so no shuffle means no compression.
    assert choose_filter(raw, Compression("zstd", shuffle=False), ElementType(4, False)) is None
    assert choose_filter(raw, ZSTD, ElementType(4, False)) == 4
    # With a higher bar even the shuffled ratio (~1.19) is not enough: stored raw, no full compression.
    assert choose_filter(raw, Compression("zstd", min_ratio=1.5), ElementType(4, False)) is None
    header = decode_header(_blob(raw, Compression("zstd", min_ratio=1.5), ElementType(4, False)))
    assert (header.codec, header.filter) == (CODEC_NONE, FILTER_NONE)


def test_incompressible_data_is_stored_raw() -> None:
    raw = np.random.default_rng(7).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    for element in (ElementType(), ElementType(4, False), ElementType(8, True)):
        blob = _blob(raw, ZSTD, element)
        assert decode_header(blob) == decode_header(HEADER.pack(MAGIC, 1, CODEC_NONE, 0, 0, len(raw), len(raw)))
        assert blob[HEADER_SIZE:] == raw and len(blob) == HEADER_SIZE + len(raw)


def test_integers_always_compress_even_above_the_sample_bar() -> None:
    ids = torch.randint(0, 50_000, (1 << 17,), generator=torch.Generator().manual_seed(3))
    raw = _bytes_of(ids)
    very_picky = Compression("zstd", min_ratio=100.0)
    assert decode_header(_blob(raw, very_picky, ElementType(8, True))).codec == CODEC_ZSTD
    assert decode_header(_blob(raw, very_picky, ElementType(8, False))).codec == CODEC_NONE


def test_element_size_one_or_odd_is_never_shuffled() -> None:
    raw = _bytes_of(torch.arange(100_000, dtype=torch.int32))
    for element in (ElementType(1, True), ElementType(3, True), ElementType(32, True)):
        header = decode_header(_blob(raw, ZSTD, element))
        assert header.codec == CODEC_ZSTD and header.filter == FILTER_NONE


def test_codec_none_never_compresses() -> None:
    raw = bytes(1 << 16)
    assert decode_header(_blob(raw, Compression("none"), ElementType(8, True))).codec == CODEC_NONE


def test_keys_hash_raw_bytes_whatever_the_compression(memory_url: str) -> None:
    state = {"w": _weights(1 << 18, torch.bfloat16), "ids": torch.arange(1 << 16)}
    digests = []
    for i, compression in enumerate([Compression("none"), ZSTD, Compression("zstd", shuffle=False)]):
        store = ckptstore.open(f"{memory_url}-{i}", compression=compression)
        digests.append(sorted(c.digest for c in store.info(store.save(1, state).step).manifest.chunks))
        drop_memory_space(f"{memory_url.removeprefix('memory://')}-{i}")
    assert digests[0] == digests[1] == digests[2]


@pytest.mark.parametrize("value", [-1, 0.5, 0.99])
def test_bad_policy_values_are_refused(value: float) -> None:
    with pytest.raises(ValueError):
        Compression("zstd", min_ratio=value)


# -- old blobs and hostile headers ----------------------------------------------------------
def _header(*, codec: int = CODEC_ZSTD, filt: int = FILTER_SHUFFLE, flags: int = 4, raw: int, payload: int) -> bytes:
    return HEADER.pack(MAGIC, 1, codec, filt, flags, raw, payload)


def test_filter_zero_blobs_still_decode() -> None:
    raw = _bytes_of(torch.arange(4096, dtype=torch.int64))
    frame = zstandard.ZstdCompressor(level=3).compress(raw)
    blob = _header(filt=0, flags=0, raw=raw.nbytes, payload=len(frame)) + frame
    assert bytes(decode_chunk(blob, expected_raw_length=raw.nbytes)) == bytes(raw)
    target = bytearray(raw.nbytes)
    decode_chunk_into(blob, memoryview(target))
    assert bytes(target) == bytes(raw)


@pytest.mark.parametrize("flags", [0, 1, 3, 5, 12, 32, 255])
def test_bad_shuffle_element_size_is_unsupported(flags: int) -> None:
    frame = zstandard.ZstdCompressor().compress(bytes(64))
    blob = _header(flags=flags, raw=64, payload=len(frame)) + frame
    with pytest.raises(UnsupportedFormatError, match="element size"):
        decode_chunk(blob, expected_raw_length=64)


def test_shuffle_without_codec_is_a_format_error() -> None:
    blob = _header(codec=CODEC_NONE, flags=4, raw=32, payload=32) + bytes(32)
    with pytest.raises(FormatError, match="without compression"):
        decode_chunk(blob, expected_raw_length=32)


def test_shuffled_blob_with_a_lying_raw_length_is_refused() -> None:
    raw = _bytes_of(_weights(1 << 16, torch.bfloat16))
    good = _blob(raw, ZSTD, ElementType(2, False))
    assert decode_header(good).filter == FILTER_SHUFFLE
    payload = good[HEADER_SIZE:]
    for claimed in (raw.nbytes - 2, raw.nbytes + 2):
        blob = _header(flags=2, raw=claimed, payload=len(payload)) + payload
        with pytest.raises(FormatError):  # header disagrees with the manifest
            decode_chunk(blob, expected_raw_length=raw.nbytes)
        with pytest.raises(FormatError):  # header agrees with the manifest, the frame does not
            decode_chunk(blob, expected_raw_length=claimed)
        with pytest.raises(FormatError):
            decode_chunk_into(blob, memoryview(bytearray(claimed)))


@pytest.mark.parametrize("length", [0, 1, 7])
def test_shuffled_blob_shorter_than_one_element(length: int) -> None:
    """Raw lengths below the element size (found by .ci/fuzz: raw 0, element 8 raised a
    ValueError): no byte plane, only the tail; an honest frame decodes, a longer one is refused."""
    raw = bytes(range(1, length + 1))
    for write_size in (True, False):
        frame = zstandard.ZstdCompressor(write_content_size=write_size).compress(raw)
        blob = _header(flags=8, raw=length, payload=len(frame)) + frame
        assert bytes(decode_chunk(blob, expected_raw_length=length)) == raw
        target = memoryview(bytearray(length))
        decode_chunk_into(blob, target)
        assert bytes(target) == raw
        longer = zstandard.ZstdCompressor(write_content_size=write_size).compress(raw + b"x" * 300)
        blob = _header(flags=8, raw=length, payload=len(longer)) + longer
        with pytest.raises(FormatError):
            decode_chunk(blob, expected_raw_length=length)


def test_shuffled_bomb_allocates_at_most_the_expected_length() -> None:
    """A frame of 1 GiB of zeros (undeclared size) behind a shuffle header claiming 64 KiB."""
    big = 1 << 30
    frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    # Stream it so the test itself never holds the gigabyte.
    zeros = bytes(1 << 20)
    payload = b"".join(frame.compress(zeros) for _ in range(big >> 20)) + frame.flush()
    assert len(payload) < 1 << 20
    expected = 64 << 10
    blob = _header(flags=8, raw=expected, payload=len(payload)) + payload
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="more than"):
            decode_chunk(blob, expected_raw_length=expected)
        with pytest.raises(FormatError, match="more than"):
            decode_chunk_into(blob, memoryview(bytearray(expected)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"decoding a bomb allocated {peak} bytes"


def test_trailing_bytes_after_the_frame_are_not_silently_dropped_for_the_hash() -> None:
    raw = _bytes_of(torch.arange(8192, dtype=torch.int64))
    good = _blob(raw, ZSTD, ElementType(8, True))
    # A second frame appended: the payload length grows; the decoder must not return a
    # different raw payload than the one the key hashes (it either refuses or ignores it).
    extra = zstandard.ZstdCompressor().compress(b"junk" * 10)
    header = decode_header(good)
    blob = _header(flags=header.element_size, raw=raw.nbytes, payload=header.payload_length + len(extra)) \
        + good[HEADER_SIZE:] + extra
    try:
        out = decode_chunk(blob, expected_raw_length=raw.nbytes)
    except FormatError:
        return
    assert blake3(out) == blake3(raw)


def test_packs_shuffle_only_when_their_tensors_share_an_element_type(memory_url: str) -> None:
    policy = ChunkingPolicy(chunk_size=1 << 20, small_tensor_limit=64 << 10, pack_size=256 << 10)
    same = {f"b{i}": _weights(20_000, torch.bfloat16) * (i + 1) for i in range(4)}  # one pack, bf16 only
    mixed = {"f": _weights(20_000, torch.bfloat16), "i": torch.arange(5_000, dtype=torch.int64)}
    headers = {}
    for name, state in (("same", same), ("mixed", mixed)):
        store = ckptstore.open(f"{memory_url}-{name}", chunking=policy, compression=ZSTD)
        manifest = store.info(store.save(1, state).step).manifest
        assert len(manifest.chunks) == 1  # everything went into one pack
        headers[name] = decode_header(store.backend.get(chunk_key(manifest.chunks[0].digest)).data)
        assert all(torch.equal(store.load(1)[k], v) for k, v in state.items())
        drop_memory_space(f"{memory_url.removeprefix('memory://')}-{name}")
    assert (headers["same"].filter, headers["same"].element_size) == (FILTER_SHUFFLE, 2)
    assert headers["mixed"].filter == FILTER_NONE
