"""Many DCP ranks in one process: the real StoreWriter and StoreReader, without a process group.

A model is {fqn: (global shape, dtype)}. Every tensor is sharded along dim 0 over `ranks`
ranks (FSDP2's layout); a dim-0 size smaller than `ranks` gives the last ranks no shard, and a
0-dim tensor is saved by rank 0 alone (DCP's dedup of replicated items). The plans, the
global Metadata (torch's own `create_default_global_save_plan`), the write results and the
coordinator's `finish` are the real ones; each rank's `write_data` runs in turn in this
process, with `data(fqn, offsets, sizes)` giving the bytes it writes (the shard itself for a
real round trip, or a tiny stand-in when only metadata is measured: the 70B simulation of
`python -m benchmarks --scale`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult

from ckptstore.dcp import StoreReader, StoreWriter

Model = dict[str, tuple[tuple[int, ...], torch.dtype]]
DataFn = Callable[[str, tuple[int, ...], tuple[int, ...]], torch.Tensor]


def llama_70b() -> Model:
    """Llama-3 70B's parameters (80 layers, dim 8192, 8 KV heads, FFN 28672, vocab 128256) and
    Adam's exp_avg and exp_avg_sq for each (the per-parameter `step` is a 0-dim tensor):
    2,892 fqns, 70.6e9 parameters."""
    dim, kv, ffn, vocab = 8192, 1024, 28672, 128256
    params: Model = {"tok_embeddings.weight": ((vocab, dim), torch.bfloat16)}
    for i in range(80):
        p = f"layers.{i}."
        params.update({
            p + "attention.wq.weight": ((dim, dim), torch.bfloat16),
            p + "attention.wk.weight": ((kv, dim), torch.bfloat16),
            p + "attention.wv.weight": ((kv, dim), torch.bfloat16),
            p + "attention.wo.weight": ((dim, dim), torch.bfloat16),
            p + "feed_forward.w1.weight": ((ffn, dim), torch.bfloat16),
            p + "feed_forward.w2.weight": ((dim, ffn), torch.bfloat16),
            p + "feed_forward.w3.weight": ((ffn, dim), torch.bfloat16),
            p + "attention_norm.weight": ((dim,), torch.bfloat16), p + "ffn_norm.weight": ((dim,), torch.bfloat16),
        })
    params.update({"norm.weight": ((dim,), torch.bfloat16), "output.weight": ((vocab, dim), torch.bfloat16)})
    model: Model = {f"model.{name}": spec for name, spec in params.items()}
    for name, (shape, _) in params.items():
        model[f"optim.state.{name}.exp_avg"] = (shape, torch.float32)
        model[f"optim.state.{name}.exp_avg_sq"] = (shape, torch.float32)
        model[f"optim.state.{name}.step"] = ((), torch.float32)
    return model


def shard(shape: tuple[int, ...], rank: int, ranks: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(offsets, sizes) of `rank`'s dim-0 shard (torch.chunk's split), or None if it has none."""
    if not shape:
        return ((), ()) if rank == 0 else None
    step = -(-shape[0] // ranks)
    start = rank * step
    if start >= shape[0]:
        return None
    rows = min(step, shape[0] - start)
    return (start, *[0] * (len(shape) - 1)), (rows, *shape[1:])


def local_plans(model: Model, ranks: int) -> list[SavePlan]:
    plans = []
    for rank in range(ranks):
        items = []
        for fqn, (shape, dtype) in model.items():
            found = shard(shape, rank, ranks)
            if found is None:
                continue
            offsets, sizes = found
            items.append(WriteItem(
                index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                                            properties=TensorProperties(dtype=dtype), size=torch.Size(shape))))
        plans.append(SavePlan(items))
    return plans


class _Planner:
    """What write_data asks of a SavePlanner: the data of each item."""

    def __init__(self, data: DataFn):
        self.data = data

    def resolve_data(self, item: WriteItem) -> torch.Tensor:
        assert item.tensor_data is not None
        chunk = item.tensor_data.chunk
        return self.data(item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes))


@dataclass
class SimulatedSave:
    metadata: Metadata
    plans: list[SavePlan]
    results: list[list[WriteResult]]
    writers: list[StoreWriter]


def write_ranks(store: Any, step: int, model: Model, ranks: int, data: DataFn, *,
                overwrite: bool = False) -> SimulatedSave:
    """Plan as DCP does (each rank's prepare_local_plan, then the coordinator's global plan and
    its prepare_global_plan), then run every rank's write_data in turn; `finish` is left to the
    caller (so it can be measured): `save.writers[0].finish(save.metadata, save.results)`."""
    writers = [StoreWriter(store, step, overwrite=overwrite) for _ in range(ranks)]
    local = []
    for rank, (writer, plan) in enumerate(zip(writers, local_plans(model, ranks), strict=True)):
        writer.set_up_storage_writer(rank == 0, rank=rank)
        local.append(writer.prepare_local_plan(plan))
    plans, metadata = create_default_global_save_plan(local)
    plans = writers[0].prepare_global_plan(plans)
    results = []
    planner = _Planner(data)
    try:
        for writer, plan in zip(writers, plans, strict=True):
            future = writer.write_data(plan, planner)  # type: ignore[arg-type]
            results.append(future.value())
    except BaseException:  # DCP aborts the save: no finish will delete the leases handed over
        for writer in writers:
            writer.release(abandon=True)
        raise
    return SimulatedSave(metadata, plans, results, writers)


def save(store: Any, step: int, model: Model, ranks: int, data: DataFn, *, overwrite: bool = False) -> SimulatedSave:
    """A whole simulated DCP save, committed by rank 0's finish."""
    done = write_ranks(store, step, model, ranks, data, overwrite=overwrite)
    try:
        done.writers[0].finish(done.metadata, done.results)
    finally:
        for writer in done.writers:
            writer.release()
    return done


def read_plan(metadata: Metadata, model: Model, rank: int, ranks: int) -> LoadPlan:
    """The read items of `rank` loading `model` sharded over `ranks` (dim 0) from `metadata`:
    for each local shard, the overlap with each stored shard (what DefaultLoadPlanner plans)."""
    items = []
    for fqn, (shape, _) in model.items():
        found = shard(shape, rank, ranks)
        if found is None:
            continue
        offsets, sizes = found
        stored = metadata.state_dict_metadata[fqn]
        for chunk in stored.chunks:  # type: ignore[union-attr]
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets, strict=True)]
            hi = [min(o + s, c + n) for o, s, c, n in zip(offsets, sizes, chunk.offsets, chunk.sizes, strict=True)]
            if any(h <= low for low, h in zip(lo, hi, strict=True)) and shape:
                continue
            items.append(ReadItem(
                type=LoadItemType.TENSOR, storage_index=MetadataIndex(fqn, chunk.offsets),
                dest_index=MetadataIndex(fqn, torch.Size(offsets)),
                storage_offsets=torch.Size([low - c for low, c in zip(lo, chunk.offsets, strict=True)]),
                dest_offsets=torch.Size([low - o for low, o in zip(lo, offsets, strict=True)]),
                lengths=torch.Size([h - low for low, h in zip(lo, hi, strict=True)])))
    return LoadPlan(items)


def open_reader(store: Any, step: int) -> tuple[StoreReader, Metadata]:
    reader = StoreReader(store, step)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    return reader, metadata
