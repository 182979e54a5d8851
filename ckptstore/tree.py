"""State trees <-> msgpack, with tensors replaced by numbered references.

Node encoding (msgpack):
- dict: map, keys str or int (optimizer state dicts use int keys); dict subclasses such as
  OrderedDict come back as plain dicts, in the same key order;
- list: array;  tuple: ext 1 holding a packed array (tuples come back as tuples;
  namedtuples and torch.Size as plain tuples);
- int (64-bit), float, bool, None, str, bytes: native (bytearray comes back as bytes);
- tensor or numpy array: ext 2 holding the tensor's index (u32 big-endian) in the manifest;
- torch.dtype, torch.device, pathlib paths, datetime / date / timedelta: ext 3-8
  (ckptstore/treevalues.py).
Anything else is an UnsupportedValueError at save time naming its path (and, for an Enum, a
dataclass or an argparse.Namespace, how to convert it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from ckptstore import treevalues
from ckptstore.errors import FormatError, UnsupportedFormatError, UnsupportedValueError

EXT_TUPLE = 1
EXT_TENSOR = 2
MAX_DEPTH = 256
# Each tuple level is decoded by a nested msgpack.unpackb call, which recurses on the C
# stack: ~195 levels crash the interpreter. Far fewer are ever needed.
MAX_TUPLE_DEPTH = 32
# Containers plus their items in one decoded tree. A byte of msgpack can become a 56-232 byte
# Python object, so a hostile tree is stopped by count while it is decoded (about 6 per
# tensor at the manifest's 10M-tensor limit).
MAX_TREE_ITEMS = 1 << 26
_INDEX = struct.Struct(">I")


@dataclass(frozen=True)
class TensorRef:
    """Placeholder for the manifest's tensor number `index` in a decoded tree."""

    index: int


def format_path(path: tuple[Any, ...]) -> str:
    """A tree path as Python subscripts, e.g. state['optim'][0]['exp_avg']."""
    return "state" + "".join(f"[{p!r}]" for p in path)


def encode_tree(state: Any, on_tensor: Callable[[tuple[Any, ...], Any], int | None]) -> bytes:
    """Pack `state`; `on_tensor(path, value)` returns the tensor index, or None if not a tensor."""

    def encode(value: Any, path: tuple[Any, ...], tuples: int = 0) -> Any:
        if len(path) > MAX_DEPTH:
            raise UnsupportedValueError(format_path(path), f"nesting deeper than {MAX_DEPTH} (a cycle?)")
        if isinstance(value, str):
            _check_utf8(value, path)
            return value
        if value is None or isinstance(value, (bool, float, bytes)):
            return value
        if isinstance(value, int):
            if not -(2**63) <= value < 2**64:
                raise UnsupportedValueError(format_path(path), f"int {value} does not fit in 64 bits")
            return int(value)
        if isinstance(value, bytearray):
            return bytes(value)
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise UnsupportedValueError(
                        format_path(path), f"dict key {key!r} of type {type(key).__name__}; keys must be str or int"
                    )
                if isinstance(key, int) and not -(2**63) <= key < 2**64:
                    raise UnsupportedValueError(format_path(path), f"int dict key {key} does not fit in 64 bits")
                if isinstance(key, str):
                    _check_utf8(key, path)
                out[key] = encode(item, (*path, key), tuples)
            return out
        if isinstance(value, list):
            return [encode(item, (*path, i), tuples) for i, item in enumerate(value)]
        index = on_tensor(path, value)
        if index is not None:
            return msgpack.ExtType(EXT_TENSOR, _INDEX.pack(index))
        if isinstance(value, tuple):
            if tuples >= MAX_TUPLE_DEPTH:
                raise UnsupportedValueError(format_path(path), f"tuples nested deeper than {MAX_TUPLE_DEPTH}")
            items = [encode(item, (*path, i), tuples + 1) for i, item in enumerate(value)]
            return msgpack.ExtType(EXT_TUPLE, msgpack.packb(items, use_bin_type=True))
        where = format_path(path)
        ext = treevalues.encode_value(value, where)
        if ext is not None:
            return ext
        reason = f"type {type(value).__module__}.{type(value).__qualname__} is not supported"
        how = treevalues.advice(value)
        raise UnsupportedValueError(where, f"{reason}; {how}" if how else reason)

    try:
        return msgpack.packb(encode(state, ()), use_bin_type=True)
    except RecursionError:
        raise UnsupportedValueError("state", "nesting too deep") from None


