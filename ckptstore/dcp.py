"""torch.distributed.checkpoint (DCP) storage for a ckptstore store.

    import torch.distributed.checkpoint as dcp
    from ckptstore.dcp import StoreReader, StoreWriter

    dcp.save(state_dict, storage_writer=StoreWriter(store, step))        # on every rank
    dcp.load(state_dict, storage_reader=StoreReader(store, step))        # any world size

Every rank writes the chunks of its own write items (content-addressed, deduplicated as in
`Store.save`) and returns plain-data WriteResults; the coordinator writes ONE manifest and
commits the step with `commit_ref`, so overwrite is decided once, exactly as in `Store.save`.
The stored layout (where DCP's Metadata lives, what `ckptstore.load` returns for such a step)
and the gc protocol across ranks are described in docs/DCP.md.

Importing this module imports torch.
"""

from __future__ import annotations

import io
import math
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ckptstore import errors, keys
from ckptstore.canary import ensure_conditional_writes
from ckptstore.chunkblob import BYTES, ElementType
from ckptstore.chunking import plan_chunks
from ckptstore.chunkio import ChunkReader, ChunkWriter, Landing
from ckptstore.distributed import ChunkTable, plain_segments, settle_chunks, write_manifest_and_commit
from ckptstore.dtypes import KIND_TORCH, TORCH_DTYPE_SIZES
from ckptstore.epoch import Epoch, read_epoch
from ckptstore.errors import CkptStoreError, FormatError, IntegrityError
from ckptstore.hashing import hasher
from ckptstore.leases import Lease
from ckptstore.manifest import ChunkEntry, Manifest, Ref, TensorEntry
from ckptstore.store import Store, writer_identity
from ckptstore.tensors import describe, torch_dtype_name
from ckptstore.tree import TensorRef, decode_tree, encode_tree

__all__ = ["DCP_FORMAT", "StoreReader", "StoreWriter", "load", "save", "unwrap"]

#: Version of the layout under the tree's "dcp" key (docs/DCP.md).
DCP_FORMAT = 1
TREE_KEY = "dcp"
KIND_BYTES = "bytes"  # a BYTE_IO item, stored as a torch uint8 tensor of its bytes

_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve_format": torch.preserve_format,
}
_LAYOUTS = {"strided": torch.strided}


def unwrap(exc: BaseException) -> CkptStoreError | None:
    """The ckptstore error inside a DCP CheckpointException (the lowest rank's), or None.

    DCP raises a CheckpointException on every rank when any rank (or the coordinator's
    finish(), where the commit and thus StepExistsError happen) failed.
    """
    if isinstance(exc, CkptStoreError):
        return exc
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for rank in sorted(failures):
            failure = failures[rank]
            inner = failure[0] if isinstance(failure, tuple) and failure else failure
            if isinstance(inner, CkptStoreError):
                return inner
    cause = exc.__cause__
    return unwrap(cause) if cause is not None and cause is not exc else None


def save(state_dict: dict[str, Any], store: Store, step: int, *, overwrite: bool = False,
         **kwargs: Any) -> Metadata:
    """`torch.distributed.checkpoint.save` with a StoreWriter; a ckptstore error (e.g.
    StepExistsError) is raised as itself, on every rank, instead of a CheckpointException."""
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.save(state_dict, storage_writer=StoreWriter(store, step, overwrite=overwrite), **kwargs)
    except BaseException as exc:
        inner = unwrap(exc)
        if inner is None or inner is exc:
            raise
        raise inner from exc


def load(state_dict: dict[str, Any], store: Store, step: int | str | None = None, *, trust_pickle: bool = False,
         **kwargs: Any) -> None:
    """`torch.distributed.checkpoint.load` with a StoreReader; ckptstore errors unwrapped."""
    import torch.distributed.checkpoint as dcp

    reader = StoreReader(store, step, trust_pickle=trust_pickle)
    reader.read_metadata()  # DCP turns errors here into an AssertionError's text: raise them as they are
    try:
        dcp.load(state_dict, storage_reader=reader, **kwargs)
    except BaseException as exc:
        inner = unwrap(exc)
        if inner is None or inner is exc:
            raise
        raise inner from exc


# -- Metadata <-> plain msgpack data ---------------------------------------------------------
def _dtype_from_name(name: Any, what: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) and name in TORCH_DTYPE_SIZES else None
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"{what}: torch dtype {name!r} unknown to this reader")
    return dtype


def _ints(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) > 64 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise FormatError(f"{what}: not a list of non-negative ints: {value!r}"[:200])
    return value


