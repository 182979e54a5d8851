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

from ckptstore.dcpformat import dcp_node
from ckptstore.epoch import Epoch, epoch_from_plain, epoch_to_plain, read_epoch
from ckptstore.errors import FormatError
from ckptstore.manifest import ChunkEntry, Manifest, Ref
from ckptstore.manifestread import read_blobs, read_chunk_tables
from ckptstore.manifestv2 import BlobRef, RootManifest, decode_part
from ckptstore.tree import decode_tree

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


# -- DCP: the coordinator resolves once, each rank reads only its own part ------------------------
#
# A DCP rank would otherwise list every ref (O(steps) LIST pages), read the latest ref and root,
# and read the gc epoch itself: 1024 ranks doing that per save is most of a re-save's requests.
# The coordinator's `prepare_global_plan` reads the epoch (E0) and *then* the latest step's ref
# and root, once, and hands each rank (in its plan's `storage_data`) E0 and the digest of that
# rank's part. The rank takes its lease, reads only its part, and settles against E0.
#
# Why that is as safe as each rank reading for itself (docs/FORMAT.md, "Why a committed ref
# never points at a missing object"): E0 was read before the ref, and the ref before any rank's
# lease existed, so E0 precedes the lease as step 1 requires; a chunk the part lists was present
# at the coordinator's ref read (a committed ref never points at a missing object), which
# follows E0. A gc that deletes it later never saw the rank's lease, so it was running at E0 or
# bumped the epoch after E0, and the rank's settle (E1 against E0) heads every chunk it skipped.

HANDOFF_VERSION = 1


def handoff_for_ranks(store: StepSource, ranks: int) -> list[dict[str, Any]] | None:
    """What the coordinator hands each of `ranks` ranks (in rank order): E0 and the digest of
    the rank's part of the latest step (or the latest v1 manifest's digest). None when even the
    epoch cannot be read: each rank then reads for itself. Never raises."""
    try:
        epoch, _ = read_epoch(store.backend)  # first: E0 must precede the ref read below
    except Exception as exc:
        log.info("the coordinator could not read the gc epoch (%s: %s); each rank reads its own",
                 type(exc).__name__, exc)
        return None
    base = {"v": HANDOFF_VERSION, "epoch": epoch_to_plain(epoch)}
    previous, _ = _previous_objects(store, ranks)
    return [{**base, "previous": previous[rank]} for rank in range(ranks)]


def known_without_handoff(store: StepSource, rank: int) -> dict[str, ChunkEntry]:
    """The chunks `rank` may skip when it got no handoff (DCP's plan cache hands over an
    earlier save's plan; an unreadable epoch): it finds its part of the latest step as the
    coordinator would, after its lease exists, then reads it as from a handoff; a v1 latest
    step (a plain save) gives its chunk table as read, not read again. Never raises."""
    previous, stored = _previous_objects(store, rank + 1)
    if isinstance(stored, Manifest):  # hash-checked by manifest_object (only when store.verify)
        return {chunk.digest: chunk for chunk in stored.chunks}
    known, _ = known_from_handoff(store, {"previous": previous[rank]})
    return known


def _previous_objects(store: StepSource, ranks: int) -> tuple[list[Any], Manifest | RootManifest | None]:
    """Per rank: ["part", digest, raw size, stored size, items] of its part of the latest step,
    ["manifest", digest] when that step is a v1 manifest, or None; and that step's manifest
    object as read (None when there is none or on any doubt)."""
    nothing: list[Any] = [None] * ranks
    if not store.verify:
        return nothing, None  # an unchecked manifest's chunk table is not trusted to skip a head
    try:
        step = store.latest()
        if step is None:
            return nothing, None
        digest = store.ref(step).manifest
        stored = store.manifest_object(digest)
        if isinstance(stored, Manifest):
            return [["manifest", digest]] * ranks, stored
        node = dcp_node(decode_tree(stored.tree))
        part_ranks = node.get("part_ranks") if node is not None else None
        if not isinstance(part_ranks, list) or len(part_ranks) != len(stored.parts):
            return nothing, None
        out = list(nothing)
        for part, rank in zip(stored.parts, part_ranks, strict=True):
            if isinstance(rank, int) and 0 <= rank < ranks and out[rank] is None:
                out[rank] = ["part", part.digest, part.raw_size, part.stored_size, part.count]
        return out, stored
    except Exception as exc:
        log.info("reading the latest step of %s failed (%s: %s); every chunk is checked with a head",
                 getattr(store, "url", "the store"), type(exc).__name__, exc)
        return nothing, None


def handoff_epoch(handoff: Any) -> Epoch | None:
    """E0 from a rank's handoff, or None when the handoff is absent or malformed (the rank then
    reads the epoch and the latest step itself)."""
    if not isinstance(handoff, dict) or handoff.get("v") != HANDOFF_VERSION:
        return None
    try:
        return epoch_from_plain(handoff.get("epoch"))
    except FormatError:
        return None


def handoff_part(handoff: Any) -> BlobRef | None:
    """The rank's part of the previous step named by its handoff, if any."""
    previous = handoff.get("previous") if isinstance(handoff, dict) else None
    if not isinstance(previous, list) or len(previous) != 5 or previous[0] != "part":
        return None
    digest, raw_size, stored_size, count = previous[1:]
    if not isinstance(digest, str) or not all(isinstance(n, int) and n >= 0 for n in (raw_size, stored_size, count)):
        return None
    return BlobRef(digest, raw_size, stored_size, count)


def known_from_handoff(store: StepSource, handoff: Any) -> tuple[dict[str, ChunkEntry], BlobRef | None]:
    """The chunks a rank may skip: those of the part (or v1 manifest) its handoff names, read
    and hash-checked after the rank's lease exists; and that part, once read (the rank may
    skip putting an identical new part). Empty and None on any doubt. Never raises."""
    previous = handoff.get("previous") if isinstance(handoff, dict) else None
    if not store.verify or not isinstance(previous, list) or not previous:
        return {}, None
    try:
        part = handoff_part(handoff)
        if part is not None:
            [data] = read_blobs(store.backend, store._hash, [part], 1, "the previous step's part of this rank")
            return {chunk.digest: chunk for chunk in decode_part(data, part.count).chunks}, part
        if previous[0] == "manifest" and len(previous) == 2 and isinstance(previous[1], str):
            stored = store.manifest_object(previous[1])
            if isinstance(stored, Manifest):
                return {chunk.digest: chunk for chunk in stored.chunks}, None
        return {}, None
    except Exception as exc:
        log.info("reading the previous step's part failed (%s: %s); every chunk is checked with a head",
                 type(exc).__name__, exc)
        return {}, None