def _check_utf8(text: str, path: tuple[Any, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedValueError(format_path(path), f"string {text!r} is not valid UTF-8 (lone surrogate); "
                                    f"store it as bytes (os.fsencode)") from None


class _Budget:
    """Counts decoded containers and items (msgpack hooks run as each container completes)."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def spend(self, container: Any) -> Any:
        self.left -= 1 + len(container)
        if self.left < 0:
            raise FormatError(f"state tree holds more than {MAX_TREE_ITEMS} values")
        return container


def _unpack(data: bytes, budget: _Budget, tuple_depth: int = 0) -> Any:
    def ext_hook(code: int, payload: bytes) -> Any:
        if code == EXT_TENSOR:
            if len(payload) != _INDEX.size:
                raise FormatError("tensor reference of wrong size")
            return TensorRef(_INDEX.unpack(payload)[0])
        if code == EXT_TUPLE:
            if tuple_depth >= MAX_TUPLE_DEPTH:
                raise FormatError(f"state tree nests tuples deeper than {MAX_TUPLE_DEPTH}")
            items = _unpack(payload, budget, tuple_depth + 1)
            if not isinstance(items, list):
                raise FormatError("tuple node does not hold an array")
            return tuple(items)
        decode = treevalues.DECODERS.get(code)
        if decode is not None:
            return decode(payload)
        # Well formed but not known here: a value type added by a newer ckptstore.
        raise UnsupportedFormatError(f"unknown ext type {code} in state tree (written by a newer ckptstore?)")

    size = max(len(data), 1)
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=False, ext_hook=ext_hook, use_list=True, max_buffer_size=size,
        max_str_len=size, max_bin_len=size, max_ext_len=size, max_array_len=size, max_map_len=size,
        list_hook=budget.spend, object_hook=budget.spend,
    )
    unpacker.feed(data)
    try:
        value = unpacker.unpack()
    except msgpack.OutOfData:
        raise FormatError("corrupt state tree: truncated") from None
    if unpacker.tell() != len(data):
        raise FormatError("corrupt state tree: extra bytes after the tree")
    return value


def decode_tree(data: bytes) -> Any:
    """Unpack a tree; tensors come back as TensorRef placeholders. Raises FormatError."""
    try:
        tree = _unpack(data, _Budget(MAX_TREE_ITEMS))
    except FormatError:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise FormatError(f"corrupt state tree: {exc}") from exc
    _check_nodes(tree, 0)
    return tree


_LEAVES = (type(None), bool, int, float, str, bytes, TensorRef)


def _check_nodes(node: Any, depth: int) -> None:
    """Reject what a writer never produces (float or bytes keys, msgpack timestamps, ...)."""
    if depth > MAX_DEPTH:
        raise FormatError(f"state tree nested deeper than {MAX_DEPTH}")
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise FormatError(f"state tree has a {type(key).__name__} dict key")
            _check_nodes(value, depth + 1)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _check_nodes(value, depth + 1)
    elif not isinstance(node, _LEAVES) and not treevalues.is_value(node):
        raise FormatError(f"state tree holds a {type(node).__name__}")


def map_tensors(tree: Any, fn: Callable[[tuple[Any, ...], TensorRef], Any]) -> Any:
    """A copy of `tree` with each TensorRef replaced by `fn(path, ref)`."""

    def walk(node: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(node, TensorRef):
            return fn(path, node)
        if isinstance(node, dict):
            return {k: walk(v, (*path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, (*path, i)) for i, v in enumerate(node)]
        if isinstance(node, tuple):
            return tuple(walk(v, (*path, i)) for i, v in enumerate(node))
        return node

    return walk(tree, ())


def lookup(tree: Any, path: tuple[Any, ...]) -> Any:
    """The node at `path` in `tree`, or None when the path does not exist there."""
    node = tree
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node
