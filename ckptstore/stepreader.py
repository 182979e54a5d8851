"""A lazy view of one committed step, like safetensors' `safe_open`: `Store.reader(step)`.

    with store.reader(100) as r:
        r.keys()                     # tensor names, in tree order
        r.metadata, r.tree, r.step   # read with the manifest: no tensor bytes
        w = r["model.layer.weight"]  # one tensor: only its chunks, hash-checked
        rows = r.get_slice("model.embed.weight")[1000:2000]  # only those rows' bytes

Opening reads the ref and the manifest, nothing else, and holds a load lease until `close()`
(or the end of the `with` block, or the reader's collection), so a gc in another process
stands down meanwhile.

- Names are the ones `export_safetensors` gives: the tree path joined with "." (``state``
  for a tensor at the root), ``#2``, ``#3``, ... appended when two paths join to one name. A
  tensor held at two paths in the tree has both names.
- `r.tree` is the state tree with every tensor replaced by a `TensorInfo` (name, kind,
  dtype, shape, bytes).
- Values come back as `Store.load` gives them: torch tensors, numpy arrays and numpy
  scalars, on the CPU.
- `get_slice(name)[...]` takes an int or a step-1 slice on dim 0, then any basic index
  (ints, slices, `...`) on the rest. Only the rows the dim-0 index selects are fetched: from
  an uncompressed chunk the byte ranges they occupy, from a compressed one the whole chunk
  (one zstd frame). The other dims are then indexed in memory. Bytes fetched by range are
  not hash-checked (like safetensors); chunks read whole are, when the store verifies.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ckptstore.chunkio import ChunkReader, Landing
from ckptstore.errors import CkptStoreError, FormatError, InvalidArgumentError, PathNotFoundError
from ckptstore.kernel import StoreKernel, writer_identity
from ckptstore.leases import Lease
from ckptstore.manifest import Manifest, TensorEntry
from ckptstore.selection import dotted_name
from ckptstore.tree import TensorRef, decode_tree, map_tensors


class TensorNotFoundError(PathNotFoundError):
    """The step holds no tensor of that name (a KeyError, like load(select=)'s unknown paths)."""

    def __init__(self, name: str, step: int, known: list[str]):
        super().__init__([name], f"step {step}", {})
        self.name = name
        hint = f"; it has {', '.join(known[:5])}{', ...' if len(known) > 5 else ''}" if known else "; it has none"
        self.args = (f"step {step} has no tensor named {name!r}{hint}",)


class ReaderClosedError(CkptStoreError, ValueError):
    """The step reader was used after `close()` (or after its `with` block)."""


@dataclass(frozen=True)
class TensorInfo:
    """What `StepReader.tree` holds in place of a tensor: its description, not its bytes."""

    name: str
    kind: str  # "torch", "numpy" or "numpy-scalar"
    dtype: str  # torch dtype name ("bfloat16") or numpy dtype string ("<f4")
    shape: tuple[int, ...]
    nbytes: int


def tensor_names(paths: list[tuple[Any, ...]]) -> list[str]:
    """The safetensors name of each tree path, in order: its dotted name (parts joined with
    ".", ``state`` for the root), ``#2``, ``#3``, ... appended to a name already taken."""
    taken: set[str] = set()
    names = []
    for path in paths:
        base = dotted_name(path)
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}#{n}"
        taken.add(name)
        names.append(name)
    return names


