"""Garbage collection, retention, tags and leases, on every backend."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import ckptstore
from ckptstore import keys
from ckptstore.leases import Lease
from ckptstore.store import Store
from ckptstore.testing.wrappers import CountingBackend, GatedDeleteBackend, HeadHookBackend

CHUNKS = ckptstore.ChunkingPolicy(chunk_size=64 << 10, small_tensor_limit=1024, pack_size=4096)


def _tensor(seed: int, kib: int = 64) -> torch.Tensor:
    return torch.randn(kib * 256, generator=torch.Generator().manual_seed(seed))  # one 64 KiB chunk


def _chunk_keys(store: Store) -> set[str]:
    return {o.key for o in store.backend.list(keys.CHUNKS)}


def test_rm_then_gc_frees_exactly_the_unshared_chunks(store_url: str) -> None:
    store = ckptstore.open(store_url, chunking=CHUNKS)
    store.save(1, {"shared": _tensor(1), "only1": _tensor(2)})
    store.save(2, {"shared": _tensor(1), "only2": _tensor(3)})
    chunks_of = {step: {c.digest for c in store.info(step).manifest.chunks} for step in (1, 2)}
    step1_manifest = store.ref(1).manifest
    sizes = {o.key: o.size for o in store.backend.list("")}
    doomed = {keys.chunk_key(d) for d in chunks_of[1] - chunks_of[2]}
    expected_bytes = sum(sizes[k] for k in doomed) + sizes[keys.manifest_key(step1_manifest)]

    before = _chunk_keys(store)
    store.delete(1)
    dry = store.gc(dry_run=True, min_age=0)
    assert (dry.deleted_chunks, dry.deleted_bytes) == (len(doomed), expected_bytes)
    assert _chunk_keys(store) == before, "a dry run deletes nothing"

    report = store.gc(min_age=0)
    assert report.ran and report.deleted_chunks == len(doomed) == 1 and report.deleted_manifests == 1
    assert report.deleted_bytes == expected_bytes
    assert _chunk_keys(store) == before - doomed
    assert torch.equal(store.load(2)["only2"], _tensor(3))
    again = store.gc(min_age=0)
    assert again.ran and again.deleted_bytes == 0, "a second gc finds no garbage"


def test_gc_keeps_young_garbage_and_stands_down_for_fresh_leases(store_url: str) -> None:
    store = ckptstore.open(store_url, chunking=CHUNKS)
    store.save(1, {"a": _tensor(1)})
    store.delete(1)
    young = store.gc(min_age=3600)
    assert young.ran and young.deleted_chunks == 0 and young.kept_young == 2  # chunk + manifest
    with Lease(store.backend, "save", "someone@elsewhere:1", ttl=600) as lease:
        blocked = store.gc(min_age=0)
        assert not blocked.ran and blocked.blocking_leases == [lease.key]
        assert [lock.name for lock in store.locks() if lock.kind == "save"] == [lease.key]
    assert store.gc(min_age=0).deleted_chunks == 1


def test_save_deduping_against_a_chunk_gc_deletes_mid_save_puts_it_back(store_url: str) -> None:
    """The race the epoch protocol exists for: a gc that listed leases before this save's
    lease existed deletes an orphaned chunk right after the save decided to reuse it."""
    base = ckptstore.open(store_url, chunking=CHUNKS)
    orphan_state = {"w": _tensor(7)}
    base.save(1, orphan_state)
    (orphan,) = _chunk_keys(base)
    base.delete(1)  # the chunk is now garbage

    gate = threading.Event()
    gc_store = Store(GatedDeleteBackend(base.backend, key=orphan, gate=gate), chunking=CHUNKS)
    reports = []
    gc_thread = threading.Thread(target=lambda: reports.append(gc_store.gc(min_age=0)))
    gc_thread.start()
    assert gc_store.backend.reached.wait(30), "gc should reach the orphan's delete"  # type: ignore[attr-defined]

    # gc is mid-sweep (it saw no lease). The save reuses the orphan, then gc deletes it.
    counting = CountingBackend(HeadHookBackend(base.backend, key=orphan, after=gate.set))
    saver = Store(counting, chunking=CHUNKS)
    info = saver.save(2, orphan_state)
    gc_thread.join(30)
    assert reports and reports[0].ran and reports[0].deleted_chunks >= 1
    assert (("put", orphan) in counting.log), "the save must re-upload the chunk gc deleted"
    assert info.step == 2
    loaded = ckptstore.open(store_url).load(2)
    assert torch.equal(loaded["w"], orphan_state["w"])


def test_retention_keeps_last_every_and_tagged(store_url: str) -> None:
    store = ckptstore.open(store_url)
    deleted: list[int] = []
    for step in range(1, 13):
        info = store.save(step, {"s": step}, keep_last=2, keep_every=5)
        deleted += info.retention_deleted
        if step == 3:
            store.tag("best", 3)
    assert store.steps() == [3, 5, 10, 11, 12]
    assert sorted(deleted) == [1, 2, 4, 6, 7, 8, 9]
    with pytest.raises(ValueError):
        store.save(13, {}, keep_last=0)


def test_tags(store_url: str) -> None:
    store = ckptstore.open(store_url, chunking=CHUNKS)
    store.save(1, {"w": _tensor(1)})
    store.save(2, {"w": _tensor(2)})
    store.tag("best", 1)
    with pytest.raises(ckptstore.TagExistsError, match="best"):
        store.tag("best", 2)
    store.tag("best", 2, overwrite=True)
    store.tag("first", 1)
    assert store.tags() == {"best": 2, "first": 1}
    assert torch.equal(store.load("first")["w"], _tensor(1))
    store.delete(1)  # the tag keeps step 1's data alive through gc
    store.gc(min_age=0)
    assert torch.equal(store.load("first")["w"], _tensor(1))
    store.untag("first")
    with pytest.raises(ckptstore.TagNotFoundError):
        store.load("first")
    assert store.gc(min_age=0).deleted_chunks == 1


def test_stale_leases_are_ignored_listed_and_cleared(store_url: str) -> None:
    store = ckptstore.open(store_url, lease_ttl=1.0)
    store.save(1, {"a": _tensor(1)})
    store.delete(1)
    store.backend.put(keys.lock_key("save-deadbeefdeadbeef"), b"\x81\xa5owner\xa8dead:123")
    time.sleep(3.2)  # past the TTL plus CLOCK_RESOLUTION (server timestamps may have 1 s resolution)
    stale = [lock for lock in store.locks() if lock.stale]
    assert [(lock.name, lock.owner) for lock in stale] == [("locks/save-deadbeefdeadbeef", "dead:123")]
    assert store.gc(min_age=0).ran, "a stale lease must not block gc"
    assert [lock.name for lock in store.clear_stale_locks()] == ["locks/save-deadbeefdeadbeef"]
    assert not any(lock.kind == "save" for lock in store.locks())


def test_gc_removes_crash_leftovers_local_staging(tmp_path) -> None:
    import os

    store = ckptstore.open(tmp_path / "s", lease_ttl=60)
    store.save(1, {"a": 1})
    leftover = tmp_path / "s" / "tmp" / "0123abcd.tmp"
    leftover.write_bytes(b"half a chunk from a killed save")
    # Younger than the lease TTL: it may belong to a put in flight, even with min_age=0.
    assert store.gc(min_age=0).staging_removed == 0 and leftover.exists()
    old = time.time() - 120
    os.utime(leftover, (old, old))
    assert store.gc(min_age=3600).staging_removed == 0 and leftover.exists()
    assert store.gc(min_age=0).staging_removed == 1 and not leftover.exists()


def test_gc_aborts_unfinished_multipart_uploads(s3_server, s3_bucket: str) -> None:
    store = ckptstore.open(f"s3://{s3_bucket}/run", lease_ttl=1.0)
    store.save(1, {"a": 1})
    client = s3_server.client()
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="run/chunks/ab/" + "ab" * 32)
    client.upload_part(Bucket=s3_bucket, Key="run/chunks/ab/" + "ab" * 32, UploadId=upload["UploadId"],
                       PartNumber=1, Body=b"x" * (5 << 20))
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    assert store.gc(min_age=3600).staging_removed == 0
    time.sleep(1.1)  # Initiated has 1 s resolution
    assert store.gc(min_age=0).staging_removed == 1
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
