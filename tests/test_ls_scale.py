"""`ckptstore ls` at scale (issue 13): every ref carries its step's summary, so ls reads one
small object per step (concurrently) and no manifest; refs written before summaries fall
back to their manifest alone."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore import keys
from ckptstore.backends.memory import drop_memory_space
from ckptstore.copy import copy_steps
from ckptstore.manifest import Ref, StepSummary, decode_manifest, encode_ref
from ckptstore.report import step_summaries
from ckptstore.testing.wrappers import CountingBackend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture
def memory_url() -> Iterator[str]:
    name = f"ls-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    drop_memory_space(name)


# Tensors over the small-tensor limit get chunks of their own, so steps share some chunks.
CHUNKING = ckptstore.ChunkingPolicy(chunk_size=128, small_tensor_limit=16, pack_size=64)


def _open(url: str) -> ckptstore.Store:
    return ckptstore.open(url, chunking=CHUNKING)


def _state(seed: int) -> dict[str, torch.Tensor]:
    return {"shared": torch.arange(64, dtype=torch.float32), "own": torch.full((32,), float(seed))}


def _manifest_summary(store: ckptstore.Store, step: int) -> tuple[int, int, int, int]:
    manifest = store.manifest(store.ref(step).manifest)
    return len(manifest.tensors), manifest.logical_bytes, manifest.stored_bytes, len(manifest.chunks)


def _counts(backend: CountingBackend) -> Counter[tuple[str, str]]:
    return Counter((op, key.split("/")[0] if op != "list" else key) for op, key in backend.log)


# -- every ref writer writes the summary -------------------------------------------------------
def test_save_overwrite_and_tag_refs_carry_the_summary(memory_url: str) -> None:
    with _open(memory_url) as store:
        first = store.save(1, _state(1))
        again = store.save(2, _state(1))  # same content: nothing uploaded
        store.save(2, _state(2), overwrite=True)
        store.tag("best", 1)
        one, two = store.ref(1).summary, store.ref(2).summary
        assert one == StepSummary(*_manifest_summary(store, 1)[:3], first.new_bytes, _manifest_summary(store, 1)[3])
        assert first.new_bytes > 0 and again.new_bytes == 0
        assert two is not None and (two.tensors, two.logical_bytes, two.stored_bytes, two.chunks) == \
            _manifest_summary(store, 2)
        assert 0 < two.new_bytes < two.stored_bytes  # "shared" was already stored
        assert store.ref("best").summary == one


def test_dcp_and_copy_refs_carry_the_summary(memory_url: str) -> None:
    from ckptstore import dcp

    with _open(memory_url) as store, ckptstore.open(f"{memory_url}-copy") as dst:
        try:
            dcp.save({"model": _state(1)}, store, 5)
            summary = store.ref(5).summary
            assert summary is not None
            assert (summary.tensors, summary.logical_bytes, summary.stored_bytes, summary.chunks) == \
                _manifest_summary(store, 5)
            assert summary.new_bytes == summary.stored_bytes  # a fresh store: every chunk uploaded
            report = copy_steps(store, dst)
            copied = dst.ref(5).summary
            assert copied is not None and copied.new_bytes == report.bytes_copied > 0
            assert (copied.tensors, copied.logical_bytes, copied.stored_bytes, copied.chunks) == \
                _manifest_summary(dst, 5)
        finally:
            drop_memory_space(f"{memory_url.removeprefix('memory://')}-copy")


# -- ls reads refs, not manifests ----------------------------------------------------------------
def _store_with_steps(url: str, steps: int) -> None:
    with _open(url) as store:
        for step in range(steps):
            store.save(step, _state(step))
        store.tag("first", 0)


def test_ls_reads_one_ref_per_step_and_no_manifest(memory_url: str) -> None:
    _store_with_steps(memory_url, 12)
    with ckptstore.open(memory_url) as plain:
        expected = [(s, *_manifest_summary(plain, s)[:3]) for s in range(12)]
    store = ckptstore.open(memory_url, create=False)
    counting = CountingBackend(store.backend)
    store.backend = counting
    rows = step_summaries(store)
    assert [(r.step, r.tensors, r.logical_bytes, r.stored_bytes) for r in rows] == expected
    assert rows[0].new_bytes == rows[0].stored_bytes and all(0 < r.new_bytes < r.stored_bytes for r in rows[1:])
    calls = _counts(counting)
    assert calls[("list", keys.STEP_REFS)] == 1
    assert calls[("get", "refs")] == 12
    assert calls[("get", "manifests")] == 0 and calls[("head", "refs")] == 0
    # The marker (the store exists) is the only other read.
    assert sum(calls.values()) == 1 + 12 + calls[("get", "CKPTSTORE")] + calls[("head", "CKPTSTORE")]
    assert calls[("get", "CKPTSTORE")] + calls[("head", "CKPTSTORE")] <= 2


def test_ls_reads_the_manifest_of_an_old_format_ref_only(memory_url: str) -> None:
    _store_with_steps(memory_url, 3)
    with ckptstore.open(memory_url) as store:
        old = store.ref(1)
        before = step_summaries(store)
        # As a writer that predates summaries wrote it.
        store.backend.put(keys.step_ref_key(1), encode_ref(Ref(old.manifest, 1, old.committed, old.writer,
                                                                 old.commit_id)))
        assert store.ref(1).summary is None
        counting = CountingBackend(store.backend)
        store.backend = counting
        rows = step_summaries(store)
    assert [(r.step, r.tensors, r.logical_bytes, r.stored_bytes) for r in rows] == \
        [(r.step, r.tensors, r.logical_bytes, r.stored_bytes) for r in before]
    manifest_reads = [key for op, key in counting.log if key.startswith(keys.MANIFESTS)]
    assert manifest_reads == [keys.manifest_key(old.manifest)]
    # No earlier summary-less step: all its chunks count as new, as ls counted them before.
    chunks = decode_manifest(store.backend.get(manifest_reads[0]).data).chunks
    assert rows[1].new_bytes == sum({c.digest: c.stored_size for c in chunks}.values())


def test_cli_ls_json_shows_the_summary_and_tags(memory_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptstore.cli import EXIT_OK, main

    _store_with_steps(memory_url, 2)
    assert main(["ls", memory_url, "--json"]) == EXIT_OK
    listed = json.loads(capsys.readouterr().out)
    with ckptstore.open(memory_url) as store:
        summaries = [store.ref(s).summary for s in (0, 1)]
    assert [(r["step"], r["tags"], r["new_bytes"], r["stored_bytes"]) for r in listed] == \
        [(s, ["first"] if s == 0 else [], summ.new_bytes, summ.stored_bytes)
         for s, summ in zip((0, 1), summaries, strict=True) if summ is not None]


# -- the client-side cache: a repeated ls reads the listing only ---------------------------------
def _ls_counting(url: str) -> tuple[list[tuple[int, int, int, int, int]], Counter[tuple[str, str]]]:
    store = ckptstore.open(url, create=False)
    counting = CountingBackend(store.backend)
    store.backend = counting
    with store:
        rows = [(r.step, r.tensors, r.logical_bytes, r.stored_bytes, r.new_bytes) for r in step_summaries(store)]
    return rows, _counts(counting)


def test_repeated_ls_reads_no_ref_and_new_steps_one_each(shared_store_url: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On every backend whose listing reports versions (local, S3 ETags, GCS generations)."""
    monkeypatch.setenv("CKPTSTORE_CACHE_DIR", str(tmp_path / "cache"))
    url = shared_store_url
    _store_with_steps(url, 6)
    first, calls = _ls_counting(url)
    assert calls[("get", "refs")] == 6
    again, calls = _ls_counting(url)
    assert again == first
    assert calls[("get", "refs")] == 0 and calls[("get", "manifests")] == 0
    assert calls[("list", keys.STEP_REFS)] == 1
    with _open(url) as store:
        store.save(6, _state(6))
        store.save(7, _state(7))
        store.save(2, _state(20), overwrite=True)  # a new version of a listed ref
        store.delete(4)
    later, calls = _ls_counting(url)
    assert calls[("get", "refs")] == 3  # steps 6, 7 and the replaced 2
    assert [row[0] for row in later] == [0, 1, 2, 3, 5, 6, 7]
    assert later == _ls_uncached(url)


