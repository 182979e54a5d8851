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

import contextlib
import dataclasses
import gc
import io
import logging
import math
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
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
from ckptstore.backends.base import OVERWRITE, Backend
from ckptstore.canary import ensure_conditional_writes
from ckptstore.chunkblob import BYTES, ElementType, encode_chunk
from ckptstore.chunking import plan_chunks
from ckptstore.chunkio import ChunkReader, ChunkWriter, Landing, put_chunk
from ckptstore.dcpformat import LAYOUT_1, LAYOUT_2, CompactMetadata, FqnEntry, build_compact, dcp_node, parse_compact
from ckptstore.distributed import ChunkTable, commit_manifest_bytes, plain_segments, settle_chunks
from ckptstore.dtypes import KIND_TORCH, TORCH_DTYPE_SIZES
from ckptstore.epoch import Epoch, epoch_from_plain, epoch_to_plain, read_epoch
from ckptstore.errors import CkptStoreError, FormatError, IntegrityError
from ckptstore.hashing import hasher
from ckptstore.knownchunks import handoff_epoch, handoff_for_ranks, known_from_handoff, known_without_handoff
from ckptstore.leases import Lease
from ckptstore.manifest import ChunkEntry, Manifest, Ref, StepSummary, TensorEntry
from ckptstore.manifestread import read_parts
from ckptstore.manifestv2 import TABLE_ENTRIES, BlobRef, RootManifest, build_chunk_tables, encode_part, encode_root
from ckptstore.store import Store, writer_identity
from ckptstore.tensors import describe, torch_dtype_name
from ckptstore.tree import decode_tree, encode_tree

__all__ = ["DCP_FORMAT", "PickleRefusedError", "StoreReader", "StoreWriter", "async_save", "latest_step", "load",
           "parse_checkpoint_id", "save", "unwrap"]

log = logging.getLogger(__name__)

#: Version of the layout under the tree's "dcp" key that this writer writes (docs/DCP.md):
#: 2, compact metadata in a v2 manifest root; the reader also reads layout 1 (v1 manifests).
DCP_FORMAT = 2
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


def _unwrapped(exc: BaseException) -> BaseException:
    """The ckptstore error inside DCP's `exc` (with `exc` as its cause), or `exc` itself."""
    inner = unwrap(exc)
    if inner is None or inner is exc:
        return exc
    inner.__cause__ = exc
    return inner


def save(state_dict: dict[str, Any], store: Store, step: int | str | os.PathLike[str], *, overwrite: bool = False,
         **kwargs: Any) -> Metadata:
    """`torch.distributed.checkpoint.save` with a StoreWriter; a ckptstore error (e.g.
    StepExistsError) is raised as itself, on every rank, instead of a CheckpointException.
    Whatever happened, this rank's save lease is gone when it returns (docs/DCP.md)."""
    import torch.distributed.checkpoint as dcp

    writer = StoreWriter(store, step, overwrite=overwrite)
    try:
        metadata = dcp.save(state_dict, storage_writer=writer, **kwargs)
    except BaseException as exc:
        writer.release(abandon=True)  # a failed save's coordinator may never have deleted it
        raise _unwrapped(exc)  # noqa: B904 - the cause is set: DCP's exception
    writer.release()  # committed: the coordinator deleted it
    return metadata


def async_save(state_dict: dict[str, Any], store: Store | None = None, step: int | str | os.PathLike[str] | None = None,
               *, overwrite: bool = False, storage_writer: StoreWriter | None = None,
               **kwargs: Any) -> Future[Metadata]:
    """`torch.distributed.checkpoint.async_save` with a StoreWriter (`store` and `step`, or a
    `storage_writer` to reuse; `checkpoint_id=` switches its step). Returns a future whose
    result is DCP's Metadata; a ckptstore error (e.g. StepExistsError, also from a PROCESS-mode
    child) is raised by `result()` as itself. When the save ends, however it ends, this rank's
    save lease is gone, also the one a PROCESS-mode child took (docs/DCP.md).
    `async_checkpointer_type`, `process_group`, `planner`, `async_stager` go to DCP as they are."""
    import concurrent.futures as cf

    import torch.distributed.checkpoint as dcp

    if storage_writer is None:
        if store is None or step is None:
            raise errors.InvalidArgumentError("async_save needs store and step, or storage_writer")
        storage_writer = StoreWriter(store, step, overwrite=overwrite)
    checkpoint_id = kwargs.pop("checkpoint_id", None)
    storage_writer.reset(checkpoint_id)  # here, not in a PROCESS-mode child: its leases carry our token
    response = dcp.async_save(state_dict, storage_writer=storage_writer, **kwargs)
    upload: Any = getattr(response, "upload_completion", response)
    out: cf.Future[Metadata] = cf.Future()
    writer = storage_writer

    def done(future: Any) -> None:
        exc = future.exception()
        # Committed: the coordinator deleted every rank's lease, a PROCESS-mode child's too.
        writer.release(children=exc is not None, abandon=exc is not None)
        if exc is None:
            out.set_result(future.result())
        else:
            out.set_exception(_unwrapped(exc))

    upload.add_done_callback(done)
    return out  # type: ignore[return-value]


