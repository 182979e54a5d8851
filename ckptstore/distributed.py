"""One step saved by many ranks through the plain API: `store.save(step, state)` on every rank.

Used by `Store.save` (ckptstore/store.py) when a torch.distributed process group is
initialised (or passed as `process_group=`) and has more than one rank. It builds on the
store's kernel (ckptstore/kernel.py), never on the Store. This docstring is the user's guide.

What each rank passes: its own state. The committed state is the union of every rank's tree:
dicts are merged key by key; anything else (a tensor, a scalar, a list, ...) is a *leaf*. A
leaf held by one rank is written by that rank. A leaf held by several ranks is *replicated*:
it must be identical on all of them (same structure and values; tensors of the same dtype,
shape and bytes), and only the lowest rank holding it writes it; the others hash their copy
to prove it is the same. Anything else raises StateConflictError naming the path and the
ranks, on every rank, and commits nothing. `step` must be the same on every rank;
`overwrite`, `metadata`, `keep_last` and `keep_every` are taken from rank 0 only.

The protocol (group rank 0 coordinates; every collective carries either data or an error,
so every rank leaves each phase together; no rank but rank 0 ever receives another rank's tree):
1. gather to rank 0: each rank's step and state skeleton (the tree with tensors replaced by
   numbered references) and tensor descriptions. Rank 0 alone merges them, so a conflict is
   decided once, before anything is written; before that, it reads the step's ref: without
   `overwrite`, a committed step is a StepExistsError. Then scatter from rank 0: each rank
   receives only its own assignment, the numbers of its own tensors that it writes and of
   those it hashes (replicated ones), or the error that every rank then raises (the same
   StateConflictError, StepExistsError, ...; the rank it came from raises its own object).
   Traffic: rank 0 receives the R skeletons; every other rank sends its own and receives
   R sizes plus its assignment, O(its tensors) (torch pads each object of a gather or scatter
   to the largest one; benchmarks/multirank_sim.py has the figures for 256 ranks).
2. each rank, under its own save lease taken after reading the gc epoch (as Store.save):
   writes the chunks of the leaves it owns, re-uploads any a concurrent gc swept
   (`settle_chunks`), and hashes its replicated tensors; gather to rank 0.
3. rank 0 merges the partial manifests, writes the manifest, checks for gc once more
   (`settle_manifest`), commits with `commit_ref` (overwrite decided there, once) and applies
   retention; broadcast of the SaveInfo or the error. Every rank holds its lease until the
   broadcast, i.e. until after the commit.

Loading afterwards: `store.load(step)` on any rank returns the whole committed union (every
rank's leaves, replicated ones once); `store.load(step, into=own_state, strict=False)` fills
the tensors of this rank's own state in place and returns the union with them (not strict:
the step also holds the other ranks' tensors; `select=` reads only some). Once save has returned on a
rank the commit is visible to it, so `load()` of the latest step works on every rank.
A load is not a collective (a rank may load alone): each rank that calls `load()` or
`load("latest")` lists the step refs and resolves "latest" itself. While another process may
commit a newer step, ranks that must load the same step resolve it once, e.g. `step =
store.latest()` on rank 0 sent with `torch.distributed.broadcast_object_list`, or use the
`SaveInfo.step` their save returned.

Every rank of the group must call save: a default group makes `Store.save` distributed, so a
trainer that saves from rank 0 alone passes `process_group=SINGLE_PROCESS`. A rank that dies
or stops answering makes the collectives of the others fail (gloo: at once when its sockets
close, otherwise after the process group's timeout, so choose that timeout with
`init_process_group(timeout=...)`); they raise DistributedSaveError and nothing is committed
unless rank 0 had already committed (its message then says so). The dead rank's save lease
stays until it goes stale (the store's lease TTL); gc stands down until then.

The chunk and manifest settling and the chunk table are shared with ckptstore.dcp.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ckptstore import keys
from ckptstore.backends.base import CREATE
from ckptstore.canary import ensure_conditional_writes
from ckptstore.chunking import ChunkPlan, plan_chunks
from ckptstore.chunkio import ChunkWriter, WrittenChunk, bounded_map, restore_missing
from ckptstore.commit import commit_ref
from ckptstore.epoch import Epoch, read_epoch
from ckptstore.errors import (
    AlreadyExistsError,
    CkptStoreError,
    DistributedSaveError,
    IntegrityError,
    InvalidArgumentError,
    StateConflictError,
)
from ckptstore.gclock import settle_with_gc
from ckptstore.kernel import SaveInfo, StoreKernel, encode_state, writer_identity
from ckptstore.leases import Lease
from ckptstore.manifest import ChunkEntry, Manifest, Ref, StepSummary, TensorEntry, encode_manifest, summarize
from ckptstore.tree import TensorRef, decode_tree, encode_tree, format_path

__all__ = ["SINGLE_PROCESS", "DistributedSaveError", "StateConflictError", "resolve_group"]


class _SingleProcess:
    def __repr__(self) -> str:
        return "ckptstore.distributed.SINGLE_PROCESS"


#: `Store.save(..., process_group=SINGLE_PROCESS)`: save from this process alone even when a
#: default process group is initialised (e.g. a trainer that saves only on rank 0).
SINGLE_PROCESS: Any = _SingleProcess()


def resolve_group(process_group: Any) -> Any:
    """The process group a save runs across, or None for a single-process save.

    None means the default group when one is initialised; a group of one rank, or
    SINGLE_PROCESS, is a single-process save.
    """
    if process_group is SINGLE_PROCESS:
        return None
    dist = sys.modules.get("torch.distributed")  # never imports torch: no torch, no group
    if process_group is None:
        if dist is None or not dist.is_available() or not dist.is_initialized():
            return None
        process_group = dist.group.WORLD
    elif dist is None or not isinstance(process_group, getattr(dist, "ProcessGroup", ())):
        raise InvalidArgumentError(f"process_group must be a torch.distributed ProcessGroup, got {process_group!r}")
    try:
        rank = dist.get_rank(process_group)
    except (RuntimeError, ValueError) as exc:  # e.g. no default group initialised
        raise InvalidArgumentError(f"process_group {process_group!r} cannot be used: {exc}") from exc
    if rank < 0:
        raise InvalidArgumentError("this process is not a member of the process_group passed to save")
    return process_group if dist.get_world_size(process_group) > 1 else None


# -- shared with ckptstore.dcp: settling with gc, the chunk table ----------------------------
def settle_chunks(store: Any, epoch_at_start: Epoch, writer: ChunkWriter, plan: ChunkPlan,
                  written: list[WrittenChunk], sources: list[memoryview]) -> bool:
    """If a gc may have swept since `epoch_at_start`, wait for it and re-upload any chunk of
    `plan` it deleted (each rank does this for its own chunks before handing them over).
    Returns whether a gc may have swept (False: none can have since `epoch_at_start`)."""
    if settle_with_gc(store.backend, epoch_at_start, ttl=store.lease_ttl) is None:
        return False
    restore_missing(writer, plan, written, sources)
    return True


def settle_manifest(store: Any, epoch_at_start: Epoch, step: int, chunks: list[ChunkEntry] | tuple[ChunkEntry, ...],
                    manifest_key: str, encoded: bytes) -> None:
    """On the coordinator before the commit: if a gc may have swept since `epoch_at_start`,
    wait for it, put the manifest back if needed and check that every chunk is there. Each
    rank already re-uploaded what a sweep took from it; a chunk missing now cannot be put back
    here (only its rank had the bytes): IntegrityError, nothing is committed."""
    backend = store.backend
    if settle_with_gc(backend, epoch_at_start, ttl=store.lease_ttl) is None:
        return
    if not backend.exists(manifest_key):
        with contextlib.suppress(AlreadyExistsError):
            backend.put(manifest_key, encoded, mode=CREATE)
    present = bounded_map(lambda c: backend.exists(keys.chunk_key(c.digest)), chunks, store.threads)
    missing = [c.digest for c, ok in zip(chunks, present, strict=True) if not ok]
    if missing:
        raise IntegrityError(f"step {step}: {len(missing)} chunk(s) (e.g. {keys.chunk_key(missing[0])}) "
                             f"vanished during the save (a gc swept); nothing was committed, save again")


def plain_segments(plan: ChunkPlan, written: list[WrittenChunk]) -> list[list[list[Any]]]:
    """Per planned source: its segments as plain data a collective can carry,
    [[chunk digest, offset in chunk, length, chunk raw size, chunk stored size], ...]."""
    out = []
    for segments in plan.segments:
        out.append([[written[slot].entry.digest, offset, length, written[slot].entry.raw_size,
                     written[slot].entry.stored_size] for slot, offset, length in segments])
    return out


@dataclass
class ChunkTable:
    """The manifest's chunk list, built from plain segments of many ranks (each chunk once)."""

    chunks: list[ChunkEntry] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict)

    def segments(self, plain: list[list[Any]]) -> tuple[tuple[int, int, int], ...]:
        """`plain_segments` of one source as manifest segments (chunk index, offset, length)."""
        out = []
        for digest, offset, length, raw_size, stored_size in plain:
            if digest not in self._index:
                self._index[digest] = len(self.chunks)
                self.chunks.append(ChunkEntry(digest, raw_size, stored_size))
            out.append((self._index[digest], offset, length))
        return tuple(out)


