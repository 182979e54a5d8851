"""gc running back to back while several writer processes save, dedupe and orphan chunks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore import keys
from ckptstore.testing.scenarios import stress_state
from ckptstore.verify import verify

pytestmark = pytest.mark.slow

WRITERS = 3
SAVES = 5  # per writer; each save after the first starts after a gc swept (stress_writer)


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ckptstore.testing.scenarios", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("delete_delay", [0.0, 0.05], ids=["gc", "slow-sweep"])
def test_gc_during_saves_never_breaks_a_committed_step(s3_bucket: str, delete_delay: float, tmp_path: Path) -> None:
    url = f"s3://{s3_bucket}/stress"
    ckptstore.open(url).marker  # noqa: B018 - a writer's first use creates the store, before the processes race
    stop = tmp_path / "stop-gc"
    gc = _spawn("stress-gc", url, str(stop), str(delete_delay))
    writers = [_spawn("stress-writer", url, str(w), str(SAVES)) for w in range(1, WRITERS + 1)]
    outputs = []
    for proc in writers:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)
    stop.touch()
    gc_out, gc_err = gc.communicate(timeout=300)
    assert gc.returncode == 0, gc_err[-3000:]
    committed = [int(line.split()[1]) for out in outputs for line in out.splitlines()
                 if line.startswith("committed")]
    gc_runs = [line for line in gc_out.splitlines() if line.startswith("gc")]
    swept = [line for line in gc_runs if "ran=1" in line]
    deleted = sum(int(line.rsplit("=", 1)[1]) for line in gc_runs)
    print(f"{len(committed)} commits, {len(gc_runs)} gc runs, {len(swept)} swept, {deleted} objects deleted")
    assert len(committed) == WRITERS * SAVES
    assert len(swept) >= SAVES - 1 and deleted > 0, gc_runs[-5:]

    store = ckptstore.open(url)
    # Every step that is still committed loads whole and equal to what its writer saved
    # (each chunk's hash is checked on the way: the deep check).
    steps = store.steps()
    # Retention is store-wide (the 2 highest steps, plus any not yet trimmed when a writer stopped).
    assert len(steps) >= 2 and max(committed) in steps
    for step in steps:
        loaded = store.load(step)
        assert all(torch.equal(loaded[k], v) for k, v in stress_state(step).items()), step

    deep = verify(store, deep=True)  # every chunk of every step re-read and re-hashed
    assert deep.ok and deep.steps_checked == len(steps), deep.problems

    # Once the writers stop, one gc reclaims all garbage: what is left is exactly what refs reach.
    final = store.gc(min_age=0)
    assert final.ran
    reachable = {c.digest for step in store.steps() for c in store.info(step).manifest.chunks}
    listed = {keys.digest_from_key(o.key) for o in store.backend.list(keys.CHUNKS)}
    assert listed == reachable
    manifests = {keys.digest_from_key(o.key) for o in store.backend.list(keys.MANIFESTS)}
    assert manifests == {store.ref(step).manifest for step in store.steps()}
