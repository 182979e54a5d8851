"""gc at scale (issue 13): batch deletes (`Backend.delete_many`), the fan-out listing of chunks/
and manifests/ 256 folders at a time, and the safety both keep: a proof of locks/gc before every
batch request, no sweep after a failed listing, every failed key reported."""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptstore.gc as gc_module
from ckptstore import keys
from ckptstore.backends.base import OVERWRITE, Backend, Buffer, DeleteFailures, PutMode
from ckptstore.backends.memory import MemoryBackend, drop_memory_space
from ckptstore.backends.s3 import S3Backend
from ckptstore.chunking import ChunkingPolicy
from ckptstore.deadline import seconds_left
from ckptstore.errors import PermissionDeniedError, TransientError
from ckptstore.gc import list_content_keys
from ckptstore.gclock import GC_LOCK
from ckptstore.retry import RetryingBackend
from ckptstore.store import Store
from ckptstore.testing.faults import Fault, FaultInjectingBackend
from ckptstore.testing.servers import S3Server
from ckptstore.testing.wrappers import ForwardingBackend
from ckptstore.url import open_backend

SMALL = ChunkingPolicy(chunk_size=64)


@pytest.fixture
def space() -> Iterator[str]:
    name = uuid.uuid4().hex
    yield name
    drop_memory_space(name)


def _digest(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _store(backend: Backend, ttl: float = 600.0) -> Store:
    store = Store(backend, chunking=SMALL, lease_ttl=ttl)
    store.marker  # noqa: B018 - create the store
    return store


def _store_with_garbage(backend: Backend) -> tuple[Store, set[str]]:
    """A store whose step 0 is live and whose steps 1-3 were deleted; returns the live objects."""
    store = _store(backend)
    store.save(0, {"w": torch.arange(64.0)})
    for step in range(1, 4):
        store.save(step, {"w": torch.arange(64.0) + step})
        store.delete(step)
    ref = store.ref(0)
    live = {keys.manifest_key(ref.manifest)} | {keys.chunk_key(c.digest) for c in store.manifest(ref.manifest).chunks}
    return store, live


def _content_objects(backend: Backend) -> set[str]:
    return {o.key for prefix in (keys.CHUNKS, keys.MANIFESTS) for o in backend.list(prefix)}


# -- the fan-out listing ---------------------------------------------------------------------
def test_the_concurrent_listing_equals_the_serial_one(store_url: str) -> None:
    backend = open_backend(store_url)
    try:
        canonical = {keys.chunk_key(_digest(i)) for i in range(60)} | {keys.manifest_key(_digest(-i)) for i in range(5)}
        stray = {"chunks/zz/" + _digest(1), "chunks/" + _digest(2), "chunks/ab/" + "cd" + _digest(3)[2:],
                 "chunks/ab/notes.txt", "manifests/" + _digest(4)}
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda key: backend.put(key, key.encode()), canonical | stray))
        for prefix in (keys.CHUNKS, keys.MANIFESTS):
            serial = sorted((i.key, i.size) for i in backend.list(prefix) if i.key in canonical)
            concurrent = sorted((i.key, i.size) for i in list_content_keys(backend, prefix, threads=7))
            assert concurrent == serial
            assert {key for key, _ in concurrent} == {k for k in canonical if k.startswith(prefix)}
    finally:
        backend.close()


