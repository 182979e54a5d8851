"""The commit protocol: step exists, overwrite, conflicts, ambiguous puts, readers during overwrite."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence

import pytest
import torch

import ckptstore
from ckptstore import keys
from ckptstore.backends.base import Backend, Buffer, PutMode
from ckptstore.backends.memory import MemoryBackend
from ckptstore.commit import commit_ref, read_ref
from ckptstore.manifest import Ref, encode_ref
from ckptstore.testing.scenarios import state_for, tag_of
from ckptstore.testing.wrappers import ForwardingBackend


def test_olmo_scenario_save_exists_then_overwrite(store_url: str) -> None:
    store = ckptstore.open(store_url)
    store.save(0, state_for(1))
    with pytest.raises(ckptstore.StepExistsError) as caught:
        store.save(0, state_for(2))
    message = str(caught.value)
    assert "step 0 already exists" in message and "overwrite=True" in message and "UTC" in message
    assert caught.value.step == 0
    assert tag_of(store.load(0)) == 1, "a refused save must leave the committed step untouched"

    info = store.save(0, state_for(2), overwrite=True)
    assert info.seq == 2 and info.replaced is not None
    assert tag_of(ckptstore.open(store_url).load(0)) == 2
    assert store.steps() == [0]


def test_overwrite_of_missing_step_is_a_plain_create(store_url: str) -> None:
    store = ckptstore.open(store_url)
    info = store.save(5, state_for(5), overwrite=True)
    assert info.seq == 1 and info.replaced is None
    assert tag_of(store.load(5)) == 5


def test_reader_during_overwrites_sees_old_or_new_never_a_mix(store_url: str) -> None:
    store = ckptstore.open(store_url, chunking=ckptstore.ChunkingPolicy(chunk_size=4096, small_tensor_limit=64,
                                                                        pack_size=256))
    store.save(0, state_for(0))
    stop = threading.Event()
    written: list[int] = [0]
    errors: list[BaseException] = []

    def overwrite() -> None:
        try:
            for tag in range(1, 30):
                store.save(0, state_for(tag), overwrite=True)
                written.append(tag)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            stop.set()

    writer = threading.Thread(target=overwrite)
    writer.start()
    seen = []
    while not stop.is_set():
        seen.append(tag_of(store.load(0)))  # raises if tensors come from different saves
    writer.join()
    assert not errors
    assert set(seen) <= set(written) and len(seen) > 0
    assert tag_of(store.load(0)) == 29


def test_step_numbers_are_validated(store_url: str) -> None:
    store = ckptstore.open(store_url)
    for bad in (-1, 10**20, 1.5, True, "3"):
        with pytest.raises(ValueError):
            store.save(bad, {})  # type: ignore[arg-type]


def test_missing_steps_raise_step_not_found(store_url: str) -> None:
    store = ckptstore.open(store_url)
    store.marker  # noqa: B018 - creates the (empty) store, as a first write would
    with pytest.raises(ckptstore.StepNotFoundError):
        store.load()
    with pytest.raises(ckptstore.StepNotFoundError):
        store.load(3)
    with pytest.raises(ckptstore.StepNotFoundError):
        store.delete(3)
    assert store.latest() is None and store.steps() == []


def test_delete_removes_only_the_ref(store_url: str) -> None:
    store = ckptstore.open(store_url)
    store.save(1, state_for(1))
    store.save(2, state_for(2))
    chunks_before = sorted(o.key for o in store.backend.list(keys.CHUNKS))
    store.delete(1)
    assert store.steps() == [2] and store.latest() == 2
    assert sorted(o.key for o in store.backend.list(keys.CHUNKS)) == chunks_before
    assert tag_of(store.load()) == 2


def test_steps_sort_numerically(store_url: str) -> None:
    store = ckptstore.open(store_url)
    for step in (100, 9, 10**19, 0, 11):
        store.save(step, {"s": step})
    assert store.steps() == [0, 9, 11, 100, 10**19]
    assert store.load() == {"s": 10**19}


def test_open_without_create_does_not_create(store_url: str) -> None:
    with pytest.raises(ckptstore.StoreNotFoundError):
        ckptstore.open(store_url, create=False)
    store = ckptstore.open(store_url)
    store.save(1, {"a": 1})  # creating works afterwards: the first write creates the store
    assert store.steps() == [1]


# -- integrity: damage written through the backend itself, so every backend is attacked ----
def _chunk_keys(store: ckptstore.Store) -> list[str]:
    return sorted(o.key for o in store.backend.list(keys.CHUNKS))


def test_corrupt_chunk_raises_integrity_error_naming_step_tensor_and_key(store_url: str) -> None:
    store = ckptstore.open(store_url)
    store.save(3, {"big": torch.arange(1 << 20, dtype=torch.float32)})
    (chunk,) = _chunk_keys(store)
    data = bytearray(store.backend.get(chunk).data)
    data[len(data) // 2] ^= 0xFF
    store.backend.put(chunk, bytes(data))
    with pytest.raises(ckptstore.IntegrityError) as caught:
        store.load(3)
    message = str(caught.value)
    assert "step 3" in message and "['big']" in message and chunk in message


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage"])
def test_damaged_chunks_are_integrity_errors(store_url: str, damage: str) -> None:
    store = ckptstore.open(store_url, compression=ckptstore.Compression("zstd"))
    store.save(1, {"a": torch.zeros(1000), "b": torch.ones(10)})
    for key in _chunk_keys(store):
        data = store.backend.get(key).data
        if damage == "truncate":
            store.backend.put(key, data[: len(data) // 2])
        elif damage == "delete":
            store.backend.delete(key)
        else:
            store.backend.put(key, b"\x00" * len(data))
    with pytest.raises(ckptstore.IntegrityError, match="step 1"):
        store.load(1)


def test_corrupt_manifest_raises_integrity_error(store_url: str) -> None:
    store = ckptstore.open(store_url)
    info = store.save(1, {"a": torch.zeros(4)})
    key = keys.manifest_key(info.manifest)
    store.backend.put(key, store.backend.get(key).data + b"x")
    with pytest.raises(ckptstore.IntegrityError, match="manifest"):
        store.load(1)


# -- ambiguous outcomes, with a backend that applies a put and then reports a failure -------
class ApplyThenFail(ForwardingBackend):
    """The next ref put of mode kind `on` lands, then raises `error`: TransientError (a
    timed-out request whose write reached the server) or PreconditionFailedError (an SDK
    retry of a put whose first attempt had landed)."""

    def __init__(self, inner: Backend, error: type[Exception], on: str = "create"):
        super().__init__(inner)
        self.error, self.on, self.armed = error, on, True

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = PutMode.OVERWRITE) -> str:
        version = self.inner.put(key, data, mode=mode)
        if self.armed and key.startswith(keys.STEP_REFS) and mode.kind == self.on:
            self.armed = False
            raise self.error("injected after the put landed", key=key, operation="put")
        return version


def _ref(step: int) -> Ref:
    return Ref(manifest="ab" * 32, step=step, committed=1.0, writer="test")


def test_ambiguous_create_that_landed_is_a_success_not_step_exists(store_url: str) -> None:
    backend = ApplyThenFail(ckptstore.open(store_url).backend, ckptstore.TransientError)
    ref = _ref(1)
    assert commit_ref(backend, keys.step_ref_key(1), ref, overwrite=False) == ref
    stored = read_ref(backend, keys.step_ref_key(1))
    assert stored is not None and stored[0].commit_id == ref.commit_id and stored[0].seq == 1


@pytest.mark.parametrize("error", [ckptstore.TransientError, ckptstore.PreconditionFailedError])
def test_ambiguous_replace_that_landed_is_a_success_not_a_conflict(store_url: str, error: type[Exception]) -> None:
    inner = ckptstore.open(store_url).backend
    key = keys.step_ref_key(1)
    first = commit_ref(inner, key, _ref(1), overwrite=False)
    second = commit_ref(ApplyThenFail(inner, error, on="update"), key, _ref(1), overwrite=True)
    stored = read_ref(inner, key)
    assert stored is not None and stored[0].commit_id == second.commit_id
    assert second.seq == 2 and second.replaces == first.manifest


def test_concurrent_replace_between_read_and_put_is_a_conflict(store_url: str) -> None:
    inner = ckptstore.open(store_url).backend
    key = keys.step_ref_key(1)
    commit_ref(inner, key, _ref(1), overwrite=False)
    intruder = _ref(1)

    class Interleaved(ApplyThenFail):
        def get_range(self, k: str, start: int, length: int) -> bytes:
            result = self.inner.get_range(k, start, length)
            if self.armed and k == key:  # someone else commits right after our read (head + bounded get)
                self.armed = False
                current = read_ref(self.inner, key)
                assert current is not None
                self.inner.put(key, encode_ref(intruder), mode=PutMode.update(current[1]))
            return result

    backend = Interleaved(inner, ckptstore.TransientError)
    with pytest.raises(ckptstore.CommitConflictError) as caught:
        commit_ref(backend, key, _ref(1), overwrite=True)
    assert caught.value.their_commit == intruder.commit_id
    assert intruder.commit_id in str(caught.value)
    stored = read_ref(inner, key)
    assert stored is not None and stored[0].commit_id == intruder.commit_id, "the winner must not be clobbered"


# -- servers that ignore conditional writes are refused -------------------------------------
class IgnoresConditions(ForwardingBackend):
    """A server that accepts If-None-Match / If-Match and then writes anyway."""

    needs_canary = True

    def __init__(self, inner: Backend):
        super().__init__(inner)
        self.needs_canary = True
        self.url = f"{inner.url}-ignoring-{uuid.uuid4().hex[:6]}"  # a URL no canary has proven

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = PutMode.OVERWRITE) -> str:
        return self.inner.put(key, data, mode=PutMode.OVERWRITE)


def test_store_refuses_a_backend_that_ignores_conditional_writes() -> None:
    backend = IgnoresConditions(MemoryBackend(uuid.uuid4().hex))
    with pytest.raises(ckptstore.ConditionalWritesUnsupportedError, match="create-only"):
        ckptstore.Store(backend).save(1, {"a": 1})  # the first write creates the store
    assert not any(o.key.startswith(keys.STEP_REFS) or o.key == keys.MARKER for o in backend.list())


def test_canary_is_cached_per_url(store_url: str) -> None:
    from ckptstore.testing.wrappers import CountingBackend

    counting = CountingBackend(ckptstore.open(store_url).backend)
    counting.needs_canary = True
    counting.url = f"{counting.url}#{uuid.uuid4().hex}"
    store = ckptstore.Store(counting)
    store.save(1, {"a": 1})
    store.save(2, {"a": 2})
    ckptstore.Store(counting).save(3, {"a": 3})
    canary_puts = [key for op, key in counting.log if op == "put" and key.startswith("locks/canary-")]
    assert len(canary_puts) == 4, "one canary (its four conditional puts) per URL and process"


def test_errors_survive_pickling_between_processes() -> None:
    """Ranks and worker processes pass errors by pickle (DCP broadcasts the coordinator's)."""
    import pickle

    for error in (ckptstore.StepExistsError(3, 1.0, "w@h:1"), ckptstore.CommitConflictError(1, "a", "b"),
                  ckptstore.TransientError("slow down", key="k", operation="put"),
                  ckptstore.TagNotFoundError("best"), ckptstore.UnsupportedValueError("state['x']", "a set")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and copy.__dict__ == error.__dict__
