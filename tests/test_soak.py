"""The soak test (issue 12): savers, DCP savers (manifest version 2 steps, issue 13), overwriters,
taggers, rm and retention, and gc with a short lease TTL, all at once, with transient faults on
every kind of request, clock skew and SIGKILLs (ckptstore.testing.soak). The slow tests run it
for 60 s per backend; the fast ones check that its parts can fail: a soak whose checker cannot
see a loss proves nothing."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

import ckptstore
from ckptstore import keys
from ckptstore.backends.memory import MemoryBackend, drop_memory_space
from ckptstore.errors import StepExistsError, TransientError
from ckptstore.manifestv2 import RootManifest
from ckptstore.testing.soak import (
    CHUNKING,
    DCP_RANKS,
    RandomFaultBackend,
    SoakConfig,
    Worker,
    _Outcome,
    check_store,
    format_summary,
    load_dcp_state,
    make_state,
    read_journal,
    run,
    save_dcp,
    states_equal,
)

SECONDS = 90  # long enough that every kind of operation happens, at 6.5 s quiet windows every 10 s


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
                                "dcp_step_refs_checked": 0, "dcp_tag_refs_checked": 0,
                                "journaled_commits": 4, "journaled_still_current": 1,
                                "journaled_vanished": 2, "journaled_removed_or_replaced": 1}
    assert "steps lost: 4" in format_summary({**summary, "seconds": 0.0})


def _dcp_save_record(seq: int, step: int, seed: int, saved: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"ev": "begin", "seq": seq, "op": "dcp_save", "t": float(seq), "step": step, "seed": seed},
            {"ev": "end", "seq": seq, "op": "dcp_save", "outcome": "ok", "t": seq + 0.5, **saved}]


def test_check_finds_a_missing_part_chunk_table_or_wrong_seed_in_a_dcp_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DCP step (saved through the DCP saver's code path: a v2 root, one part per rank, a chunk
    table) that lost its part of rank 1, a data chunk or its chunk table is lost, to the final
    check and to a tagger's load; so is one holding another seed than the journal says. An
    intact one is loaded whole through the StoreReader and is not lost."""
    url = str(tmp_path / "store")
    store = ckptstore.open(url, chunking=CHUNKING)
    store.save(0, make_state(11), metadata={"seed": 11, "step": 0})
    saved = {step: save_dcp(store, step, seed) for step, seed in ((1, 11), (2, 22), (3, 33), (4, 44), (5, 55))}
    with pytest.raises(StepExistsError):  # create-only, as the savers' saves
        save_dcp(store, 1, 12)
    roots = {step: store.manifest_object(store.ref(step).manifest) for step in saved}
    assert all(isinstance(r, RootManifest) and len(r.parts) == DCP_RANKS for r in roots.values())
    # The DCP state is made of the plain state's pool chunks: step 1 (seed 11) deduplicates
    # against step 0, a plain save of the same seed.
    assert saved[1]["new_chunks"] < saved[1]["chunks"] - 8, saved[1]
    state, digest = load_dcp_state(store, 1)
    assert digest == saved[1]["manifest"] and state["meta"].tolist() == [11, 1]

    blobs = {b.digest for r in roots.values() if isinstance(r, RootManifest) for b in r.blobs}
    chunks = {step: {c.digest for c in store.info(step).manifest.chunks} - blobs for step in (0, *saved)}
    root2, root4 = roots[2], roots[4]
    assert isinstance(root2, RootManifest) and isinstance(root4, RootManifest)
    store.backend.delete(keys.chunk_key(root2.parts[1].digest))  # step 2: rank 1's part
    only3 = sorted(chunks[3] - set().union(*(chunks[s] for s in (0, 1, 2, 4, 5))))
    store.backend.delete(keys.chunk_key(only3[0]))  # step 3: a data chunk no other step has
    store.backend.delete(keys.chunk_key(root4.chunk_tables[0].digest))  # step 4: its chunk table

    work = tmp_path / "work"
    _journal(work / "journal" / "dcp_saver0-000.jsonl", {"ev": "start", "t": 0.0, "skew": 0.0},
             *_dcp_save_record(1, 1, 11, saved[1]), *_dcp_save_record(3, 2, 22, saved[2]),
             *_dcp_save_record(5, 3, 33, saved[3]), *_dcp_save_record(7, 4, 44, saved[4]),
             *_dcp_save_record(9, 5, 56, saved[5]))  # step 5 holds seed 55: not what was journaled
    _journal(work / "orchestrator.jsonl")
    summary = check_store(SoakConfig(url=url, workdir=str(work)), work)
    lost = {p["key"]: p for p in summary["lost"]}
    assert set(lost) == {keys.step_ref_key(s) for s in (2, 3, 4, 5)}, lost
    assert "manifest parts" in lost[keys.step_ref_key(2)]["why"] and "missing" in lost[keys.step_ref_key(2)]["why"]
    assert lost[keys.step_ref_key(3)]["missing_chunks"] == 1
    assert "chunk tables" in lost[keys.step_ref_key(4)]["why"]
    assert "seed 55" in lost[keys.step_ref_key(5)]["why"] and "56" in lost[keys.step_ref_key(5)]["why"]
    assert summary["counts"]["dcp_saves"] == 5
    assert summary["check"]["dcp_step_refs_checked"] == 5 and summary["check"]["step_refs_checked"] == 6
    assert summary["check"]["journaled_still_current"] == 5

    # A tagger's load (the worker's code path) and an audit (gc's broken refs, new tags) see it too.
    for name in ("time", "time_ns"):  # the worker skews the clock (by 0 s here): put it back after
        monkeypatch.setattr(time, name, getattr(time, name))
    worker = Worker(SoakConfig(url=url, skew=0.0, fault_rate=0.0, storm_chance=0.0),
                    {"slot": "tagger0", "role": "tagger", "incarnation": 0, "deadline": 0.0, "seed": 1,
                     "journal": str(tmp_path / "tagger.jsonl")})
    try:
        assert worker.load_and_check(1) == {"commit_id": saved[1]["commit_id"], "checked": True, "dcp": True}
        assert worker.audit(1) == []
        for step in (2, 3, 4):
            with pytest.raises(_Outcome) as raised:
                worker.load_and_check(step)
            assert raised.value.outcome == "broken" and raised.value.fields["broken"], (step, raised.value.fields)
            assert [f["key"] for f in worker.audit(step)] == [keys.step_ref_key(step)]
        assert worker.load_and_check(5)["checked"]  # it holds its own seed's state (the journal is wrong)
    finally:
        worker.store.close()
        worker.journal.close()