def _str_or_none(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise FormatError(f"{what}: expected a string or nil")
    return value


def _path_to_plain(path: Any) -> list[Any] | None:
    """A planner_data object path (tuple of str/int) as a list, or None if it is not plain."""
    if isinstance(path, (tuple, list)) and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):
        return list(path)
    return None


def metadata_to_plain(metadata: Metadata) -> dict[str, Any]:
    """DCP Metadata as msgpack-able dicts and lists (no pickle). docs/DCP.md lists the fields."""
    items: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            items[fqn] = {"type": "bytes"}
        elif isinstance(md, TensorStorageMetadata):
            props = md.properties
            items[fqn] = {
                "type": "tensor",
                "dtype": torch_dtype_name(props.dtype),
                "layout": str(props.layout).removeprefix("torch."),
                "requires_grad": bool(props.requires_grad),
                "memory_format": str(props.memory_format).removeprefix("torch."),
                "pin_memory": bool(props.pin_memory),
                "size": list(md.size),
                "chunks": [[list(c.offsets), list(c.sizes)] for c in md.chunks],
            }
        else:
            raise errors.UnsupportedValueError(fqn, f"DCP storage metadata {type(md).__name__} is not supported")
    planner_data = None
    if isinstance(metadata.planner_data, dict):
        plain = {k: _path_to_plain(v) for k, v in metadata.planner_data.items() if isinstance(k, str)}
        if all(v is not None for v in plain.values()) and len(plain) == len(metadata.planner_data):
            planner_data = plain
    storage_meta = None
    if metadata.storage_meta is not None:
        sm = metadata.storage_meta
        storage_meta = {
            "checkpoint_id": None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
            "save_id": sm.save_id, "load_id": sm.load_id, "modules": [str(m) for m in sm.modules],
        }
    return {"state_dict_metadata": items, "planner_data": planner_data, "storage_meta": storage_meta,
            "version": metadata.version}


