"""Fuzz the decoders of stored objects: only typed ckptstore errors may come out.

    python -m ckptstore.testing.fuzz --inputs 100000 [--seed N] [--engine atheris|mutate] [--corpus-dir D]

Targets: the manifest, ref and marker decoders (`ckptstore.manifest`), the state tree
decoder (`ckptstore.tree`) and the chunk blob decoders (`ckptstore.chunkblob`). Every input
must decode or raise a `CkptStoreError`; anything else (an untyped exception, a hang, a
crash, a runaway allocation) fails the run, which prints the reproducer bytes and exits 1.

Engines:
- `atheris` (default when installed): coverage-guided libFuzzer over the instrumented
  Python decoders, seeded with valid encodings. One worker process per target, because
  libFuzzer owns its process; each reports its counts through a JSON file.
- `mutate`: seeded random mutations of valid encodings (flip, set, insert, delete,
  truncate, splice, interesting integers) and msgpack of random structures shaped like the
  target. Pure Python, deterministic for a seed; the regular test suite uses it.

Without --seed a run picks a new seed and prints it; `--seed N` repeats that run.

Regression corpus (`--corpus-dir`, default tests/fuzz_corpus/ in a source checkout): one file
per input under `<dir>/<target>/`. Every run first replays each file through its decoder
(both engines; the files are also mutation bases), so an input that once failed stays
checked. A finding (untyped error or hang) is written there, named by its SHA-256, and the
run fails: commit the file together with the fix.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

# Share of the inputs each target gets.
SHARES = {"manifest": 0.3, "ref": 0.15, "marker": 0.1, "tree": 0.2, "chunk": 0.25}
# An input that takes longer than this is a hang.
HANG_SECONDS = 10
# libFuzzer kills a worker above this RSS: a decoder that allocates this much from a
# <= 64 KiB input has no allocation cap.
RSS_LIMIT_MB = 2048
MAX_INPUT = 1 << 16
# The regression corpus of a source checkout (see the module docstring).
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "tests" / "fuzz_corpus"


class UntypedError(Exception):
    """A decoder raised something other than a CkptStoreError (or hung) on `data`."""

    def __init__(self, target: str, data: bytes, detail: str):
        super().__init__(f"{target}: {detail}")
        self.target, self.data, self.detail = target, data, detail


class _Hang(BaseException):  # BaseException: decoders' `except Exception` must not swallow it
    pass


def _decode_chunk(data: bytes) -> object:
    from ckptstore import chunkblob

    header = chunkblob.decode_header(data)
    # Decode against what the header claims when that is small, otherwise against what a
    # manifest would typically expect: both the "lying header" and the honest paths run.
    expected = header.raw_length if header.raw_length <= 4 << 20 else max(len(data) - chunkblob.HEADER_SIZE, 0)
    raw = chunkblob.decode_chunk(data, expected_raw_length=expected)
    decode_into = getattr(chunkblob, "decode_chunk_into", None)  # the in-place decoder, where present
    if decode_into is not None:
        target = memoryview(bytearray(expected))
        decode_into(data, target)
        assert target == raw, "decode_chunk_into and decode_chunk disagree"
    return raw


def targets() -> dict[str, Callable[[bytes], object]]:
    from ckptstore.manifest import decode_manifest, decode_marker, decode_ref
    from ckptstore.tree import decode_tree

    return {"manifest": decode_manifest, "ref": decode_ref, "marker": decode_marker, "tree": decode_tree,
            "chunk": _decode_chunk}


@dataclass
class Tally:
    """Outcomes of one target's inputs.

    `mutants` counts the inputs the mutate engine made (not the seeds it replays first, which
    always decode), `mutants_decoded` those of them that decoded and differ from every seed;
    `raise_sites` counts where the typed errors
    were raised ("manifest.py:412"), so a run whose mutants all die at one check shows it.
    """

    inputs: int = 0
    decoded: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0
    mutants: int = 0
    mutants_decoded: int = 0
    raise_sites: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "decoded": self.decoded, "errors": dict(self.errors), "slowest": self.slowest,
                "mutants": self.mutants, "mutants_decoded": self.mutants_decoded,
                "raise_sites": dict(self.raise_sites)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Tally:
        return cls(obj["inputs"], obj["decoded"], Counter(obj["errors"]), obj["slowest"], obj["mutants"],
                   obj["mutants_decoded"], Counter(obj["raise_sites"]))


def _raise_site(exc: BaseException) -> str:
    """"file.py:line" of the innermost frame of `exc`'s traceback: where it was raised."""
    tb = exc.__traceback__
    if tb is None:
        return "?"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"


