"""The chunks of the store's latest committed step: what a save may skip without a `head`.

A re-save of unchanged data would otherwise cost a `head` per chunk (231k for a 70B step on
1024 ranks). `previous_chunks(store)` reads the latest step's ref and manifest and returns its
chunk table as digest -> ChunkEntry; `ChunkWriter(known=...)` then neither `head`s nor puts a
chunk whose hash is in it.

Safe only when it is called *after* the caller read its epoch and created its save lease, and
when the caller's settle (`gclock.settle_with_gc`, then `chunkio.restore_missing`, which
`head`s every chunk the save references, skipped ones included, and re-uploads from the
save's own bytes) runs before the manifest is put: docs/FORMAT.md, "Why a committed ref never
points at a missing object", has the argument.

Fail closed: anything uncertain (no step, a ref or manifest that cannot be read, decoded or
hash-checked, a store opened with `verify=False`, whose manifests are not hash-checked) gives
an empty mapping, and the save `head`s every chunk as before.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from ckptstore.manifest import ChunkEntry, Manifest, Ref
from ckptstore.manifestread import read_chunk_tables
from ckptstore.manifestv2 import RootManifest

log = logging.getLogger(__name__)


class StepSource(Protocol):
    """What `previous_chunks` needs of a store (StoreKernel has it)."""

    verify: bool

    def latest(self) -> int | None: ...

    def ref(self, step: int | str) -> Ref: ...

    backend: Any
    threads: int

    def _hash(self, data: Any) -> str: ...

    def manifest_object(self, digest: str) -> Manifest | RootManifest: ...


def previous_chunks(store: StepSource) -> dict[str, ChunkEntry]:
    """Digest -> ChunkEntry of the latest committed step's chunks; empty when there is none or
    when anything about it is uncertain (see the module docstring). Never raises."""
    if not store.verify:
        return {}  # an unchecked manifest's chunk table is not trusted to skip a head
    try:
        step = store.latest()
        if step is None:
            return {}
        stored = store.manifest_object(store.ref(step).manifest)
        if isinstance(stored, RootManifest):  # a DCP step: its chunk tables, not its 1024 parts
            tables = read_chunk_tables(store.backend, store._hash, stored, store.threads)
            return {chunk.digest: chunk for table in tables for chunk in table.entries()}
        return {chunk.digest: chunk for chunk in stored.chunks}
    except Exception as exc:
        log.info("reading the previous step's chunks of %s failed (%s: %s); every chunk is checked with a head",
                 getattr(store, "url", "the store"), type(exc).__name__, exc)
        return {}