def load(state_dict: dict[str, Any], store: Store, step: int | str | None = None, *, trust_pickle: bool = False,
         **kwargs: Any) -> None:
    """`torch.distributed.checkpoint.load` with a StoreReader; ckptstore errors unwrapped.
    `step=None` is the latest step, resolved once (rank 0 of the process group) and broadcast,
    so all ranks load the same step."""
    import torch.distributed.checkpoint as dcp

    if step is None:
        step = _latest_once(store, kwargs)
    reader = StoreReader(store, step, trust_pickle=trust_pickle)
    reader.read_metadata()  # DCP turns errors here into an AssertionError's text: raise them as they are
    try:
        dcp.load(state_dict, storage_reader=reader, **kwargs)
    except BaseException as exc:
        raise _unwrapped(exc)  # noqa: B904 - the cause is set: DCP's exception


def latest_step(store: Store, process_group: Any = None) -> int | None:
    """The store's latest step, resolved by rank 0 of `process_group` (default: the default
    group, when one is initialised) and broadcast: a collective, so every rank of the group
    must call it, and all get the same answer (None when the store has no step; a ckptstore
    error, e.g. StoreNotFoundError, is raised on every rank)."""
    return _latest_once(store, {"process_group": process_group})


def _latest_once(store: Store, kwargs: dict[str, Any]) -> int | None:
    """The latest step, resolved by the group's rank 0 alone and broadcast over the group DCP
    loads with (`process_group`), so every rank loads the same step even when another job
    commits a newer one meanwhile. Without a group (or with `no_dist`): resolved here, None
    when the store has no step (StoreReader then raises StepNotFoundError)."""
    import torch.distributed as dist

    group = kwargs.get("process_group")
    if kwargs.get("no_dist") or not (dist.is_available() and dist.is_initialized()) \
            or dist.get_world_size(group) <= 1:
        return store.latest()
    box: list[Any] = [None]
    if dist.get_rank(group) == 0:
        try:
            box = [("ok", store.latest())]
        except CkptStoreError as exc:
            box = [("error", exc)]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    outcome, value = box[0]
    if outcome == "error":
        raise value
    return value


# -- checkpoint_id ---------------------------------------------------------------------------
_STEP_NAME = re.compile(r"(?:step[-_])?([0-9]+)")
LATEST = "latest"


def _forms(reader: bool) -> str:
    forms = "an int, or a str or path whose last component is N, step-N or step_N (e.g. 8, 'step-8', '/ckpt/step_8')"
    if reader:
        forms += "; for a StoreReader also 'latest' (or a path ending in it) or a tag name (e.g. 'best')"
    return forms


def parse_checkpoint_id(checkpoint_id: Any, *, reader: bool = False) -> int | str | None:
    """The step a DCP `checkpoint_id` names (docs/DCP.md): an int, or a str or path whose last
    component is `N`, `step-N` or `step_N`. With `reader=True` also `latest` (returns None)
    or a tag name without a path separator (returns the name). InvalidArgumentError (also a
    ValueError) for anything else, listing the accepted forms."""
    if isinstance(checkpoint_id, int) and not isinstance(checkpoint_id, bool):
        if 0 <= checkpoint_id <= keys.MAX_STEP:
            return checkpoint_id
    elif isinstance(checkpoint_id, (str, os.PathLike)):
        text = os.fspath(checkpoint_id)
        if isinstance(text, str):
            last = text.replace(os.sep, "/").rstrip("/").rsplit("/", 1)[-1]
            match = _STEP_NAME.fullmatch(last)
            if match and int(match[1]) <= keys.MAX_STEP:
                return int(match[1])
            if reader and last == LATEST:
                return None
            if reader and "/" not in text and os.sep not in text:
                with contextlib.suppress(errors.InvalidKeyError):
                    keys.tag_ref_key(text)
                    return text
    what = "StoreReader" if reader else "StoreWriter"
    raise errors.InvalidArgumentError(f"{what}: checkpoint_id {checkpoint_id!r} names no step; use {_forms(reader)}")


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


