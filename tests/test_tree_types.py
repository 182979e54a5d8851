"""Config values in state trees (issue 14): torch dtypes and devices, pathlib paths and
datetime values round-trip exactly without pickle; Enum members, dataclasses and
argparse.Namespace are refused with advice; hostile ext payloads are a FormatError."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import enum
import pathlib
import re
import zoneinfo
from typing import Any, NamedTuple

import msgpack
import pytest
import torch

import ckptstore
from ckptstore.errors import FormatError, UnsupportedFormatError, UnsupportedValueError
from ckptstore.tree import decode_tree, encode_tree

UTC = dt.timezone.utc
IST = dt.timezone(dt.timedelta(hours=5, minutes=30), "IST")

VALUES: dict[str, Any] = {
    "dtype bfloat16": torch.bfloat16,
    "dtype float8": torch.float8_e4m3fn,
    "dtype alias float": torch.float,  # is torch.float32
    "dtype quantized": torch.qint8,  # a dtype is a name: storable even where its tensors are not
    "device cpu": torch.device("cpu"),
    "device cuda:1": torch.device("cuda", 1),
    "device meta": torch.device("meta"),
    "PurePosixPath": pathlib.PurePosixPath("/data/run 1/ckpt"),
    "PureWindowsPath": pathlib.PureWindowsPath(r"C:\ckpt\run1"),
    "Path": pathlib.Path("relative/ckpts"),  # a PosixPath here
    "Path root": pathlib.Path("/"),
    "naive datetime": dt.datetime(2024, 5, 17, 13, 45, 30, 123456),
    "UTC datetime": dt.datetime(2024, 5, 17, 13, 45, tzinfo=UTC),
    "fixed offset": dt.datetime(2024, 5, 17, 13, 45, tzinfo=dt.timezone(dt.timedelta(hours=-7))),
    "named offset": dt.datetime(2024, 5, 17, 13, 45, tzinfo=IST),
    "sub-minute offset": dt.datetime(2024, 5, 17, tzinfo=dt.timezone(dt.timedelta(seconds=-37, microseconds=1))),
    "fold": dt.datetime(2021, 11, 7, 1, 30, fold=1),
    "datetime min": dt.datetime.min,
    "datetime max": dt.datetime.max,
    "date": dt.date(2024, 2, 29),
    "date min": dt.date.min,
    "timedelta": dt.timedelta(days=-1, seconds=3600, microseconds=5),
    "timedelta max": dt.timedelta.max,
    "timedelta min": dt.timedelta.min,
}


def _no_tensors(_path: tuple[Any, ...], _value: Any) -> None:
    return None


def _assert_exact(got: Any, want: Any) -> None:
    assert type(got) is type(want) and got == want, (got, want)
    if isinstance(want, dt.datetime):  # == ignores fold and the zone's name
        assert got.fold == want.fold and repr(got.tzinfo) == repr(want.tzinfo)


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
def test_config_values_round_trip_exactly(value: Any) -> None:
    _assert_exact(decode_tree(encode_tree(value, _no_tensors)), value)
    nested = decode_tree(encode_tree({"cfg": [value, (value,)]}, _no_tensors))
    _assert_exact(nested["cfg"][0], value)
    _assert_exact(nested["cfg"][1][0], value)


def test_utc_comes_back_as_the_utc_singleton() -> None:
    assert decode_tree(encode_tree(VALUES["UTC datetime"], _no_tensors)).tzinfo is UTC


def test_config_values_round_trip_through_a_store(store_url: str) -> None:
    state = {"w": torch.ones(3), "config": dict(VALUES)}
    with ckptstore.open(store_url) as store:
        store.save(1, state)
        loaded = store.load(1)
    assert list(loaded["config"]) == list(VALUES)
    for name, value in VALUES.items():
        _assert_exact(loaded["config"][name], value)


def test_a_concrete_path_of_the_other_platform_comes_back_as_its_pure_flavour() -> None:
    # Written on Windows: a WindowsPath, which cannot be built on this (POSIX) platform.
    node = msgpack.ExtType(5, msgpack.packb(["WindowsPath", "C:\\ckpt\\run1"]))
    got = decode_tree(msgpack.packb(node))
    _assert_exact(got, pathlib.PureWindowsPath("C:\\ckpt\\run1"))


# -- refused values, with advice ------------------------------------------------------------
class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Optim:
    lr: float = 0.1


class Point(NamedTuple):
    x: int
    y: int


class Timestamp(dt.datetime):  # as pandas.Timestamp: a datetime subclass with more state
    pass


class ProjectPath(pathlib.PurePosixPath):
    pass


REFUSED: dict[str, tuple[Any, str]] = {
    "Enum": (Color.RED, r"store its \.value \('red'\) or \.name \('RED'\)"),
    "dataclass": (Optim(), r"store dataclasses\.asdict\(x\)"),
    "Namespace": (argparse.Namespace(lr=0.1), r"store vars\(args\)"),
    "zoneinfo": (dt.datetime(2024, 5, 17, tzinfo=zoneinfo.ZoneInfo("UTC")),
                 r"tzinfo zoneinfo\.ZoneInfo\(key='UTC'\).*only UTC and fixed offsets.*"
                 r"x\.astimezone\(datetime\.timezone\(x\.utcoffset\(\)\)\).*x\.astimezone\(datetime\.timezone\.utc\)"),
    "datetime subclass": (Timestamp(2024, 5, 17), r"type test_tree_types\.Timestamp is not supported"),
    "path subclass": (ProjectPath("a"), r"type test_tree_types\.ProjectPath is not supported"),
    "path with a lone surrogate": (pathlib.PurePosixPath("run\udcff"), r"not valid UTF-8"),
    "dataclass class": (Optim, r"type builtins\.type is not supported$"),
}


@pytest.mark.parametrize(("value", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_values_that_cannot_be_stored_are_refused_naming_the_path_and_the_conversion(value: Any, message: str) -> None:
    with pytest.raises(UnsupportedValueError, match=r"cannot save value at state\['cfg'\]\[1\]: .*" + message) as err:
        encode_tree({"cfg": [1, value]}, _no_tensors)
    assert err.value.path == "state['cfg'][1]"


def test_save_refuses_an_enum_before_writing(tmp_path: Any) -> None:
    with ckptstore.open(tmp_path / "s") as store, pytest.raises(UnsupportedValueError, match=r"\.value"):
        store.save(1, {"w": torch.ones(2), "mode": Color.RED})
    assert not (tmp_path / "s" / "refs").exists()


def test_int_and_str_enums_and_named_tuples_come_back_as_their_plain_values() -> None:
    # Documented (docs/FORMAT.md): subclasses of int/str/tuple are stored as their base type.
    got = decode_tree(encode_tree([Level.HIGH, Point(1, 2)], _no_tensors))
    assert got == [3, (1, 2)]
    assert type(got[0]) is int and type(got[1]) is tuple


# -- hostile bytes ---------------------------------------------------------------------------
def _ext(code: int, fields: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, fields if isinstance(fields, bytes) else msgpack.packb(fields, use_bin_type=True))


HOSTILE: dict[str, tuple[msgpack.ExtType, str]] = {
    "dtype not ASCII": (_ext(3, b"\xff\xfe"), "not an ASCII name"),
    "dtype empty": (_ext(3, b""), "not a dtype name"),
    "dtype too long": (_ext(3, b"f" * 65), "not a dtype name"),
    "dtype with a dot": (_ext(3, b"float.32"), "not a dtype name"),
    "device unknown type": (_ext(4, ["warp", None]), "torch device node"),
    "device negative index": (_ext(4, ["cuda", -1]), "torch device node"),
    "device index overflow": (_ext(4, ["cuda", 2**64 - 1]), "torch device node"),
    "device index in type": (_ext(4, ["cuda:1", None]), r"is not \[type, index or nil\]"),
    "device bool index": (_ext(4, ["cuda", True]), r"is not \[type, index or nil\]"),
    "device 3 fields": (_ext(4, ["cpu", None, None]), "exceeds max_array_len"),
    "device 1 field": (_ext(4, ["cpu"]), "not an array of 2"),
    "path unknown flavour": (_ext(5, ["Path", "x"]), r"is not \[flavour, str\]"),
    "path not normal": (_ext(5, ["PurePosixPath", "a//b/"]), "normal form"),
    "path bytes": (_ext(5, ["PurePosixPath", b"a"]), "corrupt path node"),
    "datetime month 13": (_ext(6, [2024, 13, 1, 0, 0, 0, 0, 0, None, None]), "out of range"),
    "datetime year overflow": (_ext(6, [2**64 - 1, 1, 1, 0, 0, 0, 0, 0, None, None]), "out of range"),
    "datetime bool field": (_ext(6, [2024, True, 1, 0, 0, 0, 0, 0, None, None]), "non-int field"),
    "datetime float field": (_ext(6, [2024, 1, 1.0, 0, 0, 0, 0, 0, None, None]), "non-int field"),
    "datetime fold 2": (_ext(6, [2024, 1, 1, 0, 0, 0, 0, 2, None, None]), "out of range"),
    "datetime offset of a day": (_ext(6, [2024, 1, 1, 0, 0, 0, 0, 0, 86400 * 10**6, None]), "out of range"),
    "datetime name without offset": (_ext(6, [2024, 1, 1, 0, 0, 0, 0, 0, None, "X"]), "malformed zone"),
    "datetime offset a float": (_ext(6, [2024, 1, 1, 0, 0, 0, 0, 0, 1.5, None]), "malformed zone"),
    "datetime 9 fields": (_ext(6, [2024, 1, 1, 0, 0, 0, 0, 0, None]), "array of 10"),
    "datetime nested arrays": (_ext(6, [[1, 2], 1, 1, 0, 0, 0, 0, 0, None, None]), "nested array"),
    "datetime deep nesting": (_ext(6, b"\x91" * 200_000 + b"\x90"), "corrupt datetime node"),
    "datetime wide array": (_ext(6, b"\xdd\xff\xff\xff\xff" + b"\x90" * 1000), "corrupt datetime node"),
    "date map": (_ext(7, {1: 2}), "corrupt date node"),
    "date holding an ext": (_ext(7, [msgpack.ExtType(1, b"\x90"), 1, 1]), "corrupt date node"),
    "date holding an empty ext": (_ext(7, [msgpack.ExtType(1, b""), 1, 1]), "holds ext type 1"),
    "date day 0": (_ext(7, [2024, 1, 0]), "out of range"),
    "date truncated": (_ext(7, b"\x93\xcd\x07"), "corrupt date node"),
    "date extra bytes": (_ext(7, msgpack.packb([2024, 1, 1]) + b"\xc0"), "corrupt date node"),
    "timedelta not normal": (_ext(8, [0, 86400, 0]), "normal form"),
    "timedelta negative seconds": (_ext(8, [0, -1, 0]), "normal form"),
    "timedelta out of range": (_ext(8, [10**9, 0, 0]), "out of range"),
    "timedelta float": (_ext(8, [1.0, 0, 0]), "non-int field"),
}


@pytest.mark.parametrize(("node", "message"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_config_nodes_are_a_format_error(node: msgpack.ExtType, message: str) -> None:
    data = msgpack.packb({"cfg": [node]}, use_bin_type=True)
    with pytest.raises(FormatError, match=message):
        decode_tree(data)


def test_an_unknown_dtype_name_is_an_unsupported_format_error() -> None:
    with pytest.raises(UnsupportedFormatError, match=re.escape("torch dtype 'float128' is unknown to this torch")):
        decode_tree(msgpack.packb(_ext(3, b"float128")))


def test_an_unknown_ext_type_is_an_unsupported_format_error() -> None:
    """What a reader of this version says about a value type a newer ckptstore adds."""
    with pytest.raises(UnsupportedFormatError, match="unknown ext type 9 in state tree"):
        decode_tree(msgpack.packb([_ext(9, b"")]))
