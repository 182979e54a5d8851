"""verify: every damaged object is found (not just the first), each object is checked once,
and a clean store passes, on every backend."""

from __future__ import annotations

import io

import pytest
import torch

import ckptstore
from ckptstore import keys
from ckptstore.backends.base import OVERWRITE
from ckptstore.chunking import ChunkingPolicy
from ckptstore.progress import Progress
from ckptstore.store import Store
from ckptstore.testing.wrappers import CountingBackend
from ckptstore.verify import verify

# Small chunks, so a few KiB of tensors make many chunks.
SMALL = ChunkingPolicy(chunk_size=4096, small_tensor_limit=1024, pack_size=4096)
STEPS = (100, 200, 300)


def fill(store: Store) -> None:
    """Three steps sharing a 48 KiB tensor (12 chunks); each has its own optimizer chunks."""
    shared = torch.arange(3 * 4096, dtype=torch.float32)
    for i, step in enumerate(STEPS):
        store.save(step, {"w": shared, "b": torch.full((8,), float(i)), "lr": 0.1 * i,
                          "opt": {0: {"m": torch.full((2000,), float(i))}}})


def chunk_keys(store: Store, step: int) -> list[str]:
    return [keys.chunk_key(c.digest) for c in store.info(step).manifest.chunks]


def all_chunk_keys(store: Store) -> set[str]:
    return {k for step in store.steps() for k in chunk_keys(store, step)}


def referencing(store: Store, key: str) -> set[int]:
    return {step for step in store.steps() if key in chunk_keys(store, step)}


def flip_last_byte(store: Store, key: str) -> None:
    """Same length, different payload: only a deep verify can tell."""
    data = bytearray(store.backend.get(key).data)
    data[-1] ^= 0xFF
    store.backend.put(key, bytes(data), mode=OVERWRITE)


def test_clean_store_passes_shallow_and_deep(store_url: str) -> None:
    store = ckptstore.open(store_url, chunking=SMALL)
    fill(store)
    distinct = all_chunk_keys(store)
    shallow = verify(store)
    assert shallow.ok and shallow.problems == []
    assert shallow.steps == list(STEPS) and shallow.steps_checked == 3
    assert shallow.chunks_checked == len(distinct)  # shared chunks are checked once
    deep = verify(store, deep=True)
    assert deep.ok and deep.chunks_checked == len(distinct)
    stored = sum(store.backend.head(k).size for k in distinct)
    manifests = sum(store.backend.head(keys.manifest_key(store.ref(s).manifest)).size for s in STEPS)
    assert deep.bytes_read == stored + manifests
    assert verify(store, [200]).steps == [200]


def test_deep_verify_reports_exactly_the_corrupted_chunks(store_url: str) -> None:
    store = ckptstore.open(store_url, chunking=SMALL)
    fill(store)
    shared = chunk_keys(store, 100)
    only_200 = sorted(set(chunk_keys(store, 200)) - set(chunk_keys(store, 100)) - set(chunk_keys(store, 300)))
    corrupted = {shared[0], shared[5], only_200[0]}
    for key in corrupted:
        flip_last_byte(store, key)
    header = sorted(set(shared) - corrupted)[0]  # and one with a broken header (magic)
    blob = bytearray(store.backend.get(header).data)
    blob[0:4] = b"XXXX"
    store.backend.put(header, bytes(blob), mode=OVERWRITE)
    corrupted.add(header)

    assert verify(store).ok, "sizes are unchanged: a shallow verify cannot see this"
    report = verify(store, deep=True)
    assert not report.ok
    assert {p.key for p in report.problems} == corrupted
    assert {p.kind for p in report.problems} == {"corrupt-chunk"}
    expected = {(step, key) for key in corrupted for step in referencing(store, key)}
    assert {(p.step, p.key) for p in report.problems} == expected
    assert len(report.problems) == len(expected)  # one per (step, chunk), no duplicates
    assert report.damaged_steps == list(STEPS)
    # A load of a damaged step agrees with verify.
    with pytest.raises(ckptstore.IntegrityError):
        store.load(200)


