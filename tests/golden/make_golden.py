"""Regenerate the golden vectors in this directory.

Run ONLY when the storage format version changes (a new marker/manifest/ref/chunk version):
the whole point of these files is that they do NOT change when the code changes, so that a
reader that can no longer decode them, or decodes them to other values, fails
tests/test_golden.py. After regenerating, update the literal expected values in
tests/test_golden.py and tests/golden/README.md by hand, and record the change in the
"Changes" section of docs/FORMAT.md.

    .venv/bin/python tests/golden/make_golden.py            # rewrite tests/golden/
    .venv/bin/python tests/golden/make_golden.py --out DIR  # write somewhere else

Everything is deterministic: clock, writer identity and commit id are pinned while the store
is written, so two runs with the same library write identical bytes (except the zstd
payload of chunk-zstd.blob, which depends on the libzstd version).
"""

from __future__ import annotations

import argparse
import datetime as dt
import pathlib
import shutil
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

import ckptstore
import ckptstore.kernel
import ckptstore.manifest
from ckptstore.chunkblob import HEADER_SIZE, Compression, ElementType, encode_chunk
from ckptstore.chunking import ChunkingPolicy
from ckptstore.dcpformat import build_compact
from ckptstore.hashing import hasher
from ckptstore.manifest import ChunkEntry, Marker, Ref, StepSummary, TensorEntry, encode_marker, encode_ref
from ckptstore.manifestv2 import BlobRef, RootManifest, encode_chunk_table, encode_part, encode_root
from ckptstore.tree import encode_tree

HERE = Path(__file__).resolve().parent

# -- standalone vectors -------------------------------------------------------------------
CHUNK_NONE_RAW = bytes(range(32))
CHUNK_ZSTD_RAW = bytes(4096)
CHUNK_ZSTD_LEVEL = 3
# Byte shuffle (filter 1) by element size 4: uint32 0..1023, little-endian.
CHUNK_SHUFFLE_RAW = np.arange(1024, dtype="<u4").tobytes()
CHUNK_SHUFFLE_ELEMENT = ElementType(size=4, integer=True)
CHUNK_SHUFFLE_LEVEL = 1

MARKER = Marker(hash_algorithm="blake3", created=1700000000.0)

REF = Ref(
    manifest="0123456789abcdef" * 4,
    step=100,
    committed=1700000100.5,
    writer="trainer@node-0:1234",
    commit_id="fedcba9876543210fedcba9876543210",
    seq=2,
    replaces="fedcba9876543210" * 4,
)
# The same ref with a summary (what `ls` shows without reading the manifest).
REF_SUMMARY_FILE = "ref-summary.msgpack"
REF_WITH_SUMMARY = replace(REF, summary=StepSummary(tensors=4, logical_bytes=42, stored_bytes=138, new_bytes=106,
                                                    chunks=4))

# -- config values in a state tree (ext types 3-8) ----------------------------------------
TREE_VALUES_FILE = "tree-values.msgpack"


def tree_values() -> dict[str, Any]:
    """One value of each config ext type, as a state tree (no tensors). `path` is a PosixPath
    where the vectors are made (POSIX)."""
    return {
        "dtype": torch.bfloat16,
        "device": torch.device("cuda", 1),
        "cpu": torch.device("cpu"),
        "posix": pathlib.PurePosixPath("/data/run1"),
        "windows": pathlib.PureWindowsPath("C:\\ckpt\\run1"),
        "path": pathlib.Path("ckpts/exp1"),
        "naive": dt.datetime(2024, 5, 17, 13, 45, 30, 123456),
        "utc": dt.datetime(2024, 5, 17, 13, 45, 30, tzinfo=dt.timezone.utc),
        "ist": dt.datetime(2024, 5, 17, 19, 15, 30, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30), "IST")),
        "fold": dt.datetime(2021, 11, 7, 1, 30, fold=1),
        "date": dt.date(2024, 5, 17),
        "timedelta": dt.timedelta(days=-1, seconds=3600, microseconds=5),
    }


# -- manifest version 2 (a DCP step: root, one part, one chunk table) ----------------------
V2_PART_FILE = "manifest-v2-part.msgpack"
V2_TABLE_FILE = "chunk-table-v2.msgpack"
V2_ROOT_FILE = "manifest-v2-root.msgpack"
V2_CHUNKS = (ChunkEntry("11" * 32, 48, 72), ChunkEntry("22" * 32, 16, 40))
# "w" (2x4 float32) and "b" (4 float32) share chunk 0; "cfg" is a DCP bytes item in chunk 1.
V2_TENSORS = (
    TensorEntry("torch", "float32", (2, 4), ((0, 0, 32),), {"fqn": "w", "offsets": [0, 0]}),
    TensorEntry("torch", "float32", (4,), ((0, 32, 16),), {"fqn": "b", "offsets": [0]}),
    TensorEntry("torch", "uint8", (16,), ((1, 0, 16),), {"fqn": "cfg", "bytes": True}),
)
V2_PROPS = ("float32", "strided", False, "contiguous_format", False)


