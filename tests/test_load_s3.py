"""Load test on SeaweedFS: writers, readers and gc in separate processes against one store."""

from __future__ import annotations

from pathlib import Path

import pytest

import ckptstore
from ckptstore.testing.load import Config, WorkerReport, _op, load_and_check, make_state, print_summary, run

pytestmark = pytest.mark.slow


def test_concurrent_writers_readers_and_gc_see_only_expected_errors(s3_bucket: str) -> None:
    cfg = Config(f"s3://{s3_bucket}/load", writers=3, readers=2, seconds=20, tensor_kib=512)
    summary = run(cfg)
    print_summary(summary)  # shown with -s, and on failure

    assert summary["unexpected"] == []
    assert all(row["expected"] for row in summary["errors"].values()), summary["errors"]
    ops = summary["ops"]
    # Enough happened to mean something: commits, checked loads, and gc runs that swept.
    assert summary["commits"] >= 10 and ops.get("load", 0) >= 20, ops
    assert summary["gc_swept"] >= 1, "gc never found a window: the test did not exercise gc"
    # Writers collided on steps (the expected errors did occur, so they were exercised).
    assert summary["errors"].get("save-create: StepExistsError", {}).get("count", 0) > 0, summary["errors"]
    # After the run every committed step loads and matches its hash; there is at least one,
    # and every reported commit still current was among them.
    assert summary["final_steps_checked"] >= 1
    assert 1 <= summary["final_commits_checked"] <= summary["final_steps_checked"]


def test_the_driver_reports_a_wrong_step_and_tolerates_a_deleted_one(tmp_path: Path) -> None:
    store = ckptstore.open(tmp_path / "store")
    state, _ = make_state(1, 0, 0, kib=4)
    store.save(1, state, metadata={"sha256": "0" * 64})  # metadata that does not match the state
    report = WorkerReport("check")
    with _op(report, "load"):
        load_and_check(store, 1)
    with _op(report, "load"):
        load_and_check(store, 2)  # no such step: what retention leaves behind
    assert report.errors == {"load: AssertionError": 1, "load: StepNotFoundError": 1}
    assert len(report.unexpected) == 1 and "metadata hash differs" in report.unexpected[0]
