"""A chunk that vanishes between a save's two checks is a missing chunk (issue 18).

A save `head`s a chunk (missing), puts it create-only and gets AlreadyExists (another writer
stored the same bytes), then `head`s again for the stored size, and finds nothing: a gc swept
that writer's orphan in between. The save must put the bytes itself, a bounded number of
times (chunkio.CHUNK_PUT_ATTEMPTS), then raise ChunkVanishedError and commit nothing. The
same holds for `cp`, which puts chunks through the same `chunkio.put_chunk`.

The race is replayed deterministically with the fault kit: a create-only put on `chunks/`
reports AlreadyExistsError without storing anything, which is exactly what the saver sees
when the other writer's copy is swept before its next `head`. One test also plays the real
interleaving on each backend (the server's own AlreadyExists, then a delete).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore import keys
from ckptstore.backends.base import CREATE, OVERWRITE, Backend, Buffer, PutMode
from ckptstore.chunkio import CHUNK_PUT_ATTEMPTS
from ckptstore.copy import copy_steps
from ckptstore.errors import AlreadyExistsError, ChunkVanishedError, CkptStoreError
from ckptstore.store import Store
from ckptstore.testing.faults import Fault, FaultInjectingBackend
from ckptstore.testing.wrappers import ForwardingBackend
from ckptstore.url import open_backend

CHUNKS = ckptstore.ChunkingPolicy(chunk_size=64 << 10, small_tensor_limit=1024, pack_size=4096)


def _state(seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(40_000, generator=g),  # 160 KB: three chunks
            "b": torch.randn(500, generator=g),  # packed with "n"
            "n": torch.arange(10), "lr": 0.1}


def _one_chunk_state() -> dict[str, object]:
    return {"w": torch.randn(1000, generator=torch.Generator().manual_seed(3)), "lr": 0.1}


def _assert_same(expected: dict[str, object], loaded: dict[str, object]) -> None:
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[name], value), name
        else:
            assert loaded[name] == value, name


def _already_exists_while_absent(times: int | None) -> Fault:
    """A create-only chunk put that reports AlreadyExists and stores nothing."""
    return Fault("put", key=r"^chunks/", error=AlreadyExistsError, times=times)


def _faulty_store(url: str, fault: Fault) -> Store:
    return Store(FaultInjectingBackend(open_backend(url), [fault]), chunking=CHUNKS)


def _calls_on(backend: FaultInjectingBackend, key: str) -> list[str]:
    return [op for op, k in backend.calls if k == key]


def _nothing_committed(url: str) -> None:
    store = ckptstore.open(url, create=False)
    assert store.steps() == []
    assert not store.backend.exists(keys.step_ref_key(1))
    assert list(store.backend.list(keys.MANIFESTS)) == []


# -- save ------------------------------------------------------------------------------------
def test_save_puts_a_chunk_that_vanished_after_already_exists(store_url: str) -> None:
    fault = _already_exists_while_absent(times=1)
    store = _faulty_store(store_url, fault)
    state = _state()
    info = store.save(1, state)
    backend = store.backend
    assert isinstance(backend, FaultInjectingBackend)
    assert backend.fired(fault) == 1
    (raced,) = {k for op, k in backend.calls if op == "put" and k.startswith("chunks/")
                and _calls_on(backend, k).count("put") == 2}
    # head (missing), put (AlreadyExists, nothing there), head (missing again), put (stored)
    assert _calls_on(backend, raced) == ["head", "put", "head", "put"]
    assert info.new_chunks == info.chunks  # the raced chunk too was written by this save
    _assert_same(state, ckptstore.open(store_url, create=False).load(1))
    assert ckptstore.open(store_url, create=False).backend.exists(raced)


def test_save_gives_up_with_a_typed_error_when_the_chunk_keeps_vanishing(store_url: str) -> None:
    fault = _already_exists_while_absent(times=None)
    store = _faulty_store(store_url, fault)
    with pytest.raises(ChunkVanishedError) as raised:
        store.save(1, _one_chunk_state())
    error = raised.value
    assert isinstance(error, CkptStoreError) and error.attempts == CHUNK_PUT_ATTEMPTS
    assert error.key.startswith("chunks/") and error.key in str(error)
    assert "kept vanishing" in str(error) and "concurrent gc" in str(error)
    backend = store.backend
    assert isinstance(backend, FaultInjectingBackend)
    assert backend.fired(fault) == CHUNK_PUT_ATTEMPTS
    assert _calls_on(backend, error.key) == ["head", "put"] * CHUNK_PUT_ATTEMPTS + ["head"]
    _nothing_committed(store_url)


class _SweptAfterAlreadyExists(ForwardingBackend):
    """Issue 18's interleaving on a real backend, for the first create-only chunk put: after
    the saver's `head` missed, another writer stores the same blob; the saver's put then gets
    the server's own AlreadyExists, and a gc deletes the other writer's orphan before the
    saver's next request."""

    def __init__(self, inner: Backend):
        super().__init__(inner)
        self.raced: str | None = None
        self._lock = threading.Lock()

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        with self._lock:
            race = self.raced is None and key.startswith(keys.CHUNKS) and mode.kind == "create"
            if race:
                self.raced = key
        if not race:
            return self.inner.put(key, data, mode=mode)
        self.inner.put(key, data, mode=CREATE)  # the other writer, first
        try:
            self.inner.put(key, data, mode=mode)
        except AlreadyExistsError:
            self.inner.delete(key)  # gc sweeps the other writer's orphan
            raise
        raise AssertionError(f"{self.url}: a create-only put over an existing {key} succeeded")


def test_save_survives_the_real_interleaving(store_url: str) -> None:
    backend = _SweptAfterAlreadyExists(open_backend(store_url))
    state = _state(1)
    Store(backend, chunking=CHUNKS).save(1, state)
    assert backend.raced is not None
    _assert_same(state, ckptstore.open(store_url, create=False).load(1))


# -- cp --------------------------------------------------------------------------------------
def _source(tmp_path: Path, state: dict[str, object]) -> Store:
    src = ckptstore.open(str(tmp_path / "src"), chunking=CHUNKS)
    src.save(1, state)
    return src


def test_cp_puts_a_chunk_that_vanished_after_already_exists(store_url: str, tmp_path: Path) -> None:
    state = _state(2)
    src = _source(tmp_path, state)
    fault = _already_exists_while_absent(times=1)
    dst = _faulty_store(store_url, fault)
    report = copy_steps(src, dst)
    assert dst.backend.fired(fault) == 1  # type: ignore[attr-defined]
    assert report.steps == [1]
    assert report.chunks_copied == len(src.info(1).manifest.chunks) and report.chunks_skipped == 0
    _assert_same(state, ckptstore.open(store_url, create=False).load(1))


def test_cp_gives_up_with_a_typed_error_when_the_chunk_keeps_vanishing(store_url: str, tmp_path: Path) -> None:
    src = _source(tmp_path, _one_chunk_state())
    fault = _already_exists_while_absent(times=None)
    dst = _faulty_store(store_url, fault)
    with pytest.raises(ChunkVanishedError) as raised:
        copy_steps(src, dst)
    assert raised.value.attempts == CHUNK_PUT_ATTEMPTS
    assert raised.value.key == keys.chunk_key(src.info(1).manifest.chunks[0].digest)
    assert dst.backend.fired(fault) == CHUNK_PUT_ATTEMPTS  # type: ignore[attr-defined]
    _nothing_committed(store_url)
