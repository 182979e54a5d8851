"""A fuzz-style test of the command line: random argv built from the commands, their flags and
odd values, run through `ckptstore.cli.main` in-process. Every outcome must be a clean exit code
with a message; no input may raise out of main or print a traceback."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore.cli import EXIT_OK, main

COMMANDS = {  # command -> its flags (demo trains a model: only its argument errors are exercised)
    "ls": ["--json"],
    "show": ["--tree", "--json"],
    "rm": ["--yes", "-y", "--json"],
    "verify": ["--deep", "--json"],
    "du": ["--history", "--plot", "--json"],
    "diff": ["--values", "--all", "--json"],
    "cp": ["--steps", "--overwrite", "--skip-existing", "--no-tags", "--json"],
    "export": ["--format", "--max-shard-size", "--trust-pickle", "--json"],
    "import": ["--overwrite", "--json"],
    "gc": ["--dry-run", "--min-age", "--json"],
    "tag": ["--force", "-f", "--delete", "--json"],
    "locks": ["--clear-stale", "--json"],
    "doctor": ["--json"],
}
ODD = ["-1", "", "latest", "best", "nope", "0", "100", "200", "100-200", "200-100", "0-99999999999999999999",
       str(2**64), str(2**64 - 1), "9" * 30, "9" * 5000, "-0", "1.5", "1e309", "nan", "inf", "-inf", "x/y",
       "ü", "日本語", "١٢٣", "²", " ", "\t", "-", "--", "--js", "dcp", "safetensors", "2GiB", "0B", "a" * 300,
       "--bogus", "-x", "latest-1", ".", "..", "\x00"]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("fuzz") / "store")
    store = ckptstore.open(path)
    for step in (100, 200):
        store.save(step, {"w": torch.arange(8, dtype=torch.float32) + step, "lr": 0.1})
    store.tag("best", 100)
    return path


def _argv(rng: random.Random, store: str, scratch: Path) -> list[str]:
    if rng.random() < 0.05:
        return [rng.choice(ODD) for _ in range(rng.randrange(3))]
    command = rng.choice(["demo", *COMMANDS] if rng.random() < 0.03 else list(COMMANDS))
    paths = [store, str(scratch / f"p{rng.randrange(4)}"), str(scratch / "out.safetensors"), str(scratch / "d/"),
             f"memory://fuzz{rng.randrange(2)}", f"file://{store}", str(Path(store) / "chunks")]
    argv = [command]
    if command == "demo":
        return [*argv, *(["--steps", rng.choice(ODD[:20])] if rng.random() < 0.5 else ["--bogus"])]
    if rng.random() < 0.9:
        argv.append(rng.choice(paths) if rng.random() < 0.85 else rng.choice(ODD))
    for _ in range(rng.randrange(5)):
        pick = rng.random()
        if pick < 0.35:
            argv.append(rng.choice(ODD))
        elif pick < 0.6:
            argv.append(rng.choice(COMMANDS[command]))
        else:
            argv.append(rng.choice(paths))
    return argv


def test_no_argv_raises_or_prints_a_traceback(store_path: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))  # noqa: SIM115 (rm without --yes must refuse)
    monkeypatch.chdir(tmp_path)  # odd values ('inf', '') are relative store paths: never in the checkout
    rng = random.Random(14)
    cases = [["show", store_path, "-1"], ["show", store_path, "9" * 5000], ["show", store_path, ""],
             ["rm", store_path, "0-99999999999999999999", "--yes"], ["export", store_path, "\x00", "x"],
             ["gc", store_path, "--min-age", "nan"], [], ["--json"], ["show"], ["show", "--json"]]
    cases += [_argv(rng, store_path, tmp_path) for _ in range(400)]
    seen: set[int] = set()
    for argv in cases:
        try:
            code = main(argv)
        except BaseException as exc:  # anything escaping main is the failure
            pytest.fail(f"main({argv!r}) raised {type(exc).__name__}: {exc}")
        out = capsys.readouterr()
        assert isinstance(code, int) and 0 <= code <= 4, (argv, code)
        assert "Traceback" not in out.out + out.err, (argv, out.err)
        assert "internal error" not in out.out + out.err, (argv, out.err)
        if code != EXIT_OK:
            assert (out.out + out.err).strip(), f"main({argv!r}) exited {code} without a message"
        seen.add(code)
    assert {0, 2, 3} <= seen, f"the cases reach past the parser: exit codes seen {sorted(seen)}"


def test_gc_min_age_is_a_finite_non_negative_number(store_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("nan", "inf", "-1", "soon", ""):
        assert main(["gc", store_path, "--dry-run", "--min-age", bad]) == 2, bad
        assert "seconds" in capsys.readouterr().err
