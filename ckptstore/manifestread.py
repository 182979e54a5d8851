"""Reading manifests of either version from a backend: the one place that knows both.

- `read_manifest_object`: the bytes at manifests/<digest>, bounded and hash-checked, decoded
  as a v1 Manifest or a v2 RootManifest.
- `assemble`: a v2 root with all its parts, as one v1-shaped Manifest, so every reader that
  wants the whole step (load, verify, cp, export, diff) works unchanged. The root's part and
  chunk-table blobs are appended to its `chunks` (no tensor refers to them), so whoever
  checks, copies or counts "every chunk of the manifest" covers them too.
- `reachable_digests`: what gc must keep for a manifest: for v2 the chunk tables' entries
  and the part and table blobs, without reading the parts.

Parts and chunk tables are always hash-checked (they are metadata: a reader trusts nothing
it did not check), whatever the store's `verify`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ckptstore import keys
from ckptstore.backends.base import Backend
from ckptstore.chunkblob import HEADER_SIZE, decode_chunk
from ckptstore.dcpformat import expand_tree
from ckptstore.errors import FormatError, IntegrityError, ObjectNotFoundError, UnsupportedFormatError
from ckptstore.manifest import MANIFEST_VERSION, MAX_MANIFEST_BYTES, ChunkEntry, Manifest, TensorEntry, decode_manifest
from ckptstore.manifestv2 import (
    MAX_ROOT_BYTES,
    ROOT_VERSION,
    BlobRef,
    ChunkTable,
    RootManifest,
    decode_chunk_table,
    decode_part,
    decode_root,
    manifest_version,
)
from ckptstore.threads import bounded_map

ManifestObject = Manifest | RootManifest
#: The most bytes a manifest object of either version may have (a read asks for one more).
MAX_MANIFEST_READ = max(MAX_MANIFEST_BYTES, MAX_ROOT_BYTES)


def read_manifest_bytes(backend: Backend, hash_fn: Callable[[Any], str], digest: str, *, check: bool = True) -> bytes:
    """The bytes stored under manifests/<digest>; IntegrityError if missing or (`check`) not
    hashing to it."""
    key = keys.manifest_key(digest)
    try:
        # Bounded read: a hostile object at a manifest key cannot make us allocate more.
        data = backend.get_range(key, 0, MAX_MANIFEST_READ + 1)
    except ObjectNotFoundError as exc:
        raise IntegrityError(f"manifest {key} is missing") from exc
    if check and hash_fn(data) != digest:
        raise IntegrityError(f"manifest {key} is corrupt: its bytes do not hash to its key")
    return data


def decode_manifest_object(data: bytes) -> ManifestObject:
    """A v1 Manifest or a v2 RootManifest; UnsupportedFormatError for another version."""
    version = manifest_version(data)
    if version == ROOT_VERSION:
        return decode_root(data)
    if version != MANIFEST_VERSION:
        raise UnsupportedFormatError(f"manifest has format version {version}; this ckptstore reads versions "
                                     f"{MANIFEST_VERSION} and {ROOT_VERSION}. Upgrade ckptstore to read this store.")
    return decode_manifest(data)


def read_manifest_object(backend: Backend, hash_fn: Callable[[Any], str], digest: str, *,
                         check: bool = True) -> ManifestObject:
    return decode_manifest_object(read_manifest_bytes(backend, hash_fn, digest, check=check))


def decode_whole(backend: Backend, hash_fn: Callable[[Any], str], data: bytes, threads: int = 8) -> Manifest:
    """A manifest's bytes (checked by the caller) as one Manifest: a v2 root with its parts
    read and its chunk tables checked against them (`check_tables`)."""
    found = decode_manifest_object(data)
    if isinstance(found, Manifest):
        return found
    whole = assemble(backend, hash_fn, found, threads)
    check_tables(backend, hash_fn, found, whole, threads)
    return whole


def check_tables(backend: Backend, hash_fn: Callable[[Any], str], root: RootManifest, whole: Manifest,
                 threads: int = 8) -> None:
    """FormatError unless the root's chunk tables list exactly the data chunks of its parts,
    with their sizes (gc keeps what the tables list; loads read what the parts list)."""
    blobs = {b.digest for b in root.blobs}
    from_parts = sorted((c.digest, c.raw_size, c.stored_size) for c in whole.chunks if c.digest not in blobs)
    tables = read_chunk_tables(backend, hash_fn, root, threads)
    listed = sorted((c.digest, c.raw_size, c.stored_size) for table in tables for c in table.entries())
    if listed != from_parts:
        raise FormatError(f"step {root.step}: its chunk tables list {len(listed)} chunks, its parts "
                          f"{len(from_parts)} (or their sizes differ)")


def read_blobs(backend: Backend, hash_fn: Callable[[Any], str], blobs: list[BlobRef] | tuple[BlobRef, ...],
               threads: int, context: str) -> Iterator[bytes]:
    """The raw bytes of each part or table blob, in order, fetched `threads` at a time and
    always hash-checked (IntegrityError naming `context` when missing or corrupt)."""

    def fetch(blob: BlobRef) -> bytes:
        key = keys.chunk_key(blob.digest)
        try:
            stored = backend.get_range(key, 0, HEADER_SIZE + blob.raw_size + 1)
            raw = bytes(decode_chunk(stored, expected_raw_length=blob.raw_size))
        except ObjectNotFoundError as exc:
            raise IntegrityError(f"{context}: {key} is missing") from exc
        except UnsupportedFormatError:
            raise
        except FormatError as exc:
            raise IntegrityError(f"{context}: {key} is corrupt: {exc}") from exc
        if hash_fn(raw) != blob.digest:
            raise IntegrityError(f"{context}: {key} is corrupt: its bytes do not hash to its key")
        return raw

    return bounded_map(fetch, list(blobs), threads)


def read_chunk_tables(backend: Backend, hash_fn: Callable[[Any], str], root: RootManifest,
                      threads: int) -> Iterator[ChunkTable]:
    context = f"the chunk tables of step {root.step}"
    for blob, data in zip(root.chunk_tables, read_blobs(backend, hash_fn, root.chunk_tables, threads, context),
                          strict=True):
        yield decode_chunk_table(data, blob.count)


def read_parts(backend: Backend, hash_fn: Callable[[Any], str], root: RootManifest, indices: list[int],
               threads: int) -> Iterator[tuple[int, Manifest]]:
    """(index, part) for the parts at `indices`, in that order."""
    blobs = [root.parts[i] for i in indices]
    context = f"the manifest parts of step {root.step}"
    for i, data in zip(indices, read_blobs(backend, hash_fn, blobs, threads, context), strict=True):
        yield i, decode_part(data, root.parts[i].count)


def reachable_digests(backend: Backend, hash_fn: Callable[[Any], str], obj: ManifestObject,
                      threads: int = 8) -> Iterator[str]:
    """Every chunk key's digest a manifest keeps alive (what gc marks)."""
    if isinstance(obj, Manifest):
        yield from (c.digest for c in obj.chunks)
        return
    yield from (b.digest for b in obj.parts + obj.chunk_tables)
    for table in read_chunk_tables(backend, hash_fn, obj, threads):
        yield from table.hex_digests()


