"""Read-only summaries of a store for people and scripts (the CLI's ls, show, du and diff).

Reads refs and manifests only, never chunk data, and never imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ckptstore import keys
from ckptstore.chunkio import bounded_map
from ckptstore.errors import FormatError, ObjectNotFoundError
from ckptstore.lscache import RefCache
from ckptstore.manifest import MAX_REF_BYTES, Manifest, Ref, decode_ref, summarize
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
    # Stored size of the chunks its save uploaded ("new when saved"; a later gc or delete does
    # not change it). Refs written before the summary existed: of the chunks no earlier such step references.
    new_bytes: int

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


def step_summaries(store: Store, *, cache: bool = True) -> list[StepSummary]:
    """Every committed step in order, with its sizes: one listing of refs/steps/, then one
    GET per ref, concurrently (store.threads). A ref carries its step's summary; only a ref
    written before summaries existed costs a manifest read. With `cache` (not for memory://),
    refs whose listed version is unchanged since the last call come from the client-side
    cache (ckptstore.lscache) without a GET."""
    store._require_store()  # StoreNotFoundError rather than an empty list
    listed = sorted((step, info.key, info.version) for info in store.backend.list(keys.STEP_REFS)
                    if (step := keys.step_from_ref_key(info.key)) is not None)
    known = RefCache(store.url) if cache and not store.url.startswith("memory://") else None

    def read(step: int, key: str, version: str) -> Ref | None:
        cached = known.get(key, version) if known is not None else None
        return cached if cached is not None and cached.step == step else _read_step_ref(store, step, key)

    refs = list(bounded_map(lambda item: read(*item), listed, store.threads))
    if known is not None:  # only refs with a summary: a summary-less row depends on other steps
        known.replace_all({key: (version, ref) for (_, key, version), ref in zip(listed, refs, strict=True)
                           if ref is not None and ref.summary is not None})
    seen: set[str] = set()  # chunks of the earlier summary-less steps
    rows = []
    for ref in refs:
        if ref is None:
            continue  # deleted since the listing
        summary = ref.summary
        if summary is None:
            manifest = store.manifest(ref.manifest)
            fresh = {c.digest: c.stored_size for c in manifest.chunks if c.digest not in seen}
            seen.update(fresh)
            summary = summarize(manifest, new_bytes=sum(fresh.values()))
        rows.append(StepSummary(
            step=ref.step, committed=ref.committed, writer=ref.writer, seq=ref.seq, tensors=summary.tensors,
            logical_bytes=summary.logical_bytes, stored_bytes=summary.stored_bytes, new_bytes=summary.new_bytes,
        ))
    return rows


def _read_step_ref(store: Store, step: int, key: str) -> Ref | None:
    """The ref at `key` in one bounded GET (no version needed, so no head), or None if gone."""
    try:
        ref = decode_ref(store.backend.get_range(key, 0, MAX_REF_BYTES + 1))
    except ObjectNotFoundError:
        return None
    if ref.step != step:
        raise FormatError(f"ref of step {step} names step {ref.step}: refs are not copied between keys")
    return ref


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


@dataclass(frozen=True)
class TensorPlaceholder:
    """A tensor in `step_details(tree=True)`'s tree: what it is, not its bytes."""

    kind: str
    dtype: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        word = {"torch": "tensor", "numpy": "ndarray"}.get(self.kind, self.kind)
        return f"<{word} {self.dtype} [{', '.join(map(str, self.shape))}]>"


def tree_view(manifest: Manifest) -> Any:
    """The step's state tree, tensors replaced by TensorPlaceholders (reads no tensor data)."""

    def placeholder(_path: tuple[Any, ...], ref: TensorRef) -> Any:
        if ref.index >= len(manifest.tensors):
            return TensorPlaceholder("missing", f"tensor {ref.index}", ())
        entry = manifest.tensors[ref.index]
        return TensorPlaceholder(entry.kind, entry.dtype, entry.shape)

    return map_tensors(decode_tree(manifest.tree), placeholder)


def plain_tree(node: Any) -> Any:
    """`tree_view`'s tree as JSON values: tensors as their '<tensor float32 [4, 4]>' text,
    bytes as hex, tuples as lists, int keys as str, NaN and infinities as 'nan', 'inf', '-inf'."""
    if isinstance(node, dict):
        return {str(k): plain_tree(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [plain_tree(v) for v in node]
    if isinstance(node, TensorPlaceholder):
        return str(node)
    if isinstance(node, bytes):
        return node.hex()
    if isinstance(node, float) and not math.isfinite(node):
        return str(node)
    return node


def step_details(store: Store, step: int, *, tree: bool = False) -> dict[str, Any]:
    """Everything `ckptstore show` prints about `step`, as plain data; with `tree`, also
    "tree": the state's tree_view (for JSON, pass it through plain_tree)."""
    info = store.info(step)
    manifest = info.manifest
    extra = {"tree": tree_view(manifest)} if tree else {}
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
        **extra,
    }


@dataclass(frozen=True)
class HistoryRow:
    """One step of `ckptstore du --history`: how the store grew with it.

    `stored_bytes` is `new_bytes` summed over the steps up to this one (what the store's chunks
    take once older steps' unique chunks are counted once), `dedup_ratio` the logical bytes of
    those steps over it."""

    step: int
    committed: float
    logical_bytes: int
    new_bytes: int
    stored_bytes: int
    dedup_ratio: float | None  # None while nothing is stored

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def storage_history(store: Store) -> list[HistoryRow]:
    """Every committed step in order with its logical, new and cumulative stored bytes."""
    rows = []
    logical = stored = 0
    for summary in step_summaries(store):
        logical += summary.logical_bytes
        stored += summary.new_bytes
        rows.append(HistoryRow(summary.step, summary.committed, summary.logical_bytes, summary.new_bytes, stored,
                               logical / stored if stored else None))
    return rows


@dataclass(frozen=True)
class DiskUsage:
    """What a store holds, from its refs, manifests and one listing of chunks/ and manifests/.

    - logical: tensor bytes summed over every step (what the steps would take undeduplicated);
    - referenced: distinct chunks (and manifests) that committed steps reference, with their
      stored sizes; `dedup_ratio` = logical_bytes / referenced_chunk_bytes;
    - stored: every object listed under chunks/ and manifests/;
    - garbage: listed objects that no ref reaches (steps or tags): what gc would free
      (minus what is younger than its --min-age);
    - missing: objects a ref reaches that the listing does not hold (run verify).
    """

    url: str
    steps: int
    tags: int
    logical_bytes: int
    referenced_chunks: int
    referenced_chunk_bytes: int
    referenced_manifests: int
    dedup_ratio: float | None  # None when nothing is referenced
    stored_chunks: int
    stored_chunk_bytes: int
    stored_manifests: int
    stored_manifest_bytes: int
    garbage_objects: int
    garbage_bytes: int
    missing_objects: int
    unreadable_refs: list[str]  # "key: reason" for refs or manifests that could not be read

    @property
    def stored_bytes(self) -> int:
        return self.stored_chunk_bytes + self.stored_manifest_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "stored_bytes": self.stored_bytes}


def disk_usage(store: Store) -> DiskUsage:
    """Sizes of `store`: logical, referenced, stored and garbage bytes (see DiskUsage).

    Reads every ref and manifest once and lists chunks/ and manifests/; never reads chunk data.
    Tags are found as refs under refs/tags/ (a tag keeps its manifest alive like a step does).
    """
    from ckptstore import keys
    from ckptstore.chunkio import bounded_map
    from ckptstore.commit import read_ref
    from ckptstore.errors import CkptStoreError

    backend = store.backend
    ref_keys = sorted(info.key for info in backend.list("refs/"))
    step_keys = {key for key in ref_keys if keys.step_from_ref_key(key) is not None}
    unreadable: list[str] = []

    def read(key: str) -> tuple[str, str | None, str | None]:
        try:
            found = read_ref(backend, key)
        except CkptStoreError as exc:
            return key, None, f"{type(exc).__name__}: {exc}"
        return key, (found[0].manifest if found else None), None

    ref_manifest: dict[str, str] = {}
    for key, digest, error in bounded_map(read, ref_keys, store.threads):
        if error is not None:
            unreadable.append(f"{key}: {error}")
        elif digest is not None:
            ref_manifest[key] = digest

    def fetch(digest: str) -> tuple[str, Manifest | None, str | None]:
        try:
            return digest, store.manifest(digest), None
        except CkptStoreError as exc:
            return digest, None, f"{type(exc).__name__}: {exc}"

    manifests: dict[str, Manifest] = {}
    for digest, manifest, error in bounded_map(fetch, sorted(set(ref_manifest.values())), store.threads):
        if manifest is not None:
            manifests[digest] = manifest
        else:
            unreadable.append(f"{keys.manifest_key(digest)}: {error}")

    logical = 0
    step_chunks: dict[str, int] = {}
    for key, digest in ref_manifest.items():
        if key in step_keys and digest in manifests:
            logical += manifests[digest].logical_bytes
            step_chunks.update((c.digest, c.stored_size) for c in manifests[digest].chunks)
    reachable_chunks = {c.digest for m in manifests.values() for c in m.chunks}
    reachable_manifests = set(ref_manifest.values())

    listed: dict[str, tuple[str, int]] = {}  # key -> (prefix, size)
    for prefix in (keys.CHUNKS, keys.MANIFESTS):
        for info in backend.list(prefix):
            listed[info.key] = (prefix, info.size)
    garbage_objects = garbage_bytes = 0
    listed_digests: set[tuple[str, str]] = set()
    for key, (prefix, size) in listed.items():
        try:
            digest = keys.digest_from_key(key)
        except CkptStoreError:
            digest = ""
        listed_digests.add((prefix, digest))
        if digest not in (reachable_chunks if prefix == keys.CHUNKS else reachable_manifests):
            garbage_objects += 1
            garbage_bytes += size
    missing = (sum((keys.CHUNKS, d) not in listed_digests for d in reachable_chunks)
               + sum((keys.MANIFESTS, d) not in listed_digests for d in reachable_manifests))
    referenced_bytes = sum(step_chunks.values())
    return DiskUsage(
        url=store.url,
        steps=sum(key in step_keys for key in ref_manifest),
        tags=sum(key.startswith(keys.TAG_REFS) for key in ref_manifest),
        logical_bytes=logical,
        referenced_chunks=len(step_chunks),
        referenced_chunk_bytes=referenced_bytes,
        referenced_manifests=len({d for k, d in ref_manifest.items() if k in step_keys}),
        dedup_ratio=logical / referenced_bytes if referenced_bytes else None,
        stored_chunks=sum(p == keys.CHUNKS for p, _ in listed.values()),
        stored_chunk_bytes=sum(s for p, s in listed.values() if p == keys.CHUNKS),
        stored_manifests=sum(p == keys.MANIFESTS for p, _ in listed.values()),
        stored_manifest_bytes=sum(s for p, s in listed.values() if p == keys.MANIFESTS),
        garbage_objects=garbage_objects,
        garbage_bytes=garbage_bytes,
        missing_objects=missing,
        unreadable_refs=unreadable,
    )