def write_manifest_and_commit(store: Any, epoch_at_start: Epoch, manifest: Manifest, *, overwrite: bool,
                              writer: str, new_bytes: int) -> tuple[str, Ref]:
    """The coordinator's last steps: put the manifest, settle with gc, commit the ref.
    Returns the manifest digest and the committed ref (StepExistsError, CommitConflictError)."""
    return commit_manifest_bytes(store, epoch_at_start, manifest.step, encode_manifest(manifest), manifest.chunks,
                                 summarize(manifest, new_bytes), overwrite=overwrite, writer=writer)


def commit_manifest_bytes(store: Any, epoch_at_start: Epoch, step: int, encoded: bytes,
                          chunks: list[ChunkEntry] | tuple[ChunkEntry, ...], summary: StepSummary, *,
                          overwrite: bool, writer: str) -> tuple[str, Ref]:
    """Put an encoded manifest (v1, or a v2 root whose `chunks` include its part and table
    blobs), settle with gc over `chunks`, commit the ref of `step` carrying `summary`."""
    digest = store._hash(encoded)
    manifest_key = keys.manifest_key(digest)
    with contextlib.suppress(AlreadyExistsError):  # an identical manifest is already stored
        store.backend.put(manifest_key, encoded, mode=CREATE)
    settle_manifest(store, epoch_at_start, step, chunks, manifest_key, encoded)
    ref = Ref(manifest=digest, step=step, committed=time.time(), writer=writer, summary=summary)
    return digest, commit_ref(store.backend, keys.step_ref_key(step), ref, overwrite=overwrite)


