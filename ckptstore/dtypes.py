"""Tensor dtype names as stored in manifests, and their element sizes, without importing torch.

Torch dtypes are stored by their attribute name in the `torch` module ("bfloat16",
"float8_e4m3fn", "uint16"); numpy arrays by numpy's dtype string ("<f4", "|b1"). The
format is little-endian: big-endian hosts are not supported.
"""

from __future__ import annotations

import re

# name -> bytes per element, for every torch dtype with a plain byte representation.
# Sub-byte "shell" dtypes (uint1..7, int1..7, bits*, float4_e2m1fn_x2) occupy one byte
# per element in torch and are stored as such.
TORCH_DTYPE_SIZES: dict[str, int] = {
    "bool": 1,
    "uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4,
    "uint64": 8, "int64": 8,
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex32": 4, "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
    **{f"uint{n}": 1 for n in range(1, 8)},
    **{f"int{n}": 1 for n in range(1, 8)},
}

# Quantized dtypes carry scales and zero points outside their bytes; not representable.
UNSUPPORTED_TORCH_DTYPES = {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"}

KIND_TORCH = "torch"
KIND_NUMPY = "numpy"
KIND_NUMPY_SCALAR = "numpy-scalar"
KINDS = (KIND_TORCH, KIND_NUMPY, KIND_NUMPY_SCALAR)


# numpy dtype strings a writer produces: little-endian or byte-order-free numbers, bools,
# complex, datetimes/timedeltas with a plain unit, fixed-size bytes and unicode. Anything
# else is refused before numpy parses it: np.dtype() itself crashes on some strings.
_NUMPY_DTYPE = re.compile(
    r"[<|](?:b1|[iu][1248]|f(?:2|4|8|16)|c(?:8|16|32)|[mM]8(?:\[(?:Y|M|W|D|h|m|s|ms|us|ns|ps|fs|as)\])?"
    r"|S[0-9]{1,9}|U[0-9]{1,9})"
)


def numpy_dtype_allowed(dtype: str) -> bool:
    """Whether `dtype` (numpy's dtype.str) is one the format stores."""
    return isinstance(dtype, str) and _NUMPY_DTYPE.fullmatch(dtype) is not None


def numpy_itemsize(dtype: str) -> int | None:
    """Bytes per element of an allowed numpy dtype string (as numpy computes it), else None."""
    if not numpy_dtype_allowed(dtype):
        return None
    code, rest = dtype[1], dtype[2:]
    if code in "mM":
        return 8
    if code == "U":
        return 4 * int(rest)  # UCS-4
    return int(rest)  # b1, i/u/f/c<bytes>, S<bytes>


def element_size(kind: str, dtype: str) -> int | None:
    """Bytes per element, or None when only numpy can tell (checked at load time)."""
    if kind == KIND_TORCH:
        return TORCH_DTYPE_SIZES.get(dtype)
    return None