def run_one(name: str, decode: Callable[[bytes], object], data: bytes, tally: Tally) -> None:
    """Decode `data`, count the outcome; raise UntypedError for anything but a typed error."""
    from ckptstore.errors import CkptStoreError

    tally.inputs += 1
    started = time.perf_counter()
    try:
        decode(data)
        tally.decoded += 1
    except CkptStoreError as exc:
        tally.errors[type(exc).__name__] += 1
        tally.raise_sites[_raise_site(exc)] += 1
    except _Hang:
        raise UntypedError(name, data, f"no result after {HANG_SECONDS} s (hang)") from None
    except Exception as exc:  # this is what the fuzzer looks for
        raise UntypedError(name, data, "".join(traceback.format_exception(exc))) from exc
    finally:
        tally.slowest = max(tally.slowest, time.perf_counter() - started)


# -- seeds: valid encodings made by the package's own encoders --------------------------------
def seeds(name: str) -> list[bytes]:
    """Valid encodings for `name` (built by the package's encoders, plus the golden vectors)."""
    from ckptstore.chunkblob import Compression, encode_chunk
    from ckptstore.manifest import (
        ChunkEntry,
        Manifest,
        Marker,
        Ref,
        TensorEntry,
        encode_manifest,
        encode_marker,
        encode_ref,
    )

    def tensor_ref(i: int) -> msgpack.ExtType:
        return msgpack.ExtType(2, i.to_bytes(4, "big"))

    trees = [
        {"w": tensor_ref(0), "opt": {0: [tensor_ref(1), msgpack.ExtType(1, msgpack.packb([1, 2.5, None, b"x"]))]},
         "s": "x", "n": -7, "f": True},
        [msgpack.ExtType(1, msgpack.packb([msgpack.ExtType(1, msgpack.packb([tensor_ref(2)]))]))],
        {"a": {"b": {"c": [1, 2, 3]}}, 5: "int key"},
    ]
    if name == "tree":
        from ckptstore.tree import encode_tree

        return [msgpack.packb(t, use_bin_type=True) for t in trees] + [encode_tree(_config_values(), _no_tensors)]
    if name == "chunk":
        from ckptstore import chunkblob

        raw = bytes(range(256)) * 8 + bytes(2048)
        blobs = [b"".join(bytes(p) for p in encode_chunk(memoryview(payload), Compression(codec, level=3)))
                 for payload in (raw, b"", b"\x00" * 5000, os.urandom(64)) for codec in ("none", "zstd")]
        element_type = getattr(chunkblob, "ElementType", None)  # byte-shuffled blobs, where supported
        if element_type is not None:
            counting = {size: b"".join(i.to_bytes(size, "little") for i in range(2048)) for size in (2, 4, 8, 16)}
            blobs += [b"".join(bytes(p) for p in encode_chunk(memoryview(raw), Compression("zstd"),
                                                              element_type(size, integer=True)))
                      for size, raw in counting.items()]
        return blobs
    if name == "marker":
        return [encode_marker(Marker(algorithm, 1.7e9)) for algorithm in ("blake3", "sha256")]
    if name == "ref":
        return [encode_ref(Ref("ab" * 32, 7, 1.7e9, "user@host:1")),
                encode_ref(Ref("cd" * 32, 2**64 - 1, 1.7e9, "u@h:2", seq=5, replaces="ef" * 32))]
    chunks = (ChunkEntry("11" * 32, 64, 88), ChunkEntry("22" * 32, 16, 30))
    tensors = (
        TensorEntry("torch", "float32", (4, 4), ((0, 0, 64),)),
        TensorEntry("numpy", "<i2", (4,), ((1, 8, 8),)),
        TensorEntry("numpy-scalar", "<f8", (), ((1, 0, 8),)),
        TensorEntry("torch", "bfloat16", (2, 2, 2), ((0, 0, 8), (1, 0, 8)),
                    {"fqn": "model.w", "offsets": [0, 0, 0], "global_shape": [4, 2, 2]}),
        TensorEntry("torch", "int64", (0,), ()),
    )
    tree = msgpack.packb(trees[0], use_bin_type=True)
    return [encode_manifest(Manifest(3, 1.7e9, {"lr": 0.1, "tags": ["a"]}, tree, tensors, chunks)),
            encode_manifest(Manifest(0, 0.0, None, msgpack.packb({}), (), ()))]