# -- merging the ranks' trees (rank 0) -------------------------------------------------------
@dataclass(frozen=True)
class _Described:
    """What rank 0 learns about one tensor of a rank."""

    kind: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Assignment:
    """What rank 0 sends one rank after the merge: the numbers of its own tensors (in the order
    its tree lists them) that it writes and that it hashes (replicated ones), or the error
    every rank raises (`error_rank`: the rank that raised it, which raises its own object)."""

    writes: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    error: Exception | None = None
    error_rank: int = -1


@dataclass
class MergedState:
    """The union of the ranks' trees, computed on rank 0."""

    tree: Any  # TensorRef(i) = the i-th merged tensor
    owners: list[tuple[int, int]]  # merged tensor -> (rank, local index) of the rank that writes it
    replicas: dict[int, list[tuple[int, int]]]  # merged tensor -> other ranks' (rank, local index)
    where: list[tuple[Any, ...]]  # merged tensor -> its path in the tree, for messages
    described: list[_Described]  # merged tensor -> kind, dtype, shape

    def path(self, tensor: int) -> str:
        """The path of merged tensor `tensor`, as messages show it."""
        return format_path(self.where[tensor])

    def assignments(self, size: int) -> list[_Assignment]:
        """Per rank of `size`: what it writes (in merged order, so the same state packs the same
        chunks) and what it hashes."""
        writes: list[list[int]] = [[] for _ in range(size)]
        hashes: list[list[int]] = [[] for _ in range(size)]
        for rank, local in self.owners:
            writes[rank].append(local)
        for tensor, copies in self.replicas.items():
            for rank, local in (self.owners[tensor], *copies):
                hashes[rank].append(local)
        return [_Assignment(w, h) for w, h in zip(writes, hashes, strict=True)]


def _leaf_signature(leaf: Any, described: list[_Described]) -> tuple[bytes, list[_Described]]:
    """Bytes equal exactly when two leaves hold the same values, plus their tensors in order."""
    found: list[_Described] = []

    def on_tensor(_path: tuple[Any, ...], value: Any) -> int | None:
        if not isinstance(value, TensorRef):
            return None
        found.append(described[value.index])
        return 0  # local numbers differ between ranks: compare descriptions instead

    return encode_tree(leaf, on_tensor), found


