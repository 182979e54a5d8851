"""Bridge between tensors (torch, numpy) and their raw little-endian bytes.

torch is imported only when a tensor is actually seen (the check on save looks at the type's
module name first), so `import ckptstore` and the CLI's listing commands stay torch-free.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckptstore.chunkblob import BYTES, ElementType
from ckptstore.dtypes import (
    KIND_NUMPY,
    KIND_NUMPY_SCALAR,
    KIND_TORCH,
    TORCH_DTYPE_SIZES,
    UNSUPPORTED_TORCH_DTYPES,
    numpy_dtype_allowed,
)
from ckptstore.errors import FormatError, StateMismatchError, UnsupportedValueError
from ckptstore.manifest import TensorEntry

if sys.byteorder != "little":  # pragma: no cover - no such host in sight
    raise ImportError("ckptstore stores little-endian bytes and does not support big-endian hosts")


@dataclass
class SourceTensor:
    """A tensor seen while saving: how to describe it and a byte view of its data."""

    kind: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview  # flat, C-contiguous bytes; keeps the (maybe copied) storage alive
    keepalive: Any
    element: ElementType = BYTES  # what compression may assume about the bytes


def _as_bytes(flat_uint8_array: Any) -> memoryview:
    """A writable flat byte view of a 1-d uint8 numpy array, sharing its memory."""
    return memoryview(flat_uint8_array)


def _is_torch_tensor(value: Any) -> bool:
    return "torch" in sys.modules and isinstance(value, sys.modules["torch"].Tensor)


def _is_numpy(value: Any) -> bool:
    return "numpy" in sys.modules and isinstance(value, (sys.modules["numpy"].ndarray, sys.modules["numpy"].generic))


def is_tensor(value: Any) -> bool:
    """Whether `value` is saved as a tensor (torch tensor, numpy array or numpy scalar)."""
    return _is_torch_tensor(value) or _is_numpy(value)


def torch_dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def describe(value: Any, path: str) -> SourceTensor:
    """The bytes and description of a tensor value; UnsupportedValueError if it has none."""
    if _is_torch_tensor(value):
        return _describe_torch(value, path)
    return _describe_numpy(value, path)


def _describe_torch(tensor: Any, path: str) -> SourceTensor:
    import torch

    name = torch_dtype_name(tensor.dtype)
    if name in UNSUPPORTED_TORCH_DTYPES or name not in TORCH_DTYPE_SIZES:
        raise UnsupportedValueError(path, f"torch dtype {name} (quantized tensors) is not supported")
    if tensor.layout != torch.strided:
        raise UnsupportedValueError(path, f"tensor layout {tensor.layout} is not supported; convert to dense")
    if tensor.device.type == "meta":
        raise UnsupportedValueError(path, "meta tensors have no data")
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise UnsupportedValueError(path, f"tensor subclass {type(tensor).__name__} is not supported")
    plain = tensor.detach()
    if plain.is_conj():
        plain = plain.resolve_conj()
    if plain.is_neg():
        plain = plain.resolve_neg()
    plain = plain.to("cpu")
    shape = tuple(plain.shape)
    flat = _flat_bytes(plain)
    # Sub-byte and float8 dtypes are bytes to the shuffle (element size 1); ints and bool
    # always compress.
    integer = not (plain.dtype.is_floating_point or plain.dtype.is_complex)
    element = ElementType(plain.element_size(), integer)
    return SourceTensor(KIND_TORCH, name, shape, _as_bytes(flat.numpy()), flat, element)


def _flat_bytes(tensor: Any) -> Any:
    """The tensor's bytes as a flat uint8 tensor (a view when its memory is already dense)."""
    import torch

    if not _dense(tensor):
        same_size = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(tensor.element_size())
        # Reinterpret first: sub-byte "shell" dtypes (uint1..7, int1..7) have no copy kernel.
        tensor = (tensor.view(same_size) if same_size else tensor).clone(memory_format=torch.contiguous_format)
    return tensor.reshape(-1).view(torch.uint8)


def _dense(tensor: Any) -> bool:
    # is_contiguous() is also true for one-element tensors with any stride (expand, [::4]),
    # whose flat view cannot be reinterpreted as bytes: require a unit stride too.
    return bool(tensor.is_contiguous()) and (tensor.numel() == 0 or tensor.reshape(-1).stride(0) == 1)


def _describe_numpy(value: Any, path: str) -> SourceTensor:
    import numpy as np

    kind = KIND_NUMPY_SCALAR if isinstance(value, np.generic) else KIND_NUMPY
    array = np.asarray(value)  # keeps 0-d (ascontiguousarray would make it 1-d)
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if not numpy_dtype_allowed(array.dtype.str):
        raise UnsupportedValueError(path, f"numpy dtype {array.dtype} ({array.dtype.str}) is not supported: "
                                    f"objects, records and unit multiples cannot be stored")
    element = ElementType(array.dtype.itemsize, array.dtype.kind in "biu")
    return SourceTensor(kind, array.dtype.str, tuple(array.shape), _as_bytes(array.reshape(-1).view(np.uint8)), array,
                        element)