def metadata_from_plain(obj: Any) -> Metadata:
    """Rebuild DCP Metadata from `metadata_to_plain`'s output; FormatError for anything malformed."""
    what = "DCP metadata"
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict_metadata"), dict):
        raise FormatError(f"{what}: malformed")
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for fqn, md in obj["state_dict_metadata"].items():
        where = f"{what} of {fqn!r}"[:200]
        if not isinstance(fqn, str) or not isinstance(md, dict):
            raise FormatError(f"{where}: malformed entry")
        if md.get("type") == "bytes":
            state[fqn] = BytesStorageMetadata()
            continue
        if md.get("type") != "tensor":
            raise FormatError(f"{where}: unknown type {md.get('type')!r}"[:200])
        layout = _LAYOUTS.get(md.get("layout"))  # type: ignore[arg-type]
        memory_format = _MEMORY_FORMATS.get(md.get("memory_format"))  # type: ignore[arg-type]
        if layout is None or memory_format is None:
            raise FormatError(f"{where}: unknown layout or memory format")
        if not isinstance(md.get("requires_grad"), bool) or not isinstance(md.get("pin_memory"), bool):
            raise FormatError(f"{where}: malformed flags")
        size = _ints(md.get("size"), where)
        raw_chunks = md.get("chunks")
        if not isinstance(raw_chunks, list):
            raise FormatError(f"{where}: malformed chunks")
        chunks = []
        for chunk in raw_chunks:
            if not isinstance(chunk, list) or len(chunk) != 2:
                raise FormatError(f"{where}: malformed chunk")
            offsets, sizes = _ints(chunk[0], where), _ints(chunk[1], where)
            if len(offsets) != len(size) or len(sizes) != len(size) or any(
                    o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
                raise FormatError(f"{where}: chunk {offsets}+{sizes} outside {size}")
            chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        props = TensorProperties(dtype=_dtype_from_name(md.get("dtype"), where), layout=layout,
                                 requires_grad=md["requires_grad"], memory_format=memory_format,
                                 pin_memory=md["pin_memory"])
        state[fqn] = TensorStorageMetadata(props, torch.Size(size), chunks)
    planner_data = obj.get("planner_data")
    if planner_data is not None:
        if not isinstance(planner_data, dict) or not all(
                isinstance(k, str) and _path_to_plain(v) is not None for k, v in planner_data.items()):
            raise FormatError(f"{what}: malformed planner_data")
        planner_data = {k: tuple(v) for k, v in planner_data.items()}
    storage_meta = None
    raw_meta = obj.get("storage_meta")
    if raw_meta is not None:
        if not isinstance(raw_meta, dict) or not isinstance(raw_meta.get("modules", []), list):
            raise FormatError(f"{what}: malformed storage_meta")
        storage_meta = StorageMeta(
            checkpoint_id=_str_or_none(raw_meta.get("checkpoint_id"), what),
            save_id=_str_or_none(raw_meta.get("save_id"), what),
            load_id=_str_or_none(raw_meta.get("load_id"), what),
            modules=[m for m in raw_meta.get("modules", []) if isinstance(m, str)],
        )
    return Metadata(state_dict_metadata=state, planner_data=planner_data, storage_meta=storage_meta,
                    version=_str_or_none(obj.get("version"), what))


# -- writing ---------------------------------------------------------------------------------
def _close_lease(lease: Lease | None) -> None:
    if lease is not None:
        lease.__exit__(None, None, None)


class StoreWriter(StorageWriter):
    """A DCP StorageWriter that saves into `store` as `step` (one manifest, one commit).

    `overwrite` is used only by the coordinator's commit (`commit_ref`), exactly as in
    `Store.save`: StepExistsError when the step exists and not `overwrite`, CommitConflictError
    when another writer replaced it concurrently. DCP raises the coordinator's error on every
    rank inside a CheckpointException (`unwrap` finds it; `ckptstore.dcp.save` re-raises it).
    """

    def __init__(self, store: Store, step: int, *, overwrite: bool = False):
        super().__init__()
        self.store = store
        self.step = keys.check_step(step)
        self.overwrite = overwrite
        self.is_coordinator = False
        self.rank = 0
        self._hash = hasher(store.marker.hash_algorithm)
        self._epoch: Epoch | None = None
        self._lease: Lease | None = None
        self._finalizer: weakref.finalize | None = None
        #: After a save: new chunks this rank wrote and their stored bytes (the rest deduplicated).
        self.new_chunks = 0
        self.new_bytes = 0
        #: On the coordinator after finish(): the committed ref.
        self.committed: Ref | None = None

    # DCP's life cycle -----------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """A new save begins; `checkpoint_id` is ignored (the store and step name the checkpoint)."""
        self._release()
        self.committed = None
        self.new_chunks = self.new_bytes = 0

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never chosen automatically: pass storage_writer=StoreWriter(...)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # Every rank: read the gc epoch, then take a save lease, before any chunk is checked.
        # The coordinator's lease lasts until its commit, so it covers every rank's writes
        # (they start only after the coordinator's local plan); see docs/DCP.md.
        self._release()
        ensure_conditional_writes(self.store.backend)
        self._epoch = read_epoch(self.store.backend)[0]
        lease = Lease(self.store.backend, "save", writer_identity(), ttl=self.store.lease_ttl)
        lease.__enter__()
        self._lease = lease
        self._finalizer = weakref.finalize(self, _close_lease, lease)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        try:
            results = self._write(plan, planner)
        finally:
            if not self.is_coordinator:
                self._release()
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        try:
            self._finish(metadata, results)
        finally:
            self._release()

    def storage_meta(self) -> StorageMeta | None:
        return None

    # ------------------------------------------------------------------------------------------
    def _release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # closes the lease once
            self._finalizer = None
        self._lease = None

    def _write(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        items: list[WriteItem] = list(plan.items)
        sources: list[memoryview] = []
        elements: list[ElementType] = []  # what compression may assume about each source's bytes
        described: list[tuple[str, str, tuple[int, ...]]] = []
        keepalive = []
        for item in items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                sources.append(memoryview(raw))
                elements.append(BYTES)
                described.append((KIND_BYTES, "uint8", (len(raw),)))
                keepalive.append(raw)
            else:
                src = describe(data, item.index.fqn)
                sources.append(src.data)
                elements.append(src.element)
                described.append((KIND_TORCH, src.dtype, src.shape))
                keepalive.append(src.keepalive)
        chunk_plan = plan_chunks([s.nbytes for s in sources], self.store.chunking)
        writer = ChunkWriter(self.store.backend, self._hash, self.store.compression, self.store.threads,
                             elements=elements)
        written = writer.write(chunk_plan, sources)
        assert self._epoch is not None, "prepare_local_plan was not called"
        settle_chunks(self.store, self._epoch, writer, chunk_plan, written, sources)
        new = {r.entry.digest: r.entry.stored_size for r in written if r.written}
        self.new_chunks, self.new_bytes = len(new), sum(new.values())

        results = []
        for item, (kind, dtype, shape), segs, source in zip(items, described, plain_segments(chunk_plan, written),
                                                            sources, strict=True):
            storage = {"kind": kind, "dtype": dtype, "shape": list(shape), "segments": segs}
            results.append(WriteResult(index=item.index, size_in_bytes=source.nbytes, storage_data=storage))
        del keepalive
        return results

    def _finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        table = ChunkTable()
        tensors: list[TensorEntry] = []
        by_fqn: dict[str, list[TensorRef]] = {}
        for rank_results in results:
            for result in rank_results:
                storage = result.storage_data
                segments = table.segments(storage["segments"])
                fqn = result.index.fqn
                placement: dict[str, Any] = {"fqn": fqn}
                if storage["kind"] == KIND_BYTES:
                    placement["bytes"] = True
                else:
                    md = metadata.state_dict_metadata.get(fqn)
                    offsets = result.index.offset
                    placement["offsets"] = list(offsets) if offsets is not None else [0] * len(storage["shape"])
                    placement["global_shape"] = (list(md.size) if isinstance(md, TensorStorageMetadata)
                                                 else list(storage["shape"]))
                by_fqn.setdefault(fqn, []).append(TensorRef(len(tensors)))
                dtype = "uint8" if storage["kind"] == KIND_BYTES else storage["dtype"]
                tensors.append(TensorEntry(KIND_TORCH, dtype, tuple(storage["shape"]), segments, placement))

        tree_obj = {TREE_KEY: {"format": DCP_FORMAT, "metadata": metadata_to_plain(metadata), "items": by_fqn}}
        tree = encode_tree(tree_obj, lambda _path, value: value.index if isinstance(value, TensorRef) else None)
        summary = {TREE_KEY: {"format": DCP_FORMAT, "items": len(metadata.state_dict_metadata),
                              "ranks": len(results)}}
        manifest = Manifest(self.step, time.time(), summary, tree, tuple(tensors), tuple(table.chunks))
        assert self._epoch is not None, "prepare_local_plan was not called"
        _, self.committed = write_manifest_and_commit(self.store, self._epoch, manifest, overwrite=self.overwrite,
                                                      writer=writer_identity())


# -- reading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _StoredItem:
    """Where one saved item's bytes are: kind, dtype, shape and (chunk, offset, length) segments."""

    label: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    segments: tuple[tuple[ChunkEntry, int, int], ...]


class StoreReader(StorageReader):
    """A DCP StorageReader for a step saved with StoreWriter (default: the latest step).

    With `step=None` every rank resolves "latest" itself; pass the step explicitly when
    another job may commit a newer step while ranks start loading.
    """

    def __init__(self, store: Store, step: int | str | None = None, *, trust_pickle: bool = False):
        super().__init__()
        self.store = store
        self.step = step
        self.trust_pickle = trust_pickle
        self.resolved: int | None = None
        self._items: dict[MetadataIndex, _StoredItem] = {}
        self._hash = hasher(store.marker.hash_algorithm)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._items = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never chosen automatically: pass storage_reader=StoreReader(...)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        store = self.store
        with Lease(store.backend, "load", writer_identity(), ttl=store.lease_ttl, required=False):
            if self.step is None:
                latest = store.latest()
                if latest is None:
                    raise errors.StepNotFoundError("latest", store.url)
                step: int | str = latest
            else:
                step = self.step
            info = store.info(step)
        self.resolved = info.step
        manifest = info.manifest
        tree = decode_tree(manifest.tree)
        node = tree.get(TREE_KEY) if isinstance(tree, dict) else None
        if not isinstance(node, dict) or "items" not in node or "metadata" not in node:
            raise FormatError(f"step {info.step} was not saved through torch.distributed.checkpoint "
                              f"(ckptstore.dcp.StoreWriter); load it with Store.load")
        if node.get("format") != DCP_FORMAT:
            raise errors.UnsupportedFormatError(f"step {info.step}: DCP layout version {node.get('format')!r}; "
                                                f"this ckptstore reads version {DCP_FORMAT}")
        metadata = metadata_from_plain(node["metadata"])
        items: dict[MetadataIndex, _StoredItem] = {}
        for entry in manifest.tensors:
            placement = entry.placement or {}
            fqn = placement.get("fqn")
            if not isinstance(fqn, str) or fqn not in metadata.state_dict_metadata:
                raise FormatError(f"step {info.step}: tensor entry without a known DCP fqn")
            if placement.get("bytes"):
                index = MetadataIndex(fqn)
                kind = KIND_BYTES
            else:
                index = MetadataIndex(fqn, _ints(placement.get("offsets"), f"step {info.step} {fqn}"))
                kind = KIND_TORCH
            segs = tuple((manifest.chunks[i], offset, length) for i, offset, length in entry.segments)
            items[index] = _StoredItem(f"{fqn}@{list(index.offset or [])}", kind, entry.dtype, entry.shape, segs)
        self._items = items
        # Plain, picklable description for DCP (it may pass metadata between ranks).
        metadata.storage_data = {"ckptstore_step": info.step, "ckptstore_manifest": info.ref.manifest}
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not self._items:  # this rank did not read the metadata itself: read the same manifest
            data = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
            if self.step is None and isinstance(data.get("ckptstore_step"), int):
                self.step = data["ckptstore_step"]
            self.read_metadata()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        store = self.store
        with Lease(store.backend, "load", writer_identity(), ttl=store.lease_ttl, required=False):
            self._read(plan, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        # One buffer per stored item this rank needs; only chunks that overlap the requested
        # slices are fetched, each once, hash-checked by ChunkReader.
        by_storage: dict[MetadataIndex, list[ReadItem]] = {}
        for read_item in plan.items:
            by_storage.setdefault(read_item.storage_index, []).append(read_item)
        buffers: dict[MetadataIndex, Any] = {}
        jobs: dict[str, tuple[ChunkEntry, list[Landing]]] = {}
        for index, read_items in by_storage.items():
            stored = self._items.get(index)
            if stored is None:
                raise IntegrityError(f"step {self.resolved}: no stored item {index.fqn!r} at offset "
                                     f"{list(index.offset or [])}")
            buffer: Any
            if stored.kind == KIND_BYTES:
                buffer = bytearray(sum(length for _, _, length in stored.segments))
                view = memoryview(buffer)
                spans = [(0, len(buffer))]
            else:
                buffer = torch.empty(stored.shape, dtype=_dtype_from_name(stored.dtype, stored.label))
                view = memoryview(buffer.reshape(-1).view(torch.uint8).numpy())
                spans = [_byte_span(stored.shape, buffer.element_size(), r.storage_offsets, r.lengths)
                         for r in read_items]
            buffers[index] = buffer
            position = 0
            for chunk, offset, length in stored.segments:
                if any(lo < position + length and position < hi for lo, hi in spans):
                    job = jobs.setdefault(chunk.digest, (chunk, []))
                    job[1].append(Landing(offset, length, view[position:position + length], stored.label))
                position += length
        reader = ChunkReader(self.store.backend, self._hash, self.store.threads, verify=self.store.verify)
        reader.read(list(jobs.values()), f"step {self.resolved}")

        for index, read_items in by_storage.items():
            buffer = buffers[index]
            for read_item in read_items:
                if read_item.type == LoadItemType.BYTE_IO:
                    raw = bytes(buffer)
                    if not self.trust_pickle:
                        _check_weights_only(raw, index.fqn, self.resolved)
                    planner.load_bytes(read_item, io.BytesIO(raw))
                    continue
                source = buffer
                for dim, (start, length) in enumerate(zip(read_item.storage_offsets, read_item.lengths,
                                                          strict=True)):
                    source = source.narrow(dim, start, length)
                target = planner.resolve_tensor(read_item).detach()
                if target.size() != source.size():
                    raise errors.StateMismatchError(
                        f"{index.fqn}: requested slice {list(target.size())} but the stored slice is "
                        f"{list(source.size())}")
                target.copy_(source)
                planner.commit_tensor(read_item, target)


def _check_weights_only(raw: bytes, fqn: str, step: int | None) -> None:
    """Refuse a BYTE_IO item that torch.load(weights_only=True) cannot load.

    DCP stores non-tensor values as torch.save() bytes and its DefaultLoadPlanner loads them
    with torch.load(weights_only=False), i.e. full pickle. Checking them first with the
    restricted unpickler means a checkpoint from an untrusted bucket cannot run code here.
    """
    try:
        torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as exc:
        raise errors.UnsupportedValueError(
            f"step {step} item {fqn!r}",
            f"DCP stored it as a pickle that torch.load(weights_only=True) refuses ({type(exc).__name__}); "
            f"pass StoreReader(..., trust_pickle=True) only if you trust this store") from exc


def _byte_span(shape: tuple[int, ...], element_size: int, offsets: Any, lengths: Any) -> tuple[int, int]:
    """The byte range [lo, hi) of a row-major tensor that holds the hypercube at offsets/lengths."""
    if any(length == 0 for length in lengths):
        return (0, 0)
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    first = sum(o * s for o, s in zip(offsets, strides, strict=True))
    last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides, strict=True))
    return (first * element_size, (last + 1) * element_size)
