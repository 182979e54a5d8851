"""Config values in state trees: torch dtypes and devices, pathlib paths, datetime values.

Each is a msgpack ext type of the state tree (docs/FORMAT.md, "State tree") whose payload is
a UTF-8 name (dtype) or a packed msgpack array of scalars, and each comes back as the same
type and value, never through pickle. Decoders validate every field (FormatError) and build
nothing but the one value. Values that cannot be stored but have an obvious plain form (an
Enum member, a dataclass, an argparse.Namespace, a datetime with a zoneinfo zone) get an
UnsupportedValueError that says how to convert them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import enum
import functools
import pathlib
import re
import sys
from collections.abc import Callable
from typing import Any

import msgpack

from ckptstore.errors import FormatError, UnsupportedFormatError, UnsupportedValueError

EXT_DTYPE = 3
EXT_DEVICE = 4
EXT_PATH = 5
EXT_DATETIME = 6
EXT_DATE = 7
EXT_TIMEDELTA = 8

_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_PATHS: dict[str, type[pathlib.PurePath]] = {
    "PurePosixPath": pathlib.PurePosixPath, "PureWindowsPath": pathlib.PureWindowsPath,
    "PosixPath": pathlib.PosixPath, "WindowsPath": pathlib.WindowsPath,
}
# A concrete path of the other platform's flavour cannot be built here: its pure flavour is.
_PURE = {"PosixPath": pathlib.PurePosixPath, "WindowsPath": pathlib.PureWindowsPath}
_CONVERT_TZ = ("convert it to a fixed offset, x.astimezone(datetime.timezone(x.utcoffset())), "
               "or to UTC, x.astimezone(datetime.timezone.utc)")


# -- encoding ------------------------------------------------------------------------------
def encode_value(value: Any, where: str) -> msgpack.ExtType | None:
    """The ext node of a config value, or None when `value` is none of these types. Exact
    types only: a subclass (pandas.Timestamp is a datetime) would not come back as itself."""
    kind = type(value)
    if kind is dt.datetime:
        return _ext(EXT_DATETIME, [value.year, value.month, value.day, value.hour, value.minute, value.second,
                                   value.microsecond, value.fold, *_zone(value, where)], where)
    if kind is dt.date:
        return _ext(EXT_DATE, [value.year, value.month, value.day], where)
    if kind is dt.timedelta:
        return _ext(EXT_TIMEDELTA, [value.days, value.seconds, value.microseconds], where)
    if kind in _PATHS.values():
        return _ext(EXT_PATH, [kind.__name__, str(value)], where)
    torch = sys.modules.get("torch")  # no torch imported: no dtype or device to store
    if torch is not None and kind is torch.dtype:
        return msgpack.ExtType(EXT_DTYPE, _dtype_name(value).encode("ascii"))
    if torch is not None and kind is torch.device:
        return _ext(EXT_DEVICE, [value.type, value.index], where)
    return None


def _ext(code: int, fields: list[Any], where: str) -> msgpack.ExtType:
    try:
        return msgpack.ExtType(code, msgpack.packb(fields, use_bin_type=True))
    except UnicodeEncodeError:
        raise UnsupportedValueError(where, f"{_shown(fields)} holds text that is not valid UTF-8 (a lone "
                                           f"surrogate); convert it to a str that is") from None


def _zone(value: dt.datetime, where: str) -> list[Any]:
    """[offset in microseconds, name or None] of a fixed-offset zone; [None, None] when naive."""
    zone = value.tzinfo
    if zone is None:
        return [None, None]
    if type(zone) is not dt.timezone:
        raise UnsupportedValueError(where, f"datetime with tzinfo {zone!r} ({type(zone).__module__}."
                                           f"{type(zone).__qualname__}); only UTC and fixed offsets "
                                           f"(datetime.timezone) are stored: {_CONVERT_TZ}")
    # (offset,) or (offset, name): exactly how it was built (its pickle support; not in typeshed)
    offset, *name = zone.__getinitargs__()  # type: ignore[attr-defined]
    return [offset // dt.timedelta(microseconds=1), name[0] if name else None]


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def advice(value: Any) -> str | None:
    """How to turn a value that cannot be stored into one that can, when there is a plain way."""
    if isinstance(value, enum.Enum):
        return f"store its .value ({value.value!r}) or .name ({value.name!r}) and rebuild the member on load"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "store dataclasses.asdict(x) (a dict) and rebuild the dataclass on load"
    if isinstance(value, argparse.Namespace):
        return "store vars(args) (a dict) and rebuild the Namespace on load"
    return None


# -- decoding ------------------------------------------------------------------------------
def _fields(payload: bytes, what: str, count: int) -> list[Any]:
    """The payload's flat array of `count` scalars; nested containers and ext types are refused
    as soon as the first one is complete, so a hostile payload builds almost nothing."""
    arrays = 0

    def one_array(items: list[Any]) -> list[Any]:
        nonlocal arrays
        arrays += 1
        if arrays > 1:
            raise FormatError(f"{what} node holds a nested array")
        return items

    def no_map(_: Any) -> Any:
        raise FormatError(f"{what} node holds a map")

    def no_ext(code: int, _: bytes) -> Any:
        raise FormatError(f"{what} node holds ext type {code}")

    try:
        items = msgpack.unpackb(payload, raw=False, use_list=True, list_hook=one_array, object_hook=no_map,
                                ext_hook=no_ext, max_array_len=count, max_map_len=0, max_bin_len=0,
                                max_str_len=len(payload), max_ext_len=0)
    except FormatError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise FormatError(f"corrupt {what} node ({type(exc).__name__}: {str(exc)[:200]})") from None
    if type(items) is not list or len(items) != count:
        raise FormatError(f"{what} node is not an array of {count}")
    return items


def _shown(fields: list[Any]) -> str:
    """Decoded fields for a message: hostile ones can hold a long string."""
    text = repr(fields)
    return text if len(text) <= 200 else text[:200] + "...]"


def _ints(items: list[Any], what: str) -> list[int]:
    if any(type(i) is not int for i in items):  # bool is an int subclass: refused too
        raise FormatError(f"{what} node holds a non-int field: {_shown(items)}")
    return items


def _exact(build: Callable[[], Any], fields: list[Any], canonical: Callable[[Any], list[Any]], what: str) -> Any:
    """`build()`, refusing out-of-range fields and fields a writer would not have written."""
    try:
        value = build()
    except (ValueError, OverflowError, TypeError) as exc:
        raise FormatError(f"{what} node {_shown(fields)} is out of range: {exc}") from None
    if canonical(value) != fields:
        raise FormatError(f"{what} node {_shown(fields)} is not in normal form")
    return value


def _decode_dtype(payload: bytes) -> Any:
    try:
        name = payload.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("torch dtype node is not an ASCII name") from None
    if not _NAME.fullmatch(name):
        raise FormatError(f"torch dtype node {name[:80]!r} is not a dtype name")
    dtype = _torch_dtypes().get(name)
    if dtype is None:  # well formed: a dtype of another torch version
        raise UnsupportedFormatError(f"torch dtype {name!r} is unknown to this torch")
    return dtype


@functools.cache
def _torch_dtypes() -> dict[str, Any]:
    import torch

    return {_dtype_name(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _decode_device(payload: bytes) -> Any:
    import torch

    kind, index = _fields(payload, "torch device", 2)
    if type(kind) is not str or not _NAME.fullmatch(kind) or not (index is None or type(index) is int):
        raise FormatError(f"torch device node {_shown([kind, index])} is not [type, index or nil]")
    try:
        device = torch.device(kind) if index is None else torch.device(kind, index)
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise FormatError(f"torch device node {_shown([kind, index])}: {exc}") from None
    if [device.type, device.index] != [kind, index]:
        raise FormatError(f"torch device node {_shown([kind, index])} is not in normal form")
    return device


def _decode_path(payload: bytes) -> pathlib.PurePath:
    kind, text = _fields(payload, "path", 2)
    if type(kind) is not str or kind not in _PATHS or type(text) is not str:
        raise FormatError(f"path node {_shown([kind, text])} is not [flavour, str]")
    try:
        path = _PATHS[kind](text)
    except NotImplementedError:  # e.g. a WindowsPath read on Linux: its pure flavour
        path = _PURE[kind](text)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"path node {_shown([kind, text])}: {exc}") from None
    if str(path) != text:
        raise FormatError(f"path node {_shown([kind, text])} is not in normal form")
    return path


def _decode_datetime(payload: bytes) -> dt.datetime:
    fields = _fields(payload, "datetime", 10)
    *parts, offset, name = fields
    _ints(parts, "datetime")
    if not (offset is None or type(offset) is int) or not (name is None or type(name) is str) \
            or (offset is None and name is not None):
        raise FormatError(f"datetime node {_shown(fields)} has a malformed zone")

    def build() -> dt.datetime:
        zone = None
        if offset is not None:
            delta = dt.timedelta(microseconds=offset)
            zone = dt.timezone(delta) if name is None else dt.timezone(delta, name)
        year, month, day, hour, minute, second, microsecond, fold = parts
        return dt.datetime(year, month, day, hour, minute, second, microsecond, zone, fold=fold)

    def canonical(v: dt.datetime) -> list[Any]:
        zone = [None, None] if v.tzinfo is None else _zone(v, "")
        return [v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, v.fold, *zone]

    return _exact(build, fields, canonical, "datetime")


def _decode_date(payload: bytes) -> dt.date:
    fields = _ints(_fields(payload, "date", 3), "date")
    return _exact(lambda: dt.date(*fields), fields, lambda v: [v.year, v.month, v.day], "date")


def _decode_timedelta(payload: bytes) -> dt.timedelta:
    days, seconds, micros = fields = _ints(_fields(payload, "timedelta", 3), "timedelta")
    return _exact(lambda: dt.timedelta(days=days, seconds=seconds, microseconds=micros), fields,
                  lambda v: [v.days, v.seconds, v.microseconds], "timedelta")


DECODERS: dict[int, Callable[[bytes], Any]] = {
    EXT_DTYPE: _decode_dtype, EXT_DEVICE: _decode_device, EXT_PATH: _decode_path,
    EXT_DATETIME: _decode_datetime, EXT_DATE: _decode_date, EXT_TIMEDELTA: _decode_timedelta,
}


def is_value(node: Any) -> bool:
    """Whether a decoded node is one of these config values (what DECODERS build)."""
    kind = type(node)
    if kind in (dt.datetime, dt.date, dt.timedelta) or isinstance(node, pathlib.PurePath):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and kind in (torch.dtype, torch.device)
