"""gc's mark cache (issue 13, ckptstore/gccache.py): a repeated gc with nothing new reads no
ref and no manifest; k new steps cost k of each; whatever the cache holds is trusted only
under a key that cannot lie (a manifest digest, or a ref version the listing shows again on a
backend whose versions never repeat), and any doubt about a cache file is a read."""

from __future__ import annotations

import hashlib
import os
import struct
import time
import zlib
from collections import Counter
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore import keys
from ckptstore.gc import MARK_FORMAT, GCReport
from ckptstore.gccache import SETTLED_SECONDS, MarkCache, cache_dir, versions_identify_bytes
from ckptstore.manifest import decode_ref, encode_ref
from ckptstore.testing.wrappers import CountingBackend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

CHUNKS = ckptstore.ChunkingPolicy(chunk_size=4 << 10, small_tensor_limit=256, pack_size=1024)


def _state(seed: int) -> dict[str, torch.Tensor]:
    """A chunk shared by every step, and one of the step's own."""
    return {"shared": torch.arange(1024, dtype=torch.float32),
            "own": torch.randn(1024, generator=torch.Generator().manual_seed(seed))}


def _open(url: str) -> ckptstore.Store:
    return ckptstore.open(url, chunking=CHUNKS)


def _gc(url: str, *, cache: bool = True, dry_run: bool = False) -> tuple[GCReport, Counter[tuple[str, str]]]:
    """One gc (min_age 0) through a counting backend: its report and requests by (op, first key segment)."""
    store = _open(url)
    counting = CountingBackend(store.backend)
    store.backend = counting
    with store:
        report = store.gc(min_age=0, cache=cache, dry_run=dry_run)
    assert not report.failed, report
    return report, Counter((op, key.split("/")[0]) for op, key in counting.log)


def _settle_refs(url: str) -> None:
    """On local, make every ref an hour old (os.utime), as refs of earlier runs are: gc caches a
    local ref's target only once it has settled (gccache.SETTLED_SECONDS). Elsewhere nothing."""
    if "://" in url:
        return
    past = time.time() - 3600
    for path in Path(url, keys.REFS).rglob("*"):
        if path.is_file():
            os.utime(path, (past, past))


def _assert_every_step_loads(url: str, states: dict[int | str, int]) -> None:
    """Every step (or tag) -> the seed its state was saved with still loads, bit for bit."""
    with _open(url) as store:
        for step, seed in states.items():
            loaded = store.load(step)
            expected = _state(seed)
            assert all(torch.equal(loaded[name], expected[name]) for name in expected), step


def _cache_path(url: str) -> Path:
    with _open(url) as store:
        return cache_dir() / f"gc-{hashlib.sha256(store.backend.url.encode()).hexdigest()[:32]}"


# -- (1) nothing new, (2) k new steps ----------------------------------------------------------
def test_a_repeated_gc_reads_no_ref_and_no_manifest_and_k_new_steps_cost_k(store_url: str) -> None:
    with _open(store_url) as store:
        for step in range(6):
            store.save(step, _state(step))
        store.tag("best", 2)
    _settle_refs(store_url)
    first, calls = _gc(store_url)
    assert (first.refs, first.refs_read, first.manifests_read) == (7, 7, 6)
    assert calls[("get", "refs")] == 7 and calls[("get", "manifests")] == 6
    # Each read (get_small) is one request, bytes and version together; local, whose versions
    # can repeat, confirms each version with a head after the read; S3 only where the ETag is
    # not the bytes' MD5.
    heads = {"memory": 0, "gs": 0, "s3": 0}.get(store_url.split("://")[0], 7)
    assert calls[("head", "refs")] == heads or (store_url.startswith("s3://") and calls[("head", "refs")] == 7)

    again, calls = _gc(store_url)
    assert again.ran and again.deleted_chunks == again.deleted_manifests == 0
    assert (again.reachable_manifests, again.reachable_chunks) == (first.reachable_manifests, first.reachable_chunks)
    assert calls[("get", "manifests")] == 0 and again.manifests_read == 0
    assert calls[("get", "refs")] == calls[("head", "refs")] == 0 and again.refs_read == 0
    assert calls[("list", "chunks")] == calls[("list", "manifests")] == 256, "the sweep still lists every folder"

    with _open(store_url) as store:
        for step in (6, 7, 8):
            store.save(step, _state(step))
        chunks_of_1 = {keys.chunk_key(c.digest) for c in store.manifest(store.ref(1).manifest).chunks}
        store.delete(1)  # its own chunk becomes garbage
    later, calls = _gc(store_url)
    assert calls[("get", "manifests")] == 3 and later.manifests_read == 3
    assert calls[("get", "refs")] == later.refs_read == 3
    assert later.deleted_manifests == 1 and later.deleted_chunks == 1
    with _open(store_url) as store:
        assert len(chunks_of_1 - {o.key for o in store.backend.list(keys.CHUNKS)}) == 1
    _assert_every_step_loads(store_url, {0: 0, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, "best": 2})
    uncached, calls = _gc(store_url, cache=False)
    assert (uncached.reachable_manifests, uncached.reachable_chunks) == (later.reachable_manifests,
                                                                          later.reachable_chunks)
    assert calls[("get", "refs")] == 9 and calls[("get", "manifests")] == 8 and uncached.deleted_chunks == 0