def _config_values() -> dict[str, Any]:
    """One value of each config ext type of the state tree (ckptstore/treevalues.py)."""
    import datetime as dt
    import pathlib

    import torch

    zone = dt.timezone(dt.timedelta(hours=-3, seconds=7), "X")
    return {"dtype": torch.float8_e4m3fn, "device": [torch.device("cuda", 3), torch.device("cpu")],
            "paths": (pathlib.PurePosixPath("/a/b"), pathlib.PureWindowsPath("C:\\x"), pathlib.Path("rel")),
            "when": [dt.datetime(2024, 2, 29, 23, 59, 59, 999999, fold=1), dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc),
                     dt.datetime(9999, 12, 31, tzinfo=zone)],
            "date": dt.date(2000, 1, 1), "delta": dt.timedelta(days=-5, seconds=1, microseconds=2)}


def _no_tensors(_path: tuple[Any, ...], _value: Any) -> None:
    return None


def golden_seeds(name: str) -> list[bytes]:
    """The golden vectors under tests/golden/, when run from a source checkout."""
    golden = Path(__file__).resolve().parents[2] / "tests" / "golden"
    files = {"ref": ["ref.msgpack"], "marker": ["marker.msgpack"],
             "chunk": ["chunk-none.blob", "chunk-zstd.blob", "chunk-shuffle.blob"], "tree": ["tree-values.msgpack"]}
    found = [(golden / f).read_bytes() for f in files.get(name, []) if (golden / f).is_file()]
    if name == "manifest":
        found += [p.read_bytes() for p in (golden / "store-v1" / "manifests").glob("*/*") if p.is_file()]
    return found


