"""What changed between two steps: tensors added, removed, changed and unchanged, with bytes.

Decided from the manifests alone: content addressing means a tensor whose dtype, shape and
(chunk digest, offset, length) segments match holds the same bytes, so no tensor data is read.
The converse has one gap: small tensors are packed together into shared chunks, so when one
of them changes, its pack's digest changes for all of them. Such a tensor counts as changed and
is marked `packed` (its own bytes may be equal); `values=True` reads it and settles it.

`values=True` also reads the changed tensors (only those, through `load(select=...)`, in batches
that read each chunk once) and reports the max abs difference and the relative L2 change
||b - a|| / ||a|| of each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ckptstore.dtypes import KIND_TORCH
from ckptstore.errors import TagNotFoundError
from ckptstore.kernel import StoreKernel
from ckptstore.manifest import Manifest, TensorEntry
from ckptstore.selection import dotted_name
from ckptstore.tree import TensorRef, decode_tree, format_path, lookup, map_tensors

#: Bytes of one side's tensors read per batch with `values=True` (a batch reads each chunk once).
VALUES_BATCH_BYTES = 256 << 20
#: Elements compared at a time, so the float64 temporaries stay small whatever the tensor size.
_BLOCK_ELEMENTS = 1 << 20


@dataclass
class TensorDiff:
    """One tensor in a diff: its name (tree path joined with '.', as `export` names it), dtype,
    shape and bytes in the step it is in (B for added, changed and unchanged; A for removed).
    For a changed tensor: `old_dtype` / `old_shape` when they differ from A's, `packed` when it
    shares a chunk with other tensors (see the module doc), and with values=True
    `max_abs_diff` and `rel_l2` (None when dtype or shape changed, or the dtype has no numbers)."""

    name: str
    dtype: str
    shape: list[int]
    bytes: int
    old_dtype: str | None = None
    old_shape: list[int] | None = None
    packed: bool = False
    max_abs_diff: float | None = None
    rel_l2: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": self.shape, "bytes": self.bytes}
        if self.old_dtype is not None:
            out["old_dtype"] = self.old_dtype
        if self.old_shape is not None:
            out["old_shape"] = self.old_shape
        if self.packed:
            out["packed"] = True
        for name in ("max_abs_diff", "rel_l2"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value if math.isfinite(value) else str(value)  # JSON has no inf or nan
        return out


@dataclass
class StepDiff:
    """Tensors of step `b` compared with step `a` (see the module doc)."""

    url: str
    a: int
    b: int
    values: bool
    added: list[TensorDiff] = field(default_factory=list)
    removed: list[TensorDiff] = field(default_factory=list)
    changed: list[TensorDiff] = field(default_factory=list)
    unchanged: list[TensorDiff] = field(default_factory=list)

    @property
    def categories(self) -> dict[str, list[TensorDiff]]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed, "unchanged": self.unchanged}

    def bytes_of(self, category: str) -> int:
        return sum(t.bytes for t in self.categories[category])

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def as_dict(self) -> dict[str, Any]:
        lists = self.categories
        return {
            "url": self.url, "a": self.a, "b": self.b, "values": self.values,
            "counts": {name: len(items) for name, items in lists.items()},
            "bytes": {name: self.bytes_of(name) for name in lists},
            **{name: [t.as_dict() for t in items] for name, items in lists.items()},
        }


@dataclass(frozen=True)
class _Side:
    """One step's manifest and its tensors by tree path."""

    step: int
    manifest: Manifest
    tensors: dict[tuple[Any, ...], int]  # path -> tensor index

    def entry(self, path: tuple[Any, ...]) -> TensorEntry:
        return self.manifest.tensors[self.tensors[path]]


def diff_steps(store: StoreKernel, a: int | str, b: int | str, *, values: bool = False) -> StepDiff:
    """Compare step `b` with step `a` (each a step number, 'latest' or a tag name)."""
    old, new = _side(store, a), _side(store, b)
    names = _names([*old.tensors, *(p for p in new.tensors if p not in old.tensors)])
    result = StepDiff(store.url, old.step, new.step, values)
    to_compare: list[tuple[tuple[Any, ...], TensorDiff]] = []
    for path, name in names.items():
        if path not in new.tensors:
            result.removed.append(_describe(name, old.entry(path)))
            continue
        entry = _describe(name, new.entry(path))
        if path not in old.tensors:
            result.added.append(entry)
            continue
        before, after = old.entry(path), new.entry(path)
        if (before.kind, before.dtype, before.shape) != (after.kind, after.dtype, after.shape):
            entry.old_dtype = before.dtype if before.dtype != after.dtype else None
            entry.old_shape = list(before.shape) if before.shape != after.shape else None
            result.changed.append(entry)
        elif _segments(old.manifest, before) == _segments(new.manifest, after):
            result.unchanged.append(entry)
        else:
            entry.packed = _is_packed(old.manifest, before) or _is_packed(new.manifest, after)
            result.changed.append(entry)
            to_compare.append((path, entry))
    if values:
        settled = _compare_values(store, old, new, to_compare)
        order = {name: i for i, name in enumerate(names.values())}
        result.unchanged = sorted([*result.unchanged, *settled], key=lambda t: order[t.name])
        result.changed = [t for t in result.changed if t not in settled]
    return result


def resolve_step(store: StoreKernel, step: int | str) -> int:
    """The step number a step argument names, as `Store.load` reads one: N (or a str of
    digits) itself, 'latest' the newest committed step, any other str the step of the tag of
    that name. `Store.diff` and every CLI command resolve steps here."""
    resolved = store._resolve(step)
    if isinstance(resolved, int):
        return resolved
    tags = store.tags()
    if resolved not in tags:
        raise TagNotFoundError(resolved, store.url)
    return int(tags[resolved])