# -- (3) a ref rewritten in place --------------------------------------------------------------
def test_a_ref_rewritten_in_place_is_read_again_and_its_new_chunks_kept(store_url: str) -> None:
    """If gc trusted a cached target by key alone, it would mark step 1's old manifest and
    delete the chunk of its new one: the load below would fail."""
    with _open(store_url) as store:
        for step in range(3):
            store.save(step, _state(step))
        old = store.ref(1).manifest
    _settle_refs(store_url)
    _gc(store_url)
    with _open(store_url) as store:
        store.save(1, _state(100), overwrite=True)  # same key, new bytes, new version
        new = store.ref(1).manifest
    assert new != old
    report, calls = _gc(store_url)
    assert calls[("get", "refs")] == 1
    assert calls[("get", "manifests")] == 1  # the new manifest; the others are cached
    assert report.deleted_manifests == 1 and report.deleted_chunks == 1  # the old manifest and its own chunk
    with _open(store_url) as store:
        assert not store.backend.exists(keys.manifest_key(old)) and store.backend.exists(keys.manifest_key(new))
    _assert_every_step_loads(store_url, {0: 0, 1: 100, 2: 2})


def _forge_crc32(data: bytes, at: int, target: int) -> bytes:
    """`data` with its 4 bytes at `at` changed so that its CRC32 is `target` (CRC32 is affine
    over GF(2): solve for the 32 bits)."""
    base = bytearray(data)
    base[at:at + 4] = bytes(4)
    zero = zlib.crc32(base)
    basis: dict[int, tuple[int, int]] = {}  # leading bit -> (effect on the CRC, bits flipped)
    for bit in range(32):
        flipped = bytearray(base)
        flipped[at + bit // 8] ^= 1 << (bit % 8)
        effect, combo = zlib.crc32(flipped) ^ zero, 1 << bit
        while effect:
            lead = effect.bit_length() - 1
            if lead not in basis:
                basis[lead] = (effect, combo)
                break
            effect, combo = effect ^ basis[lead][0], combo ^ basis[lead][1]
    want, combo = zero ^ target, 0
    while want:
        effect, bits = basis[want.bit_length() - 1]
        want, combo = want ^ effect, combo ^ bits
    for bit in range(32):
        if combo >> bit & 1:
            base[at + bit // 8] ^= 1 << (bit % 8)
    assert zlib.crc32(base) == target
    return bytes(base)


def test_a_local_version_can_repeat_and_gc_reads_such_a_ref_again(tmp_path: Path) -> None:
    """The local backend's version (inode, mtime ns, size, CRC32) comes back for other bytes
    when a ref is rewritten in place within one timestamp tick: here step 1's ref is made to
    name step 5's manifest with the very version it had when gc first read it. gc recorded no
    target for it then (it was younger than SETTLED_SECONDS), so it reads it again: keeps step
    5's chunk and frees step 1's old one. Had it trusted the version, it would have deleted
    the chunk the ref now needs, and step 1 would not load."""
    url = str(tmp_path / "store")
    key = keys.step_ref_key(1)
    path = Path(url, *key.split("/"))
    with _open(url) as store:
        for step, seed in ((0, 0), (1, 1), (5, 100)):
            store.save(step, _state(seed))
        first = store.ref(1)
        target = store.ref(5).manifest
        listed_before = {info.key: info.version for info in store.backend.list(keys.REFS)}
    report, calls = _gc(url)
    assert calls[("get", "refs")] == 3 and report.deleted_chunks == 0
    with _open(url) as store:
        store.delete(5)  # from now on only the rewritten ref 1 reaches step 5's manifest
    # Same length as the first bytes (same fields, a manifest digest of the same length), with
    # the low half of `committed` chosen so that the CRC32 is the first bytes' too.
    old_bytes = path.read_bytes()
    rewritten = encode_ref(dataclasses_replace(first, manifest=target))
    assert len(rewritten) == len(old_bytes)
    at = rewritten.index(b"\xcb" + struct.pack(">d", first.committed)) + 5
    rewritten = _forge_crc32(rewritten, at, zlib.crc32(old_bytes))
    assert decode_ref(rewritten).manifest == target
    stat = path.stat()
    with open(path, "r+b") as out:  # in place: the same inode
        out.write(rewritten)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same tick
    with _open(url) as store:
        listed = {info.key: info.version for info in store.backend.list(keys.REFS)}
    assert listed[key] == listed_before[key], "the version came back for other bytes"

    report, calls = _gc(url)
    _assert_every_step_loads(url, {0: 0, 1: 100})
    assert report.deleted_chunks == 1 and report.deleted_manifests == 1  # step 1's first chunk and manifest
    with _open(url) as store:
        assert not store.backend.exists(keys.manifest_key(first.manifest))
    assert calls[("get", "refs")] == 2  # both refs are still young: neither was cached
    assert not versions_identify_bytes(url) and not versions_identify_bytes(f"file://{url}")
    assert versions_identify_bytes("s3://b/p") and versions_identify_bytes("gs://b/p")
    assert versions_identify_bytes("memory://x")
    assert SETTLED_SECONDS > 2  # past the coarsest filesystem timestamps (FAT: 2 s)


def _forge_ref_entry(store: ckptstore.Store, key: str, version: str, manifest: str) -> None:
    """Write the store's refs cache file with one entry, as the code would (valid checksum and identity)."""
    cache = MarkCache.open(store.backend, store._hash, MARK_FORMAT)
    assert cache is not None
    assert cache.remember_ref(key, version, manifest, modified=0.0, now=None)
    cache.save_refs()


def test_a_forged_entry_at_the_listed_version_is_what_gc_trusts_on_versioned_backends(tmp_path: Path) -> None:
    """The other side of the test above, on memory://: the version is the whole key of a ref
    entry, so an entry at another version is ignored, and one at the listed version is used."""
    url = f"memory://gc-forged-{tmp_path.name}"
    with _open(url) as store:
        for step in range(2):
            store.save(step, _state(step))
        old = store.ref(1).manifest
        stale_version = store.backend.head(keys.step_ref_key(1)).version
        store.save(1, _state(100), overwrite=True)
        _forge_ref_entry(store, keys.step_ref_key(1), stale_version, old)
    report, calls = _gc(url, dry_run=True)
    assert calls[("get", "refs")] == 2  # the entry's version is not the listed one: read
    assert report.deleted_chunks == 1  # step 1's old chunk, and only that
    with _open(url) as store:
        current = store.backend.head(keys.step_ref_key(1)).version
        _forge_ref_entry(store, keys.step_ref_key(1), current, store.ref(1).manifest)
    _, calls = _gc(url, dry_run=True)
    assert calls[("get", "refs")] == 1  # step 0 only (the file now holds step 1's entry alone)


# -- (4) a damaged or foreign cache is a miss --------------------------------------------------
def _damage_chunk_file(path: Path, how: str, store: ckptstore.Store, manifest: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:-40])
    elif how == "flipped byte":  # one digest changed: only the checksum tells
        at = len(data) - 32 - 5
        path.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    elif how == "empty":
        path.write_bytes(b"")
    elif how in ("other store", "older mark format"):
        # A well-formed file (valid checksum) that lacks one of the manifest's digests, written
        # by another store's cache, or by code whose gc read manifests differently.
        other = MarkCache.open(store.backend, store._hash, MARK_FORMAT + (how == "older mark format"))
        assert other is not None
        if how == "other store":  # e.g. one deleted and created again at this URL: another marker
            other = MarkCache(other.url, "another store's identity", versions_unique=True)
        digests = sorted(c.digest for c in store.manifest(manifest).chunks)
        other.path = path.parent.parent
        other.remember_chunks(manifest, digests[1:])
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "flipped byte", "empty", "other store", "older mark format"])
@pytest.mark.parametrize("kind", ["memory", "local"])
def test_a_damaged_or_foreign_chunk_set_is_read_again(how: str, kind: str, tmp_path: Path) -> None:
    url = f"memory://gc-damage-{tmp_path.name}" if kind == "memory" else str(tmp_path / "store")
    with _open(url) as store:
        for step in range(3):
            store.save(step, _state(step))
        victim = store.ref(1).manifest
    _gc(url)
    chunk_file = _cache_path(url) / "m" / victim
    assert chunk_file.exists()
    with _open(url) as store:
        _damage_chunk_file(chunk_file, how, store, victim)
    report, calls = _gc(url)
    assert calls[("get", "manifests")] == 1 and report.manifests_read == 1
    assert report.deleted_chunks == 0
    _assert_every_step_loads(url, {0: 0, 1: 1, 2: 2})
    _, calls = _gc(url)
    assert calls[("get", "manifests")] == 0, "the file was written again"


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "other store"])
def test_a_damaged_or_foreign_refs_file_is_read_again(how: str, tmp_path: Path) -> None:
    url = f"memory://gc-refs-{tmp_path.name}"
    with _open(url) as store:
        for step in range(3):
            store.save(step, _state(step))
        old = store.ref(1).manifest
        store.save(1, _state(100), overwrite=True)
        current = store.backend.head(keys.step_ref_key(1)).version
        # What a trusted entry would be if the file were believed: step 1 -> its old manifest.
        _forge_ref_entry(store, keys.step_ref_key(1), current, old)
        refs_file = _cache_path(url) / "refs"
        data = refs_file.read_bytes()
        if how == "flipped byte":
            at = data.index(old.encode()) + 3
            refs_file.write_bytes(data[:at] + (b"0" if data[at:at + 1] != b"0" else b"1") + data[at + 1:])
        elif how == "truncated":
            refs_file.write_bytes(data[:-1])
        else:
            other = MarkCache.open(store.backend, store._hash, MARK_FORMAT)
            assert other is not None
            forged = MarkCache(url, "another store's identity", versions_unique=True)
            forged.path = other.path
            forged.remember_ref(keys.step_ref_key(1), current, old, modified=0.0, now=None)
            forged.save_refs()
    report, calls = _gc(url)
    assert calls[("get", "refs")] == 3
    assert report.deleted_chunks == 1  # step 1's old chunk, not its new one
    _assert_every_step_loads(url, {0: 0, 1: 100, 2: 2})


