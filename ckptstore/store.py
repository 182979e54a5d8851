"""The Store: save and load steps. Open one with `ckptstore.open(url)`.

`Store` is the single-process kernel (ckptstore/kernel.py: the order of writes, settling with
gc, retention, tags, reads, loads, deletes, locks) plus what builds on it: a save across the
ranks of a process group (ckptstore/distributed.py), background saves (ckptstore/async_save.py)
and gc (ckptstore/gc.py). Imports flow one way: this module imports those, and none of them
imports it.

Save order (docs/FORMAT.md, "Commit protocol"): chunks, then the manifest, then the ref.
A step exists exactly when its ref does, and a ref only ever names a complete manifest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from ckptstore.async_save import AsyncSaver, saver_for
from ckptstore.canary import ensure_conditional_writes
from ckptstore.chunkblob import Compression
from ckptstore.chunking import ChunkingPolicy
from ckptstore.distributed import resolve_group, save_across_ranks
from ckptstore.gc import GCReport, collect_garbage
from ckptstore.hashing import DEFAULT_ALGORITHM
from ckptstore.kernel import DEFAULT_THREADS, SaveInfo, StepInfo, StoreKernel, writer_identity
from ckptstore.leases import DEFAULT_TTL
from ckptstore.retry import DEFAULT_RETRIES, RetryingBackend
from ckptstore.url import open_backend, retries_option

__all__ = ["DEFAULT_THREADS", "SaveInfo", "StepInfo", "Store", "open", "writer_identity"]


class Store(StoreKernel):
    """A checkpoint store on one backend. Open with `ckptstore.open(url)`."""

    _async_saver: AsyncSaver | None = None  # created by the first save_async

    def close(self) -> None:
        """Wait for async saves in flight, then release the backend's connections."""
        if self._async_saver is not None:
            self._async_saver.close()
        super().close()

    #: Set by `open`: the options a pickled copy needs that the Store does not keep itself.
    _open_options: dict[str, Any] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled, a Store is its URL and options, and unpickling opens it again (with the
        handle's `create`: a store not written yet, hence not created yet, reopens too).
        Clients, pools, thread pools and leases belong to one process: the copy makes its own.
        What travels: the backend's URL, this handle's chunking, compression, threads, verify
        and lease TTL, the retry count, and the `storage_options` given to `open`, credentials
        included (inside the pickle only: docs/DCP.md, "Async saves"). A memory:// store opens
        only in the process that holds it. PROCESS-mode DCP async_save pickles a StoreWriter."""
        recorded = self._open_options or {}
        retries = recorded.get("retries")
        if retries is None:  # built without `open`: what its backend does
            retries = max(0, int(getattr(self.backend, "attempts", 1)) - 1)
        options = {"chunking": self.chunking, "compression": self.compression, "threads": self.threads,
                   "verify": self.verify, "lease_ttl": self.lease_ttl, "retries": retries,
                   "storage_options": recorded.get("storage_options"), "create": self._create}
        return _reopen, (self.url, options)

    # -- save ------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, overwrite: bool = False, metadata: Any = None,
             keep_last: int | None = None, keep_every: int | None = None, process_group: Any = None) -> SaveInfo:
        """Save `state` as `step` and commit it atomically.

        After a successful commit, retention deletes the refs of steps that are neither among
        the `keep_last` newest, nor a multiple of `keep_every`, nor tagged (data is freed by gc).
        Raises StepExistsError if the step exists and not `overwrite` (nothing is touched),
        CommitConflictError if another writer replaced it concurrently, and
        UnsupportedValueError (naming the path) for state the format cannot hold.

        With a torch.distributed process group of several ranks (`process_group`, default: the
        default group when one is initialised) every rank must call save with its own state;
        rank 0 commits the union and every rank returns or raises the same (ckptstore/distributed.py;
        `process_group=ckptstore.distributed.SINGLE_PROCESS` saves from this process alone).
        """
        group = resolve_group(process_group)
        if group is not None:
            return save_across_ranks(
                self, group, step, state, overwrite=overwrite, metadata=metadata, keep_last=keep_last,
                keep_every=keep_every, check_arguments=lambda: self._check_save_arguments(step, metadata, keep_last,
                                                                                         keep_every))
        return super().save(step, state, overwrite=overwrite, metadata=metadata, keep_last=keep_last,
                            keep_every=keep_every)

    def save_async(self, step: int, state: Any, *, overwrite: bool = False, metadata: Any = None,
                   keep_last: int | None = None, keep_every: int | None = None,
                   process_group: Any = None) -> Future[SaveInfo]:
        """Stage a snapshot of `state` in CPU memory and return; save and commit it in the background.

        The Future gives the SaveInfo, or raises what `save` would have raised (the previous
        step stays the latest). At most one save runs at a time; a second call waits for the
        first. Staging buffers are reused between saves. See ckptstore/async_save.py.
        """
        return saver_for(self).submit(step, state, overwrite=overwrite, metadata=metadata, keep_last=keep_last,
                                      keep_every=keep_every, process_group=process_group)

    # -- reading -------------------------------------------------------------------------
    def reader(self, step: int | str | None = None) -> Any:
        """A lazy view of one committed step, like safetensors' `safe_open`: `with
        store.reader(step) as r:` gives `r.keys()`, `r.metadata`, `r.tree` (the non-tensor
        values, no tensor bytes read), `r[name]` (one tensor) and `r.get_slice(name)[a:b]`
        (only the byte ranges needed). See ckptstore/stepreader.py."""
        from ckptstore.stepreader import StepReader

        return StepReader(self, step)

    def diff(self, a: int | str, b: int | str, *, values: bool = False) -> Any:
        """What changed between steps (or tags, or `latest`) `a` and `b`: tensors added,
        removed, changed and unchanged, with bytes, decided from chunk digests alone (no
        tensor data read). `values=True` also reads the changed tensors and reports their
        max abs difference and relative L2 change. See ckptstore/diff.py."""
        from ckptstore.diff import diff_steps

        return diff_steps(self, a, b, values=values)

    # -- gc --------------------------------------------------------------------------------
    def gc(self, *, dry_run: bool = False, min_age: float = 3600.0, cache: bool = True) -> GCReport:
        """Free chunks and manifests that no ref reaches and that are older than `min_age`
        seconds; safe while other processes save (docs/FORMAT.md, "Garbage collection").
        `cache`: keep what the mark learned on this machine's disk, so a repeated gc reads only
        new refs and manifests (ckptstore/gccache.py); False reads them all."""
        self._require_store()  # gc writes its lock: never at a URL that holds no store
        if not dry_run:
            ensure_conditional_writes(self.backend)
        return collect_garbage(self.backend, self._hash, owner=writer_identity(), dry_run=dry_run,
                               min_age=min_age, ttl=self.lease_ttl, cache=cache)


def open(  # noqa: A001 - mirrors builtins.open on purpose: ckptstore.open(url)
    url: str | os.PathLike[str],
    *,
    create: bool = True,
    chunking: ChunkingPolicy | None = None,
    compression: Compression | None = None,
    threads: int = DEFAULT_THREADS,
    verify: bool = True,
    hash_algorithm: str = DEFAULT_ALGORITHM,
    storage_options: Mapping[str, Any] | None = None,
    lease_ttl: float = DEFAULT_TTL,
    retries: int | None = None,
) -> Store:
    """Open the store at `url`: a path, file://, or memory://. Opening never writes: with
    `create=True` (the default) the store is created by the first write (save, tag, import,
    cp destination), and a read at a URL with no store raises StoreNotFoundError.

    `hash_algorithm` applies only when this handle's first write creates the store; an existing store keeps
    the algorithm its CKPTSTORE marker names. Chunking, compression, threads and verify are
    this handle's I/O settings and never change what a reader needs (default chunking: the
    backend's preferred chunk size, 64 MiB on S3, else ChunkingPolicy()). `storage_options` are
    keyword arguments of the backend (e.g. S3: endpoint_url, region, profile; GCS: project).
    `retries`: how often each backend operation is retried after a TransientError, on top of
    the SDK's own retries (ckptstore.retry); default: the URL's `?retries=N`, else 4; 0 = off.

    Raises StoreNotFoundError when `create=False` and no store is there (at once), InvalidURLError
    for a URL ckptstore cannot open, UnsupportedFormatError for a newer store format.
    """
    attempts = 1 + retries_option(url, retries, DEFAULT_RETRIES)
    backend = open_backend(url, storage_options, threads=threads)
    if chunking is None and backend.preferred_chunk_size is not None:
        chunking = ChunkingPolicy(chunk_size=backend.preferred_chunk_size)
    if attempts > 1:
        backend = RetryingBackend(backend, attempts=attempts)
    store = Store(backend, create=create, chunking=chunking, compression=compression, threads=threads,
                  verify=verify, hash_algorithm=hash_algorithm, lease_ttl=lease_ttl)
    store._open_options = {"storage_options": dict(storage_options) if storage_options else None,
                           "retries": attempts - 1}
    return store


def _reopen(url: str, options: dict[str, Any]) -> Store:
    """Unpickling a Store (Store.__reduce__): open it again in this process."""
    options = dict(options)
    return open(url, create=options.pop("create", False), **options)
