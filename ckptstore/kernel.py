"""The store's kernel: everything a Store does from one process, and what it builds on.

`StoreKernel` reads the store's marker (its first write creates it), saves a step from this process alone,
settles with a concurrent gc, applies retention, tags, reads, loads and deletes steps, and
lists or clears locks. It is the only code that knows the order of writes of a save
(docs/FORMAT.md, "Commit protocol"): chunks, then the manifest, then the ref. A step exists
exactly when its ref does, and a ref only ever names a complete manifest.

The layers above it import it, never the other way round: saves across ranks
(ckptstore/distributed.py), background saves (ckptstore/async_save.py), and the public
`ckptstore.store.Store`, which adds process-group dispatch, `save_async` and `gc` to it. gc
(ckptstore/gc.py) needs only a backend and the store's hash, not the kernel. Users import
`Store`, `open`, `SaveInfo` and `StepInfo` from ckptstore or ckptstore.store, and
`writer_identity` from ckptstore.store: this module is not public.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, TypeVar

import msgpack

from ckptstore import keys
from ckptstore.backends.base import CREATE, Backend
from ckptstore.canary import ensure_conditional_writes
from ckptstore.chunkblob import Compression
from ckptstore.chunking import ChunkingPolicy, ChunkPlan, plan_chunks
from ckptstore.chunkio import ChunkReader, ChunkWriter, Landing, WrittenChunk, bounded_map, restore_missing
from ckptstore.commit import commit_ref, read_ref
from ckptstore.epoch import Epoch, read_epoch
from ckptstore.errors import (
    AlreadyExistsError,
    CkptStoreError,
    FormatError,
    InsufficientMemoryError,
    IntegrityError,
    InvalidArgumentError,
    InvalidKeyError,
    ObjectNotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
    StateMismatchError,
    StepExistsError,
    StepNotFoundError,
    StoreNotFoundError,
    TagExistsError,
    TagNotFoundError,
    UnsupportedValueError,
)
from ckptstore.gclock import settle_with_gc
from ckptstore.hashing import DEFAULT_ALGORITHM, hasher
from ckptstore.knownchunks import previous_chunks
from ckptstore.leases import DEFAULT_TTL, Lease, LockInfo, clear_stale, list_locks
from ckptstore.manifest import (
    MAX_REF_BYTES,
    ChunkEntry,
    Manifest,
    Marker,
    Ref,
    TensorEntry,
    decode_marker,
    encode_manifest,
    encode_marker,
    summarize,
)
from ckptstore.manifestread import assemble, read_manifest_object
from ckptstore.manifestv2 import RootManifest
from ckptstore.selection import (
    Selection,
    check_select,
    compare_targets,
    dotted_name,
    leaves,
    select_subtrees,
    target_tensors,
)
from ckptstore.serverclock import probe_clock
from ckptstore.tree import TensorRef, decode_tree, encode_tree, format_path, map_tensors

# The public Store's logger: retention and lock-age warnings keep the name they always had.
log = logging.getLogger("ckptstore.store")

DEFAULT_THREADS = 4
_STEP_NUMBER = re.compile(r"[0-9]+")  # load("2") means step 2, as the CLI reads a STEP


@dataclass(frozen=True)
class SaveInfo:
    """What a save did: the commit, and how many bytes it had to write."""

    step: int
    manifest: str
    commit_id: str
    seq: int
    replaced: str | None  # manifest the commit replaced (overwrite), if any
    tensors: int
    logical_bytes: int
    chunks: int
    new_chunks: int
    new_bytes: int  # stored bytes of chunks this save wrote (the rest deduplicated)
    seconds: float
    retention_deleted: tuple[int, ...] = ()  # steps whose refs retention deleted after the commit
    # Retention deletions that failed after the commit (also logged as warnings). The step is
    # committed all the same: a failed clean-up never turns a committed save into an error.
    retention_errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepInfo:
    """A committed step: its ref and manifest."""

    step: int
    ref: Ref
    manifest: Manifest


def writer_identity() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


_K = TypeVar("_K", bound="StoreKernel")


def encode_state(state: Any) -> tuple[bytes, list[Any]]:
    """`state`'s tree (tensors replaced by their numbers) and its tensors' descriptions
    (ckptstore.tensors.SourceTensor), numbered in tree order."""
    from ckptstore.tensors import describe, is_tensor

    sources: list[Any] = []

    def on_tensor(path: tuple[Any, ...], value: Any) -> int | None:
        if not is_tensor(value):
            return None
        sources.append(describe(value, format_path(path)))
        return len(sources) - 1

    return encode_tree(state, on_tensor), sources


class StoreKernel:
    """A checkpoint store on one backend, used from this process alone: the single-process
    core of `ckptstore.store.Store` (users open a Store with `ckptstore.open(url)`)."""

    def __init__(
        self,
        backend: Backend,
        *,
        create: bool = True,
        chunking: ChunkingPolicy | None = None,
        compression: Compression | None = None,
        threads: int = DEFAULT_THREADS,
        verify: bool = True,
        hash_algorithm: str = DEFAULT_ALGORITHM,
        lease_ttl: float = DEFAULT_TTL,
    ):
        self.backend = backend
        self.lease_ttl = lease_ttl
        self.chunking = chunking or ChunkingPolicy()
        self.compression = compression or Compression()
        self.threads = max(1, threads)
        self.verify = verify
        hasher(hash_algorithm)  # reject an unknown name before anything is written
        # Opening never writes: the store (its CKPTSTORE marker) is created by the first write.
        self._create = create
        self._hash_algorithm = hash_algorithm
        self._marker: Marker | None = self._read_marker()
        if self._marker is None and not create:
            raise self._not_found()

    @property
    def marker(self) -> Marker:
        """The store's marker. Writers reach it before they write: with `create=True` and no
        store at the URL yet, this creates it (reads call `_require_store`, which never does)."""
        if self._marker is None:
            self._marker = self._read_marker() or self._create_marker()
        return self._marker

    @property
    def _hash(self) -> Callable[[Any], str]:
        return hasher(self.marker.hash_algorithm)

    def _not_found(self) -> StoreNotFoundError:
        return StoreNotFoundError(
            f"no ckptstore store at {self.url} (no {keys.MARKER} marker); "
            f"save a step there first, or check the URL"
        )

    def _require_store(self) -> Marker:
        """The marker, for a read: raises StoreNotFoundError (naming the URL) when there is no
        store, and creates nothing."""
        if self._marker is None:
            self._marker = self._read_marker()
            if self._marker is None:
                raise self._not_found()
        return self._marker

    def _read_marker(self) -> Marker | None:
        try:
            return decode_marker(self.backend.get_small(keys.MARKER, MAX_REF_BYTES).data)
        except ObjectNotFoundError:
            return None

    @property
    def url(self) -> str:
        return self.backend.url

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __enter__(self: _K) -> _K:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the backend's connections."""
        self.backend.close()

    def _create_marker(self) -> Marker:
        """Create the store (the first write does): a create-only put of the marker."""
        if not self._create:
            raise self._not_found()
        ensure_conditional_writes(self.backend)  # creating the marker is a create-only put too
        marker = Marker(self._hash_algorithm, time.time())
        try:
            self.backend.put(keys.MARKER, encode_marker(marker), mode=CREATE)
            return marker
        except AlreadyExistsError:  # another process created the store first: use theirs
            return decode_marker(self.backend.get_small(keys.MARKER, MAX_REF_BYTES).data)

    # -- save ------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, overwrite: bool = False, metadata: Any = None,
             keep_last: int | None = None, keep_every: int | None = None) -> SaveInfo:
        """Save `state` as `step` from this process alone and commit it atomically, then apply
        retention (`Store.save` documents the arguments; it adds the save across ranks)."""
        started = time.perf_counter()
        self._check_save_arguments(step, metadata, keep_last, keep_every)
        self.refuse_committed(step, overwrite)
        # The epoch is read before the lease exists: a gc that lists leases before our lease
        # appears must have bumped the epoch after this read, and we see that at commit.
        epoch_at_start, _ = read_epoch(self.backend)
        with Lease(self.backend, "save", writer_identity(), ttl=self.lease_ttl):
            info = self._save_leased(step, state, overwrite, metadata, epoch_at_start, started)
        return self.retain_after_commit(info, keep_last=keep_last, keep_every=keep_every)

    def refuse_committed(self, step: int, overwrite: bool) -> None:
        """Without `overwrite`, raise StepExistsError when `step` is committed already, before
        the save writes a single chunk (one read of its ref). Only an early refusal: a step
        committed after this read is still refused, or replaced, by the commit itself."""
        if overwrite:
            return
        found = read_ref(self.backend, keys.step_ref_key(step))
        if found is not None:
            raise StepExistsError(step, found[0].committed, found[0].writer)

    def _check_save_arguments(self, step: int, metadata: Any, keep_last: int | None,
                              keep_every: int | None) -> None:
        keys.check_step(step)
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
        ensure_conditional_writes(self.backend)
        self.marker  # noqa: B018 - the first write creates the store (its marker)
        try:
            msgpack.packb(metadata, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise UnsupportedValueError("metadata", f"must be plain msgpack values: {exc}") from exc

    def _save_leased(self, step: int, state: Any, overwrite: bool, metadata: Any, epoch_at_start: Epoch,
                     started: float) -> SaveInfo:
        tree, sources = encode_state(state)
        plan = plan_chunks([s.data.nbytes for s in sources], self.chunking)
        # Under the lease, after the epoch read: the settle below covers the skipped chunks too.
        writer = ChunkWriter(self.backend, self._hash, self.compression, self.threads,
                             elements=[s.element for s in sources], known=self.previous_chunks())
        written = writer.write(plan, [s.data for s in sources])
        # Settle with gc before the manifest is built: chunks a sweep took are put back, and
        # the manifest then records them as stored now (docs/FORMAT.md, "The protocol").
        self._settle_with_gc(epoch_at_start, plan, written, writer, [s.data for s in sources])

        # One table entry per distinct chunk; planned slots map onto it.
        table: dict[str, int] = {}
        chunks: list[ChunkEntry] = []
        for result in written:
            if result.entry.digest not in table:
                table[result.entry.digest] = len(chunks)
                chunks.append(result.entry)
        slot_to_index = [table[result.entry.digest] for result in written]
        tensors = tuple(
            TensorEntry(src.kind, src.dtype, src.shape,
                        tuple((slot_to_index[slot], offset, length) for slot, offset, length in segs))
            for src, segs in zip(sources, plan.segments, strict=True)
        )
        manifest = Manifest(step, time.time(), metadata, tree, tensors, tuple(chunks))
        encoded = encode_manifest(manifest)
        manifest_digest = self._hash(encoded)
        # After the settle: a gc that could delete it would have been seen there (FORMAT.md).
        with contextlib.suppress(AlreadyExistsError):  # identical manifest already stored
            self.backend.put(keys.manifest_key(manifest_digest), encoded, mode=CREATE)

        new = {r.entry.digest: r.entry.stored_size for r in written if r.written}
        ref = Ref(manifest=manifest_digest, step=step, committed=time.time(), writer=writer_identity(),
                  summary=summarize(manifest, new_bytes=sum(new.values())))
        committed = commit_ref(self.backend, keys.step_ref_key(step), ref, overwrite=overwrite)
        return SaveInfo(
            step=step, manifest=manifest_digest, commit_id=committed.commit_id, seq=committed.seq,
            replaced=committed.replaces, tensors=len(tensors), logical_bytes=manifest.logical_bytes,
            chunks=len(chunks), new_chunks=len(new), new_bytes=sum(new.values()),
            seconds=time.perf_counter() - started,
        )

    def previous_chunks(self) -> dict[str, ChunkEntry]:
        """Digest -> ChunkEntry of the latest committed step's chunks, which a save passes to
        `ChunkWriter(known=...)` to skip their `head`s; empty when unsure (ckptstore/knownchunks.py).
        Call it only after reading the epoch and creating the save lease, and settle with
        `restore_missing` before the manifest is put (docs/FORMAT.md, "The protocol")."""
        return previous_chunks(self)

    def _settle_with_gc(self, epoch_at_start: Epoch, plan: ChunkPlan, written: list[WrittenChunk],
                        writer: ChunkWriter, sources: list[memoryview]) -> None:
        """After the chunk writes: if a gc may have swept since we started, wait for it to
        finish and put back (updating `written`) every chunk it deleted."""
        if settle_with_gc(self.backend, epoch_at_start, ttl=self.lease_ttl, owner=writer_identity()) is None:
            return
        restore_missing(writer, plan, written, sources)

    # -- retention and tags ------------------------------------------------------------------
    def apply_retention(self, *, keep_last: int | None = None, keep_every: int | None = None,
                        protect: tuple[int, ...] = ()) -> list[int]:
        """Delete the refs of steps that no rule keeps; returns the deleted steps.

        Kept: the `keep_last` newest steps, multiples of `keep_every`, tagged steps, `protect`.
        Only refs are deleted (each at the version just read: a step re-committed meanwhile is
        kept); gc frees the data. Tries every doomed step, then raises the first failure.
        """
        deleted, failures = self._retain(keep_last=keep_last, keep_every=keep_every, protect=protect)
        if failures:
            raise failures[0][1]
        return deleted

    def retain_after_commit(self, info: SaveInfo, *, keep_last: int | None, keep_every: int | None) -> SaveInfo:
        """Retention after a committed save: never raises, because the commit stands. What it
        could not delete goes into `SaveInfo.retention_errors` and is logged as a warning."""
        if keep_last is None and keep_every is None:
            return info
        try:
            deleted, failures = self._retain(keep_last=keep_last, keep_every=keep_every, protect=(info.step,))
            errors = [f"step {step}: {type(exc).__name__}: {exc}" for step, exc in failures]
        except CkptStoreError as exc:  # listing the steps or tags failed: nothing was deleted
            deleted, errors = [], [f"retention did not run: {type(exc).__name__}: {exc}"]
        for error in errors:
            log.warning("step %d of %s is committed, but retention failed: %s", info.step, self.url, error)
        return replace(info, retention_deleted=tuple(deleted), retention_errors=tuple(errors))

    def _retain(self, *, keep_last: int | None, keep_every: int | None,
                protect: tuple[int, ...]) -> tuple[list[int], list[tuple[int, CkptStoreError]]]:
        steps = self.steps()
        keep = set(protect) | set(self.tags().values())
        if keep_last is not None:
            keep.update(steps[-keep_last:])
        if keep_every is not None:
            keep.update(s for s in steps if s % keep_every == 0)
        deleted: list[int] = []
        failures: list[tuple[int, CkptStoreError]] = []
        for step in (s for s in steps if s not in keep):
            try:
                if self._delete_ref(keys.step_ref_key(step)):
                    deleted.append(step)
            except PreconditionFailedError:
                continue  # re-committed since we looked: a new commit is not ours to delete
            except CkptStoreError as exc:
                failures.append((step, exc))
        return deleted, failures

    def _delete_ref(self, key: str) -> bool:
        """Delete the ref at `key` at the version it has now; False if there is none. Deleting
        by version means an SDK retry of a delete that landed cannot remove a commit made
        in between (PreconditionFailedError instead, where the backend enforces it)."""
        try:
            version = self.backend.head(key).version
        except ObjectNotFoundError:
            return False
        self.backend.delete(key, version=version)
        return True

    def tag(self, name: str, step: int | str, *, overwrite: bool = False) -> Ref:
        """Name `step` (refs/tags/<name>); a tagged step is never deleted by retention, and
        its data survives gc even if the step's own ref is deleted. Raises TagExistsError, and
        IntegrityError when the step's manifest or a chunk of it is gone.

        A tag is a commit like a save's (docs/FORMAT.md): epoch, lease, check that every object
        it will reference exists, re-check after any sweep, then the conditional put.
        """
        key = keys.tag_ref_key(name)
        if name == "latest" or _STEP_NUMBER.fullmatch(name):
            # Every STEP argument (load, reader, the CLI) reads these as step numbers or the
            # newest step, so such a tag could never be named again: refuse it up front.
            raise InvalidKeyError(f"invalid tag name {name!r}: a STEP argument reads it as "
                                  f"{'the newest step' if name == 'latest' else 'step ' + str(int(name))}; "
                                  f"use a name with a letter in it")
        self._require_store()  # a tag names a committed step: there is nothing to create
        ensure_conditional_writes(self.backend)
        epoch_at_start, _ = read_epoch(self.backend)
        with Lease(self.backend, "save", writer_identity(), ttl=self.lease_ttl):
            target = self.ref(step)
            self._require_objects(target)
            if settle_with_gc(self.backend, epoch_at_start, ttl=self.lease_ttl, owner=writer_identity()):
                self._require_objects(target)
            # The tag shows what its step shows: it carries the step's summary.
            ref = Ref(manifest=target.manifest, step=target.step, committed=time.time(), writer=writer_identity(),
                      summary=target.summary)
            try:
                return commit_ref(self.backend, key, ref, overwrite=overwrite)
            except StepExistsError:
                existing = read_ref(self.backend, key)
                raise TagExistsError(name, existing[0].step if existing else -1) from None

    def _require_objects(self, ref: Ref) -> None:
        """Raise IntegrityError unless the manifest `ref` names and every chunk of it exist."""
        manifest = self.manifest(ref.manifest)
        digests = sorted({c.digest for c in manifest.chunks})
        present = bounded_map(lambda d: self.backend.exists(keys.chunk_key(d)), digests, self.threads)
        missing = [d for d, ok in zip(digests, present, strict=True) if not ok]
        if missing:
            raise IntegrityError(f"step {ref.step}: {len(missing)} chunk(s) of its manifest are gone "
                                 f"(e.g. {keys.chunk_key(missing[0])}); it cannot be tagged")

    def untag(self, name: str) -> None:
        """Remove the tag `name` (at the version read now). Raises TagNotFoundError."""
        self._require_store()
        if not self._delete_ref(keys.tag_ref_key(name)):
            raise TagNotFoundError(name, self.url)

    def tags(self) -> dict[str, int]:
        """Tag name -> tagged step."""
        self._require_store()
        found = {}
        for info in self.backend.list(keys.TAG_REFS):
            ref = read_ref(self.backend, info.key)
            if ref is not None:
                found[info.key[len(keys.TAG_REFS):]] = ref[0].step
        return dict(sorted(found.items()))

    # -- locks -------------------------------------------------------------------------------
    def locks(self) -> list[LockInfo]:
        """Leases and locks under locks/, with owner, age and staleness by the server's clock
        (read off a scratch write; with read-only credentials, the local clock, with a warning)."""
        self._require_store()
        try:
            now = probe_clock(self.backend).now()
        except PermissionDeniedError:
            log.warning("cannot write to %s: lock ages below use this machine's clock, not the server's", self.url)
            now = time.time()
        return list_locks(self.backend, ttl=self.lease_ttl, now=now)

    def clear_stale_locks(self) -> list[LockInfo]:
        """Delete leases and locks whose holder stopped refreshing them, judged by the server's
        clock and deleted only at the version judged; returns them."""
        self._require_store()
        return clear_stale(self.backend, ttl=self.lease_ttl, now=probe_clock(self.backend).now())

    # -- read ------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, ascending. Raises StoreNotFoundError when the URL holds no store."""
        self._require_store()
        found = (keys.step_from_ref_key(info.key) for info in self.backend.list(keys.STEP_REFS))
        return sorted(step for step in found if step is not None)

    def latest(self) -> int | None:
        """The highest committed step, or None for an empty store."""
        steps = self.steps()
        return steps[-1] if steps else None

    def ref(self, step: int | str) -> Ref:
        """The ref of `step`, or of the tag named by a str. Raises StepNotFoundError."""
        self._require_store()
        if isinstance(step, str):
            tagged = read_ref(self.backend, keys.tag_ref_key(step))
            if tagged is None:
                raise TagNotFoundError(step, self.url)
            return tagged[0]
        found = read_ref(self.backend, keys.step_ref_key(step))
        if found is None:
            raise StepNotFoundError(step, self.url)
        if found[0].step != step:
            raise FormatError(f"ref of step {step} names step {found[0].step}: refs are not copied between keys")
        return found[0]

    def manifest(self, digest: str) -> Manifest:
        """The manifest stored under `digest`, checked against it (unless the store's `verify`
        is off); a version 2 root comes with all its parts, as one Manifest
        (ckptstore.manifestread.assemble)."""
        found = self.manifest_object(digest)
        if isinstance(found, RootManifest):
            return assemble(self.backend, self._hash, found, self.threads)
        return found

    def manifest_object(self, digest: str) -> Manifest | RootManifest:
        """The manifest stored under `digest` as stored: a v2 root without its parts (readers
        that need only some parts start from it)."""
        self._require_store()
        return read_manifest_object(self.backend, self._hash, digest, check=self.verify)

    def info(self, step: int | str) -> StepInfo:
        """The ref and manifest of a committed step (or tag)."""
        ref = self.ref(step)
        return StepInfo(ref.step, ref, self.manifest(ref.manifest))

    def _resolve(self, step: int | str | None) -> int | str:
        """The step number or tag name `step` means, as the CLI reads a STEP: None or "latest"
        the newest committed step, an int or a str of ASCII digits ("2", "002") that step, any
        other str the tag of that name. `tag()` refuses such names; a store written before it
        did may hold one, and the step reading wins: it is loaded by its step,
        ``load(store.ref("2").step)``. Raises StepNotFoundError (an empty store) and
        InvalidStepError."""
        if step is None or step == "latest":
            latest = self.latest()
            if latest is None:
                raise StepNotFoundError("latest", self.url)
            return latest
        if isinstance(step, str):
            return keys.check_step(int(step)) if _STEP_NUMBER.fullmatch(step) else step
        return keys.check_step(step)

    def load(self, step: int | str | None = None, *, into: Any = None, select: list[str] | None = None,
             strict: bool = True) -> Any:
        """The state saved as `step`: an int, "latest" (the default, None, means it too), a str of
        digits for that step number, or a tag name (`_resolve` has the rules).

        `select`: a list of dotted paths, the names `export` gives (path parts joined with ".",
        int keys and list indices as their decimal text: ``["model", "optim.state.0"]``). Only
        those subtrees are loaded, in their original nesting (``{"model": ..., "optim": {"state":
        {0: ...}}}``; a list or tuple of which only some items are selected comes back as a dict
        of them by index), and only chunks holding their tensors are read. A chunk shared with
        tensors not selected (a pack of small tensors) is read whole, so that its hash can be
        checked. A name that names nothing raises PathNotFoundError (a KeyError) before any
        chunk is read; every name that does is kept.

        `into`: a tree of existing tensors, such as ``{"model": model.state_dict()}``; each is
        filled in place (dense CPU tensors receive the bytes directly, others through a staging
        copy) and returned in the result at its path. As torch's `load_state_dict`, it is
        strict: the tensor paths of `into` (only those inside the selection, with `select`)
        must be exactly the step's (the selection's), each of the stored kind, dtype and shape.
        Otherwise StateMismatchError lists `missing` (in `into`, not in the step), `unexpected`
        (in the step, not in `into`) and `mismatched` tensors, before a single chunk is read.
        Plain values in `into` (ints, strs) are ignored; the result holds the stored ones. An
        `into` that is not a dict, list, tuple or tensor (a module, an int), or holds such an
        object, raises InvalidArgumentError.

        `strict=False`: tensors that match are filled; the step's other tensors are loaded
        into new memory, `into`'s other tensors are left untouched, and the return value is a
        `LoadResult(state, missing, unexpected)` (a NamedTuple, even without `into`). Kind,
        dtype or shape mismatches still raise.

        Raises StepNotFoundError, PathNotFoundError, StateMismatchError, InvalidArgumentError,
        InsufficientMemoryError (the tensors to allocate exceed RAM plus swap) or
        IntegrityError (corrupt or missing data, naming the step, tensor and key).
        """
        names = None if select is None else check_select(select)
        if names == ():
            raise InvalidArgumentError("select=[] selects nothing; leave select out to load the whole step")
        self._require_store()  # before the lease: reading a URL with no store creates nothing
        # A load lease makes a concurrent gc stand down. Read-only credentials cannot write
        # one: the load goes ahead without (gc's min_age still protects it in practice).
        with Lease(self.backend, "load", writer_identity(), ttl=self.lease_ttl, required=False):
            state, missing, unexpected = self._load_leased(step, into, names, strict)
        return state if strict else LoadResult(state, missing, unexpected)

    def _load_leased(self, step: int | str | None, into: Any, names: tuple[str, ...] | None,
                     strict: bool) -> tuple[Any, list[str], list[str]]:
        from ckptstore.tensors import allocate, is_tensor, target_mismatch

        step = self._resolve(step)
        manifest = self.info(step).manifest
        context = f"step {step}"
        tree = decode_tree(manifest.tree)
        selection = Selection(tree, ((),)) if names is None else select_subtrees(tree, names, context)
        stored: dict[tuple[Any, ...], TensorRef] = leaves(selection.tree, lambda node: isinstance(node, TensorRef))
        for ref in stored.values():
            if ref.index >= len(manifest.tensors):
                raise FormatError(f"{context}: tree references tensor {ref.index} of {len(manifest.tensors)}")

        # Everything is checked before anything is allocated or read.
        matched: dict[tuple[Any, ...], Any] = {}
        missing: list[str] = []
        unexpected: list[str] = []
        if into is not None:
            if is_tensor(into) and not isinstance(selection.tree, TensorRef):
                raise InvalidArgumentError(f"into is a tensor, but {context} holds a {type(selection.tree).__name__}: "
                                           f"pass a tree shaped like the saved state")
            wanted = {path: t for path, t in target_tensors(into, is_tensor).items() if selection.holds(path)}
            comparison = compare_targets(stored, wanted)
            matched, missing, unexpected = comparison.matched, comparison.missing, comparison.unexpected
            mismatched = [(dotted_name(path), why) for path, target in matched.items()
                          if (why := target_mismatch(manifest.tensors[stored[path].index], target)) is not None]
            if mismatched or (strict and (missing or unexpected)):
                what = "the selection" if names is not None else "the stored state"
                hint = "" if mismatched else "; strict=False fills what matches, select=[...] loads part of a step"
                raise StateMismatchError(f"{context}: into does not match {what}{hint}",
                                         missing=missing if strict else [], unexpected=unexpected if strict else [],
                                         mismatched=mismatched)
        fresh = {ref.index for path, ref in stored.items() if path not in matched}
        _check_fits(step, sum(manifest.tensors[index].nbytes for index in fresh))

        targets: dict[int, Any] = {}
        labels: dict[int, str] = {}
        for path, ref in stored.items():
            if ref.index in targets:
                continue
            labels[ref.index] = format_path(path)
            try:
                targets[ref.index] = allocate(manifest.tensors[ref.index], labels[ref.index], matched.get(path))
            except (MemoryError, RuntimeError) as exc:  # torch reports allocation failures as RuntimeError
                if isinstance(exc, RuntimeError) and "alloc" not in str(exc):
                    raise
                raise InsufficientMemoryError(
                    f"{context}: allocating {labels[ref.index]} "
                    f"({manifest.tensors[ref.index].nbytes} bytes) failed: {exc}") from exc
        landings: dict[int, list[Landing]] = {}
        for index, target in targets.items():
            position = 0
            for chunk_index, offset, length in manifest.tensors[index].segments:
                landings.setdefault(chunk_index, []).append(
                    Landing(offset, length, target.data[position:position + length], labels[index]))
                position += length
        reader = ChunkReader(self.backend, self._hash, self.threads, verify=self.verify)
        # select=: a selected tensor packed with others is fetched by byte range from an
        # uncompressed chunk (not hash-checked: docs/FORMAT.md, "Ranged reads"); whole chunks
        # and compressed ones are read whole and checked, as in a full load.
        read = reader.read_ranges if names is not None else reader.read
        read([(manifest.chunks[i], group) for i, group in sorted(landings.items())], context)
        finished = {index: target.finish() for index, target in targets.items()}
        return map_tensors(selection.tree, lambda _path, ref: finished[ref.index]), missing, unexpected

    # -- delete ----------------------------------------------------------------------------
    def delete(self, step: int) -> None:
        """Delete the ref of `step` (its data is freed by gc), at the version read now.
        Raises StepNotFoundError, or PreconditionFailedError if the step was re-committed in
        between (the new commit stays)."""
        keys.check_step(step)  # a bad argument is told before a missing store
        self._require_store()
        try:
            deleted = self._delete_ref(keys.step_ref_key(step))
        except PreconditionFailedError as exc:
            raise PreconditionFailedError(f"step {step} was committed again while it was being deleted; "
                                          f"the new commit was kept", key=exc.key, operation="delete") from exc
        if not deleted:
            raise StepNotFoundError(step, self.url)


def _check_fits(step: int | str, nbytes: int) -> None:
    """Raise InsufficientMemoryError when a load must allocate `nbytes` (the tensors it does not
    fill in an `into`) and they cannot fit in RAM plus swap."""
    from ckptstore.sysmem import machine_memory_bytes

    limit = machine_memory_bytes()
    if limit is not None and nbytes > limit:
        raise InsufficientMemoryError(
            f"step {step} holds {nbytes} bytes of tensors, more than this machine's memory "
            f"({limit} bytes of RAM and swap); load(into=...) fills existing tensors instead, "
            f"load(select=[...]) loads part of the step")


class LoadResult(NamedTuple):
    """What `load(..., strict=False)` returns: the loaded state, and the dotted paths of the
    tensors `into` has and the step (or selection) has not (`missing`, left untouched), and of
    those the step has and `into` has not (`unexpected`, loaded into new memory)."""

    state: Any
    missing: list[str]
    unexpected: list[str]
