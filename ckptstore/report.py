"""Read-only summaries of a store for people and scripts (the CLI's ls and show).

Reads refs and manifests only, never chunk data, and never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ckptstore.store import Store
from ckptstore.tree import TensorRef, decode_tree, format_path, map_tensors


@dataclass(frozen=True)
class StepSummary:
    """One row of `ckptstore ls`."""

    step: int
    committed: float
    writer: str
    seq: int
    tensors: int
    logical_bytes: int
    stored_bytes: int  # stored size of every chunk the step references
    new_bytes: int  # stored size of chunks no earlier step references

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TensorSummary:
    """One tensor of a step, as `ckptstore show` lists it."""

    path: str
    kind: str
    dtype: str
    shape: list[int]
    nbytes: int


def step_summaries(store: Store) -> list[StepSummary]:
    """Every committed step in order, with sizes and what each added over earlier steps."""
    seen: set[str] = set()
    rows = []
    for step in store.steps():
        info = store.info(step)
        fresh = [c for c in info.manifest.chunks if c.digest not in seen]
        seen.update(c.digest for c in fresh)
        rows.append(StepSummary(
            step=step, committed=info.ref.committed, writer=info.ref.writer, seq=info.ref.seq,
            tensors=len(info.manifest.tensors), logical_bytes=info.manifest.logical_bytes,
            stored_bytes=info.manifest.stored_bytes, new_bytes=sum(c.stored_size for c in fresh),
        ))
    return rows


def tensor_summaries(store: Store, step: int) -> list[TensorSummary]:
    """The tensors of `step` in tree order, by path."""
    manifest = store.info(step).manifest
    rows: list[TensorSummary] = []

    def visit(path: tuple[Any, ...], ref: TensorRef) -> None:
        if ref.index < len(manifest.tensors):
            entry = manifest.tensors[ref.index]
            rows.append(TensorSummary(format_path(path), entry.kind, entry.dtype, list(entry.shape), entry.nbytes))

    map_tensors(decode_tree(manifest.tree), visit)
    return rows


def step_details(store: Store, step: int) -> dict[str, Any]:
    """Everything `ckptstore show` prints about `step`, as plain data."""
    info = store.info(step)
    manifest = info.manifest
    return {
        "step": step,
        "manifest": info.ref.manifest,
        "committed": info.ref.committed,
        "writer": info.ref.writer,
        "commit_id": info.ref.commit_id,
        "seq": info.ref.seq,
        "replaces": info.ref.replaces,
        "created": manifest.created,
        "metadata": manifest.metadata,
        "logical_bytes": manifest.logical_bytes,
        "stored_bytes": manifest.stored_bytes,
        "chunks": len(manifest.chunks),
        "tensors": [t.__dict__ for t in tensor_summaries(store, step)],
    }
