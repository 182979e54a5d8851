"""copy_steps: between every pair of backends, chunk by chunk, never propagating corruption,
committing exactly as save does."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptstore
from ckptstore import keys
from ckptstore.backends.base import OVERWRITE
from ckptstore.chunkblob import Compression
from ckptstore.chunking import ChunkingPolicy
from ckptstore.copy import IncompatibleStoresError, copy_steps
from ckptstore.store import Store
from ckptstore.testing.wrappers import HeadHookBackend
from ckptstore.verify import verify

SMALL = ChunkingPolicy(chunk_size=4096, small_tensor_limit=1024, pack_size=4096)


def fill(store: Store) -> dict[int, Any]:
    """Three steps sharing a 32 KiB tensor; returns the states saved."""
    shared = torch.arange(8192, dtype=torch.float32)
    states = {}
    for i, step in enumerate((100, 200, 300)):
        states[step] = {"w": shared, "opt": {0: {"m": torch.full((1500,), float(i))}}, "lr": 0.1 * i,
                        "t": (step, b"raw", None)}
        store.save(step, states[step], metadata={"i": i})
    return states


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def distinct_chunks(store: Store) -> dict[str, int]:
    return {c.digest: c.stored_size for s in store.steps() for c in store.info(s).manifest.chunks}


def test_cp_round_trips_local_s3_gcs_local(tmp_path: Path, s3_bucket: str, gcs_bucket: str) -> None:
    src = ckptstore.open(str(tmp_path / "a"), chunking=SMALL)
    states = fill(src)
    chunks = distinct_chunks(src)
    hops = [src, ckptstore.open(f"s3://{s3_bucket}/run"), ckptstore.open(f"gs://{gcs_bucket}/run"),
            ckptstore.open(str(tmp_path / "b"))]
    for a, b in itertools.pairwise(hops):
        report = copy_steps(a, b)
        assert report.steps == [100, 200, 300]
        # Shared chunks travel once.
        assert report.chunks_copied == len(chunks) and report.chunks_skipped == 0
        assert report.bytes_copied == sum(chunks.values())
        for step, state in states.items():
            assert_same(state, b.load(step))
            assert b.info(step).manifest.metadata == {"i": step // 100 - 1}
            assert b.ref(step).manifest == src.ref(step).manifest  # same content-addressed manifest
        assert verify(b, deep=True).ok

    again = copy_steps(src, hops[1], overwrite=True)
    assert again.bytes_copied == 0 and again.chunks_copied == 0 and again.chunks_skipped == len(chunks)
    assert again.steps == [100, 200, 300] and hops[1].ref(100).seq == 2
    skipped = copy_steps(src, hops[2], skip_existing=True)
    assert skipped.steps == [] and skipped.bytes_copied == 0


def test_cp_into_an_existing_step_needs_overwrite(store_url: str, tmp_path: Path) -> None:
    src = ckptstore.open(str(tmp_path / "src"), chunking=SMALL)
    states = fill(src)
    dst = ckptstore.open(store_url, chunking=SMALL)
    theirs = {"other": torch.ones(3)}
    dst.save(200, theirs)
    listed_before = sorted(info.key for info in dst.backend.list(keys.CHUNKS))

    with pytest.raises(ckptstore.StepExistsError) as caught:
        copy_steps(src, dst)
    assert caught.value.step == 200
    assert dst.steps() == [200]  # nothing committed,
    assert sorted(info.key for info in dst.backend.list(keys.CHUNKS)) == listed_before  # nothing copied
    assert_same(theirs, dst.load(200))

    report = copy_steps(src, dst, [200, 300], overwrite=True)
    assert report.steps == [200, 300]
    assert_same(states[200], dst.load(200))
    assert dst.ref(200).seq == 2 and dst.ref(300).seq == 1


def test_corrupt_source_chunk_is_never_copied_nor_committed(tmp_path: Path, s3_bucket: str) -> None:
    src = ckptstore.open(str(tmp_path / "src"), chunking=SMALL)
    fill(src)
    own = {c.digest for c in src.info(200).manifest.chunks} - {c.digest for c in src.info(100).manifest.chunks}
    bad = keys.chunk_key(sorted(own)[0])
    blob = bytearray(src.backend.get(bad).data)
    blob[-1] ^= 0xFF  # same size: only a hash check finds it
    src.backend.put(bad, bytes(blob), mode=OVERWRITE)

    dst = ckptstore.open(f"s3://{s3_bucket}/copy")
    with pytest.raises(ckptstore.IntegrityError, match=bad):
        copy_steps(src, dst)
    assert dst.steps() == [100]  # copied before the bad step; 200 is not committed
    assert not dst.backend.exists(bad)
    assert not dst.backend.exists(keys.manifest_key(src.ref(200).manifest))


def test_corrupt_source_manifest_is_an_integrity_error(tmp_path: Path) -> None:
    src = ckptstore.open(str(tmp_path / "src"))
    src.save(1, {"x": torch.ones(4)})
    key = keys.manifest_key(src.ref(1).manifest)
    data = bytearray(src.backend.get(key).data)
    data[-1] ^= 0x01
    src.backend.put(key, bytes(data), mode=OVERWRITE)
    dst = ckptstore.open(f"memory://{tmp_path.name}-dst")
    with pytest.raises(ckptstore.IntegrityError, match="corrupt"):
        copy_steps(src, dst)
    assert dst.steps() == []


def test_stores_with_different_hash_algorithms_are_refused(tmp_path: Path) -> None:
    src = ckptstore.open(str(tmp_path / "sha"), hash_algorithm="sha256")
    src.save(1, {"x": torch.ones(2)})
    dst = ckptstore.open(str(tmp_path / "b3"))
    with pytest.raises(IncompatibleStoresError, match="sha256"):
        copy_steps(src, dst)
    assert isinstance(IncompatibleStoresError("x"), ckptstore.CkptStoreError)
    with pytest.raises(ckptstore.StepNotFoundError):
        copy_steps(src, ckptstore.open(str(tmp_path / "sha2"), hash_algorithm="sha256"), [7])


def test_destination_with_differently_compressed_chunks_gets_a_consistent_manifest(tmp_path: Path) -> None:
    state = {"w": torch.zeros(4096), "b": torch.arange(100)}  # compresses well
    src = ckptstore.open(str(tmp_path / "src"), chunking=SMALL, compression=Compression("zstd"))
    src.save(1, state)
    dst = ckptstore.open(str(tmp_path / "dst"), chunking=SMALL)  # stores the same chunks uncompressed
    dst.save(9, state)
    report = copy_steps(src, dst)
    assert report.chunks_copied == 0 and report.manifests_rewritten == 1
    assert dst.ref(1).manifest != src.ref(1).manifest
    assert verify(dst, deep=True).ok  # sizes in the manifest match the destination's blobs
    assert_same(state, dst.load(1))


def test_copy_holds_a_save_lease_so_gc_cannot_sweep_what_it_deduplicated(tmp_path: Path) -> None:
    state = {"w": torch.arange(2048, dtype=torch.float32)}
    src = ckptstore.open(str(tmp_path / "src"), chunking=SMALL)
    src.save(1, state)
    dst = ckptstore.open(str(tmp_path / "dst"), chunking=SMALL)
    dst.save(5, state)
    dst.delete(5)  # its chunks are now garbage that the copy will find present and reuse
    reused = keys.chunk_key(src.info(1).manifest.chunks[0].digest)
    reports = []
    hooked = Store(HeadHookBackend(dst.backend, key=reused,
                                   after=lambda: reports.append(dst.gc(min_age=0.0))), create=False)
    copy = copy_steps(src, hooked)
    assert copy.chunks_skipped == len(src.info(1).manifest.chunks) and copy.chunks_copied == 0
    assert len(reports) == 1 and not reports[0].ran and reports[0].deleted_chunks == 0
    assert verify(dst, deep=True).ok
    assert_same(state, dst.load(1))


def test_copy_puts_back_a_chunk_a_gc_swept_after_the_copy_found_it(tmp_path: Path) -> None:
    """A gc that listed leases before the copy's lease existed deletes a garbage chunk right
    after the copy decided to reuse it: the copy must notice (gc epoch) and copy it again."""
    import threading

    from ckptstore.testing.wrappers import GatedDeleteBackend

    state = {"w": torch.arange(1024, dtype=torch.float32)}  # one 4 KiB chunk
    src = ckptstore.open(str(tmp_path / "src"), chunking=SMALL)
    src.save(1, state)
    (orphan,) = [keys.chunk_key(c.digest) for c in src.info(1).manifest.chunks]
    dst_url = f"memory://{tmp_path.name}-swept"
    dst = ckptstore.open(dst_url, chunking=SMALL)
    dst.save(5, state)
    dst.delete(5)  # garbage now

    gate = threading.Event()
    gc_store = Store(GatedDeleteBackend(dst.backend, key=orphan, gate=gate), create=False)
    reports: list[Any] = []
    gc_thread = threading.Thread(target=lambda: reports.append(gc_store.gc(min_age=0.0)))
    gc_thread.start()
    assert gc_store.backend.reached.wait(30)  # type: ignore[attr-defined]

    copier = Store(HeadHookBackend(dst.backend, key=orphan, after=gate.set), create=False)
    report = copy_steps(src, copier)
    gc_thread.join(30)
    assert reports and reports[0].ran and reports[0].deleted_chunks >= 1
    assert report.steps == [1] and report.bytes_copied > 0  # the swept chunk travelled after all
    assert verify(ckptstore.open(dst_url), deep=True).ok
    assert_same(state, ckptstore.open(dst_url).load(1))


# -- tags, reruns, and a source that is only read (issue 14) -----------------------------------------


def tag_steps(store: Store) -> None:
    store.tag("first", 100)
    store.tag("best", 200)


@pytest.mark.parametrize("pair", ["local->s3", "memory->memory"])
def test_cp_copies_the_tags_of_copied_steps(pair: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if pair == "local->s3":
        src = ckptstore.open(str(tmp_path / "src"), chunking=SMALL)
        dst = ckptstore.open(f"s3://{request.getfixturevalue('s3_bucket')}/run")
    else:
        src = ckptstore.open(f"memory://{tmp_path.name}-src", chunking=SMALL)
        dst = ckptstore.open(f"memory://{tmp_path.name}-dst")
    states = fill(src)
    tag_steps(src)
    report = copy_steps(src, dst, [200, 300])  # "first" names a step not copied: it stays behind
    assert report.steps == [200, 300] and report.tags == ["best"] and report.as_dict()["tags"] == ["best"]
    assert dst.tags() == {"best": 200}
    assert_same(states[200], dst.load("best"))
    assert dst.ref("best").manifest == src.ref("best").manifest

    again = copy_steps(src, dst)  # 200 and 300 are there, 100 and its tag travel now
    assert again.steps == [100] and again.already_there == [200, 300]
    assert again.tags == ["first"] and again.tags_already_there == ["best"]
    assert dst.tags() == {"best": 200, "first": 100}


def test_cp_without_tags_copies_none(tmp_path: Path) -> None:
    src = ckptstore.open(str(tmp_path / "src"), chunking=SMALL)
    fill(src)
    tag_steps(src)
    dst = ckptstore.open(f"memory://{tmp_path.name}-dst")
    report = copy_steps(src, dst, tags=False)
    assert report.steps == [100, 200, 300] and report.tags == []
    assert dst.tags() == {}


def test_a_tag_the_destination_has_on_another_step_needs_overwrite(tmp_path: Path) -> None:
    src = ckptstore.open(str(tmp_path / "src"), chunking=SMALL)
    states = fill(src)
    tag_steps(src)
    dst = ckptstore.open(str(tmp_path / "dst"), chunking=SMALL)
    dst.save(7, {"x": torch.ones(2)})
    dst.tag("best", 7)

    with pytest.raises(ckptstore.TagExistsError, match="'best' already names step 7"):
        copy_steps(src, dst)
    assert dst.steps() == [7] and dst.tags() == {"best": 7}  # refused before anything was copied

    kept = copy_steps(src, dst, skip_existing=True)
    assert kept.steps == [100, 200, 300] and kept.tags == ["first"] and kept.tags_skipped == ["best"]
    assert dst.tags() == {"best": 7, "first": 100}

    moved = copy_steps(src, dst, overwrite=True)
    assert moved.tags == ["best"] and moved.tags_already_there == ["first"]
    assert dst.tags() == {"best": 200, "first": 100}
    assert_same(states[200], dst.load("best"))


def test_a_tag_on_an_older_commit_of_its_step_is_not_copied(tmp_path: Path) -> None:
    src = ckptstore.open(str(tmp_path / "src"), chunking=SMALL)
    src.save(1, {"x": torch.zeros(3)})
    src.tag("old", 1)
    src.save(1, {"x": torch.ones(3)}, overwrite=True)  # the tag still names the zeros
    dst = ckptstore.open(f"memory://{tmp_path.name}-dst")
    report = copy_steps(src, dst)
    assert report.steps == [1] and report.tags == [] and report.tags_skipped == ["old"]
    assert dst.tags() == {}


def test_recopying_the_same_steps_is_a_no_op_success(store_url: str, tmp_path: Path) -> None:
    src = ckptstore.open(str(tmp_path / "src"), chunking=SMALL)
    fill(src)
    dst = ckptstore.open(store_url, chunking=SMALL)
    copy_steps(src, dst)
    refs = {step: dst.ref(step) for step in dst.steps()}
    listed = sorted(info.key for info in dst.backend.list(""))

    again = copy_steps(src, dst)
    assert again.steps == [] and again.already_there == [100, 200, 300]
    assert again.chunks_copied == again.bytes_copied == 0
    assert {step: dst.ref(step) for step in dst.steps()} == refs  # not re-committed
    assert sorted(info.key for info in dst.backend.list("")) == listed  # nothing written at all


def test_recopying_into_a_destination_that_rewrote_the_manifest_is_a_no_op(tmp_path: Path) -> None:
    state = {"w": torch.zeros(4096)}
    src = ckptstore.open(str(tmp_path / "src"), chunking=SMALL, compression=Compression("zstd"))
    src.save(1, state)
    dst = ckptstore.open(str(tmp_path / "dst"), chunking=SMALL)
    dst.save(9, state)  # the same chunks, stored uncompressed: the copy re-encodes the manifest
    assert copy_steps(src, dst).manifests_rewritten == 1
    again = copy_steps(src, dst)
    assert again.steps == [] and again.already_there == [1]


def test_a_step_with_another_manifest_still_raises_step_exists(tmp_path: Path) -> None:
    src = ckptstore.open(str(tmp_path / "src"), chunking=SMALL)
    src.save(1, {"x": torch.ones(3)})
    dst = ckptstore.open(f"memory://{tmp_path.name}-dst")
    dst.save(1, {"x": torch.ones(3)})  # same state, saved separately: another manifest (its time)
    with pytest.raises(ckptstore.StepExistsError):
        copy_steps(src, dst)
    assert copy_steps(src, dst, skip_existing=True).skipped == [1]


def test_an_interrupted_copy_completes_when_run_again(tmp_path: Path) -> None:
    from ckptstore.errors import BackendError
    from ckptstore.testing.faults import Fault, FaultInjectingBackend
    from ckptstore.url import open_backend

    src = ckptstore.open(str(tmp_path / "src"), chunking=SMALL)
    states = fill(src)
    tag_steps(src)
    dst_url = f"memory://{tmp_path.name}-dst"
    # The connection drops at the second step's commit: its chunks and manifest are there, its ref is not.
    cut = Fault("put", key=r"^refs/steps/", skip=1, error=BackendError("connection lost"))
    interrupted = Store(FaultInjectingBackend(open_backend(dst_url), [cut]))
    with pytest.raises(BackendError, match="connection lost"):
        copy_steps(src, interrupted)
    dst = ckptstore.open(dst_url)
    assert dst.steps() == [100] and dst.tags() == {}

    report = copy_steps(src, dst)
    assert report.already_there == [100] and report.steps == [200, 300]
    assert report.tags == ["best", "first"]
    assert verify(dst, deep=True).ok
    for step, state in states.items():
        assert_same(state, dst.load(step))
    assert dst.tags() == {"best": 200, "first": 100}


def test_a_source_with_no_store_raises_and_nothing_is_created(tmp_path: Path) -> None:
    missing, dst_dir = tmp_path / "typo", tmp_path / "dst"
    with pytest.raises(ckptstore.StoreNotFoundError, match="typo"):
        copy_steps(ckptstore.open(str(missing)), ckptstore.open(str(dst_dir)))
    assert not missing.exists() and not dst_dir.exists()


def test_cp_reads_a_source_with_read_only_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptstore.testing import servers

    try:
        server = servers.start_seaweedfs(tmp_path / "weed", read_only_identity=True)
    except FileNotFoundError as exc:  # no weed binary here
        pytest.skip(str(exc))
    try:
        for var in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            monkeypatch.delenv(var, raising=False)
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        url = f"s3://{server.new_bucket()}/store"
        with ckptstore.open(url, chunking=SMALL) as writable:
            states = fill(writable)
            tag_steps(writable)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", servers.SEAWEEDFS_READ_ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", servers.SEAWEEDFS_READ_SECRET_KEY)
        with ckptstore.open(url) as src:
            dst = ckptstore.open(str(tmp_path / "dst"))
            report = copy_steps(src, dst)
        assert report.steps == [100, 200, 300] and report.tags == ["best", "first"]
        assert verify(dst, deep=True).ok
        assert_same(states[300], dst.load(300))
    finally:
        server.stop()


def test_overwrite_with_skip_existing_is_an_invalid_argument(tmp_path: Path) -> None:
    src = ckptstore.open(str(tmp_path / "src"))
    src.save(1, {"x": torch.ones(1)})
    with pytest.raises(ckptstore.InvalidArgumentError, match="exclude each other"):
        copy_steps(src, ckptstore.open(str(tmp_path / "dst")), overwrite=True, skip_existing=True)
    assert not (tmp_path / "dst").exists()
