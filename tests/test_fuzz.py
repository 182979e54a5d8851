"""A quick run of the decoder fuzzer (the dedicated job, .ci/fuzz, runs 3.5M inputs)."""

from __future__ import annotations

import ast
import time
from collections.abc import Callable

import pytest

from ckptstore.errors import FormatError
from ckptstore.testing import fuzz


@pytest.mark.parametrize("name", list(fuzz.SHARES))
def test_seeds_decode(name: str):
    decode = fuzz.targets()[name]
    for data in fuzz.seeds(name) + fuzz.golden_seeds(name):
        decode(data)  # the mutations start from valid objects


# Distinct places (file:line) that raised the typed errors of 1,500 mutate inputs with seed 7: at
# least half the fewest measured over seeds 1-20 (manifest 21, ref 13, marker 13, tree 7, chunk 11).
MIN_RAISE_SITES = {"manifest": 10, "ref": 6, "marker": 6, "tree": 3, "chunk": 5}


@pytest.mark.parametrize("name", list(fuzz.SHARES))
def test_mutations_give_only_typed_errors(name: str):
    tally = fuzz.fuzz_mutate(name, 1500, seed=7)
    replayed = len(fuzz.seeds(name) + fuzz.golden_seeds(name))
    assert tally.inputs == 1500 and tally.mutants == 1500 - replayed
    assert set(tally.errors) <= {"FormatError", "UnsupportedFormatError"}
    # The mutants themselves (not the replayed seeds) must land on both sides of the decoder,
    # in numbers: over seeds 1-20 at least 30 of them decoded (tree: 300) and 1,050 were refused.
    assert tally.mutants_decoded >= 15, f"only {tally.mutants_decoded} mutants decoded: mutations too destructive"
    assert sum(tally.errors.values()) >= 500, f"only {sum(tally.errors.values())} mutants refused: mutations too weak"
    # ... and be refused by many different checks, not all by the first one.
    assert len(tally.raise_sites) >= MIN_RAISE_SITES[name], tally.raise_sites


def _with_target(monkeypatch: pytest.MonkeyPatch, decode: Callable[[bytes], object]) -> None:
    real = fuzz.targets
    monkeypatch.setattr(fuzz, "targets", lambda: real() | {"ref": decode})


def test_an_untyped_error_fails_the_run_and_prints_the_reproducer(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]):
    from ckptstore.manifest import decode_ref

    def leaky(data: bytes) -> object:
        if len(data) % 7 == 3:
            raise KeyError("a decoder bug")
        return decode_ref(data)

    _with_target(monkeypatch, leaky)
    assert fuzz.main(["--engine", "mutate", "--inputs", "3000", "--targets", "ref"]) == 1
    out = capsys.readouterr().out
    assert "KeyError: 'a decoder bug'" in out and "reproducer (" in out
    reproducer = ast.literal_eval(out.split("reproducer, python: ")[1].strip())
    assert len(reproducer) % 7 == 3


def test_a_hang_fails_the_run(monkeypatch: pytest.MonkeyPatch):
    def stuck(data: bytes) -> object:
        if data.endswith(b"\x00"):
            time.sleep(5)
        raise FormatError("fine")

    _with_target(monkeypatch, stuck)
    monkeypatch.setattr(fuzz, "HANG_SECONDS", 0.2)
    with pytest.raises(fuzz.UntypedError, match="hang"):
        fuzz.fuzz_mutate("ref", 2000, seed=1)


@pytest.mark.skipif(not fuzz.atheris_available(), reason="atheris not installed")
def test_atheris_engine_short_run(capsys: pytest.CaptureFixture[str]):
    assert fuzz.main(["--engine", "atheris", "--inputs", "3000", "--seed", "3"]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("total"))
    assert int(total.split()[1]) == 3000