def v2_compact() -> dict[str, Any]:
    return build_compact([("w", V2_PROPS, [2, 4], [((0, 0), (2, 4))], [0]),
                          ("b", V2_PROPS, [4], [((0,), (4,))], [0]),
                          ("cfg", None, [], [], [0])],
                         planner_data={"w": ["w"], "b": ["b"], "cfg": ["cfg"]},
                         storage_meta={"checkpoint_id": "step-200", "save_id": "golden", "load_id": None,
                                       "modules": []}, version="1.0.0")


def v2_objects() -> tuple[bytes, bytes, bytes]:
    """(part, chunk table, root) bytes; the root names the other two by their blake3."""
    digest = hasher("blake3")
    part = encode_part(V2_TENSORS, V2_CHUNKS)
    table = encode_chunk_table(sorted(V2_CHUNKS, key=lambda c: c.digest))
    tree = encode_tree({"dcp": {"format": 2, "metadata": v2_compact(), "part_ranks": [0]}}, lambda _p, _v: None)
    root = RootManifest(
        step=200, created=1700000200.0, metadata={"dcp": {"format": 2, "items": 3, "ranks": 1}}, tree=tree,
        parts=(BlobRef(digest(part), len(part), HEADER_SIZE + len(part), 3),),
        chunk_tables=(BlobRef(digest(table), len(table), HEADER_SIZE + len(table), 2),),
        tensors=3, chunks=2, logical_bytes=64, stored_bytes=112)
    return part, table, encode_root(root)


# -- the golden store ---------------------------------------------------------------------
STORE_DIR = "store-v1"
STORE_STEP = 7
STORE_POLICY = ChunkingPolicy(chunk_size=16, small_tensor_limit=8, pack_size=32)
STORE_COMPRESSION = Compression("none")
STORE_METADATA = {"run": "golden"}
STORE_WRITER = "golden@ckptstore:0"
STORE_COMMIT_ID = "00112233445566778899aabbccddeeff"
# time.time() as the store sees it: while the store is opened (marker "created"), and during
# the save (manifest "created", ref "committed", and any other timestamp a save may take).
STORE_OPEN_TIME = 1700000000.0
STORE_SAVE_TIME = 1700000001.5


def golden_state() -> dict[str, Any]:
    """The state saved as step 7 of the golden store."""
    return {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, 2], dtype=torch.bfloat16),
        "n": np.arange(3, dtype="<i2"),
        "s": np.int64(-5),
        "meta": {"name": "golden", 3: (1, 2.5, None, True, b"\x00\x01")},
    }


class _Clock:
    """Stands in for the `time` module inside ckptstore.kernel: a clock stopped at `now`."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now

    @staticmethod
    def perf_counter() -> float:
        return 0.0


@contextmanager
def _pinned(clock: _Clock) -> Iterator[None]:
    fixed_secrets = types.SimpleNamespace(token_hex=lambda n: STORE_COMMIT_ID)
    with mock.patch.object(ckptstore.kernel, "time", clock), \
            mock.patch.object(ckptstore.kernel, "writer_identity", lambda: STORE_WRITER), \
            mock.patch.object(ckptstore.manifest, "secrets", fixed_secrets):
        yield


def _write(path: Path, parts: list[Any]) -> None:
    path.write_bytes(b"".join(bytes(p) for p in parts))


def generate(out: Path) -> None:
    """Write every golden vector into `out` (replacing an existing golden store there)."""
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "chunk-none.blob", encode_chunk(memoryview(CHUNK_NONE_RAW), Compression("none")))
    _write(out / "chunk-zstd.blob",
           encode_chunk(memoryview(CHUNK_ZSTD_RAW), Compression("zstd", level=CHUNK_ZSTD_LEVEL)))
    _write(out / "chunk-shuffle.blob", encode_chunk(memoryview(CHUNK_SHUFFLE_RAW),
                                                    Compression("zstd", level=CHUNK_SHUFFLE_LEVEL),
                                                    CHUNK_SHUFFLE_ELEMENT))
    (out / "marker.msgpack").write_bytes(encode_marker(MARKER))
    (out / "ref.msgpack").write_bytes(encode_ref(REF))
    (out / REF_SUMMARY_FILE).write_bytes(encode_ref(REF_WITH_SUMMARY))
    (out / TREE_VALUES_FILE).write_bytes(encode_tree(tree_values(), lambda _path, _value: None))
    for name, data in zip((V2_PART_FILE, V2_TABLE_FILE, V2_ROOT_FILE), v2_objects(), strict=True):
        (out / name).write_bytes(data)

    root = out / STORE_DIR
    if root.exists():
        shutil.rmtree(root)
    clock = _Clock(STORE_OPEN_TIME)
    with _pinned(clock):
        store = ckptstore.open(root, chunking=STORE_POLICY, compression=STORE_COMPRESSION, threads=1)
        store.marker  # noqa: B018 - create the store now, as opening did when the vectors were made
        clock.now = STORE_SAVE_TIME
        store.save(STORE_STEP, golden_state(), metadata=STORE_METADATA)
        store.close()
    # Staging and lock files are local-backend scratch, never part of the format.
    shutil.rmtree(root / "tmp", ignore_errors=True)
    shutil.rmtree(root / "locks", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write (default: tests/golden/)")
    args = parser.parse_args()
    generate(args.out)
    for path in sorted(p for p in args.out.rglob("*") if p.is_file() and p.suffix not in (".py", ".md")):
        print(path.relative_to(args.out), path.stat().st_size)


if __name__ == "__main__":
    main()
