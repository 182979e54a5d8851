"""A quick run of the decoder fuzzer (the dedicated job, .ci/fuzz, runs 3.5M inputs)."""

from __future__ import annotations

import ast
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

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


def test_an_untyped_error_fails_the_run_and_prints_the_reproducer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]):
    from ckptstore.manifest import decode_ref

    def leaky(data: bytes) -> object:
        if len(data) % 7 == 3:
            raise KeyError("a decoder bug")
        return decode_ref(data)

    _with_target(monkeypatch, leaky)
    corpus = tmp_path / "corpus"
    assert fuzz.main(["--engine", "mutate", "--inputs", "3000", "--targets", "ref", "--corpus-dir", str(corpus)]) == 1
    out = capsys.readouterr().out
    assert "KeyError: 'a decoder bug'" in out and "reproducer (" in out
    reproducer = ast.literal_eval(out.split("reproducer, python: ")[1].splitlines()[0])
    assert len(reproducer) % 7 == 3
    # The finding went into the regression corpus, and the seed to repeat the run was printed.
    (saved,) = (corpus / "ref").iterdir()
    assert saved.read_bytes() == reproducer and f"regression corpus: {saved}" in out
    assert re.search(r"seed \d+: repeat this run with --seed \d+", out)


def test_the_corpus_is_replayed_before_any_fuzzing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]):
    from ckptstore.manifest import decode_ref

    seen: list[bytes] = []
    found_once = b"an input a past run found"

    def fixed_but_recorded(data: bytes) -> object:
        seen.append(data)
        if data == found_once and len(seen) > 1:
            raise KeyError("the bug is back")
        return decode_ref(data)

    _with_target(monkeypatch, fixed_but_recorded)
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "0001").write_bytes(b"another corpus input")
    (tmp_path / "ref" / "0002").write_bytes(found_once)
    argv = ["--engine", "mutate", "--inputs", "50", "--targets", "ref", "--corpus-dir", str(tmp_path)]
    assert fuzz.main(argv) == 1  # the mutations alone never produce it: only the replay can fail
    assert seen[:2] == [b"another corpus input", found_once], "the corpus goes first, in file name order"
    assert "KeyError: 'the bug is back'" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["0001", "0002", fuzz.save_finding(
        tmp_path, fuzz.UntypedError("ref", found_once, "")).name], "written once more, under its hash"


def test_a_run_without_seed_picks_a_new_one_and_prints_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    def run(*extra: str) -> tuple[int, str]:
        argv = ["--engine", "mutate", "--inputs", "400", "--targets", "ref,tree", "--corpus-dir", str(tmp_path)]
        assert fuzz.main([*argv, *extra]) == 0
        out = capsys.readouterr().out
        seed = int(re.search(r"seed (\d+) \(repeat this run with --seed (\d+)\)", out)[1])  # type: ignore[index]
        table = re.sub(r" +[\d.]+$", "", out[out.index("target"):out.rindex("inputs in")], flags=re.M)  # no "slowest"
        return seed, table

    first, table = run()
    second, _ = run()
    assert first != second  # 1 in 2**31 to be equal by chance
    assert run("--seed", str(first)) == (first, table), "the printed seed repeats the run"


def test_the_regression_corpus_replays() -> None:
    """Everything a past run found still decodes or raises a typed error (the suite's copy of
    the replay .ci/fuzz does first)."""
    assert fuzz.DEFAULT_CORPUS.is_dir()
    assert {p.name for p in fuzz.DEFAULT_CORPUS.iterdir() if p.is_dir()} <= set(fuzz.SHARES)
    fuzz.replay_corpus(fuzz.DEFAULT_CORPUS, list(fuzz.SHARES))


def test_a_hang_fails_the_run(monkeypatch: pytest.MonkeyPatch):
    def stuck(data: bytes) -> object:
        if data.endswith(b"\x00"):
            time.sleep(5)
        raise FormatError("fine")

    _with_target(monkeypatch, stuck)
    monkeypatch.setattr(fuzz, "HANG_SECONDS", 0.2)
    with pytest.raises(fuzz.UntypedError, match="hang"):
        fuzz.fuzz_mutate("ref", 2000, seed=1)


class _OuterAlarm(BaseException):  # like pytest-timeout's Failed: no `except Exception` stops it
    pass


def test_an_outer_alarm_still_goes_off(monkeypatch: pytest.MonkeyPatch):
    """pytest-timeout's signal method arms ITIMER_REAL too: the fuzzer's per-input alarm must
    neither cancel it nor take it for a decoder hang, and must hand the signal back."""
    def outer(_signum: int, _frame: object) -> None:
        raise _OuterAlarm

    previous = signal.signal(signal.SIGALRM, outer)
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        fuzz.fuzz_mutate("ref", 300, seed=1)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < left < 100.0 and signal.getsignal(signal.SIGALRM) is outer, "re-armed and handed back"

        # Due while the fuzzer runs (each input takes 0.2 s, far below HANG_SECONDS): it goes
        # off then, to its own handler, and not as a hang.
        _with_target(monkeypatch, lambda data: time.sleep(0.2))
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        started = time.monotonic()
        with pytest.raises(_OuterAlarm):
            fuzz.fuzz_mutate("ref", 100, seed=1)
        assert time.monotonic() - started < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not fuzz.atheris_available(), reason="atheris not installed")
def test_atheris_engine_short_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert fuzz.main(["--engine", "atheris", "--inputs", "3000", "--seed", "3", "--corpus-dir", str(tmp_path)]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("total"))
    assert int(total.split()[1]) == 3000