def test_gc_deletes_only_keys_in_their_own_fan_out_folder(space: str) -> None:
    """A hex name in the wrong folder (or none) is not something this store wrote: kept."""
    inner = MemoryBackend(space)
    store, live = _store_with_garbage(inner)
    stray = {"chunks/ab/cd" + _digest(3)[2:], "chunks/zz/" + _digest(1), "chunks/" + _digest(2)}
    for key in stray:
        inner.put(key, b"not ours")
    report = store.gc(min_age=0)
    assert report.ran and report.deleted_chunks > 0, report
    assert _content_objects(inner) == live | stray


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_listing_error_in_one_folder_fails_gc_closed(space: str, dry_run: bool) -> None:
    inner = MemoryBackend(space)
    _, live = _store_with_garbage(inner)
    before = _content_objects(inner)
    assert before != live
    view = FaultInjectingBackend(inner, [Fault("list", key=r"^chunks/7f/", error=PermissionDeniedError)])
    report = _store(view).gc(min_age=0, dry_run=dry_run)
    assert not report.ran and report.failed and report.list_errors, report
    assert "PermissionDeniedError" in report.list_errors[0] and "listing" in report.reason
    assert report.deleted_chunks == report.deleted_manifests == 0
    assert _content_objects(inner) == before
    assert view.fired(view.faults[0]) == 1


# -- batches ---------------------------------------------------------------------------------
def test_a_failed_delete_in_a_batch_is_reported_and_its_object_kept(space: str) -> None:
    inner = MemoryBackend(space)
    _, live = _store_with_garbage(inner)
    garbage = sorted(_content_objects(inner) - live)
    victim = next(k for k in garbage if k.startswith(keys.CHUNKS))
    view = FaultInjectingBackend(inner, [Fault("delete", key=f"^{victim}$", error=PermissionDeniedError)])
    report = _store(view).gc(min_age=0)
    assert report.failed and len(report.delete_failures) == 1, report
    assert report.delete_failures[0].startswith(f"{victim}: PermissionDeniedError")
    assert report.reason == "1 object(s) could not be deleted and were kept (delete_failures)"
    assert report.deleted_chunks + report.deleted_manifests == len(garbage) - 1
    assert _content_objects(inner) == live | {victim}


class _Recording(ForwardingBackend):
    """Logs each proof of locks/gc and each batch delete (with the deadline it runs under)."""

    def __init__(self, inner: Backend):
        super().__init__(inner)
        self.log: list[tuple[str, Any]] = []

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        version = super().put(key, data, mode=mode)
        if key == GC_LOCK:
            self.log.append(("prove", None))
        return version

    def delete_many(self, keys: Sequence[str]) -> DeleteFailures:
        self.log.append(("batch", (len(keys), seconds_left())))
        return super().delete_many(keys)


def test_every_batch_starts_with_a_proof_and_must_end_within_a_quarter_ttl(
        space: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc_module, "DELETE_BATCH", 2)
    inner = MemoryBackend(space)
    _, live = _store_with_garbage(inner)
    garbage = len(_content_objects(inner) - live)
    view = _Recording(inner)
    ttl = 600.0
    report = _store(view, ttl).gc(min_age=0)
    assert report.ran and report.deleted_chunks + report.deleted_manifests == garbage
    batches = [i for i, (what, _) in enumerate(view.log) if what == "batch"]
    assert len(batches) == math.ceil(garbage / 2)
    for i in batches:
        size, left = view.log[i][1]
        assert view.log[i - 1][0] == "prove" and 1 <= size <= 2
        assert left is not None and left <= ttl / 4


def test_the_batch_size_is_the_backends_when_smaller(space: str) -> None:
    inner = MemoryBackend(space)
    _, live = _store_with_garbage(inner)
    garbage = len(_content_objects(inner) - live)
    view = _Recording(inner)
    view.max_delete_batch = 3
    assert _store(view).gc(min_age=0).ran
    assert [entry[1][0] for entry in view.log if entry[0] == "batch"] == [3] * (garbage // 3) + (
        [garbage % 3] if garbage % 3 else [])


# -- the retry layer -------------------------------------------------------------------------
def test_retrying_delete_many_retries_only_the_transiently_failed_keys(space: str) -> None:
    inner = MemoryBackend(space)
    for key in ("many/a", "many/b", "many/c"):
        inner.put(key, b"x")
    faulty = FaultInjectingBackend(inner, [Fault("delete", key="^many/b$", error=TransientError, times=2),
                                           Fault("delete", key="^many/c$", error=PermissionDeniedError)])
    retrying = RetryingBackend(faulty, attempts=5, sleep=lambda _: None)
    failures = retrying.delete_many(["many/a", "many/b", "many/c"])
    assert [(key, type(exc)) for key, exc in failures] == [("many/c", PermissionDeniedError)]
    deletes = [key for op, key in faulty.calls if op == "delete"]
    assert deletes == ["many/a", "many/b", "many/c", "many/b", "many/b"]  # c (not transient) once
    assert [o.key for o in inner.list("many/")] == ["many/c"]