class StepReader:
    """One committed step of `store`, read lazily; see the module docstring."""

    def __init__(self, store: StoreKernel, step: int | str | None = None):
        store._require_store()  # before the lease: a URL with no store gets nothing written
        self._store = store
        lease = Lease(store.backend, "load", writer_identity(), ttl=store.lease_ttl, required=False).__enter__()
        # Released by close(), or when the reader is collected unclosed: a forgotten reader
        # must not hold gc off for the rest of the process.
        self._release = weakref.finalize(self, lease.__exit__, None, None, None)
        try:
            resolved = store._resolve(step)
            info = store.info(resolved)
            self.step: int = info.step
            self._manifest: Manifest = info.manifest
            self._context = f"step {self.step}"
            tree = decode_tree(self._manifest.tree)
            paths: list[tuple[Any, ...]] = []
            indices: list[int] = []

            def collect(path: tuple[Any, ...], ref: TensorRef) -> TensorRef:
                if ref.index >= len(self._manifest.tensors):
                    raise FormatError(f"{self._context}: tree references tensor {ref.index} "
                                      f"of {len(self._manifest.tensors)}")
                paths.append(path)
                indices.append(ref.index)
                return ref

            map_tensors(tree, collect)
            names = tensor_names(paths)
            self._index: dict[str, int] = dict(zip(names, indices, strict=True))
            # map_tensors visits in the same order again: hand each path its name.
            order = iter(names)
            self._tree = map_tensors(tree, lambda _path, ref: self._info(next(order), ref.index))
        except BaseException:
            self.close()
            raise

    # -- lifetime ---------------------------------------------------------------------------
    def __enter__(self) -> StepReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the load lease (a gc may then sweep what only this step held). Idempotent."""
        self._release()

    @property
    def closed(self) -> bool:
        return not self._release.alive

    def _open(self) -> None:
        if self.closed:
            raise ReaderClosedError(f"the reader of {self._context} in {self._store.url} is closed")

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._index)} tensors"
        return f"StepReader({self._store.url!r}, step={getattr(self, 'step', '?')}, {state})"

    # -- what the manifest says -------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names, in tree order."""
        self._open()
        return list(self._index)

    def __contains__(self, name: object) -> bool:
        self._open()
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        self._open()
        return len(self._index)

    @property
    def metadata(self) -> Any:
        """The `metadata=` the step was saved with (None if none)."""
        self._open()
        return self._manifest.metadata

    @property
    def tree(self) -> Any:
        """The saved state tree with a `TensorInfo` in place of each tensor."""
        self._open()
        return self._tree

    def info(self, name: str) -> TensorInfo:
        """The description of tensor `name` (no bytes read)."""
        return self._info(name, self._lookup(name))

    def _info(self, name: str, index: int) -> TensorInfo:
        entry = self._manifest.tensors[index]
        return TensorInfo(name, entry.kind, entry.dtype, entry.shape, entry.nbytes)

    def _lookup(self, name: str) -> int:
        self._open()
        if name not in self._index:
            raise TensorNotFoundError(name, self.step, list(self._index))
        return self._index[name]

    # -- tensor bytes -----------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        """Tensor `name`, whole: its chunks only, hash-checked when the store verifies."""
        index = self._lookup(name)
        return self._read(self._manifest.tensors[index], name, ranged=False)

    def get_tensor(self, name: str) -> Any:
        """`r[name]`, under safetensors' name for it."""
        return self[name]

    def get_slice(self, name: str) -> TensorSlice:
        """A handle on tensor `name` that reads only what `[...]` selects on dim 0."""
        return TensorSlice(self, name, self._manifest.tensors[self._lookup(name)])

    def _read(self, entry: TensorEntry, name: str, *, ranged: bool) -> Any:
        """Allocate `entry` and land its segments' bytes in it."""
        from ckptstore.tensors import allocate

        self._open()
        target = allocate(entry, name)
        landings: dict[int, list[Landing]] = {}
        position = 0
        for chunk_index, offset, length in entry.segments:
            landings.setdefault(chunk_index, []).append(
                Landing(offset, length, target.data[position:position + length], name))
            position += length
        store = self._store
        reader = ChunkReader(store.backend, store._hash, store.threads, verify=store.verify)
        jobs = [(self._manifest.chunks[i], group) for i, group in sorted(landings.items())]
        (reader.read_ranges if ranged else reader.read)(jobs, self._context)
        return target.finish()


class TensorSlice:
    """`StepReader.get_slice(name)`: shape and dtype at once, then `[...]` reads rows."""

    def __init__(self, reader: StepReader, name: str, entry: TensorEntry):
        self._reader, self.name, self._entry = reader, name, entry

    def get_shape(self) -> list[int]:
        return list(self._entry.shape)

    def get_dtype(self) -> str:
        """The stored dtype: a torch dtype name ("bfloat16") or a numpy dtype string ("<f4")."""
        return self._entry.dtype

    def __repr__(self) -> str:
        return f"TensorSlice({self.name!r}, {self._entry.dtype}{list(self._entry.shape)})"

    def __getitem__(self, key: Any) -> Any:
        entry = self._entry
        index = key if isinstance(key, tuple) else (key,)
        for part in index:
            if not (part is Ellipsis or isinstance(part, slice) or _is_int(part)):
                raise InvalidArgumentError(f"{self.name}: get_slice takes ints, slices and ..., not {part!r}")
        if not entry.shape or not index or index[0] is Ellipsis:
            # No dim-0 index to narrow the read by (a 0-d tensor, [()] or [..., i]): read it whole.
            whole = self._reader._read(entry, self.name, ranged=False)
            return _copy(whole[index]) if index else whole
        first, rest = index[0], index[1:]
        rows = entry.shape[0]
        if _is_int(first):
            row = int(first) + rows if int(first) < 0 else int(first)
            if not 0 <= row < rows:
                raise InvalidArgumentError(f"{self.name}: index {int(first)} is out of range for dim 0 of size {rows}")
            start, stop, shape, rows_dim = row, row + 1, entry.shape[1:], False
        else:
            start, stop, step = first.indices(rows)
            if step != 1:
                raise InvalidArgumentError(f"{self.name}: get_slice reads a contiguous range of rows; slice steps "
                                           f"other than 1 are not supported (got {step}): read [a:b] and index it")
            stop = max(start, stop)
            shape, rows_dim = (stop - start, *entry.shape[1:]), True
        part = self._reader._read(_rows(entry, start, stop, shape), self.name, ranged=True)
        if not rest:
            return part
        return _copy(part[(slice(None), *rest) if rows_dim else rest])


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _copy(view: Any) -> Any:
    """An indexed view as a value of its own (not holding on to the rows it was cut from)."""
    return view.clone() if hasattr(view, "clone") else view.copy()


def _rows(entry: TensorEntry, start: int, stop: int, shape: tuple[int, ...]) -> TensorEntry:
    """The entry of rows [start, stop) of `entry`, as `shape`: its segments are the sub-ranges
    of `entry`'s segments that hold those rows' bytes."""
    row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
    low, high = start * row_bytes, stop * row_bytes
    segments = []
    position = 0  # where each segment starts in the tensor's bytes
    for chunk_index, offset, length in entry.segments:
        begin, end = max(low, position), min(high, position + length)
        if begin < end:
            segments.append((chunk_index, offset + begin - position, end - begin))
        position += length
    return TensorEntry(entry.kind, entry.dtype, shape, tuple(segments), entry.placement)