def _side(store: StoreKernel, step: int | str) -> _Side:
    number = resolve_step(store, step)
    manifest = store.info(number).manifest
    tensors: dict[tuple[Any, ...], int] = {}

    def visit(path: tuple[Any, ...], ref: TensorRef) -> None:
        if ref.index < len(manifest.tensors):
            tensors[path] = ref.index

    map_tensors(decode_tree(manifest.tree), visit)
    return _Side(number, manifest, tensors)


def _names(paths: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], str]:
    """Path -> name: the path joined with '.' (as `export` names tensors), or, where two paths
    join to the same name (('a.b',) and ('a', 'b')), the path as Python subscripts."""
    dotted = {path: dotted_name(path) for path in paths}
    seen: dict[str, int] = {}
    for name in dotted.values():
        seen[name] = seen.get(name, 0) + 1
    return {path: name if seen[name] == 1 else format_path(path) for path, name in dotted.items()}


def _describe(name: str, entry: TensorEntry) -> TensorDiff:
    dtype = entry.dtype if entry.kind == KIND_TORCH else f"{entry.kind}:{entry.dtype}"
    return TensorDiff(name, dtype, list(entry.shape), entry.nbytes)


def _segments(manifest: Manifest, entry: TensorEntry) -> list[tuple[str, int, int]]:
    return [(manifest.chunks[index].digest, offset, length) for index, offset, length in entry.segments]


def _is_packed(manifest: Manifest, entry: TensorEntry) -> bool:
    """Whether the tensor shares a chunk with others (a segment is not its chunk's whole payload)."""
    return any(offset or length != manifest.chunks[index].raw_size for index, offset, length in entry.segments)


# -- values --------------------------------------------------------------------------------------
def _compare_values(store: StoreKernel, old: _Side, new: _Side,
                    pairs: list[tuple[tuple[Any, ...], TensorDiff]]) -> list[TensorDiff]:
    """Read both sides of each pair and fill in max_abs_diff and rel_l2; returns the entries
    whose bytes turned out equal (packed tensors whose pack changed around them)."""
    equal: list[TensorDiff] = []
    for batch in _batches(pairs, lambda pair: new.entry(pair[0]).nbytes):
        paths = [path for path, _ in batch]
        before, after = _read(store, old, paths), _read(store, new, paths)
        for (path, entry), x, y in zip(batch, before, after, strict=True):
            entry.packed = False  # settled: the bytes were compared
            if x.shape == y.shape and bool((x == y).all()):
                equal.append(entry)
            else:
                entry.max_abs_diff, entry.rel_l2 = _difference(new.entry(path), x, y)
    return equal


def _batches(items: list[Any], size: Any) -> Iterator[list[Any]]:
    batch: list[Any] = []
    total = 0
    for item in items:
        if batch and total + size(item) > VALUES_BATCH_BYTES:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size(item)
    if batch:
        yield batch


def _read(store: StoreKernel, side: _Side, paths: list[tuple[Any, ...]]) -> list[Any]:
    """The raw bytes (flat uint8 numpy arrays) of the tensors at `paths` of one step, through
    `load(select=...)`: only their chunks are read, each once."""
    import numpy as np

    state = store.load(side.step, select=sorted({dotted_name(path) for path in paths}))
    raw = []
    for path in paths:
        value = lookup(state, path)
        if hasattr(value, "untyped_storage"):  # a torch tensor: its bytes, whatever the dtype
            import torch

            raw.append(value.contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            raw.append(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
    return raw


def _difference(entry: TensorEntry, before: Any, after: Any) -> tuple[float | None, float | None]:
    """(max |b - a|, ||b - a|| / ||a||) over the elements, in float64 (complex128 for complex
    dtypes), a block at a time; (None, None) for a dtype without numbers. ||a|| = 0 gives inf
    (0 when b = a); a NaN in either gives NaN."""
    import numpy as np

    x, y = _elements(entry, before), _elements(entry, after)
    if x is None or y is None:
        return None, None
    peak = squares = norm = 0.0
    for start in range(0, math.prod(entry.shape), _BLOCK_ELEMENTS):
        a, b = x(start, start + _BLOCK_ELEMENTS), y(start, start + _BLOCK_ELEMENTS)
        d = np.abs(b - a)
        peak = max(peak, float(d.max())) if not math.isnan(peak) and not np.isnan(d).any() else math.nan
        squares += float(np.sum(d * d))
        norm += float(np.sum(np.abs(a) ** 2))
    if squares == 0:
        return peak, 0.0
    return peak, (math.sqrt(squares) / math.sqrt(norm)) if norm else math.inf


def _elements(entry: TensorEntry, raw: Any) -> Callable[[int, int], Any] | None:
    """`block(start, stop)`: elements [start, stop) as a numpy float64 (complex128 for complex
    dtypes) array; None for a dtype without numbers."""
    import numpy as np

    if entry.kind != KIND_TORCH:
        try:
            array = np.frombuffer(raw, dtype=np.dtype(entry.dtype))
        except (TypeError, ValueError):
            return None
        if array.dtype.kind not in "biufc":
            return None
        wide = np.complex128 if array.dtype.kind == "c" else np.float64
        return lambda start, stop: array[start:stop].astype(wide)
    import torch

    dtype = getattr(torch, entry.dtype, None)
    if not isinstance(dtype, torch.dtype):
        return None
    tensor = torch.frombuffer(raw, dtype=dtype) if len(raw) else torch.empty(0, dtype=dtype)
    target = torch.complex128 if tensor.is_complex() else torch.float64
    try:
        tensor[:1].to(target)
    except (RuntimeError, TypeError):  # float8 and the like may not convert on every build
        return None
    return lambda start, stop: tensor[start:stop].to(target).numpy()
