"""Separate processes racing to commit one step, and saves killed with SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

import ckptstore
from ckptstore.testing.scenarios import race_commit, tag_of

pytestmark = pytest.mark.slow


def test_eight_processes_racing_create_only_one_wins_each_round(tmp_path) -> None:
    url = str(tmp_path / "store")
    rounds = race_commit(url, processes=8, rounds=5)
    store = ckptstore.open(url)
    for r, outcomes in enumerate(rounds):
        winners = [o for o in outcomes if o.result == "won"]
        assert len(winners) == 1, f"round {r}: {outcomes}"
        losers = [o.result for o in outcomes if o.result != "won"]
        assert losers == ["StepExistsError"] * 7, f"round {r}: {outcomes}"
        assert tag_of(store.load(r)) == winners[0].tag
        assert store.ref(r).seq == 1


def test_eight_processes_racing_overwrite_cas_has_no_silent_clobber(tmp_path) -> None:
    url = str(tmp_path / "store")
    rounds = race_commit(url, processes=8, rounds=5, overwrite=True)
    store = ckptstore.open(url)
    for r, outcomes in enumerate(rounds):
        results = {o.result for o in outcomes}
        assert results <= {"won", "CommitConflictError"}, f"round {r}: {outcomes}"
        winners = [o for o in outcomes if o.result == "won"]
        assert winners, f"round {r}: somebody must win"
        ref = store.ref(r)
        # Every successful commit either created the ref or replaced it once by CAS, so the
        # sequence number counts exactly the winners: no commit was lost or applied twice.
        assert ref.seq == len(winners), f"round {r}: seq {ref.seq} for {len(winners)} winners"
        assert tag_of(store.load(r)) in {w.tag for w in winners}


def _committed_lines(output: str) -> list[tuple[int, int]]:
    lines = [line.split() for line in output.splitlines()]
    return [(int(a), int(b)) for a, b in (line for line in lines if len(line) == 2)]


def test_saves_killed_at_random_points_never_leave_a_broken_step(tmp_path) -> None:
    url = str(tmp_path / "store")
    rng = random.Random(1234)
    printed: dict[int, int] = {}
    first_step = 0
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckptstore.testing.scenarios", "crash-saver", url, str(first_step), "3"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(1.5 + rng.random() * 2.0)  # interpreter + torch start, then a few saves
        if proc.poll() is not None:
            pytest.fail(f"crash saver died on its own: {proc.stderr.read() if proc.stderr else ''}")
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        kills += 1
        for step, tag in _committed_lines(out):
            printed[step] = tag

        store = ckptstore.open(url)
        steps = store.steps()
        # Every commit the saver reported is still there and loads, whole.
        assert set(printed) <= set(steps)
        for step in steps:
            tag = tag_of(store.load(step))  # raises on a torn or incomplete step
            assert tag == step or tag >= 10_000_000, f"step {step} holds foreign tag {tag}"
            if step in printed and printed[step] >= 10_000_000:
                assert tag >= printed[step], "a reported overwrite was lost"
        first_step = (steps[-1] + 1) if steps else 0
    assert kills == 12 and len(printed) >= 12, f"too few commits to mean anything: {printed}"
    # A rerun after the crashes succeeds.
    store = ckptstore.open(url)
    store.save(first_step, {"after": "crashes"})
    assert store.load(first_step) == {"after": "crashes"}
