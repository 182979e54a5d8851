"""The soak test (issue 12): savers, overwriters, taggers, rm and retention, and gc with a short
lease TTL, all at once, with transient faults on every kind of request, clock skew and SIGKILLs
(ckptstore.testing.soak). The slow tests run it for 60 s per backend; the fast ones check that
its parts can fail: a soak whose checker cannot see a loss proves nothing."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

import ckptstore
from ckptstore import keys
from ckptstore.backends.memory import MemoryBackend, drop_memory_space
from ckptstore.errors import TransientError
from ckptstore.testing.soak import (
    CHUNKING,
    RandomFaultBackend,
    SoakConfig,
    check_store,
    format_summary,
    make_state,
    run,
    states_equal,
)

SECONDS = 60


# -- the parts ---------------------------------------------------------------------------------


def test_states_come_back_from_their_seed_and_share_pool_chunks() -> None:
    a, again, b = make_state(1), make_state(1), make_state(2)
    assert states_equal(a, again) and not states_equal(a, b)
    # Pool tensors recur across seeds (that is what makes saves dedupe against garbage).
    layers = [set(make_state(seed)["layers"]) for seed in range(10)]
    assert any(layers[0] & other for other in layers[1:])
    changed = make_state(1)
    changed["own"][3] += 1
    assert not states_equal(a, changed)


def test_random_faults_fail_before_or_after_the_request() -> None:
    name = "soak-faults"
    faulty = RandomFaultBackend(MemoryBackend(name), rate=1.0, seed=7)
    try:
        for i in range(40):
            with pytest.raises(TransientError):
                faulty.put(f"k/{i}", b"x")
        landed = sum(faulty.inner.exists(f"k/{i}") for i in range(40))
        assert 0 < landed < 40  # "after": it landed, then the caller was told it failed
        with pytest.raises(TransientError):
            faulty.head("k/0")
        with pytest.raises(TransientError):
            list(faulty.list("k/"))
        injected = faulty.snapshot()
        assert injected["put after"] == landed and injected["put before"] == 40 - landed
        assert injected["head before"] == 1
        assert injected["list before"] + injected["list part-way"] == 1
        quiet = RandomFaultBackend(MemoryBackend(name), rate=0.0, seed=7)
        assert len(list(quiet.list("k/"))) == landed and not quiet.snapshot()
    finally:
        drop_memory_space(name)


def _journal(path: Path, *records: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_check_finds_a_missing_chunk_a_vanished_commit_and_what_workers_found(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    store = ckptstore.open(url, chunking=CHUNKING)
    for step, seed in ((1, 11), (2, 22)):
        store.save(step, make_state(seed), metadata={"seed": seed, "step": step})
    store.tag("best", 1)
    good, broken = store.info(1), store.info(2)
    store.backend.delete(keys.chunk_key(broken.manifest.chunks[-1].digest))  # step 2 loses a chunk

    def commit(seq: int, t: float, step: int, commit_id: str) -> list[dict[str, Any]]:
        return [{"ev": "begin", "seq": seq, "op": "save", "t": t, "step": step, "seed": 1},
                {"ev": "end", "seq": seq, "op": "save", "outcome": "ok", "t": t + 1, "commit_id": commit_id,
                 "manifest": "ab" * 32}]

    work = tmp_path / "work"
    _journal(work / "journal" / "saver0-000.jsonl", {"ev": "start", "t": 0.0, "skew": 12.5},
             {"ev": "begin", "seq": 1, "op": "save", "t": 1.0, "step": 1, "seed": 11},
             {"ev": "end", "seq": 1, "op": "save", "outcome": "ok", "t": 2.0, "commit_id": good.ref.commit_id,
              "manifest": good.ref.manifest},
             *commit(2, 10.0, 3, "c3"),  # step 3: committed, never deleted, gone: vanished
             *commit(4, 10.0, 4, "c4"),  # step 4: committed, then deleted by an rm that began later
             {"ev": "begin", "seq": 6, "op": "rm", "t": 20.0, "step": 4},
             {"ev": "end", "seq": 6, "op": "rm", "outcome": "ok", "t": 21.0},
             *commit(7, 30.0, 5, "c5"),  # step 5: an rm that ended before the commit began excuses nothing
             {"ev": "begin", "seq": 9, "op": "rm", "t": 20.0, "step": 5},
             {"ev": "end", "seq": 9, "op": "rm", "outcome": "ok", "t": 21.0})
    # A gc that audited a ref it could not follow: gone by the end, still a loss.
    _journal(work / "journal" / "gc0-000.jsonl", {"ev": "start", "t": 0.0, "skew": -3.0},
             {"ev": "begin", "seq": 1, "op": "gc", "t": 5.0},
             {"ev": "end", "seq": 1, "op": "gc", "outcome": "ok", "t": 6.0, "ran": True, "broken": [
                 {"key": "refs/tags/t9", "commit_id": "c9", "manifest": "cd" * 32, "error": "manifest is missing"}]})
    _journal(work / "orchestrator.jsonl")
    summary = check_store(SoakConfig(url=url, workdir=str(work)), work)
    lost = {p["key"]: p for p in summary["lost"]}
    assert set(lost) == {keys.step_ref_key(2), keys.step_ref_key(3), keys.step_ref_key(5), "refs/tags/t9"}, lost
    assert lost[keys.step_ref_key(2)]["missing_chunks"] == 1
    assert "vanished" in lost[keys.step_ref_key(3)]["why"]
    assert "gc during the run" in lost["refs/tags/t9"]["why"]
    assert summary["steps_lost"] == 4 and summary["counts"]["broken_refs_found_during_run"] == 1
    assert summary["check"] == {"refs_checked": 3, "step_refs_checked": 2, "tag_refs_checked": 1,
                                "journaled_commits": 4, "journaled_still_current": 1,
                                "journaled_vanished": 2, "journaled_removed_or_replaced": 1}
    assert "steps lost: 4" in format_summary({**summary, "seconds": 0.0})


# -- the soak ----------------------------------------------------------------------------------


def _url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "local":
        return str(tmp_path / "store")
    if backend == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/soak"
    return f"gs://{request.getfixturevalue('gcs_bucket')}/soak"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3", "gcs"])
def test_soak_loses_nothing(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    # Journals and worker logs go to tmp_path, or under $CKPTSTORE_SOAK_ARTIFACTS to outlive
    # pytest's temp-dir rotation. Workers are separate processes: they find the session's
    # servers through the variables the s3_server / gcs_server fixtures export.
    keep = os.environ.get("CKPTSTORE_SOAK_ARTIFACTS")
    workdir = Path(tempfile.mkdtemp(prefix=f"soak-{backend}-", dir=keep)) if keep else tmp_path / "soak"
    summary = run(SoakConfig(url=_url(backend, request, tmp_path), seconds=SECONDS, workdir=str(workdir)))
    report = format_summary(summary)
    print(report)
    assert summary["steps_lost"] == 0, report
    assert summary["counts"]["unexpected_errors"] == 0, report
    counts, faults = summary["counts"], summary["faults_by_request"]
    # A soak that did nothing must fail: every kind of operation, fault and kill happened.
    for name in ("saves", "overwrites_replacing", "retention_saves", "retention_deleted", "rms", "tags", "untags",
                 "loads_checked", "chunks_deduplicated", "gc_swept", "gc_stood_down", "gc_deleted_objects",
                 "faults", "kills"):
        assert counts[name] > 0, (name, report)
    for request_kind in ("put before", "put after", "delete before", "delete after", "head before"):
        assert faults.get(request_kind, 0) > 0, (request_kind, report)
    assert faults.get("list before", 0) + faults.get("list part-way", 0) > 0, report
    assert faults.get("get before", 0) + faults.get("get_range before", 0) + faults.get("read_into before", 0) > 0
    assert summary["check"]["refs_checked"] > 0 and summary["check"]["journaled_commits"] > 0, report
    assert max(abs(s) for s in summary["clock_skew_s"]) > 60, report
