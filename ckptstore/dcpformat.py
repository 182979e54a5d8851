"""DCP metadata in a manifest root, compactly (DCP layout 2), without torch.

A DCP step's Metadata lists, for every fqn, the (offsets, sizes) of every rank's shard: at
1024 ranks and 2,170 fqns that is 2.2M entries. Most fqns share their sharding (every layer's
wq has the same shape and so the same shards), so the root stores each distinct shard list
once (`layouts`), each distinct "which part holds shard i" list once (`partmaps`), each
distinct tensor property set once (`props`), and the fqns once, in a table (`fqns`), with one
small entry per fqn pointing into those tables. docs/DCP.md, "Layout 2".

    {"fqns": [name, ...],
     "entries": [[kind, props, size, layout, partmap], ...],   # one per fqn; kind 0 tensor, 1 bytes
     "props": [[dtype, layout, requires_grad, memory_format, pin_memory], ...],
     "layouts": [[ndim, [offsets...], [sizes...]], ...],      # shard i: flat[i*ndim:(i+1)*ndim]
     "partmaps": [[part, ...], ...],                         # shard i of an fqn is in part partmap[i]
     "planner_data": ..., "storage_meta": ..., "version": ...}

ckptstore.dcp turns it into torch's Metadata; `expand_tree` turns a layout-2 root tree into
the layout-1 tree (metadata in full, items by fqn) that `Store.load` of a DCP step returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ckptstore.errors import FormatError
from ckptstore.manifest import MAX_DIMS, TensorEntry
from ckptstore.tree import TensorRef, decode_tree, encode_tree

DCP_TREE_KEY = "dcp"
LAYOUT_1 = 1
LAYOUT_2 = 2
KIND_TENSOR = 0
KIND_BYTES = 1

Shard = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


@dataclass(frozen=True)
class FqnEntry:
    fqn: str
    is_bytes: bool
    props: int        # index into CompactMetadata.props (-1 for bytes)
    size: tuple[int, ...]
    layout: int       # index into CompactMetadata.layouts (-1 for bytes)
    partmap: int      # index into CompactMetadata.partmaps


@dataclass(frozen=True)
class CompactMetadata:
    """A validated layout-2 metadata object."""

    entries: list[FqnEntry]
    props: list[tuple[str, str, bool, str, bool]]
    layouts: list[list[Shard]]
    partmaps: list[list[int]]
    planner_data: Any
    storage_meta: Any
    version: Any

    def shards(self, entry: FqnEntry) -> list[Shard]:
        return [] if entry.is_bytes else self.layouts[entry.layout]

    def plain(self) -> dict[str, Any]:
        """The layout-1 (`metadata_to_plain`) form of this metadata."""
        items: dict[str, Any] = {}
        for e in self.entries:
            if e.is_bytes:
                items[e.fqn] = {"type": "bytes"}
                continue
            dtype, layout, requires_grad, memory_format, pin_memory = self.props[e.props]
            items[e.fqn] = {"type": "tensor", "dtype": dtype, "layout": layout, "requires_grad": requires_grad,
                            "memory_format": memory_format, "pin_memory": pin_memory, "size": list(e.size),
                            "chunks": [[list(o), list(s)] for o, s in self.layouts[e.layout]]}
        return {"state_dict_metadata": items, "planner_data": self.planner_data, "storage_meta": self.storage_meta,
                "version": self.version}


def build_compact(items: Sequence[tuple[str, tuple[Any, ...] | None, Sequence[int], list[Shard], list[int]]],
                  *, planner_data: Any, storage_meta: Any, version: Any) -> dict[str, Any]:
    """The layout-2 object for (fqn, props or None for bytes, size, shards, part of each shard)
    items; equal shard lists, part lists and props are stored once."""
    tables: dict[str, dict[Any, int]] = {"props": {}, "layouts": {}, "partmaps": {}}

    def intern(table: str, key: Any) -> int:
        return tables[table].setdefault(key, len(tables[table]))

    entries: list[list[Any]] = []
    for _fqn, props, size, shards, parts in items:
        partmap = intern("partmaps", tuple(parts))
        if props is None:
            entries.append([KIND_BYTES, -1, None, -1, partmap])
        else:
            entries.append([KIND_TENSOR, intern("props", tuple(props)), list(size),
                            intern("layouts", (len(size), tuple(shards))), partmap])
    layouts = [[ndim, [d for o, _ in shards for d in o], [d for _, s in shards for d in s]]
               for ndim, shards in tables["layouts"]]
    return {"fqns": [item[0] for item in items], "entries": entries,
            "props": [list(p) for p in tables["props"]], "layouts": layouts,
            "partmaps": [list(p) for p in tables["partmaps"]],
            "planner_data": planner_data, "storage_meta": storage_meta, "version": version}


def _ints(value: Any, what: str, limit: int) -> list[int]:
    if not isinstance(value, list) or len(value) > limit or not all(
            type(v) is int and v >= 0 for v in value):
        raise FormatError(f"{what}: not a list of at most {limit} non-negative ints")
    return value


def parse_compact(obj: Any, parts: int) -> CompactMetadata:
    """Validate a layout-2 object whose root has `parts` parts; FormatError for anything malformed."""
    what = "DCP metadata (layout 2)"
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: not a map")
    fqns, raw_entries = obj.get("fqns"), obj.get("entries")
    raw_props, raw_layouts, raw_partmaps = obj.get("props"), obj.get("layouts"), obj.get("partmaps")
    if not all(isinstance(v, list) for v in (fqns, raw_entries, raw_props, raw_layouts, raw_partmaps)):
        raise FormatError(f"{what}: a table is missing")
    assert isinstance(fqns, list) and isinstance(raw_entries, list)
    assert isinstance(raw_props, list) and isinstance(raw_layouts, list) and isinstance(raw_partmaps, list)
    if len(fqns) != len(raw_entries) or not all(isinstance(f, str) for f in fqns) or len(set(fqns)) != len(fqns):
        raise FormatError(f"{what}: fqns are not distinct strings, one per entry")
    props = []
    for p in raw_props:
        if (not isinstance(p, list) or len(p) != 5 or not isinstance(p[0], str) or not isinstance(p[1], str)
                or not isinstance(p[2], bool) or not isinstance(p[3], str) or not isinstance(p[4], bool)):
            raise FormatError(f"{what}: malformed tensor properties")
        props.append((p[0], p[1], p[2], p[3], p[4]))
    layouts: list[list[Shard]] = []
    for raw in raw_layouts:
        if not isinstance(raw, list) or len(raw) != 3 or type(raw[0]) is not int or not 0 <= raw[0] <= MAX_DIMS:
            raise FormatError(f"{what}: malformed layout")
        ndim = raw[0]
        flat_offsets, flat_sizes = _ints(raw[1], what, 1 << 28), _ints(raw[2], what, 1 << 28)
        if len(flat_offsets) != len(flat_sizes) or (ndim and len(flat_offsets) % ndim) or (not ndim and flat_offsets):
            raise FormatError(f"{what}: a layout's offsets and sizes do not pair up")
        count = len(flat_offsets) // ndim if ndim else 1
        layouts.append([(tuple(flat_offsets[i * ndim:(i + 1) * ndim]), tuple(flat_sizes[i * ndim:(i + 1) * ndim]))
                        for i in range(count)])
    partmaps = [_ints(p, what, 1 << 28) for p in raw_partmaps]
    if any(part >= parts for p in partmaps for part in p):
        raise FormatError(f"{what}: a part map names a part the root does not have")
    entries = []
    fitted: set[tuple[int, tuple[int, ...]]] = set()
    for fqn, e in zip(fqns, raw_entries, strict=True):
        if not isinstance(e, list) or len(e) != 5 or e[0] not in (KIND_TENSOR, KIND_BYTES):
            raise FormatError(f"{what}: malformed entry of {fqn!r}"[:200])
        kind, prop, size, layout, partmap = e
        if type(partmap) is not int or not 0 <= partmap < len(partmaps):
            raise FormatError(f"{what}: entry of {fqn!r} names a part map that does not exist"[:200])
        if kind == KIND_BYTES:
            if len(partmaps[partmap]) != 1:
                raise FormatError(f"{what}: bytes item {fqn!r} is not in exactly one part"[:200])
            entries.append(FqnEntry(fqn, True, -1, (), -1, partmap))
            continue
        if type(prop) is not int or not 0 <= prop < len(props) or type(layout) is not int \
                or not 0 <= layout < len(layouts):
            raise FormatError(f"{what}: entry of {fqn!r} names a table row that does not exist"[:200])
        dims: tuple[int, ...] = tuple(_ints(size, what, MAX_DIMS))
        shards = layouts[layout]
        if len(shards) != len(partmaps[partmap]):
            raise FormatError(f"{what}: {fqn!r} has {len(shards)} shards but {len(partmaps[partmap])} parts"[:200])
        if (layout, dims) not in fitted:  # fqns share layouts and sizes: check each pair once
            for offsets, sizes in shards:
                if len(offsets) != len(dims) or any(o + s > d for o, s, d in zip(offsets, sizes, dims, strict=True)):
                    raise FormatError(f"{what}: a shard of {fqn!r} lies outside its size {list(dims)}"[:200])
            fitted.add((layout, dims))
        entries.append(FqnEntry(fqn, False, prop, dims, layout, partmap))
    return CompactMetadata(entries, props, layouts, partmaps, obj.get("planner_data"), obj.get("storage_meta"),
                           obj.get("version"))


def dcp_node(tree: Any) -> dict[str, Any] | None:
    """The tree's DCP node, or None when the step was not saved through DCP."""
    node = tree.get(DCP_TREE_KEY) if isinstance(tree, dict) else None
    return node if isinstance(node, dict) and "metadata" in node else None