def merge_states(skeletons: list[Any], described: list[list[_Described]]) -> MergedState:
    """Merge decoded per-rank trees (rank order); StateConflictError names the first conflict."""
    owners: list[tuple[int, int]] = []
    replicas: dict[int, list[tuple[int, int]]] = {}
    where: list[tuple[Any, ...]] = []
    kinds: list[_Described] = []

    def refs(node: Any) -> list[TensorRef]:
        found: list[TensorRef] = []

        def walk(n: Any) -> None:
            if isinstance(n, TensorRef):
                found.append(n)
            elif isinstance(n, dict):
                for v in n.values():
                    walk(v)
            elif isinstance(n, (list, tuple)):
                for v in n:
                    walk(v)

        walk(node)
        return found

    def renumber(node: Any, rank: int, path: tuple[Any, ...]) -> Any:
        if isinstance(node, TensorRef):
            owners.append((rank, node.index))
            where.append(path)
            kinds.append(described[rank][node.index])
            return TensorRef(len(owners) - 1)
        if isinstance(node, dict):
            return {k: renumber(v, rank, (*path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [renumber(v, rank, (*path, i)) for i, v in enumerate(node)]
        if isinstance(node, tuple):
            return tuple(renumber(v, rank, (*path, i)) for i, v in enumerate(node))
        return node

    def merge(held: list[tuple[int, Any]], path: tuple[Any, ...]) -> Any:
        dicts = [(rank, node) for rank, node in held if isinstance(node, dict)]
        if dicts and len(dicts) != len(held):
            leaf_rank = next(rank for rank, node in held if not isinstance(node, dict))
            raise StateConflictError(format_path(path), (dicts[0][0], leaf_rank),
                                     f"a dict on rank {dicts[0][0]}, a leaf on rank {leaf_rank}")
        if dicts:
            names: dict[Any, list[tuple[int, Any]]] = {}
            for rank, node in dicts:
                for key, value in node.items():
                    names.setdefault(key, []).append((rank, value))
            # A subtree one rank holds (most of them) has nothing to merge or compare.
            return {key: renumber(values[0][1], values[0][0], (*path, key)) if len(values) == 1
                    else merge(values, (*path, key)) for key, values in names.items()}
        owner_rank, owner_leaf = held[0]
        if len(held) > 1:  # a leaf of one rank (most of them) has nothing to compare
            signature = _leaf_signature(owner_leaf, described[owner_rank])
            for rank, leaf in held[1:]:
                if _leaf_signature(leaf, described[rank]) != signature:
                    raise StateConflictError(format_path(path), (owner_rank, rank),
                                             "different values (or tensor dtypes or shapes)")
        first = len(owners)
        merged = renumber(owner_leaf, owner_rank, path)
        for rank, leaf in held[1:]:
            for offset, ref in enumerate(refs(leaf)):
                replicas.setdefault(first + offset, []).append((rank, ref.index))
        return merged

    tree = merge(list(enumerate(skeletons)), ())
    return MergedState(tree, owners, replicas, where, kinds)


def introduce(state: Any, step: int, sources: list[Any]) -> dict[str, Any]:
    """What a rank sends rank 0 in phase 1: its step, its state's skeleton (tensors replaced by
    their numbers, appended to `sources`) and the tensors' descriptions."""
    tree, described = encode_state(state)
    sources.extend(described)
    return {"step": step, "tree": tree, "tensors": [_Described(s.kind, s.dtype, s.shape) for s in sources]}


def merge_introductions(intros: list[dict[str, Any]]) -> MergedState:
    """Rank 0's merge of every rank's `introduce` (none holding an error): InvalidArgumentError
    when the steps differ, StateConflictError on a conflict."""
    steps = [i["step"] for i in intros]
    if len(set(steps)) > 1:
        raise InvalidArgumentError(f"the ranks passed different steps to save: {steps}")
    return merge_states([decode_tree(i["tree"]) for i in intros], [i["tensors"] for i in intros])


# -- the collectives -----------------------------------------------------------------------
class _Group:
    """torch.distributed object collectives on one group, rooted at its rank 0; failures
    become DistributedSaveError."""

    def __init__(self, group: Any, step: int):
        import torch.distributed as dist

        self.dist, self.group, self.step = dist, group, step
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.root = dist.get_global_rank(group, 0)

    def _failed(self, what: str, exc: BaseException) -> DistributedSaveError:
        return DistributedSaveError(
            f"step {self.step}: the {what} between the {self.size} ranks failed on rank {self.rank} "
            f"({type(exc).__name__}: {str(exc)[:300]}); a rank died or did not answer within the process group's "
            f"timeout (every rank of the group must call save; to save from one process pass "
            f"process_group=ckptstore.distributed.SINGLE_PROCESS). Nothing was committed by this save unless "
            f"another rank reports that it was")

    def gather(self, obj: Any, what: str) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        out: list[Any] | None = [None] * self.size if self.rank == 0 else None
        try:
            self.dist.gather_object(obj, out, dst=self.root, group=self.group)
        except RuntimeError as exc:
            raise self._failed(what, exc) from exc
        return out

    def scatter(self, objs: list[Any] | None, what: str) -> Any:
        """`objs[r]` (given on rank 0, None elsewhere) on rank r."""
        box: list[Any] = [None]
        try:
            self.dist.scatter_object_list(box, objs, src=self.root, group=self.group)
        except RuntimeError as exc:
            raise self._failed(what, exc) from exc
        return box[0]

    def broadcast(self, obj: Any, what: str) -> Any:
        box = [obj]
        try:
            self.dist.broadcast_object_list(box, src=self.root, group=self.group)
        except RuntimeError as exc:
            if self.rank == 0 and isinstance(obj, _Outcome) and obj.info is not None:
                raise DistributedSaveError(
                    f"step {self.step} was committed (manifest {obj.info.manifest}), but telling the other ranks "
                    f"failed ({type(exc).__name__}: {str(exc)[:300]})") from exc
            raise self._failed(what, exc) from exc
        return box[0]


def _portable(exc: Exception) -> Exception:
    """`exc` if another rank can rebuild it, else a CkptStoreError with its text.

    torch's object collectives pickle the exception; rebuilding it from its own reduce
    tuple is the part that fails for exceptions with custom constructors. (The package
    never imports pickle itself: tests/test_security.py.)
    """
    try:
        reduced = exc.__reduce__()
        if not isinstance(reduced, str):  # a str names a global: nothing to rebuild
            reduced[0](*reduced[1])
        return exc
    except Exception:
        return CkptStoreError(f"{type(exc).__name__}: {exc}")


def _first_error(items: list[Any]) -> tuple[int, Exception] | None:
    """The lowest rank's error in gathered `items`, with that rank."""
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("error") is not None:
            return index, item["error"]
    return None


@dataclass(frozen=True)
class _Outcome:
    info: Any = None  # SaveInfo
    error: Exception | None = None


def save_across_ranks(store: StoreKernel, group: Any, step: int, state: Any, *, overwrite: bool, metadata: Any,
                      keep_last: int | None, keep_every: int | None,
                      check_arguments: Callable[[], None]) -> SaveInfo:
    """Store.save on every rank of `group` (see the module docstring); returns SaveInfo."""
    started = time.perf_counter()
    ranks = _Group(group, step)
    sources: list[Any] = []
    local_error: Exception | None = None  # this rank's own exception object, raised with its traceback
    try:
        check_arguments()
        if ranks.rank == 0:
            # Refused before any rank writes a chunk (as Store.save): `overwrite` is rank 0's, and
            # its StepExistsError reaches every rank through the assignments below.
            store.refuse_committed(step, overwrite)
        intro = introduce(state, step, sources)
    except Exception as exc:
        local_error = exc
        intro = {"step": step, "error": _portable(exc)}

    # Phase 1: trees to rank 0, which merges them; each rank gets back only its own part.
    intros = ranks.gather(intro, "gather of state trees")
    merged: MergedState | None = None
    assignments: list[_Assignment] | None = None
    if intros is not None:  # rank 0
        failed = _first_error(intros)
        try:
            if failed is not None:
                raise failed[1]
            merged = merge_introductions(intros)
            assignments = merged.assignments(ranks.size)
        except Exception as exc:
            if failed is None:  # rank 0's merge raised it
                failed, local_error = (0, _portable(exc)), exc
            assignments = [_Assignment(error=failed[1], error_rank=failed[0])] * ranks.size
    mine: _Assignment = ranks.scatter(assignments, "scatter of assignments")
    if mine.error is not None:
        raise local_error if mine.error_rank == ranks.rank and local_error is not None else mine.error

    # Every rank: epoch first, then the lease, then any chunk check (as Store.save); the lease
    # is held until the outcome arrives, i.e. after rank 0's commit.
    partial: dict[str, Any] = {}
    epoch_at_start: Epoch | None = None
    with contextlib.ExitStack() as stack:
        try:
            ensure_conditional_writes(store.backend)
            epoch_at_start = read_epoch(store.backend)[0]
            stack.enter_context(Lease(store.backend, "save", writer_identity(), ttl=store.lease_ttl))
            partial = _write_own(store, mine, sources, epoch_at_start)
        except Exception as exc:
            partial = {"error": _portable(exc)}
            local_error = exc
        partials = ranks.gather(partial, "gather of partial manifests")
        outcome = _Outcome()
        if partials is not None:  # rank 0
            try:
                failed = _first_error(partials)
                if failed is not None:
                    raise local_error if failed[0] == 0 and local_error is not None else failed[1]
                assert merged is not None and epoch_at_start is not None
                outcome = _Outcome(info=_commit(store, merged, partials, step, epoch_at_start, overwrite, metadata,
                                                keep_last, keep_every, started, writer_identity()))
            except Exception as exc:
                outcome = _Outcome(error=_portable(exc))
        outcome = ranks.broadcast(outcome, "broadcast of the outcome")
    if outcome.error is not None:
        raise outcome.error
    return outcome.info


def _write_own(store: StoreKernel, mine: _Assignment, sources: list[Any], epoch: Epoch) -> dict[str, Any]:
    """This rank's part: write the chunks of the tensors it owns, hash its replicated ones.
    Keyed by this rank's own tensor numbers; rank 0 knows which merged tensor each is."""
    datas = [sources[local].data for local in mine.writes]
    plan = plan_chunks([d.nbytes for d in datas], store.chunking)
    writer = ChunkWriter(store.backend, store._hash, store.compression, store.threads,
                         elements=[sources[local].element for local in mine.writes])
    written = writer.write(plan, datas)
    settle_chunks(store, epoch, writer, plan, written, datas)
    segments = dict(zip(mine.writes, plain_segments(plan, written), strict=True))
    # Replicated tensors: the owner and every replica hash the whole tensor; rank 0 compares.
    digests = {local: store._hash(sources[local].data) for local in mine.hashes}
    new = {r.entry.digest: r.entry.stored_size for r in written if r.written}
    return {"segments": segments, "digests": digests, "new": new}


def _commit(store: StoreKernel, merged: MergedState, partials: list[dict[str, Any]], step: int, epoch: Epoch,
            overwrite: bool, metadata: Any, keep_last: int | None, keep_every: int | None, started: float,
            writer: str) -> SaveInfo:
    """Rank 0: check replicas, build and commit the manifest, apply retention."""
    for g, copies in merged.replicas.items():
        owner_rank, owner_local = merged.owners[g]
        want = partials[owner_rank]["digests"][owner_local]
        for rank, local in copies:
            if partials[rank]["digests"][local] != want:
                raise StateConflictError(merged.path(g), (owner_rank, rank), "tensors of different contents")
    table = ChunkTable()
    entries = tuple(
        TensorEntry(d.kind, d.dtype, d.shape, table.segments(partials[rank]["segments"][local]))
        for (rank, local), d in zip(merged.owners, merged.described, strict=True))
    tree = encode_tree(merged.tree, lambda _p, v: v.index if isinstance(v, TensorRef) else None)
    manifest = Manifest(step, time.time(), metadata, tree, entries, tuple(table.chunks))
    new: dict[str, int] = {}
    for partial in partials:
        new.update(partial["new"])
    digest, committed = write_manifest_and_commit(store, epoch, manifest, overwrite=overwrite, writer=writer,
                                                  new_bytes=sum(new.values()))
    info = SaveInfo(
        step=step, manifest=digest, commit_id=committed.commit_id, seq=committed.seq, replaced=committed.replaces,
        tensors=len(entries), logical_bytes=manifest.logical_bytes, chunks=len(table.chunks),
        new_chunks=len(new), new_bytes=sum(new.values()), seconds=time.perf_counter() - started)
    # Never raises: the step is committed, and every rank gets the same SaveInfo.
    return store.retain_after_commit(info, keep_last=keep_last, keep_every=keep_every)