@dataclass
class TargetTensor:
    """Where a stored tensor's bytes land on load: `data` (flat bytes), then `finish()`."""

    value: Any  # the object that goes into the loaded tree
    data: memoryview
    copy_back: Callable[[], object] | None = None  # copies a staging buffer into the caller's tensor
    as_scalar: bool = False  # numpy scalars are read into a 0-d array, then unwrapped

    def finish(self) -> Any:
        """The loaded value, once every byte has landed in `data`."""
        if self.copy_back is not None:
            self.copy_back()
        return self.value[()] if self.as_scalar else self.value


def describe_entry(entry: TensorEntry) -> str:
    """A stored tensor in a few words: ``float32[3, 4]``, ``numpy <f8[3]``."""
    kind = "" if entry.kind == KIND_TORCH else f"{entry.kind} "
    return f"{kind}{entry.dtype}{list(entry.shape)}"


def target_mismatch(entry: TensorEntry, target: Any) -> str | None:
    """Why `target` (a tensor of a load's `into`) cannot receive the stored `entry` (kind,
    dtype, shape, a read-only array), or None when it can. Reads no bytes."""
    stored = describe_entry(entry)
    if entry.kind == KIND_TORCH:
        if not _is_torch_tensor(target):
            return f"stored {stored}, target is a {type(target).__name__}, not a torch tensor"
        name = torch_dtype_name(target.dtype)
        if name != entry.dtype or tuple(target.shape) != entry.shape:
            return f"stored {stored}, target {name}{list(target.shape)}"
        return None
    import numpy as np

    if entry.kind == KIND_NUMPY_SCALAR:
        if not isinstance(target, np.generic) or target.dtype.str != entry.dtype:
            return f"stored {stored}, target {_numpy_what(target)}"
        return None
    if not isinstance(target, np.ndarray) or target.dtype.str != entry.dtype or target.shape != entry.shape:
        return f"stored {stored}, target {_numpy_what(target)}"
    if not target.flags.writeable:
        return f"stored {stored}, target is a read-only array"
    return None


def _numpy_what(value: Any) -> str:
    if _is_numpy(value):
        kind = "numpy-scalar" if isinstance(value, sys.modules["numpy"].generic) else "numpy"
        return f"{kind} {value.dtype.str}{list(value.shape)}"
    if _is_torch_tensor(value):
        return f"torch tensor {torch_dtype_name(value.dtype)}{list(value.shape)}"
    return type(value).__name__


def allocate(entry: TensorEntry, path: str, into: Any = None) -> TargetTensor:
    """Memory for `entry`: the `into` tensor itself when it can take the bytes (through a
    staging copy when it is not dense CPU memory), else new memory. Raises StateMismatchError
    for an `into` tensor that cannot receive `entry` (`target_mismatch`). A numpy scalar is
    immutable: the loaded tree holds a new one."""
    if into is not None:
        why = target_mismatch(entry, into)
        if why is not None:
            raise StateMismatchError(f"{path}: {why}", mismatched=[(path, why)])
    if entry.kind == KIND_TORCH:
        return _allocate_torch(entry, path, into)
    return _allocate_numpy(entry, path, into)


def _allocate_torch(entry: TensorEntry, path: str, into: Any) -> TargetTensor:
    import torch

    dtype = getattr(torch, entry.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"{path}: torch dtype {entry.dtype} is not available in this torch build")
    if into is not None:
        if into.device.type == "cpu" and _dense(into) and not into.is_conj() and not into.is_neg():
            # Bytes land straight in the caller's tensor: no second copy of the state.
            return TargetTensor(into, _byte_view(into.detach()))
        staging = torch.empty(entry.shape, dtype=dtype)
        return TargetTensor(into, _byte_view(staging), copy_back=functools.partial(into.detach().copy_, staging))
    tensor = torch.empty(entry.shape, dtype=dtype)
    return TargetTensor(tensor, _byte_view(tensor))


def _byte_view(tensor: Any) -> memoryview:
    import torch

    return _as_bytes(tensor.reshape(-1).view(torch.uint8).numpy())


def _allocate_numpy(entry: TensorEntry, path: str, into: Any) -> TargetTensor:
    import math

    import numpy as np

    if not numpy_dtype_allowed(entry.dtype):
        raise FormatError(f"{path}: numpy dtype {entry.dtype[:40]!r} is not allowed")
    try:
        dtype = np.dtype(entry.dtype)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{path}: numpy dtype {entry.dtype!r} unknown to this numpy") from exc
    if math.prod(entry.shape) * dtype.itemsize != entry.nbytes:
        raise FormatError(f"{path}: segments hold {entry.nbytes} bytes, shape {list(entry.shape)} of {dtype} needs "
                          f"{math.prod(entry.shape) * dtype.itemsize}")
    if isinstance(into, np.ndarray) and into.flags.c_contiguous:
        return TargetTensor(into, _as_bytes(into.reshape(-1).view(np.uint8)))
    array = np.empty(entry.shape, dtype=dtype)
    if isinstance(into, np.ndarray):  # a strided view: land in staging, then copy into it
        return TargetTensor(into, _as_bytes(array.reshape(-1).view(np.uint8)),
                            copy_back=functools.partial(np.copyto, into, array))
    return TargetTensor(array, _as_bytes(array.reshape(-1).view(np.uint8)), as_scalar=entry.kind == KIND_NUMPY_SCALAR)