def test_the_dcp_saver_reads_its_step_back_and_again_after_a_gc_swept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DCP saver's loop: a DCP step committed, read back at once, and read back again in
    its next round once a gc has swept (the epoch's last_sweep passed the commit's epoch); the
    tally counts both and the check finds the steps whole."""
    url, work = str(tmp_path / "store"), tmp_path / "work"
    ckptstore.open(url, chunking=CHUNKING).marker  # noqa: B018 - creates the store, as run() does
    (work / "journal").mkdir(parents=True)
    _journal(work / "orchestrator.jsonl")
    for name in ("time", "time_ns"):  # the worker skews the clock (by 0 s here): put it back after
        monkeypatch.setattr(time, name, getattr(time, name))
    cfg = SoakConfig(url=url, workdir=str(work), skew=0.0, fault_rate=0.0, storm_chance=0.0, quiet_for=0.0)
    worker = Worker(cfg, {"slot": "dcp_saver0", "role": "dcp_saver", "incarnation": 0, "deadline": 0.0,
                          "seed": 5, "journal": str(work / "journal" / "dcp_saver0-000.jsonl")})
    try:
        worker.dcp_saver()  # a save and its read-back; no gc has swept since: nothing else
        store = ckptstore.open(url)
        report = store.gc(min_age=0)
        assert report.ran, report
        worker.dcp_saver()  # the first step again (a sweep passed it), then a new save and its read-back
        worker.dcp_saver()  # no sweep since the second commit: a save and its read-back only
    finally:
        worker.store.close()
        worker.journal.close()
    records = [r for r in read_journal(work / "journal" / "dcp_saver0-000.jsonl") if r["ev"] == "end"]
    assert [(r["op"], r["outcome"]) for r in records] == [
        ("dcp_save", "ok"), ("load", "ok"), ("load", "ok"), ("dcp_save", "ok"), ("load", "ok"), ("dcp_save", "ok"),
        ("load", "ok")], records
    assert records[2]["commit_id"] == records[0]["commit_id"]  # the first step, read again after the sweep
    assert all(r["checked"] for r in records if r["op"] == "load")
    summary = check_store(cfg, work)
    assert summary["steps_lost"] == 0, summary["lost"]
    counts = summary["counts"]
    assert counts["dcp_saves"] == 3 and summary["check"]["dcp_step_refs_checked"] == 3, summary
    assert counts["dcp_loads_checked"] == 4 and counts["dcp_loads_after_sweep"] == 1, counts


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
    for name in ("saves", "dcp_saves", "overwrites_replacing", "retention_saves", "retention_deleted", "rms", "tags",
                 "untags", "loads_checked", "chunks_deduplicated", "gc_swept", "gc_stood_down", "gc_deleted_objects",
                 "faults", "kills"):
        assert counts[name] > 0, (name, report)
    for request_kind in ("put before", "put after", "delete before", "delete after", "head before"):
        assert faults.get(request_kind, 0) > 0, (request_kind, report)
    assert faults.get("list before", 0) + faults.get("list part-way", 0) > 0, report
    assert faults.get("get before", 0) + faults.get("get_range before", 0) + faults.get("read_into before", 0) > 0
    assert summary["check"]["refs_checked"] > 0 and summary["check"]["journaled_commits"] > 0, report
    # DCP steps (manifest version 2) were read whole and compared: at the end, or by loads during the run.
    check = summary["check"]
    assert check["dcp_step_refs_checked"] + check["dcp_tag_refs_checked"] + counts["dcp_loads_checked"] > 0, report
    assert max(abs(s) for s in summary["clock_skew_s"]) > 60, report