def assemble(backend: Backend, hash_fn: Callable[[Any], str], root: RootManifest, threads: int = 8) -> Manifest:
    """The whole step of a v2 root as one Manifest (tensors in part order)."""
    chunk_index: dict[str, int] = {}
    chunks: list[ChunkEntry] = []
    tensors: list[TensorEntry] = []
    for _, part in read_parts(backend, hash_fn, root, list(range(len(root.parts))), threads):
        local = []
        for chunk in part.chunks:
            if chunk.digest not in chunk_index:
                chunk_index[chunk.digest] = len(chunks)
                chunks.append(chunk)
            local.append(chunk_index[chunk.digest])
        for t in part.tensors:
            tensors.append(TensorEntry(t.kind, t.dtype, t.shape,
                                       tuple((local[i], offset, length) for i, offset, length in t.segments),
                                       t.placement))
    if len(chunks) != root.chunks or sum(t.nbytes for t in tensors) != root.logical_bytes:
        raise FormatError(f"step {root.step}: its parts hold {len(chunks)} chunks of "
                          f"{sum(t.nbytes for t in tensors)} tensor bytes; its root says {root.chunks} of "
                          f"{root.logical_bytes}")
    tree, tensors = expand_tree(root.tree, tensors, len(root.parts))
    for blob in root.blobs:  # no tensor refers to them; listed so they are checked and copied
        if blob.digest not in chunk_index:
            chunk_index[blob.digest] = len(chunks)
            chunks.append(blob)
    return Manifest(root.step, root.created, root.metadata, tree, tuple(tensors), tuple(chunks))
