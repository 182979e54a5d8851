"""The save/load pipeline: bytes land in the caller's tensors, and S3 puts stream the parts
of a chunk without joining them (single request and multipart, retries rewinding)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from botocore.exceptions import EndpointConnectionError

import ckptstore
from ckptstore.backends.parts import PartsReader
from ckptstore.backends.s3 import S3Backend
from ckptstore.chunkblob import HEADER_SIZE, Compression, decode_header
from ckptstore.chunking import ChunkingPolicy
from ckptstore.testing.servers import S3Server

SMALL = ChunkingPolicy(chunk_size=256 << 10, small_tensor_limit=16 << 10, pack_size=64 << 10)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fp32": torch.randn(300_000, generator=g) * 0.02,  # several chunks, maybe shuffled
        "bf16": (torch.randn(200_000, generator=g) * 0.02).to(torch.bfloat16),  # shuffled
        "ids": torch.randint(0, 1000, (100_000,), generator=g),  # zstd, shuffled by 8
        "zeros": torch.zeros(100_000, dtype=torch.int32),  # compresses very well
        "noise": torch.randint(0, 256, (300_000,), generator=g, dtype=torch.uint8),  # stored raw
        "bias": torch.randn(100, generator=g),  # packed with its neighbour
        "scale": torch.ones(7, dtype=torch.float16),
    }


@pytest.mark.parametrize("compression", [Compression("none"), Compression("zstd"),
                                         Compression("zstd", shuffle=False)], ids=["none", "zstd", "zstd-noshuffle"])
def test_load_into_writes_into_the_given_storage(tmp_path: Path, compression: Compression) -> None:
    state = _state()
    store = ckptstore.open(str(tmp_path / "store"), chunking=SMALL, compression=compression)
    store.save(1, state)
    into = {name: torch.full_like(value, 3) for name, value in state.items()}
    pointers = {name: value.data_ptr() for name, value in into.items()}
    loaded = store.load(1, into=into)
    for name, value in state.items():
        assert loaded[name] is into[name], name
        assert loaded[name].data_ptr() == pointers[name], name
        assert torch.equal(into[name], value), name
    codecs = {(h.codec, h.filter) for h in _headers(store)}
    expected = {(0, 0)} if compression.codec == "none" else {(0, 0), (1, 0), (1, 1)} if compression.shuffle \
        else {(0, 0), (1, 0)}
    assert codecs == expected


def _headers(store: ckptstore.Store) -> list[Any]:
    return [decode_header(store.backend.get_range(o.key, 0, HEADER_SIZE)) for o in store.backend.list("chunks/")]


@pytest.mark.parametrize("shuffle", [False, True], ids=["zstd", "zstd+shuffle"])
def test_compressed_whole_chunk_load_does_not_allocate_a_chunk_copy(tmp_path: Path, shuffle: bool) -> None:
    """A zstd chunk decompresses straight into the tensor (a shuffled one through a 1 MiB
    block): a load allocates one reusable read buffer (untouched beyond the compressed
    bytes) and no decompressed copy of any chunk."""
    import tracemalloc

    chunk = 8 << 20
    ids = torch.arange(2 * chunk // 8, dtype=torch.int64) % 7  # two chunks, compress to almost nothing
    store = ckptstore.open(str(tmp_path / "s"), chunking=ChunkingPolicy(chunk_size=chunk),
                           compression=Compression("zstd", shuffle=shuffle), threads=1)
    store.save(1, {"ids": ids})
    assert [(h.codec, h.filter) for h in _headers(store)] == [(1, int(shuffle))] * 2
    into = {"ids": torch.empty_like(ids)}
    tracemalloc.start()
    try:
        store.load(1, into=into)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(into["ids"], ids)
    assert peak < chunk + (3 << 20), f"load allocated {peak} bytes for two {chunk}-byte chunks"


# -- PartsReader --------------------------------------------------------------------------------
def test_parts_body_reads_seeks_and_reads_again() -> None:
    parts = [b"head", memoryview(bytearray(b"0123456789")), b"", memoryview(b"tail")]
    body = PartsReader(parts)
    whole = b"head0123456789tail"
    assert body.seek(0, io.SEEK_END) == len(whole) and body.tell() == len(whole)
    body.seek(0)
    assert b"".join(iter(lambda: body.read(3), b"")) == whole  # blocks that straddle parts
    assert body.read(5) == b""
    body.seek(2)
    buf = bytearray(7)
    assert body.readinto(buf) == 7 and bytes(buf) == whole[2:9]
    body.seek(-4, io.SEEK_END)
    assert body.read() == b"tail"
    with pytest.raises(ValueError):
        body.seek(-1)


# -- S3, on the SeaweedFS fixture -----------------------------------------------------------
@pytest.fixture
def s3(s3_server: S3Server, s3_bucket: str) -> Iterator[S3Backend]:
    backend = S3Backend(s3_bucket, f"pipeline/{uuid.uuid4().hex[:8]}", multipart_threshold=5 << 20,
                        part_size=5 << 20)
    yield backend
    backend.close()


@pytest.mark.parametrize("size", [100_000, (5 << 20) * 2 + 12345], ids=["single", "multipart"])
def test_s3_put_of_parts_round_trips(s3: S3Backend, size: int) -> None:
    tensor = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    payload = memoryview(tensor.numpy())
    header = b"H" * 24
    s3.put("chunks/obj", [header, payload[:size // 3], payload[size // 3:]])
    assert s3.get("chunks/obj").data == header + bytes(payload)
    assert s3.head("chunks/obj").size == 24 + size


def test_s3_put_rewinds_the_body_on_retry(s3: S3Backend) -> None:
    """A connection error after part of the body was read: botocore retries, seeking the
    body back; the server (which checks the body's CRC32) gets the exact bytes."""
    attempts: list[int] = []

    def fail_first(request: Any, **_: Any) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            request.body.read(12_345)  # a partial send
            raise EndpointConnectionError(endpoint_url=request.url)

    events = s3._writer("chunks/retried").meta.events
    events.register("before-send.s3.PutObject", fail_first)
    try:
        data = bytes(range(256)) * 1000
        s3.put("chunks/retried", [data[:100], memoryview(data)[100:]])
    finally:
        events.unregister("before-send.s3.PutObject", fail_first)
    assert len(attempts) == 2
    assert s3.get("chunks/retried").data == data


def test_s3_store_round_trip_with_compression(s3: S3Backend) -> None:
    store = ckptstore.Store(s3, chunking=SMALL, compression=Compression("zstd"))
    state = _state()
    store.save(1, state)
    into = {name: torch.empty_like(value) for name, value in state.items()}
    pointers = {name: value.data_ptr() for name, value in into.items()}
    loaded = store.load(1, into=into)
    for name, value in state.items():
        assert loaded[name].data_ptr() == pointers[name] and torch.equal(loaded[name], value), name