def metadata_from_compact(compact: CompactMetadata) -> Metadata:
    """DCP Metadata from a validated layout-2 object. Shard lists and properties that fqns
    share are built once and shared (each fqn gets its own list of the same immutable
    ChunkStorageMetadata), so 2.2M shards of a 70B model over 1024 ranks cost ~12k objects."""
    base = metadata_from_plain({"state_dict_metadata": {}, "planner_data": compact.planner_data,
                                "storage_meta": compact.storage_meta, "version": compact.version})
    props = []
    for dtype, layout, requires_grad, memory_format, pin_memory in compact.props:
        if layout not in _LAYOUTS or memory_format not in _MEMORY_FORMATS:
            raise FormatError(f"DCP metadata: unknown layout {layout!r} or memory format {memory_format!r}"[:200])
        props.append(TensorProperties(dtype=_dtype_from_name(dtype, "DCP metadata"), layout=_LAYOUTS[layout],
                                      requires_grad=requires_grad, memory_format=_MEMORY_FORMATS[memory_format],
                                      pin_memory=pin_memory))
    layouts = [[ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in shards] for shards in compact.layouts]
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for e in compact.entries:
        state[e.fqn] = (BytesStorageMetadata() if e.is_bytes
                        else TensorStorageMetadata(props[e.props], torch.Size(e.size), list(layouts[e.layout])))
    base.state_dict_metadata = state
    return base


