"""The crash matrix: a save, an overwrite, a retention pass and a gc, each SIGKILLed at every
stage of its write order, on every backend separate processes can share (local, S3, GCS).

Each crash point runs the operation in a child process (ckptstore.testing.crash) that a
fault (ckptstore.testing.faults, kill_before / kill_after) kills at an exact backend call.
After every kill:
1. every step committed before still loads equal to what was saved, and verify --deep is clean;
2. the step being written holds exactly the state the crash point allows: absent (or its
   old state) before the ref put lands, the new state after it, never anything else;
3. a rerun of the same operation succeeds (a save of a new step killed after its commit
   answers StepExistsError instead: its commit landed);
4. once the dead child's lease is stale, gc(min_age=0) runs and leaves exactly the chunks
   and manifests reachable from refs (reachability computed here, not by gc), no stale
   lock but the dead child's lease, no unfinished S3 multipart upload, no local staging file.
On S3, a save killed between the parts of a multipart upload leaves an upload that listings
do not show and that gc aborts once it is older than the safe age.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ckptstore
from ckptstore import keys
from ckptstore.commit import read_ref
from ckptstore.epoch import read_epoch
from ckptstore.serverclock import CLOCK_RESOLUTION
from ckptstore.store import Store
from ckptstore.testing.crash import CrashResult, CrashSpec, KillPoint, Operation, run_crash
from ckptstore.testing.scenarios import state_for, tag_of
from ckptstore.verify import verify

pytestmark = pytest.mark.slow

#: 4 KiB chunks: state_for(tag, elements=8192) is a 32 KiB "w" (8 chunks), a constant
#: "exp_avg" (8 slots, 1 distinct chunk) and a bf16 "b" packed alone: 10 chunk puts per new
#: tag, no chunk shared between tags (tags stay below 256 so bf16 holds them exactly).
CHUNKING = (4 << 10, 1024, 4 << 10)
ELEMENTS = 8192
NEW_CHUNKS = 10
#: Short lease TTL so a dead child's lease (and a dead gc's lock) goes stale within seconds.
TTL = 0.5


def _stale_after(url: str) -> float:
    """Seconds after a child's death when its lease is stale by the server's clock: object
    stores' modification times may have 1 s resolution (S3 LastModified), local files ns; and
    nothing counts as stale before ttl + CLOCK_RESOLUTION."""
    return TTL + CLOCK_RESOLUTION + (0.1 if _is_local(url) else 1.1)


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


CHUNK, MANIFEST, STEP_REF = r"^chunks/", r"^manifests/", r"^refs/steps/"
GC_LOCK, EPOCH = r"^locks/gc$", r"^locks/epoch$"


def _open(url: str) -> Store:
    return ckptstore.open(url, chunking=ckptstore.ChunkingPolicy(*CHUNKING), lease_ttl=TTL)


def _spec(url: str, operation: Operation, kill: KillPoint | None, **kwargs: Any) -> CrashSpec:
    options: dict[str, Any] = {"elements": ELEMENTS, "chunking": CHUNKING, "lease_ttl": TTL, **kwargs}
    return CrashSpec(operation, url, kill, **options)


def _save(store: Store, step: int, tag: int, **kwargs: Any) -> ckptstore.SaveInfo:
    return store.save(step, state_for(tag, elements=ELEMENTS), **kwargs)


def _chunks(store: Store) -> set[str]:
    return {info.key for info in store.backend.list(keys.CHUNKS)}


def _objects(store: Store) -> set[str]:
    return _chunks(store) | {info.key for info in store.backend.list(keys.MANIFESTS)}


def _reachable(store: Store) -> set[str]:
    """Manifests and chunks some step or tag ref reaches, read from the manifests themselves."""
    found: set[str] = set()
    for prefix in (keys.STEP_REFS, keys.TAG_REFS):
        for info in store.backend.list(prefix):
            ref = read_ref(store.backend, info.key)
            assert ref is not None, f"ref {info.key} vanished while nothing ran"
            found.add(keys.manifest_key(ref[0].manifest))
            found.update(keys.chunk_key(c.digest) for c in store.manifest(ref[0].manifest).chunks)
    return found


@functools.lru_cache(maxsize=4)
def _s3_client(endpoint: str) -> Any:
    from ckptstore.testing.servers import s3_server_from_env

    server = s3_server_from_env()
    assert server is not None and server.endpoint == endpoint
    return server.client()


def _unfinished_uploads(url: str) -> list[str]:
    """Keys of multipart uploads still open in an s3:// store's bucket (none elsewhere)."""
    if not url.startswith("s3://"):
        return []
    from ckptstore.testing.servers import s3_server_from_env

    server = s3_server_from_env()
    assert server is not None, "the s3_server fixture exports the server's variables"
    bucket = url[len("s3://"):].split("/", 1)[0]
    return [u["Key"] for u in _s3_client(server.endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def _assert_committed(store: Store, expected: dict[int, int], tags: dict[str, int] | None = None) -> None:
    """Exactly the `expected` steps exist, each loads whole with its tag, and verify --deep is clean."""
    assert store.steps() == sorted(expected)
    for step, tag in expected.items():
        assert tag_of(store.load(step)) == tag, f"step {step}"  # tag_of raises on a torn state
    for name, tag in (tags or {}).items():
        assert tag_of(store.load(name)) == tag, f"tag {name}"
    report = verify(store, deep=True)
    assert report.ok, report.problems
    assert report.steps == sorted(expected)


def _collect_after_crash(store: Store, crash: CrashResult, expected: dict[int, int], *,
                         dead_lease: bool, tags: dict[str, int] | None = None) -> None:
    """Wait until the dead child's lease or lock is stale, then gc must run and leave exactly
    the reachable objects; the dead child's lease is the only stale lock left to clear."""
    time.sleep(max(0.0, crash.died_at + _stale_after(store.url) - time.time()))
    report = store.gc(min_age=0)
    assert report.ran, f"gc did not run after a crash: {report}"
    assert not report.broken_refs, report.broken_refs
    assert _objects(store) == _reachable(store), "gc left garbage, or deleted a reachable object"
    assert not read_epoch(store.backend)[0].running, "the gc epoch must be idle after a complete gc"
    cleared = store.clear_stale_locks()
    assert [lock.kind for lock in cleared] == (["save"] if dead_lease else []), cleared
    assert {lock.kind for lock in store.locks()} <= {"epoch"}, store.locks()
    assert _unfinished_uploads(store.url) == []
    if _is_local(store.url):  # no staging file of a killed put survives gc
        assert not list((Path(store.url.removeprefix("file://")) / "tmp").glob("*.tmp"))
    _assert_committed(store, expected, tags)


# -- a save of a new step ---------------------------------------------------------------------

@dataclass(frozen=True)
class SavePoint:
    name: str
    kill: KillPoint
    committed: bool  # whether the new state must be visible after the kill
    chunks_written: int  # new chunk objects present after the kill (with one I/O thread)
    threads: int = 1

    def assert_landed(self, landed: set[str]) -> None:
        # With several I/O threads the killed put is not the k-th to finish: an earlier one
        # may still be in flight, and other threads may finish several later ones while it
        # runs (seen: 8 of 10 landed). Only the killed put itself surely landed.
        low, high = (self.chunks_written,) * 2 if self.threads == 1 else (1, NEW_CHUNKS)
        assert low <= len(landed) <= high, f"the kill landed elsewhere: {len(landed)} new chunks"


MID = 4  # "mid-chunks": killed right after the 4th of 10 chunk puts

NEW_SAVE_POINTS = [
    SavePoint("before-any-chunk", KillPoint("put", CHUNK, "before"), False, 0),
    SavePoint("mid-chunks", KillPoint("put", CHUNK, "after", skip=MID - 1), False, MID),
    # Other puts in flight when the process dies (a local put may leave a staging file).
    SavePoint("mid-chunks-4-threads", KillPoint("put", CHUNK, "after", skip=MID - 1), False, MID, threads=4),
    SavePoint("after-manifest", KillPoint("put", MANIFEST, "after"), False, NEW_CHUNKS),
    SavePoint("before-ref", KillPoint("put", STEP_REF, "before"), False, NEW_CHUNKS),
    SavePoint("after-ref", KillPoint("put", STEP_REF, "after"), True, NEW_CHUNKS),
]


@pytest.mark.parametrize("point", NEW_SAVE_POINTS, ids=lambda p: p.name)
def test_save_of_a_new_step_killed(shared_store_url: str, point: SavePoint) -> None:
    url = shared_store_url
    store = _open(url)
    expected = {1: 1, 2: 2}
    for step, tag in expected.items():
        _save(store, step, tag)
    before = _chunks(store)

    crash = run_crash(_spec(url, "save", point.kill, step=3, tag=3, threads=point.threads))

    _assert_committed(store, {**expected, 3: 3} if point.committed else expected)
    if not point.committed:
        with pytest.raises(ckptstore.StepNotFoundError):
            store.load(3)
    landed = _chunks(store) - before
    point.assert_landed(landed)

    if point.committed:  # the rerun finds the commit the killed save made
        with pytest.raises(ckptstore.StepExistsError):
            _save(store, 3, 3)
    else:
        info = _save(store, 3, 3)
        assert info.new_chunks == NEW_CHUNKS - len(landed), "a rerun re-uploads only what is missing"
    expected[3] = 3
    assert landed <= {keys.chunk_key(c.digest) for c in store.info(3).manifest.chunks}
    _collect_after_crash(store, crash, expected, dead_lease=True)


# -- an overwrite of an existing step ----------------------------------------------------------
#
# Until the ref's compare-and-swap lands, step 2 must load as its old state, whole; after it,
# as the new state, whole. tag_of() rejects any state whose tensors come from two writers.
# This is what a torch.distributed.checkpoint (DCP) directory cannot give: DCP re-saves into
# the same directory (overwrite=True by default), its data files first and .metadata last, so
# a crash mid re-save leaves some data files new and the rest (and .metadata) old, and the
# next load silently returns a mix of the two steps' tensors. Here old and new never share a
# manifest, and the ref names exactly one of them.

OVERWRITE_POINTS = [
    SavePoint("before-any-chunk", KillPoint("put", CHUNK, "before"), False, 0),
    SavePoint("mid-chunks", KillPoint("put", CHUNK, "after", skip=MID - 1), False, MID),
    SavePoint("after-manifest", KillPoint("put", MANIFEST, "after"), False, NEW_CHUNKS),
    # The commit first tries create-only (and finds the step), then compare-and-swaps.
    SavePoint("before-ref-create", KillPoint("put", STEP_REF, "before"), False, NEW_CHUNKS),
    SavePoint("before-ref-cas", KillPoint("put", STEP_REF, "before", skip=1), False, NEW_CHUNKS),
    SavePoint("after-ref-cas", KillPoint("put", STEP_REF, "after", skip=1), True, NEW_CHUNKS),
]
OLD, NEW = 2, 102


@pytest.mark.parametrize("point", OVERWRITE_POINTS, ids=lambda p: p.name)
def test_overwrite_of_a_step_killed(shared_store_url: str, point: SavePoint) -> None:
    url = shared_store_url
    store = _open(url)
    expected = {1: 1, 2: OLD}
    for step, tag in expected.items():
        _save(store, step, tag)
    old_ref = store.ref(2)
    before = _chunks(store)

    crash = run_crash(_spec(url, "save", point.kill, step=2, tag=NEW, overwrite=True))

    if point.committed:
        expected[2] = NEW
        ref = store.ref(2)
        assert (ref.seq, ref.replaces) == (old_ref.seq + 1, old_ref.manifest)
    else:
        assert store.ref(2) == old_ref, "the old commit must stay untouched until the CAS lands"
    _assert_committed(store, expected)
    point.assert_landed(_chunks(store) - before)

    info = _save(store, 2, NEW, overwrite=True)  # the rerun replaces whatever is there
    assert info.seq == store.ref(2).seq == old_ref.seq + (2 if point.committed else 1)
    expected[2] = NEW
    _collect_after_crash(store, crash, expected, dead_lease=True)


# -- retention ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetentionPoint:
    name: str
    kill: KillPoint
    deleted: int  # step refs deleted before the kill (ascending: steps 1..deleted)
    save_step: int | None = None  # retention run by save(save_step, keep_last=2), not alone


RETENTION_POINTS = [
    RetentionPoint("before-first-delete", KillPoint("delete", STEP_REF, "before"), 0),
    RetentionPoint("mid-deletes", KillPoint("delete", STEP_REF, "after", skip=1), 2),
    RetentionPoint("save-then-mid-deletes", KillPoint("delete", STEP_REF, "after", skip=2), 3, save_step=6),
]


@pytest.mark.parametrize("point", RETENTION_POINTS, ids=lambda p: p.name)
def test_retention_killed_mid_ref_deletes(shared_store_url: str, point: RetentionPoint) -> None:
    url = shared_store_url
    store = _open(url)
    expected = {step: step for step in range(1, 6)}
    for step, tag in expected.items():
        _save(store, step, tag)

    if point.save_step is None:
        crash = run_crash(_spec(url, "retention", point.kill, keep_last=2))
    else:
        crash = run_crash(_spec(url, "save", point.kill, step=point.save_step, tag=point.save_step, keep_last=2))
        expected[point.save_step] = point.save_step  # retention runs only after the commit
    for step in range(1, point.deleted + 1):
        del expected[step]
    _assert_committed(store, expected)

    newest = sorted(expected)[-2:]
    deleted = store.apply_retention(keep_last=2)  # the rerun finishes the pass
    assert deleted == sorted(set(expected) - set(newest))
    expected = {step: expected[step] for step in newest}
    _collect_after_crash(store, crash, expected, dead_lease=False)


# -- gc ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GCPoint:
    name: str
    kill: KillPoint
    deleted: int | None  # garbage objects deleted before the kill; None: all of it


GC_POINTS = [
    GCPoint("after-lock", KillPoint("put", GC_LOCK, "after"), 0),
    GCPoint("after-epoch-bump", KillPoint("put", EPOCH, "after"), 0),
    GCPoint("mid-sweep", KillPoint("delete", r"^(chunks|manifests)/", "after", skip=2), 3),
    GCPoint("before-final-epoch-bump", KillPoint("put", EPOCH, "before", skip=1), None),
]


@pytest.mark.parametrize("point", GC_POINTS, ids=lambda p: p.name)
def test_gc_killed_mid_sweep(shared_store_url: str, point: GCPoint) -> None:
    url = shared_store_url
    store = _open(url)
    for step in range(1, 4):
        _save(store, step, step)
    store.tag("first", 1)  # step 1's data stays reachable through the tag
    store.delete(1)
    store.delete(2)
    expected, tags = {3: 3}, {"first": 1}
    garbage = _objects(store) - _reachable(store)
    assert len(garbage) == NEW_CHUNKS + 1, "step 2's chunks and manifest"

    crash = run_crash(_spec(url, "gc", point.kill))

    left = _objects(store) - _reachable(store)
    assert len(garbage - left) == (len(garbage) if point.deleted is None else point.deleted)
    _assert_committed(store, expected, tags)
    # A save right after must commit although the dead gc's lock and epoch still say
    # "running": it waits at most until the lock is stale.
    started = time.monotonic()
    _save(store, 4, 4)
    assert time.monotonic() - started < _stale_after(url) + 10
    expected[4] = 4
    # The rerun: a later gc takes the stale lock over and finishes the sweep.
    _collect_after_crash(store, crash, expected, dead_lease=False, tags=tags)


def test_a_gc_killed_on_this_machine_holds_up_nothing(shared_store_url: str) -> None:
    """With the default 600 s lease TTL: a gc SIGKILLed after its epoch bump leaves a fresh
    lock and a "running" epoch, yet its holder provably died here (ckptstore.liveness), so a
    save commits at once and the next gc takes the lock over instead of standing down."""
    url = shared_store_url
    store = ckptstore.open(url, chunking=ckptstore.ChunkingPolicy(*CHUNKING))
    _save(store, 1, 1)
    store.delete(1)
    crash = run_crash(_spec(url, "gc", KillPoint("put", EPOCH, "after"), lease_ttl=600.0))
    assert crash.died_at and read_epoch(store.backend)[0].running
    assert store.backend.exists("locks/gc")
    started = time.monotonic()
    _save(store, 2, 2)
    assert time.monotonic() - started < 15, "the save waited for the dead gc's lock to go stale"
    report = store.gc(min_age=0)
    assert report.ran, report  # took the dead gc's lock over
    assert not read_epoch(store.backend)[0].running
    _assert_committed(store, {2: 2}, {})


# -- S3: a save killed mid multipart upload ------------------------------------------------------

def test_save_killed_mid_multipart_upload_leaves_an_upload_gc_aborts(s3_server: Any, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/store"
    store = _open(url)
    _save(store, 1, 1)
    # 64 KiB chunks above a 32 KiB multipart threshold (S3Backend options, passed as
    # storage_options): the first chunk put becomes an upload of 16 KiB parts, and the child
    # dies after its 2nd part. Parts under 5 MiB would be refused at completion
    # (EntityTooSmall, on SeaweedFS as on AWS), but this upload is never completed.
    elements, chunking = 64 << 10, (64 << 10, 1024, 4 << 10)
    crash = run_crash(_spec(url, "save", None, kill_after_upload_parts=2, step=2, tag=2, elements=elements,
                            chunking=chunking,
                            storage_options={"multipart_threshold": 32 << 10, "part_size": 16 << 10}))

    (pending,) = _unfinished_uploads(url)
    assert pending.startswith("store/chunks/")
    chunk = pending[len("store/"):]
    assert chunk not in _chunks(store) and not store.backend.exists(chunk), "an unfinished upload is invisible"
    _assert_committed(store, {1: 1})

    time.sleep(max(0.0, crash.died_at + _stale_after(url) - time.time()))
    young = store.gc(min_age=3600)  # younger than the safe age max(min_age, lease TTL): kept
    assert young.ran and young.staging_removed == 0 and _unfinished_uploads(url) == [pending]
    report = store.gc(min_age=0)  # older than max(0, lease TTL): aborted
    assert report.ran and report.staging_removed == 1, report
    assert _unfinished_uploads(url) == []

    rerun = ckptstore.open(url, chunking=ckptstore.ChunkingPolicy(*chunking), lease_ttl=TTL)
    rerun.save(2, state_for(2, elements=elements))  # default threshold: single-request puts
    _collect_after_crash(store, crash, {1: 1, 2: 2}, dead_lease=True)


# -- the driver itself ---------------------------------------------------------------------------

def test_crash_driver_reproduces_a_point_from_the_command_line(tmp_path) -> None:
    url = str(tmp_path / "store")
    _save(_open(url), 1, 1)
    spec = _spec(url, "save", KillPoint("put", STEP_REF, "before"), step=2, tag=2)
    proc = subprocess.run([sys.executable, "-m", "ckptstore.testing.crash", spec.to_json()],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _open(url).steps() == [1]
    assert CrashSpec.from_json(spec.to_json()) == spec