def test_retrying_delete_many_returns_a_key_still_failing_when_out_of_tries(space: str) -> None:
    inner = MemoryBackend(space)
    inner.put("many/a", b"x")
    faulty = FaultInjectingBackend(inner, [Fault("delete", key="^many/a$", error=TransientError, times=None)])
    failures = RetryingBackend(faulty, attempts=3, sleep=lambda _: None).delete_many(["many/a", "many/gone"])
    assert [key for key, _ in failures] == ["many/a"]
    assert isinstance(failures[0][1], TransientError) and "3 attempts" in str(failures[0][1])
    assert inner.exists("many/a")


def test_retrying_backend_keeps_the_inner_batch_size() -> None:
    inner = MemoryBackend(uuid.uuid4().hex)
    inner.max_delete_batch = 7
    assert RetryingBackend(inner).max_delete_batch == 7


# -- S3 ----------------------------------------------------------------------------------------
def _count_delete_requests(backend: S3Backend) -> dict[str, list[int]]:
    """botocore hooks: the number of keys each DeleteObjects / DeleteObject request carried."""
    counts: dict[str, list[int]] = {"DeleteObjects": [], "DeleteObject": []}

    def many(params: dict[str, Any], **_: Any) -> None:
        counts["DeleteObjects"].append(len(params["Delete"]["Objects"]))

    def one(params: dict[str, Any], **_: Any) -> None:
        if "/chunks/" in params["Key"] or "/manifests/" in params["Key"]:
            counts["DeleteObject"].append(1)

    backend._client.meta.events.register("before-parameter-build.s3.DeleteObjects", many)
    backend._client.meta.events.register("before-parameter-build.s3.DeleteObject", one)
    return counts


def test_s3_gc_deletes_n_objects_in_ceil_n_over_1000_requests(s3_server: S3Server, s3_bucket: str) -> None:
    inner = S3Backend(s3_bucket, f"scale/{uuid.uuid4().hex[:8]}")
    try:
        store = _store(RetryingBackend(inner))
        store.save(0, {"w": torch.arange(64.0)})
        live = _content_objects(inner)
        n = 2345  # a dropped step's chunks
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: inner.put(keys.chunk_key(_digest(i)), b"x"), range(n)))
        counts = _count_delete_requests(inner)
        report = store.gc(min_age=0)
        assert report.ran and report.deleted_chunks == n and not report.failed, report
        assert counts["DeleteObjects"] == [1000, 1000, 345] and counts["DeleteObject"] == []
        assert _content_objects(inner) == live
    finally:
        inner.close()


def test_s3_delete_many_reports_each_key_a_read_only_identity_cannot_delete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptstore.testing import servers

    server = servers.start_seaweedfs(tmp_path / "weed", read_only_identity=True)
    try:
        for var in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            monkeypatch.delenv(var, raising=False)
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        bucket = server.new_bucket()
        admin = S3Backend(bucket, "ro")
        for key in ("many/a", "many/b"):
            admin.put(key, b"x")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", servers.SEAWEEDFS_READ_ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", servers.SEAWEEDFS_READ_SECRET_KEY)
        reader = S3Backend(bucket, "ro")
        failures = reader.delete_many(["many/a", "many/b", "many/missing"])
        assert [key for key, _ in failures if key != "many/missing"] == ["many/a", "many/b"]
        assert all(isinstance(error, PermissionDeniedError) for _, error in failures), failures
        assert [o.key for o in admin.list("many/")] == ["many/a", "many/b"]
        reader.close()
        admin.close()
    finally:
        server.stop()