# -- (5) a tag ---------------------------------------------------------------------------------
def test_a_tag_on_a_cached_manifest_costs_one_ref_read_and_keeps_its_chunks(store_url: str) -> None:
    with _open(store_url) as store:
        for step in range(3):
            store.save(step, _state(step))
    _settle_refs(store_url)
    _gc(store_url)
    with _open(store_url) as store:
        store.tag("best", 1)
        store.delete(1)  # only the tag reaches step 1's manifest now
    report, calls = _gc(store_url)
    assert calls[("get", "manifests")] == 0
    assert calls[("get", "refs")] == 1
    assert report.refs == 3 and report.deleted_chunks == report.deleted_manifests == 0
    _assert_every_step_loads(store_url, {0: 0, "best": 1, 2: 2})


# -- the cache's own bookkeeping ---------------------------------------------------------------
def test_the_cache_drops_manifests_no_ref_reaches_and_no_cache_writes_none(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTSTORE_CACHE_DIR", str(tmp_path / "cache"))
    url = str(tmp_path / "store")
    with _open(url) as store:
        for step in range(3):
            store.save(step, _state(step))
        manifests = [store.ref(step).manifest for step in range(3)]
    gone = manifests[0]
    _gc(url, cache=False)
    assert not (tmp_path / "cache").exists()
    _gc(url)
    assert sorted(os.listdir(_cache_path(url) / "m")) == sorted(manifests)
    with _open(url) as store:
        store.delete(0)
    _gc(url)
    assert gone not in os.listdir(_cache_path(url) / "m") and len(os.listdir(_cache_path(url) / "m")) == 2


def test_cli_gc_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptstore.cli import EXIT_OK, main

    monkeypatch.setenv("CKPTSTORE_CACHE_DIR", str(tmp_path / "cache"))
    url = str(tmp_path / "store")
    with _open(url) as store:
        store.save(0, _state(0))
    assert main(["gc", url, "--no-cache", "--min-age", "0"]) == EXIT_OK
    assert not (tmp_path / "cache").exists()
    assert main(["gc", url, "--min-age", "0"]) == EXIT_OK
    assert (tmp_path / "cache").exists()


def test_a_ref_replaced_between_its_head_and_its_read_is_not_cached(s3_bucket: str) -> None:
    """`get_small` takes a ref's version from a head before its read, so the bytes can be newer
    than the version. On S3 a version is the bytes' MD5, so the old bytes put back give the old
    version again (ABA): had gc cached "old version -> new target", the next gc would mark the
    wrong manifest and delete step 1's chunk. gc caches a ref only if a head after the read
    shows the same version."""
    from ckptstore.testing.wrappers import HeadHookBackend

    url = f"s3://{s3_bucket}/store"
    key = keys.step_ref_key(1)
    with _open(url) as store:
        for step in range(2):
            store.save(step, _state(step))
        first_bytes = store.backend.get(key).data
        store.save(1, _state(100), overwrite=True)
        second_bytes = store.backend.get(key).data
        store.backend.put(key, first_bytes)  # step 1 is its first state again
        if store.backend.head(key).version != hashlib.md5(first_bytes).hexdigest().join('""'):
            pytest.skip("this S3 server's ETags are not the MD5 of the bytes: the old version cannot come back")

        inner = store.backend
        store.backend = HeadHookBackend(inner, key=key, after=lambda: inner.put(key, second_bytes))
        assert store.gc(dry_run=True, min_age=0).refs_read == 2  # read the second bytes under the first version
        inner.put(key, first_bytes)  # back to the first bytes, and so to the first version
    report, _ = _gc(url)
    assert report.refs_read == 1 and report.deleted_chunks == 1  # step 1's second own chunk
    _assert_every_step_loads(url, {0: 0, 1: 1})


def test_a_dcp_step_in_manifest_v2_is_cached_whole(tmp_path: Path) -> None:
    """A v2 root's chunk set includes its part and chunk-table blobs, which gc reads as chunks:
    cached, a repeated gc reads neither the root nor a table."""
    from ckptstore import dcp
    from ckptstore.manifestv2 import manifest_version

    url = f"memory://gc-dcp-{tmp_path.name}"
    with _open(url) as store:
        dcp.save({"model": _state(1)}, store, 5)
        store.save(6, _state(6))
        assert manifest_version(store.backend.get(keys.manifest_key(store.ref(5).manifest)).data) == 2
    first, calls = _gc(url)
    assert first.manifests_read == 2 and calls[("get", "chunks")] >= 1  # the root's chunk table
    again, calls = _gc(url)
    assert calls[("get", "manifests")] == calls[("get", "chunks")] == calls[("get", "refs")] == 0
    assert (again.reachable_manifests, again.reachable_chunks, again.deleted_chunks) == \
        (first.reachable_manifests, first.reachable_chunks, 0)
    uncached, _ = _gc(url, cache=False)
    assert uncached.reachable_chunks == first.reachable_chunks and uncached.deleted_chunks == 0