def _ls_uncached(url: str) -> list[tuple[int, int, int, int, int]]:
    with ckptstore.open(url, create=False) as store:
        return [(r.step, r.tensors, r.logical_bytes, r.stored_bytes, r.new_bytes)
                for r in step_summaries(store, cache=False)]


@pytest.mark.parametrize("damage", [b"", b"{not json", b'{"v": 1, "url": "x", "refs": {}}',
                                    b"garbage that is not a cache"])
def test_a_corrupt_or_foreign_cache_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               damage: bytes) -> None:
    monkeypatch.setenv("CKPTSTORE_CACHE_DIR", str(tmp_path / "cache"))
    url = str(tmp_path / "store")
    _store_with_steps(url, 3)
    rows, _ = _ls_counting(url)
    (cache_file,) = (tmp_path / "cache").iterdir()
    cache_file.write_bytes(damage)
    again, calls = _ls_counting(url)
    assert again == rows and calls[("get", "refs")] == 3


def test_a_cache_entry_with_tampered_ref_bytes_is_a_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTSTORE_CACHE_DIR", str(tmp_path / "cache"))
    url = str(tmp_path / "store")
    _store_with_steps(url, 2)
    rows, _ = _ls_counting(url)
    (cache_file,) = (tmp_path / "cache").iterdir()
    cached = json.loads(cache_file.read_text())
    for entry in cached["refs"].values():
        entry[1] = entry[1][:-6]  # truncated ref bytes
    cache_file.write_text(json.dumps(cached))
    again, calls = _ls_counting(url)
    assert again == rows and calls[("get", "refs")] == 2


def test_cache_dir_honours_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptstore.lscache import cache_dir

    monkeypatch.delenv("CKPTSTORE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ckptstore"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "ckptstore"
    monkeypatch.setenv("CKPTSTORE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