def test_shallow_verify_finds_deleted_chunks_and_a_missing_manifest(store_url: str) -> None:
    store = ckptstore.open(store_url, chunking=SMALL)
    fill(store)
    gone = sorted(set(chunk_keys(store, 100)) - set(chunk_keys(store, 300)))[:2]
    expected = {(step, key) for key in gone for step in referencing(store, key)}
    for key in gone:
        store.backend.delete(key)
    manifest_300 = keys.manifest_key(store.ref(300).manifest)
    store.backend.delete(manifest_300)

    report = verify(store)
    missing = {(p.step, p.key) for p in report.problems if p.kind == "missing-chunk"}
    assert missing == expected and len(expected) >= 2
    assert [(p.step, p.key) for p in report.problems if p.kind == "missing-manifest"] == [(300, manifest_300)]
    assert {p.kind for p in report.problems} == {"missing-chunk", "missing-manifest"}


def test_truncated_chunk_is_a_size_mismatch(store_url: str) -> None:
    store = ckptstore.open(store_url, chunking=SMALL)
    fill(store)
    key = chunk_keys(store, 300)[-1]
    store.backend.put(key, store.backend.get(key).data[:-7], mode=OVERWRITE)
    for deep in (False, True):
        report = verify(store, deep=deep)
        assert {(p.kind, p.key) for p in report.problems} == {("size-mismatch", key)}, deep
        assert {p.step for p in report.problems} == referencing(store, key)


def test_corrupt_manifest_and_ref_are_reported_and_the_rest_still_checked(tmp_path) -> None:
    store = ckptstore.open(str(tmp_path / "s"), chunking=SMALL)
    fill(store)
    manifest_100 = keys.manifest_key(store.ref(100).manifest)
    data = bytearray(store.backend.get(manifest_100).data)
    data[len(data) // 2] ^= 0x01
    store.backend.put(manifest_100, bytes(data), mode=OVERWRITE)
    store.backend.put(keys.step_ref_key(200), b"\x81\xa1v\x01", mode=OVERWRITE)  # a map missing fields
    bad_chunk = chunk_keys(store, 300)[-1]
    store.backend.delete(bad_chunk)

    report = verify(store)
    assert {(p.step, p.kind, p.key) for p in report.problems} == {
        (100, "corrupt-manifest", manifest_100),
        (200, "corrupt-ref", keys.step_ref_key(200)),
        (300, "missing-chunk", bad_chunk),
    }
    assert report.steps == [100, 200, 300]


def test_each_chunk_is_read_once_however_many_steps_share_it(tmp_path) -> None:
    fill(ckptstore.open(str(tmp_path / "s"), chunking=SMALL))
    counting = CountingBackend(ckptstore.open(str(tmp_path / "s")).backend)
    store = Store(counting, create=False)
    report = verify(store, deep=True)
    chunk_reads = [key for op, key in counting.log if key.startswith("chunks/") and op == "get"]
    assert report.ok and len(chunk_reads) == len(set(chunk_reads)) == report.chunks_checked


def test_unknown_step_is_not_found(tmp_path) -> None:
    store = ckptstore.open(str(tmp_path / "s"))
    store.save(1, {"x": torch.ones(2)})
    with pytest.raises(ckptstore.StepNotFoundError):
        verify(store, [1, 2])


class _FakeTTY(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_draws_only_on_a_terminal() -> None:
    quiet = _FakeTTY(False)
    with Progress(10, "verify", "chunks", stream=quiet) as bar:
        bar.advance(10)
    assert quiet.getvalue() == ""
    loud = _FakeTTY(True)
    with Progress(4 << 20, "cp", "bytes", stream=loud) as bar:
        bar.advance(1 << 20)
        bar.advance(1 << 20)  # within 0.1 s of the first draw: not drawn
        bar.advance(2 << 20)
    text = loud.getvalue()
    assert text.startswith("\rcp:") and text.endswith("\n")
    assert text.count("\r") == 2  # the first advance and the final state
    assert "100.0%" in text and "4.0 MiB/4.0 MiB" in text
    off = _FakeTTY(True)
    with Progress(1, "x", enabled=False, stream=off) as bar:
        bar.advance(1)
    assert off.getvalue() == ""