def test_s3_delete_objects_errors_become_typed_errors_per_key() -> None:
    """DeleteObjects' answer as AWS documents it: a missing key is no failure, the rest are typed."""
    from ckptstore.backends.s3 import delete_objects_errors
    from ckptstore.errors import BackendError

    names = {"p/a": "a", "p/b": "b", "p/c": "c", "p/d": "d"}
    response = {"Errors": [{"Key": "p/a", "Code": "AccessDenied", "Message": "Access Denied"},
                           {"Key": "p/b", "Code": "NoSuchKey", "Message": "gone"},
                           {"Key": "p/c", "Code": "SlowDown", "Message": "reduce your request rate"},
                           {"Key": "p/d", "Code": "InvalidObjectState", "Message": "archived"},
                           {"Key": "p/other", "Code": "AccessDenied", "Message": "not ours"}]}
    failures = delete_objects_errors(response, names)
    assert [(key, type(error)) for key, error in failures] == [
        ("a", PermissionDeniedError), ("c", TransientError), ("d", BackendError)]
    assert delete_objects_errors({}, names) == []


# -- the reachable set -----------------------------------------------------------------------
def test_digest_set_answers_exactly_like_a_set() -> None:
    import random

    rng = random.Random(13)
    members = [rng.randbytes(32).hex() for _ in range(3000)]
    members += ["00" * 31 + "01", "00" * 32, "ab" * 31 + "00", "ab" * 31 + "0000"[:2]]  # trailing zero bytes
    members += ["cd" * 16]  # another width: kept exactly too
    others = [rng.randbytes(32).hex() for _ in range(3000)] + ["ab" * 30 + "0000", "00" * 16, "cd" * 32, "ff" * 32]
    reachable = gc_module.DigestSet()
    for start in range(0, len(members), 700):
        reachable.add(members[start:start + 700] + members[:50])  # duplicates, across merges
    reachable.freeze()
    assert len(reachable) == len(set(members))
    queries = members + others
    assert reachable.contains_each(queries) == [q in set(members) for q in queries]
    assert gc_module.DigestSet().freeze().contains_each(["00" * 32]) == [False]


def test_digest_set_merges_so_duplicates_waiting_stay_bounded() -> None:
    """Marking 10^7 chunks over many manifests that share them must not hold every repeat."""
    reachable = gc_module.DigestSet()
    manifest = [_digest(i) for i in range(20_000)]  # 640 kB raw
    for _ in range(12):  # every step's manifest names the same chunks
        reachable.add(manifest)
        assert len(reachable._pending) <= reachable._sorted.nbytes // 4 + (1 << 20) + 32 * len(manifest)
        assert len(reachable._pending) < 2 << 20
    assert len(reachable.freeze()) == len(manifest)


class _RendezvousBackend(ForwardingBackend):
    """Every read under `prefix` waits until `parties` such reads are in flight at once (a
    barrier): a mark that reads one object after the other breaks the barrier."""

    def __init__(self, inner: Backend, prefix: str, parties: int):
        super().__init__(inner)
        import threading

        self.prefix = prefix
        self.barrier = threading.Barrier(parties, timeout=20)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if key.startswith(self.prefix):
            self.barrier.wait()
        return super().get_range(key, start, length)


@pytest.mark.parametrize("prefix", ["refs/", "manifests/"])
def test_the_mark_reads_refs_and_manifests_concurrently(space: str, prefix: str) -> None:
    """8 steps: their 8 refs, then their 8 manifests, are read 4 at a time at least (the
    sequential mark broke the barrier: BrokenBarrierError after 20 s, checked)."""
    plain = _store(MemoryBackend(space))
    for step in range(8):
        plain.save(step, {"t": torch.full((4,), float(step))})
    store = _store(_RendezvousBackend(MemoryBackend(space), prefix, 4))
    report = store.gc(min_age=0, cache=False)
    assert not report.failed and report.refs == 8 and report.reachable_manifests == 8