# -- writing ---------------------------------------------------------------------------------
class _SaveLease(Lease):
    """One rank's save lease for one DCP save (docs/DCP.md, "gc protocol across ranks").

    Refreshed in the background only while a DCP call of the save runs on this rank
    (`write_data`; `finish` on the coordinator), so a save DCP aborts between calls leaves a
    lease nobody refreshes, stale one TTL later. Its key, locks/save-<token>-<nonce>, starts
    with the writer's token: the process that pickled the writer into a PROCESS-mode child
    can end the child's leases by listing them (`StoreWriter.release(children=True)`)."""

    def __init__(self, backend: Backend, token: str, *, ttl: float):
        super().__init__(backend, "save", writer_identity(), ttl=ttl)
        self.key = keys.lock_key(f"save-{token}-{secrets.token_hex(4)}")
        #: Named in this rank's write result: the coordinator's finish deletes it, committed or
        #: not, so closing it here only stops refreshing (one delete a rank fewer per save).
        self.handed_over = False

    def pause(self) -> None:
        """Stop refreshing; the lease object stays until deleted or stale."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def resume(self) -> None:
        """Refresh now, then in the background again."""
        if not self.held:
            return
        self.backend.put(self.key, self._payload(), mode=OVERWRITE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="ckptstore-lease", daemon=True)
        self._thread.start()


def _close_lease(lease: _SaveLease | None) -> None:
    if lease is None:
        return
    if lease.handed_over:
        lease.pause()
        lease.held = False
    else:
        lease.__exit__(None, None, None)


def _delete_leases(backend: Backend, names: Any) -> None:
    """Delete save leases by key, in batches where the backend has them (S3 DeleteObjects: 1024
    ranks' leases in 2 requests); a leftover goes stale and is ignored anyway."""
    doomed = sorted({name for name in names if isinstance(name, str) and name.startswith(keys.lock_key("save-"))})
    with contextlib.suppress(Exception):
        backend.delete_many(doomed)


def _writer_step(checkpoint_id: Any) -> int:
    step = parse_checkpoint_id(checkpoint_id)
    assert isinstance(step, int)
    return step


class StoreWriter(StorageWriter):
    """A DCP StorageWriter that saves into `store` as `step` (one manifest, one commit).

    `step` may also be given later as DCP's `checkpoint_id` (`dcp.save(..., checkpoint_id=
    "step-8")` or `reset("step-8")`), so one writer serves many saves; the forms are in
    `parse_checkpoint_id`. `overwrite` is used only by the coordinator's commit
    (`commit_ref`), exactly as in `Store.save`: StepExistsError when the step exists and not
    `overwrite`, CommitConflictError when another writer replaced it concurrently. DCP raises
    the coordinator's error on every rank inside a CheckpointException (`unwrap` finds it;
    `ckptstore.dcp.save` re-raises it). The writer pickles (PROCESS-mode `dcp.async_save`):
    the copy reopens its store from the URL and options and takes its own lease
    (docs/DCP.md, "Async saves").
    """

    def __init__(self, store: Store, step: int | str | os.PathLike[str] | None = None, *, overwrite: bool = False):
        super().__init__()
        self.store = store
        self.step: int | None = None if step is None else _writer_step(step)
        self.overwrite = overwrite
        self.is_coordinator = False
        self.rank = 0
        #: Starts the key of every lease this writer (or a pickled copy of it) takes; new per reset().
        self.token = secrets.token_hex(8)
        self._hash = hasher(store.marker.hash_algorithm)
        self._epoch: Epoch | None = None
        self._lease: _SaveLease | None = None
        self._finalizer: weakref.finalize | None = None
        #: After a save: new chunks this rank wrote and their stored bytes (the rest deduplicated).
        self.new_chunks = 0
        self.new_bytes = 0
        #: On the coordinator after finish(): the committed ref.
        self.committed: Ref | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A lease, its thread and the hasher belong to this process; the store reopens itself.
        state = dict(self.__dict__)
        state.update(_hash=None, _epoch=None, _lease=None, _finalizer=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._hash = hasher(self.store.marker.hash_algorithm)

    # DCP's life cycle -----------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | int | None = None) -> None:
        """A new save begins, as `checkpoint_id`'s step when one is given (`parse_checkpoint_id`).
        Ends this writer's lease of an earlier save at once."""
        step = None if checkpoint_id is None else _writer_step(checkpoint_id)
        self.release()
        if step is not None:
            self.step = step
        self.token = secrets.token_hex(8)
        self.committed = None
        self.new_chunks = self.new_bytes = 0

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.step is None:
            raise errors.InvalidArgumentError("StoreWriter has no step: pass StoreWriter(store, step), or "
                                              f"checkpoint_id to dcp.save; {_forms(False)}")
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never chosen automatically: pass storage_writer=StoreWriter(...)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # No lease yet: a save DCP aborts before write_data leaves none (docs/DCP.md).
        self.release()
        ensure_conditional_writes(self.store.backend)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # The gc epoch and the latest step, read once here for every rank (ckptstore/knownchunks.py
        # says why that is safe): a rank then reads only its own part of that step.
        handoffs = handoff_for_ranks(self.store, len(plans))
        if handoffs is None:
            return plans
        return [plan if plan.storage_data is not None else
                dataclasses.replace(plan, storage_data={**handoff, "step": self.step})
                for plan, handoff in zip(plans, handoffs, strict=True)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        # A rank that writes (and the coordinator, which commits) reads the gc epoch, then takes
        # its lease, before any chunk is checked; the lease is refreshed only during this call.
        self.release()
        handoff = plan.storage_data
        epoch = handoff_epoch(handoff) if isinstance(handoff, dict) and handoff.get("step") == self.step else None
        if epoch is None:  # no coordinator's handoff for this save (or a cached plan's, of another)
            handoff = None  # its part is safe to trust only with its own E0
        try:
            if plan.items or self.is_coordinator:
                self._begin(epoch)
            results = self._write(plan, planner, handoff) if plan.items else []
        except BaseException:
            self.release()
            raise
        if self._lease is not None:
            self._lease.pause()  # until the coordinator's finish deletes it, or one TTL
            # Named in a write result, another rank's finish deletes it (the coordinator's own is
            # deleted by its finish, or by its release when DCP aborts before finish).
            self._lease.handed_over = bool(results) and not self.is_coordinator
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        leases = {r.storage_data.get("lease") for rank_results in results for r in rank_results
                  if isinstance(r.storage_data, dict)}
        try:
            if self._lease is None:
                self._begin()
            else:
                self._lease.resume()
            self._finish(metadata, results)
        finally:  # every rank's lease of this save ends here, committed or not
            own = self._lease.key if self._lease is not None else None
            self.release()
            _delete_leases(self.store.backend, leases - {own})

    def storage_meta(self) -> StorageMeta | None:
        """The step, as DCP's checkpoint_id `step-N` (and this save's token as save_id)."""
        if self.step is None:
            return None
        return StorageMeta(checkpoint_id=f"step-{self.step}", save_id=self.token)

    def release(self, *, children: bool = False, abandon: bool = False) -> None:
        """End this writer's save lease now (DCP calls nothing after an aborted save). A lease
        handed over to the coordinator (named in this rank's write result) is left to the
        coordinator's finish, which deletes every rank's, or to go stale one TTL later, unless
        `abandon` (the save failed: finish may never run). With `children`, also the leases
        pickled copies of it took in PROCESS-mode children (lists locks/).
        `ckptstore.dcp.save`/`async_save`, reset() and dropping the writer do it."""
        if abandon and self._lease is not None:
            self._lease.handed_over = False
        if self._finalizer is not None:
            self._finalizer()  # closes the lease once
            self._finalizer = None
        self._lease = None
        if children:
            prefix = keys.lock_key(f"save-{self.token}-")
            with contextlib.suppress(Exception):
                _delete_leases(self.store.backend, [info.key for info in self.store.backend.list(keys.LOCKS)
                                                    if info.key.startswith(prefix)])

    # ------------------------------------------------------------------------------------------
    def _begin(self, epoch: Epoch | None = None) -> None:
        """Take the save lease; `epoch` is E0 as the coordinator read it before this lease
        existed, else it is read here (before the lease exists: docs/FORMAT.md)."""
        backend = self.store.backend
        ensure_conditional_writes(backend)
        self._epoch = epoch if epoch is not None else read_epoch(backend)[0]
        lease = _SaveLease(backend, self.token, ttl=self.store.lease_ttl)
        lease.__enter__()
        self._lease = lease
        self._finalizer = weakref.finalize(self, _close_lease, lease)

    def _write(self, plan: SavePlan, planner: SavePlanner, handoff: dict[str, Any] | None) -> list[WriteResult]:
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
        if handoff is None:
            known, previous_part = known_without_handoff(self.store, self.rank), None
        else:
            known, previous_part = known_from_handoff(self.store, handoff)
        writer = ChunkWriter(self.store.backend, self._hash, self.store.compression, self.store.threads,
                             elements=elements, known=known)
        written = writer.write(chunk_plan, sources)
        assert self._epoch is not None, "write_data took no lease"
        swept = settle_chunks(self.store, self._epoch, writer, chunk_plan, written, sources)
        new = {r.entry.digest: r.entry.stored_size for r in written if r.written}
        part, items_plain, logical = self._part(items, described, plain_segments(chunk_plan, written))
        part_digest = self._hash(part)
        if previous_part is not None and not swept and part_digest == previous_part.digest:
            # The same part as the previous step's (unchanged data): present at the coordinator's
            # ref read, and no gc swept since E0, so neither a head nor a put (knownchunks.py).
            part_entry, part_written = previous_part.entry, False
        else:
            part_entry, part_written = put_blob(self.store, self._hash, part, part_digest)
        if part_written:
            new[part_entry.digest] = part_entry.stored_size
        self.new_chunks, self.new_bytes = len(new), sum(new.values())
        chunks = {r.entry.digest: r.entry for r in written}
        del keepalive

        # One result for the rank (DCP hands the coordinator whatever write_data returned): its
        # part, the chunks and (fqn, offsets) of its items, its epoch (the coordinator settles
        # against the earliest) and its lease (the coordinator deletes it after the commit).
        assert self._lease is not None
        storage: dict[str, Any] = {
            "part": [part_entry.digest, part_entry.raw_size, part_entry.stored_size, len(items)],
            "chunks": _pack([[bytes.fromhex(c.digest), c.raw_size, c.stored_size] for c in chunks.values()]),
            "items": _pack(items_plain), "logical": logical, "new_bytes": self.new_bytes, "rank": self.rank,
            "epoch": epoch_to_plain(self._epoch), "lease": self._lease.key}
        return [WriteResult(index=items[0].index, size_in_bytes=logical, storage_data=storage)]

    @staticmethod
    def _part(items: list[WriteItem], described: list[tuple[str, str, tuple[int, ...]]],
              segments: list[list[list[Any]]]) -> tuple[bytes, list[list[Any]], int]:
        """This rank's manifest part (docs/FORMAT.md, "Manifest version 2"), the (fqn, offsets)
        of its items in part order, and their bytes."""
        table = ChunkTable()
        tensors: list[TensorEntry] = []
        keys_: list[list[Any]] = []
        for item, (kind, dtype, shape), segs in zip(items, described, segments, strict=True):
            fqn = item.index.fqn
            placement: dict[str, Any] = {"fqn": fqn}
            if kind == KIND_BYTES:
                placement["bytes"] = True
                keys_.append([fqn, None])
            else:
                offsets = list(item.index.offset) if item.index.offset is not None else [0] * len(shape)
                placement["offsets"] = offsets
                keys_.append([fqn, offsets])
            tensors.append(TensorEntry(KIND_TORCH, dtype, tuple(shape), table.segments(segs), placement))
        return encode_part(tuple(tensors), tuple(table.chunks)), keys_, sum(t.nbytes for t in tensors)

    def _finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        # The merge allocates millions of small objects (2.2M items at 1024 ranks) beside DCP's
        # global metadata (as many again): the cyclic gc would rescan that heap over and over
        # and it creates no cycles, so it is paused for it (refcounting still frees).
        with _cyclic_gc_paused():
            self._finish_merged(metadata, results)

    def _finish_merged(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert self._epoch is not None and self.step is not None, "write_data was not called"
        earliest = self._epoch
        new_bytes = logical = 0
        parts: list[BlobRef] = []
        part_ranks: list[int] = []  # the rank that wrote each part: its next save reads only that one
        chunks: dict[bytes, ChunkEntry] = {}
        held: dict[str, tuple[list[Any], list[int]]] = {}  # fqn -> offsets and part of each item, in order
        for rank_results in results:
            for result in rank_results:
                storage = result.storage_data
                epoch = epoch_from_plain(storage.get("epoch"))
                if epoch.number < earliest.number:
                    earliest = epoch
                new_bytes += storage.get("new_bytes", 0)
                logical += storage["logical"]
                part_no = len(parts)
                parts.append(BlobRef(*storage["part"]))
                part_ranks.append(int(storage.get("rank", -1)))
                for digest, raw_size, stored_size in _unpack(storage["chunks"]):
                    if digest not in chunks:
                        chunks[digest] = ChunkEntry(digest.hex(), raw_size, stored_size)
                for fqn, offsets in _unpack(storage["items"]):
                    found = held.get(fqn)
                    if found is None:
                        found = held[fqn] = ([], [])
                    found[0].append(offsets)
                    found[1].append(part_no)

        if metadata.storage_meta is None:  # DCP's default planner drops it: the metadata names the step
            metadata.storage_meta = self.storage_meta()
        compact = metadata_to_compact(metadata, held)
        tree = encode_tree({TREE_KEY: {"format": DCP_FORMAT, "metadata": compact, "part_ranks": part_ranks}},
                           lambda _p, _v: None)
        tables = []
        for data in build_chunk_tables(list(chunks.values())):
            table, written = put_blob(self.store, self._hash, data)
            tables.append(table)
            new_bytes += table.stored_size if written else 0
        table_refs = tuple(BlobRef(t.digest, t.raw_size, t.stored_size,
                                   min(TABLE_ENTRIES, len(chunks) - i * TABLE_ENTRIES)) for i, t in enumerate(tables))
        summary = {TREE_KEY: {"format": DCP_FORMAT, "items": len(metadata.state_dict_metadata), "ranks": len(results)}}
        data_stored = sum(c.stored_size for c in chunks.values())
        root = RootManifest(self.step, time.time(), summary, tree, tuple(parts), table_refs,
                            tensors=sum(p.count for p in parts), chunks=len(chunks), logical_bytes=logical,
                            stored_bytes=data_stored)
        every_chunk = [*chunks.values(), *root.blobs]
        step_summary = StepSummary(root.tensors, logical, data_stored + sum(b.stored_size for b in root.blobs),
                                   new_bytes, len(chunks) + len(root.blobs))
        # The earliest epoch any rank read before its lease: a gc that swept since then may have
        # taken a chunk after its rank stopped refreshing (docs/FORMAT.md, the DCP bullet).
        _, self.committed = commit_manifest_bytes(self.store, earliest, self.step, encode_root(root), every_chunk,
                                                  step_summary, overwrite=self.overwrite, writer=writer_identity())


@contextlib.contextmanager
def _cyclic_gc_paused() -> Any:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(data: Any) -> Any:
    if not isinstance(data, bytes):
        raise FormatError("a rank's write result is malformed")
    return msgpack.unpackb(data, raw=False, use_list=False)


def put_blob(store: Store, hash_fn: Callable[[Any], str], data: bytes,
             digest: str | None = None) -> tuple[ChunkEntry, bool]:
    """Store `data` as one chunk blob (a manifest part or chunk table); (its entry, whether put).
    `digest`: hash_fn(data) when the caller has it already."""
    digest = digest if digest is not None else hash_fn(data)
    stored, written = put_chunk(store.backend, keys.chunk_key(digest),
                                lambda: encode_chunk(memoryview(data), store.compression, BYTES))
    return ChunkEntry(digest, len(data), stored), written


def metadata_to_compact(metadata: Metadata, held: dict[str, tuple[list[Any], list[int]]]) -> dict[str, Any]:
    """DCP Metadata as layout 2 (ckptstore.dcpformat), with the part holding each shard:
    `held[fqn]` is (offsets, parts) of the items that were written, which normally come in
    the metadata's own shard order (the planner builds both from the same plans, rank by
    rank); compared as whole lists, so the 2.2M shards of 1024 ranks cost no Python loop."""
    items: list[tuple[str, tuple[Any, ...] | None, list[int], list[Any], list[int]]] = []
    for fqn, md in metadata.state_dict_metadata.items():
        offsets, parts = held.get(fqn, ([], []))
        if isinstance(md, BytesStorageMetadata):
            if len(parts) != 1:
                raise IntegrityError(f"DCP item {fqn!r} was written by {len(parts)} ranks, not one")
            items.append((fqn, None, [], [], parts))
            continue
        if not isinstance(md, TensorStorageMetadata):
            raise errors.UnsupportedValueError(fqn, f"DCP storage metadata {type(md).__name__} is not supported")
        stored = [c.offsets for c in md.chunks]  # torch.Size: a tuple, equal to the written tuples
        if offsets != stored:  # another order: look each shard up
            where = dict(zip(offsets, parts, strict=True))
            missing = [list(o) for o in stored if tuple(o) not in where]
            if missing:
                raise IntegrityError(f"DCP item {fqn!r}: no rank wrote the shard at {missing[0]}")
            parts = [where[tuple(o)] for o in stored]
        props = md.properties
        items.append((fqn, (torch_dtype_name(props.dtype), str(props.layout).removeprefix("torch."),
                            bool(props.requires_grad), str(props.memory_format).removeprefix("torch."),
                            bool(props.pin_memory)), list(md.size),
                      list(zip(stored, [c.sizes for c in md.chunks], strict=True)), parts))
    rest = metadata_to_plain(Metadata(state_dict_metadata={}, planner_data=metadata.planner_data,
                                      storage_meta=metadata.storage_meta, version=metadata.version))
    return build_compact(items, planner_data=rest["planner_data"], storage_meta=rest["storage_meta"],
                         version=rest["version"])


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
        # A v2 root and what was learned from it (parts are read as plans need them).
        self._root: RootManifest | None = None
        self._compact: CompactMetadata | None = None
        self._entries: dict[str, FqnEntry] = {}
        self._positions: dict[int, dict[tuple[int, ...], int]] = {}
        self._loaded_parts: set[int] = set()

    def reset(self, checkpoint_id: str | os.PathLike[str] | int | None = None) -> None:
        """A new load begins; `checkpoint_id`, when given, names the step, `latest` or a tag
        (`parse_checkpoint_id`)."""
        if checkpoint_id is not None:
            self.step = parse_checkpoint_id(checkpoint_id, reader=True)
        self.resolved = None
        self._items = {}
        self._root = self._compact = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never chosen automatically: pass storage_reader=StoreReader(...)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        store = self.store
        # A read: at a URL with no store, StoreNotFoundError naming it, before the lease, and
        # nothing is created (Store.marker would create the store).
        store._require_store()
        with Lease(store.backend, "load", writer_identity(), ttl=store.lease_ttl, required=False):
            if self.step is None:
                latest = store.latest()
                if latest is None:
                    raise errors.StepNotFoundError("latest", store.url)
                step: int | str = latest
            else:
                step = self.step
            ref = store.ref(step)
            stored = store.manifest_object(ref.manifest)
        self.resolved = ref.step
        self._items = {}
        metadata = self._read_root(stored) if isinstance(stored, RootManifest) else self._read_v1(stored)
        # Plain, picklable description for DCP (it may pass metadata between ranks).
        metadata.storage_data = {"ckptstore_step": ref.step, "ckptstore_manifest": ref.manifest}
        return metadata

    def _dcp_node(self, tree_bytes: bytes, layout: int) -> dict[str, Any]:
        node = dcp_node(decode_tree(tree_bytes))
        if node is None or "metadata" not in node:
            raise FormatError(f"step {self.resolved} was not saved through torch.distributed.checkpoint "
                              f"(ckptstore.dcp.StoreWriter); load it with Store.load")
        if node.get("format") != layout:
            raise errors.UnsupportedFormatError(f"step {self.resolved}: DCP layout version {node.get('format')!r}; "
                                                f"this ckptstore reads version {layout} in this manifest version")
        return node

    def _read_v1(self, manifest: Manifest) -> Metadata:
        """A step written before manifest version 2: one manifest holds every rank's items."""
        node = self._dcp_node(manifest.tree, LAYOUT_1)
        if "items" not in node:
            raise FormatError(f"step {self.resolved}: DCP node without items")
        metadata = metadata_from_plain(node["metadata"])
        self._add_items(manifest, set(metadata.state_dict_metadata))
        self._root = None
        return metadata

    def _add_items(self, manifest: Manifest, fqns: Any) -> None:
        """Index the tensor entries of `manifest` (a v1 manifest or a v2 part) by DCP item."""
        for entry in manifest.tensors:
            placement = entry.placement or {}
            fqn = placement.get("fqn")
            if not isinstance(fqn, str) or fqn not in fqns:
                raise FormatError(f"step {self.resolved}: tensor entry without a known DCP fqn")
            if placement.get("bytes"):
                index = MetadataIndex(fqn)
                kind = KIND_BYTES
            else:
                index = MetadataIndex(fqn, _ints(placement.get("offsets"), f"step {self.resolved} {fqn}"))
                kind = KIND_TORCH
            segs = tuple((manifest.chunks[i], offset, length) for i, offset, length in entry.segments)
            self._items[index] = _StoredItem(f"{fqn}@{list(index.offset or [])}", kind, entry.dtype, entry.shape, segs)

    def _read_root(self, root: RootManifest) -> Metadata:
        """A v2 root: DCP's Metadata from its compact form; the parts are read later, only
        those holding items this rank's plan reads (`_load_parts`)."""
        compact = parse_compact(self._dcp_node(root.tree, LAYOUT_2)["metadata"], len(root.parts))
        self._root, self._compact = root, compact
        self._entries = {e.fqn: e for e in compact.entries}
        self._positions = {}
        self._loaded_parts = set()
        return metadata_from_compact(compact)

    def _load_parts(self, indices: Any) -> None:
        """Read the parts (of a v2 root) that hold the stored items at `indices`, once each."""
        root, compact = self._root, self._compact
        if root is None or compact is None:
            return
        needed: set[int] = set()
        for index in indices:
            if index in self._items:
                continue
            entry = self._entries.get(index.fqn)
            if entry is None:
                continue  # reported as "no stored item" by _read
            partmap = compact.partmaps[entry.partmap]
            if entry.is_bytes:
                needed.add(partmap[0])
                continue
            positions = self._positions.get(entry.layout)
            if positions is None:
                positions = self._positions[entry.layout] = {
                    offsets: i for i, (offsets, _) in enumerate(compact.layouts[entry.layout])}
            at = positions.get(tuple(index.offset or ()))
            if at is not None:
                needed.add(partmap[at])
        fqns = self._entries
        todo = sorted(needed - self._loaded_parts)
        for number, part in read_parts(self.store.backend, self._hash(), root, todo, self.store.threads):
            self._add_items(part, fqns)
            self._loaded_parts.add(number)

    def _hash(self) -> Callable[[Any], str]:
        return hasher(self.store._require_store().hash_algorithm)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not self._items and self._root is None:  # this rank did not read the metadata itself: read the same step
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
        self._load_parts(by_storage)
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
                # Only the bytes the plan reads: a resharded load needs part of a stored shard.
                for lo, hi in _merged(spans, position, position + length):
                    job = jobs.setdefault(chunk.digest, (chunk, []))
                    job[1].append(Landing(offset + lo - position, hi - lo, view[lo:hi], stored.label))
                position += length
        algorithm = self.store._require_store().hash_algorithm
        reader = ChunkReader(self.store.backend, hasher(algorithm), self.store.threads, verify=self.store.verify)
        # A chunk stored uncompressed that is needed only in part is fetched by byte range (not
        # hash-checked: docs/FORMAT.md, "Ranged reads"); whole and compressed chunks are checked.
        reader.read_ranges(list(jobs.values()), f"step {self.resolved}")

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


class PickleRefusedError(errors.UnsupportedValueError):
    """StoreReader refused to unpickle a stored non-tensor item (`trust_pickle` is off)."""

    def __init__(self, step: int | None, fqn: str, refused: list[str], reason: str):
        self.path = f"step {step} item {fqn!r}"
        self.step = step
        self.fqn = fqn
        self.refused = tuple(refused)
        what = f"the global {', '.join(refused)}" if refused else f"it ({reason})"
        CkptStoreError.__init__(
            self, f"cannot load item {fqn!r} of step {step}: DCP stored it as a pickle, and "
                  f"torch.load(weights_only=True) refuses {what}; pass trust_pickle=True "
                  f"(StoreReader(..., trust_pickle=True) or ckptstore.dcp.load(..., trust_pickle=True)) only if "
                  f"you trust this store: unpickling it may run its code")


#: Globals a stored item may need beyond what torch.load(weights_only=True) admits: building
#: them runs no user code. io.BytesIO: DCP pickles a BytesIO value (a dataloader's or
#: tokenizer's state) as the object, and its state is bytes and a position.
ADMITTED_GLOBALS: tuple[Callable[..., Any], ...] = (io.BytesIO,)
_ADMIT = threading.Lock()


def _global_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _unsafe_globals(raw: bytes) -> list[str]:
    """The globals of a torch.save payload that weights_only does not admit by default."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(raw)))
    except Exception:
        return []


def _check_weights_only(raw: bytes, fqn: str, step: int | None) -> None:
    """Refuse a BYTE_IO item that torch.load(weights_only=True), admitting also
    ADMITTED_GLOBALS, cannot load.

    DCP stores non-tensor values as torch.save() bytes and its DefaultLoadPlanner loads them
    with torch.load(weights_only=False), i.e. full pickle. Checking them first with the
    restricted unpickler means a checkpoint from an untrusted bucket cannot run code here.
    torch keeps admitted globals in one process-wide set: the few ADMITTED_GLOBALS this item
    needs are added (under a lock, only those not already there) for the check and removed after.
    """
    unsafe = _unsafe_globals(raw)
    admit = [g for g in ADMITTED_GLOBALS if _global_name(g) in unsafe]
    try:
        with _ADMIT if admit else contextlib.nullcontext():
            present = set(torch.serialization.get_safe_globals())
            missing: list[Any] = [g for g in admit if g not in present]
            with torch.serialization.safe_globals(missing) if missing else contextlib.nullcontext():
                torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as exc:
        admitted = {_global_name(g) for g in admit}
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:200]
        raise PickleRefusedError(step, fqn, [n for n in unsafe if n not in admitted], reason) from exc


def _merged(spans: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) that `spans` cover, as disjoint sorted ranges."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted((max(lo, start), min(hi, end)) for lo, hi in spans):
        if lo >= hi:
            continue
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _byte_span(shape: tuple[int, ...], element_size: int, offsets: Any, lengths: Any) -> tuple[int, int]:
    """The byte range [lo, hi) of a row-major tensor that holds the hypercube at offsets/lengths."""
    if any(length == 0 for length in lengths):
        return (0, 0)
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    first = sum(o * s for o, s in zip(offsets, strides, strict=True))
    last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides, strict=True))
    return (first * element_size, (last + 1) * element_size)