def expand_tree(tree_bytes: bytes, tensors: list[TensorEntry], parts: int) -> tuple[bytes, list[TensorEntry]]:
    """A v2 root's tree (of `parts` parts), with its parts' tensors in order, as a v1 manifest's: a layout-2 DCP
    node becomes layout 1 (full metadata, items by fqn; placements gain `global_shape`).
    Any other tree is returned as it is."""
    tree = decode_tree(tree_bytes)
    node = dcp_node(tree)
    if node is None or node.get("format") != LAYOUT_2:
        return tree_bytes, tensors
    compact = parse_compact(node["metadata"], parts)
    sizes = {e.fqn: list(e.size) for e in compact.entries if not e.is_bytes}
    items: dict[str, list[TensorRef]] = {}
    out = []
    for i, t in enumerate(tensors):
        placement = dict(t.placement or {})
        fqn = placement.get("fqn")
        if not isinstance(fqn, str):
            raise FormatError(f"DCP step: tensor {i} of its parts has no fqn")
        if not placement.get("bytes"):
            if fqn not in sizes:
                raise FormatError(f"DCP step: tensor {i} names fqn {fqn[:80]!r}, which its metadata lacks")
            placement["global_shape"] = sizes[fqn]
        items.setdefault(fqn, []).append(TensorRef(i))
        out.append(TensorEntry(t.kind, t.dtype, t.shape, t.segments, placement))
    v1 = {DCP_TREE_KEY: {"format": LAYOUT_1, "metadata": compact.plain(), "items": items}}
    return encode_tree(v1, lambda _path, value: value.index if isinstance(value, TensorRef) else None), out