# -- the mutate engine -------------------------------------------------------------------
_INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 2**31 - 1, 2**32 - 1, 2**40, 2**62, 2**63 - 1, 2**64 - 1,
                -1, -(2**63)]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """1-6 random edits of `data`; splices take bytes from another member of `pool`."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(9)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op == 2:
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del out[pos:pos + rng.randint(1, 16)]
        elif op == 4:
            del out[pos:]
        elif op == 5:
            other = rng.choice(pool)
            start = rng.randrange(len(other) + 1)
            out[pos:pos + rng.randint(0, 32)] = other[start:start + rng.randint(1, 64)]
        elif op == 6:  # a msgpack int / length header with a boundary value
            out[pos:pos] = msgpack.packb(rng.choice(_INTERESTING))
        elif op == 7:  # a container header claiming many entries
            out[pos:pos] = rng.choice([b"\xdc", b"\xdd", b"\xde", b"\xdf", b"\xc6", b"\xdb"]) + rng.randbytes(4)
        elif op == 8 and len(out) > 1:  # duplicate a region
            a = rng.randrange(len(out))
            out[pos:pos] = out[a:a + rng.randint(1, 64)]
    return bytes(out[:MAX_INPUT])


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 4 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice(_INTERESTING)
    if kind == 2:
        return rng.choice([0.0, -1.5, 1e300, float("inf"), float("nan"), 1.7e9])
    if kind == 3:
        return rng.choice(["", "torch", "numpy", "numpy-scalar", "float32", "<f4", "|S0", "<U3", "ab" * 32, "x" * 70])
    if kind == 4:
        return rng.randbytes(rng.choice([0, 4, 8, 32, 65]))
    if kind == 5:
        return rng.choice([True, False])
    if kind == 6:
        # Ext types 3-8 (config values) hold a packed array of a few scalars.
        fields = msgpack.packb([_random_value(rng, 4) for _ in range(rng.choice([2, 3, 10]))], use_bin_type=True)
        return rng.choice([msgpack.ExtType(rng.choice([0, 1, 2, 3, 127]), rng.randbytes(rng.choice([0, 4, 8]))),
                           msgpack.ExtType(rng.randint(3, 9), fields), msgpack.Timestamp(1, 0)])
    if kind == 7:
        return rng.randint(-5, 300)
    if kind in (8, 9):
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return {_random_key(rng): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def _random_key(rng: random.Random) -> Any:
    return rng.choice(["v", "step", "tree", "tensors", "chunks", "metadata", "created", "manifest", "seq",
                       "format", "hash", 0, 1, b"k", 1.5])


def random_structure(rng: random.Random, name: str, base: bytes) -> bytes:
    """msgpack shaped like `name`: the base object with random fields replaced or added."""
    try:
        obj = msgpack.unpackb(base, raw=False, strict_map_key=False)
    except Exception:  # a mutant base may be any garbage (unhashable keys: TypeError)
        obj = None
    if isinstance(obj, dict):
        for _ in range(rng.randint(1, 3)):
            key = rng.choice([*obj, _random_key(rng)])
            value = obj.get(key)
            if isinstance(value, list) and value and rng.random() < 0.6:  # edit inside an entry
                entry = value[rng.randrange(len(value))]
                if isinstance(entry, list) and entry:
                    entry[rng.randrange(len(entry))] = _random_value(rng, 2)
                    continue
            obj[key] = _random_value(rng, 1)
    else:
        obj = _random_value(rng)
    try:
        return msgpack.packb(obj, use_bin_type=True)[:MAX_INPUT]
    except (TypeError, ValueError, OverflowError):
        return base


class _HangAlarm:
    """SIGALRM while fuzzing: a timer per input turns one over HANG_SECONDS into a finding.
    ITIMER_REAL is shared with whoever armed it before (pytest-timeout's signal method): their
    alarm still goes off at its time, to their handler, and is re-armed on the way out."""

    def __enter__(self) -> _HangAlarm:
        outer, _ = signal.setitimer(signal.ITIMER_REAL, 0)
        self.outer_deadline: float | None = time.monotonic() + outer if outer > 0 else None
        self.previous = signal.signal(signal.SIGALRM, self._on_alarm)
        return self

    def __exit__(self, *_exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous if self.previous is not None else signal.SIG_DFL)
        if self.outer_deadline is not None:
            signal.setitimer(signal.ITIMER_REAL, max(self.outer_deadline - time.monotonic(), 1e-3))

    def _on_alarm(self, _signum: int, _frame: object) -> None:
        if self.outer_deadline is not None and time.monotonic() >= self.outer_deadline - 1e-3:
            self.outer_deadline = None  # theirs: hand the signal over, from now on
            signal.signal(signal.SIGALRM, self.previous if self.previous is not None else signal.SIG_DFL)
            signal.raise_signal(signal.SIGALRM)
            return
        raise _Hang

    def run(self, name: str, decode: Callable[[bytes], object], data: bytes, tally: Tally) -> None:
        timer = float(HANG_SECONDS)
        if self.outer_deadline is not None:
            timer = min(timer, max(self.outer_deadline - time.monotonic(), 1e-3))
        signal.setitimer(signal.ITIMER_REAL, timer)
        try:
            run_one(name, decode, data, tally)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


def fuzz_mutate(name: str, inputs: int, seed: int, bases: Sequence[bytes] = ()) -> Tally:
    """`inputs` inputs for target `name`, from seeded mutations of its valid seeds (replayed
    first) and of `bases` (the regression corpus). Raises UntypedError."""
    decode = targets()[name]
    rng = random.Random(f"{seed}:{name}")
    pool = seeds(name) + golden_seeds(name)
    replays = len(pool)  # the valid seeds go first, unmutated
    pool += bases
    originals = set(pool)
    tally = Tally()
    with _HangAlarm() as alarm:
        for i in range(inputs):
            mutated = i >= replays
            if not mutated:
                data = pool[i]
            elif name == "chunk" or rng.random() < 0.7:
                data = mutate(rng, rng.choice(pool), pool)
            else:
                data = random_structure(rng, name, rng.choice(pool))
            decoded = tally.decoded
            alarm.run(name, decode, data, tally)
            if mutated:
                tally.mutants += 1
                # A mutant identical to a seed (an edit undone by the next) proves nothing.
                tally.mutants_decoded += tally.decoded - decoded if data not in originals else 0
                if len(pool) < 512 and tally.decoded > decoded and rng.random() < 0.2:
                    pool.append(data)  # a mutant that still decodes is a good base for more
    return tally


# -- the regression corpus -----------------------------------------------------------------
def corpus_inputs(corpus_dir: Path | None, name: str) -> list[bytes]:
    """The corpus files of target `name`, in file name order."""
    folder = corpus_dir / name if corpus_dir is not None else None
    if folder is None or not folder.is_dir():
        return []
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]


def replay_corpus(corpus_dir: Path | None, chosen: Sequence[str]) -> dict[str, Tally]:
    """Every corpus input of the `chosen` targets through its decoder; raises UntypedError."""
    results = {}
    with _HangAlarm() as alarm:
        for name in chosen:
            decode, tally = targets()[name], Tally()
            for data in corpus_inputs(corpus_dir, name):
                alarm.run(name, decode, data, tally)
            results[name] = tally
    return results


def save_finding(corpus_dir: Path, finding: UntypedError) -> Path:
    """Write the input of `finding` into the corpus (named by its SHA-256: once per input)."""
    path = corpus_dir / finding.target / hashlib.sha256(finding.data).hexdigest()[:32]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(finding.data)
    return path


# -- the atheris engine --------------------------------------------------------------------
def atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


# Modules whose code the decoders run: instrumented for coverage. (instrument_all() would
# also instrument everything else loaded, ~4000 functions: 15 s per worker here.)
INSTRUMENTED = ("ckptstore.manifest", "ckptstore.tree", "ckptstore.chunkblob", "ckptstore.dtypes", "ckptstore.keys",
                "ckptstore.errors", "ckptstore.hashing")


def _instrument(atheris: Any) -> None:
    import importlib
    import inspect

    for module_name in INSTRUMENTED:
        module = importlib.import_module(module_name)
        for obj in list(vars(module).values()):
            members = [obj] if inspect.isfunction(obj) else (
                [m for m in vars(obj).values() if inspect.isfunction(m)] if inspect.isclass(obj) else [])
            for fn in members:
                if fn.__module__ == module_name:
                    atheris.instrument_func(fn)


def _atheris_worker(name: str, inputs: int, seed: int, stats: Path, corpus: Path) -> None:
    """Runs in its own process: libFuzzer calls exit() when done, so counts go to `stats`."""
    import atheris

    decode = targets()[name]
    _instrument(atheris)
    tally = Tally()

    def dump(untyped: UntypedError | None = None) -> None:
        report = {"tally": tally.as_json()}
        if untyped is not None:
            report["untyped"] = {"detail": untyped.detail, "data": base64.b64encode(untyped.data).decode()}
        tmp = stats.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        tmp.replace(stats)

    def one_input(data: bytes) -> None:
        try:
            run_one(name, decode, data, tally)
        except UntypedError as exc:
            dump(exc)
            raise
        if tally.inputs % 2000 == 0:
            dump()
        if tally.inputs >= inputs:
            dump()
            os._exit(0)

    for i, data in enumerate(seeds(name) + golden_seeds(name)):
        (corpus / f"seed-{i}").write_bytes(data)
    atheris.Setup([sys.argv[0], str(corpus), f"-seed={seed + 1}", f"-max_len={MAX_INPUT}",
                   f"-timeout={HANG_SECONDS}", f"-rss_limit_mb={RSS_LIMIT_MB}", f"-runs={inputs + 10_000}",
                   f"-artifact_prefix={corpus.parent}/", "-print_final_stats=0"], one_input)
    atheris.Fuzz()


def fuzz_atheris(name: str, inputs: int, seed: int, workdir: Path, bases: Sequence[bytes] = ()) -> Tally:
    """Run the atheris worker for `name` (its corpus: the valid seeds and `bases`); raises
    UntypedError on a finding (crash, hang, OOM)."""
    stats, corpus = workdir / f"{name}.json", workdir / f"{name}-corpus"
    corpus.mkdir()
    for i, data in enumerate(bases):
        (corpus / f"regression-{i}").write_bytes(data)
    proc = subprocess.run(
        [sys.executable, "-m", "ckptstore.testing.fuzz", "--worker", name, "--inputs", str(inputs),
         "--seed", str(seed), "--stats", str(stats), "--corpus", str(corpus)],
        capture_output=True, text=True, check=False,
    )
    report = json.loads(stats.read_text()) if stats.is_file() else {"tally": Tally().as_json()}
    tally = Tally.from_json(report["tally"])
    if "untyped" in report:
        raise UntypedError(name, base64.b64decode(report["untyped"]["data"]), report["untyped"]["detail"])
    if proc.returncode != 0:  # crash, timeout or OOM caught by libFuzzer: it wrote the input
        artifacts = sorted(workdir.glob("crash-*")) + sorted(workdir.glob("timeout-*")) + sorted(workdir.glob("oom-*"))
        data = artifacts[-1].read_bytes() if artifacts else b""
        raise UntypedError(name, data, f"worker exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return tally


# -- command line ------------------------------------------------------------------------
def split_inputs(total: int, chosen: list[str]) -> dict[str, int]:
    """`total` spread over the `chosen` targets by SHARES (each gets at least one)."""
    weight = sum(SHARES[name] for name in chosen)
    counts = {name: max(1, int(total * SHARES[name] / weight)) for name in chosen}
    counts[chosen[0]] += max(0, total - sum(counts.values()))
    return counts


def print_table(results: dict[str, Tally], seconds: float) -> None:
    kinds = sorted({k for t in results.values() for k in t.errors})
    header: list[object] = ["target", "inputs", "decoded", *kinds, "slowest ms"]
    rows: list[list[object]] = [
        [name, t.inputs, t.decoded, *(t.errors.get(k, 0) for k in kinds), f"{t.slowest * 1000:.1f}"]
        for name, t in results.items()]
    total = [sum(t.inputs for t in results.values()), sum(t.decoded for t in results.values())]
    rows.append(["total", *total, *(sum(t.errors.get(k, 0) for t in results.values()) for k in kinds), ""])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).rjust(w) for cell, w in zip(row, widths, strict=True)))
    print(f"{total[0]} inputs in {seconds:.1f} s ({total[0] / max(seconds, 1e-9):.0f}/s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckptstore.testing.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="total inputs over all targets")
    parser.add_argument("--seed", type=int, default=None, help="default: a new one, printed (0 <= N < 2**31)")
    parser.add_argument("--engine", choices=["atheris", "mutate"], default=None,
                        help="default: atheris when installed, else mutate")
    parser.add_argument("--targets", default=",".join(SHARES), help="comma-separated subset of " + ",".join(SHARES))
    parser.add_argument("--corpus-dir", type=Path, default=None,
                        help="the regression corpus, replayed first; findings are written there "
                             "(default: tests/fuzz_corpus of a source checkout)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _atheris_worker(args.worker, args.inputs, args.seed, args.stats, args.corpus)
        return 0
    engine = args.engine or ("atheris" if atheris_available() else "mutate")
    chosen = [t for t in args.targets.split(",") if t]
    unknown = set(chosen) - set(SHARES)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}")
    seed = random.SystemRandom().randrange(1 << 31) if args.seed is None else args.seed
    if not 0 <= seed < 1 << 31:
        parser.error("--seed must be in [0, 2**31)")
    corpus_dir = args.corpus_dir if args.corpus_dir is not None else (
        DEFAULT_CORPUS if DEFAULT_CORPUS.is_dir() else None)
    if corpus_dir is not None and corpus_dir.is_dir():
        strays = sorted(p.name for p in corpus_dir.iterdir() if p.is_dir() and p.name not in SHARES)
        if strays:
            parser.error(f"{corpus_dir} has folders for no target: {strays} (one per target: {list(SHARES)})")
    counts = split_inputs(args.inputs, chosen)
    print(f"engine {engine}, seed {seed} (repeat this run with --seed {seed}), inputs {sum(counts.values())}: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    started = time.perf_counter()
    results: dict[str, Tally] = {}
    try:
        replayed = sum(t.inputs for t in replay_corpus(corpus_dir, chosen).values())
        print(f"regression corpus {corpus_dir}: {replayed} inputs replayed, none failed" if corpus_dir is not None
              else "no regression corpus (--corpus-dir)", flush=True)
        with tempfile.TemporaryDirectory(prefix="ckptstore-fuzz-") as tmp:
            for name, n in counts.items():
                bases = corpus_inputs(corpus_dir, name)
                results[name] = (fuzz_atheris(name, n, seed, Path(tmp), bases) if engine == "atheris"
                                 else fuzz_mutate(name, n, seed, bases))
    except UntypedError as exc:
        print(f"FAIL: {exc.target} decoder raised an untyped error\n{exc.detail}")
        print(f"reproducer ({len(exc.data)} bytes), base64: {base64.b64encode(exc.data).decode()}")
        print(f"reproducer, python: {exc.data!r}")
        if corpus_dir is not None:
            print(f"saved to the regression corpus: {save_finding(corpus_dir, exc)} (commit it with the fix; "
                  f"every run replays it first)")
        print(f"seed {seed}: repeat this run with --seed {seed}")
        return 1
    print_table(results, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
