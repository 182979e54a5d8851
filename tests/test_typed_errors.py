"""Bad arguments to the public API raise typed errors deriving from CkptStoreError (as the
README promises), and InvalidArgumentError stays a ValueError for `except ValueError` callers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch.distributed  # noqa: F401 - resolve_group looks for an imported torch.distributed

import ckptstore
from ckptstore import dcp
from ckptstore.backends.gcs import GCSBackend
from ckptstore.backends.memory import drop_memory_space
from ckptstore.chunkblob import Compression
from ckptstore.chunking import ChunkingPolicy
from ckptstore.distributed import resolve_group
from ckptstore.errors import CkptStoreError, InvalidArgumentError, InvalidURLError


@pytest.fixture
def memory_store() -> Iterator[ckptstore.Store]:
    name = uuid.uuid4().hex
    with ckptstore.open(f"memory://{name}") as store:
        yield store
    drop_memory_space(name)


BAD_ARGUMENTS: dict[str, Callable[[], Any]] = {
    "unknown codec": lambda: Compression("lz4"),  # type: ignore[arg-type]
    "zstd level out of range": lambda: Compression("zstd", level=99),
    "zstd level not an int": lambda: Compression("zstd", level="3"),  # type: ignore[arg-type]
    "zstd level a bool": lambda: Compression("zstd", level=True),
    "min_ratio below 1": lambda: Compression("zstd", min_ratio=0.5),
    "min_ratio NaN": lambda: Compression("zstd", min_ratio=float("nan")),
    "min_ratio not a number": lambda: Compression("zstd", min_ratio="1.2"),  # type: ignore[arg-type]
    "shuffle not a bool": lambda: Compression("zstd", shuffle="no"),  # type: ignore[arg-type]
    "chunk_size zero": lambda: ChunkingPolicy(chunk_size=0),
    "chunk_size not an int": lambda: ChunkingPolicy(chunk_size="16M"),  # type: ignore[arg-type]
    "chunk_size a float": lambda: ChunkingPolicy(chunk_size=1.5),  # type: ignore[arg-type]
    "small_tensor_limit above pack_size": lambda: ChunkingPolicy(small_tensor_limit=10, pack_size=5),
    "process_group not a group": lambda: resolve_group(object()),
    "checkpoint_id names no step": lambda: dcp.parse_checkpoint_id("not-a-step"),
    "reader checkpoint_id names no step": lambda: dcp.parse_checkpoint_id("a/b/c", reader=True),
    "async_save without store and step": lambda: dcp.async_save({}),
    "export max_shard_bytes zero": lambda: _export_with_max_shard_bytes(0),
    "GCS threads zero": lambda: GCSBackend("bucket", threads=0),
}


def _export_with_max_shard_bytes(size: int) -> Any:
    from ckptstore.interop import export_safetensors

    with ckptstore.open(f"memory://{uuid.uuid4().hex}") as store:
        return export_safetensors(store, 1, "/nonexistent-export-target", max_shard_bytes=size)


def test_a_bad_gcs_bucket_name_is_an_invalid_url_error() -> None:
    with pytest.raises(InvalidURLError, match="invalid GCS bucket name"):
        GCSBackend("a/b")


@pytest.mark.parametrize("call", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_invalid_argument_error(call: Callable[[], Any]) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        call()
    assert isinstance(raised.value, CkptStoreError) and isinstance(raised.value, ValueError)


def test_a_store_writer_without_a_step_raises_invalid_argument_error(memory_store: ckptstore.Store) -> None:
    writer = dcp.StoreWriter(memory_store)
    with pytest.raises(InvalidArgumentError, match="StoreWriter has no step"):
        writer.set_up_storage_writer(True)
