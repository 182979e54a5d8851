"""Fewer requests per save (issue 13): a re-save skips the chunks of the previous step.

A save reads the latest committed step's ref and manifest after its lease exists and neither
`head`s nor puts a chunk that manifest lists (ckptstore/knownchunks.py). The skip is safe
because the save's settle (`restore_missing`) `head`s skipped chunks too and puts back, from
the save's own bytes, any a gc swept in between (docs/FORMAT.md, "The protocol"). When the
previous step cannot be read, the save `head`s every chunk as before.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from test_gc_safety import _in_thread, _result

from ckptstore import keys
from ckptstore.backends.base import OVERWRITE, Backend
from ckptstore.backends.memory import MemoryBackend, drop_memory_space
from ckptstore.chunking import ChunkingPolicy
from ckptstore.errors import PermissionDeniedError, TransientError
from ckptstore.retry import RetryingBackend
from ckptstore.store import Store
from ckptstore.testing.faults import Fault, FaultInjectingBackend
from ckptstore.testing.interleave import Hook, HookBackend
from ckptstore.testing.wrappers import CountingBackend, PrefixRateLimitedBackend, SimulatedClock, fan_out_prefix

SMALL = ChunkingPolicy(chunk_size=4096, small_tensor_limit=256, pack_size=1024)
WAIT = 30.0  # how long a gate waits before the test gives up (never reached when it passes)


def _state(seed: int, n: int = 400 * 1024) -> dict[str, Any]:
    """`n` float32s in 4 KiB chunks (400 by default), plus small tensors packed together."""
    return {"w": torch.arange(n, dtype=torch.float32) + seed,
            "b": [torch.full((16,), float(seed + i)) for i in range(8)], "step": seed}


def _equal(loaded: dict[str, Any], expected: dict[str, Any]) -> bool:
    return (torch.equal(loaded["w"], expected["w"]) and loaded["step"] == expected["step"]
            and all(torch.equal(a, b) for a, b in zip(loaded["b"], expected["b"], strict=True)))


@pytest.fixture
def space() -> Iterator[str]:
    name = uuid.uuid4().hex
    yield name
    drop_memory_space(name)


def _store(backend: Backend, **options: Any) -> Store:
    store = Store(backend, chunking=SMALL, **options)
    store.marker  # noqa: B018 - create the store (opening no longer does)
    return store


def _chunk_requests(counting: CountingBackend) -> int:
    return sum(n for (op, prefix), n in counting.calls.items() if prefix == "chunks" and op in ("head", "put"))


def _all_chunks_present(inner: Backend, store: Store, manifest: str) -> bool:
    return all(inner.exists(keys.chunk_key(c.digest)) for c in store.manifest(manifest).chunks)


# -- (a) a re-save of unchanged data --------------------------------------------------------
def test_a_resave_of_unchanged_data_costs_under_a_tenth_of_a_request_per_chunk(space: str) -> None:
    """Before: a head per chunk (401 heads for 401 chunks, 1.0 per chunk; 1.06 requests per
    chunk in all). Now: no chunk request at all, and the whole save under 0.1 per chunk."""
    inner = MemoryBackend(space)
    _store(inner).save(0, _state(0))
    counting = CountingBackend(inner)
    info = _store(counting).save(1, _state(0))
    assert info.chunks == 401 and info.new_chunks == 0, info
    assert _chunk_requests(counting) == 0, counting.calls
    total = sum(counting.calls.values())
    assert total / info.chunks <= 0.1, (total, counting.calls)
    assert _equal(_store(inner).load(1), _state(0))


def test_a_save_with_one_changed_tensor_checks_only_its_chunks(space: str) -> None:
    """The packed small tensors changed (one pack), the large tensor did not (400 chunks)."""
    inner = MemoryBackend(space)
    _store(inner).save(0, _state(0))
    changed = _state(0)
    changed["b"][3] += 1
    counting = CountingBackend(inner)
    info = _store(counting).save(1, changed)
    assert info.new_chunks == 1, info
    assert counting.calls[("head", "chunks")] == 1 and counting.calls[("put", "chunks")] == 1, counting.calls
    assert _equal(_store(inner).load(1), changed)


# -- (b) a gc sweeps the previous step's chunks after the save read them --------------------
def test_chunks_skipped_as_known_and_swept_before_the_commit_are_put_back(space: str) -> None:
    """A gc lists the leases just before the save creates its lease (so it will not stand
    down), and pauses. The save reads step 0's ref and manifest (every chunk it will write is
    there: all are skipped). Then step 0 is deleted and the gc marks and sweeps all of step 0's
    chunks before the save writes. The save's settle sees the sweep, heads every chunk it
    references, skipped ones included, and puts them all back: the commit references only
    present chunks and loads. Without the settle covering skipped chunks (restore_missing
    writing with the known mapping, or heading only chunks it wrote) the step commits with
    its chunks gone and the load raises IntegrityError."""
    inner = MemoryBackend(space)
    store = _store(inner)
    store.save(0, _state(0))
    store.gc(min_age=3600)  # the epoch exists; nothing is garbage
    listed, resume = threading.Event(), threading.Event()
    gc_view = HookBackend(inner, [Hook("list", r"^locks/$", after=lambda: (listed.set(), resume.wait(WAIT)))])
    gc: dict[str, Any] = {}

    def start_gc() -> None:  # right before the save's lease put: the gc will not see the lease
        gc["party"] = _in_thread(lambda: _store(gc_view).gc(min_age=0))
        assert listed.wait(WAIT)

    def drop_step_and_sweep() -> None:  # right after the save read step 0's manifest
        store.delete(0)
        resume.set()
        gc["report"] = _result(*gc["party"])

    view = HookBackend(inner, [Hook("put", r"^locks/save-", before=start_gc),
                               Hook("get_range", r"^manifests/", after=drop_step_and_sweep)])
    counting = CountingBackend(view)
    info = _store(counting).save(1, _state(0))
    report = gc["report"]
    assert report.ran and report.deleted_chunks == info.chunks == 401, report
    # Every chunk had been skipped as known (no head in the write pass); the settle headed
    # each once and put every one back.
    assert counting.calls[("put", "chunks")] == info.chunks == info.new_chunks, counting.calls
    assert _all_chunks_present(inner, store, info.manifest)
    assert _equal(_store(inner).load(1), _state(0))


# -- (c) the previous step cannot be read: head every chunk, and the save succeeds -------------
def _corrupt_manifest(store: Store, inner: MemoryBackend) -> Backend:
    inner.put(keys.manifest_key(store.ref(0).manifest), b"\x93garbage", mode=OVERWRITE)
    return inner


def _missing_manifest(store: Store, inner: MemoryBackend) -> Backend:
    inner.delete(keys.manifest_key(store.ref(0).manifest))
    return inner


def _manifest_read_fails(store: Store, inner: MemoryBackend) -> Backend:
    return FaultInjectingBackend(inner, [Fault("get_range", key=r"^manifests/", times=None,
                                               error=TransientError("SlowDown"))])


def _ref_unreadable(store: Store, inner: MemoryBackend) -> Backend:
    return FaultInjectingBackend(inner, [Fault(("get", "get_range", "head"), key=f"^{keys.step_ref_key(0)}$",
                                               times=None, error=PermissionDeniedError("AccessDenied"))])


def _steps_unlistable(store: Store, inner: MemoryBackend) -> Backend:
    return FaultInjectingBackend(inner, [Fault("list", key=f"^{keys.STEP_REFS}", times=None,
                                               error=TransientError("SlowDown"))])


UNREADABLE: dict[str, Callable[[Store, MemoryBackend], Backend]] = {
    "corrupt-manifest": _corrupt_manifest,
    "missing-manifest": _missing_manifest,
    "manifest-read-fails": _manifest_read_fails,
    "ref-unreadable": _ref_unreadable,
    "steps-unlistable": _steps_unlistable,
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_a_previous_step_that_cannot_be_read_only_costs_heads(space: str, case: str) -> None:
    """Fail closed: when the previous step's chunks are unknown, every chunk is headed."""
    inner = MemoryBackend(space)
    store = _store(inner)
    store.save(0, _state(0))
    counting = CountingBackend(UNREADABLE[case](store, inner))
    info = _store(counting).save(1, _state(0))
    assert counting.calls[("head", "chunks")] == info.chunks == 401, counting.calls
    assert _equal(_store(inner).load(1), _state(0))


def test_a_store_opened_without_verify_does_not_trust_an_unchecked_manifest(space: str) -> None:
    """verify=False reads manifests without checking their hash: their chunk table is not
    trusted to skip a head."""
    inner = MemoryBackend(space)
    _store(inner).save(0, _state(0))
    counting = CountingBackend(inner)
    info = _store(counting, verify=False).save(1, _state(0))
    assert counting.calls[("head", "chunks")] == info.chunks, counting.calls


def test_a_known_entry_whose_raw_size_disagrees_is_headed(space: str) -> None:
    """A chunk table entry is trusted only when its raw size is the planned chunk's."""
    from ckptstore.chunkblob import Compression
    from ckptstore.chunking import plan_chunks
    from ckptstore.chunkio import ChunkWriter
    from ckptstore.hashing import hasher
    from ckptstore.manifest import ChunkEntry

    inner = MemoryBackend(space)
    data = memoryview(bytes(range(256)) * 16)
    hash_fn = hasher("blake3")
    digest = hash_fn(data)
    counting = CountingBackend(inner)
    writer = ChunkWriter(counting, hash_fn, Compression(), 1, known={digest: ChunkEntry(digest, 1, 1)})
    [written] = writer.write(plan_chunks([data.nbytes], SMALL), [data])
    assert written.written and writer.skipped == 0
    assert counting.calls[("head", "chunks")] == 1


# -- SlowDown: 3,500 PUT/s per prefix ------------------------------------------------------
def _slowdown_save(space: str, chunks: int, prefix: Callable[[str], str]) -> dict[str, Any]:
    """Save `chunks` 64-byte chunks through RetryingBackend over a PrefixRateLimitedBackend
    (3,500 PUT/s and a one-second burst per prefix), on a simulated clock, one thread."""
    clock = SimulatedClock()
    limiter = PrefixRateLimitedBackend(MemoryBackend(space), rate=3500, prefix=prefix, clock=clock.now)
    store = Store(RetryingBackend(limiter, sleep=clock.sleep, clock=clock.now),
                  chunking=ChunkingPolicy(chunk_size=64, small_tensor_limit=0), threads=1)
    state = {"w": torch.arange(chunks * 8, dtype=torch.int64)}
    info = store.save(0, state)
    numbers = {"chunks": info.chunks, "new_chunks": info.new_chunks, "accepted": sum(limiter.accepted.values()),
               "refused": sum(limiter.refused.values()), "busiest_prefix": limiter.accepted.most_common(1)[0],
               "sleeps": clock.sleeps, "seconds": clock.now()}
    assert torch.equal(store.load(0)["w"], state["w"])
    return numbers


def test_a_save_beyond_3500_puts_a_second_on_one_prefix_backs_off_and_completes(space: str) -> None:
    """An unpartitioned bucket (one prefix for every key): 8,000 chunk puts at once, 3,500 a
    second allowed. Every refused put is retried after a backoff and lands; the save takes at
    least the (8,000 - 3,500 burst) / 3,500 s the limit imposes, and backoff wastes under a
    fifth of a second on top (one thread)."""
    numbers = _slowdown_save(space, 8000, lambda key: "")
    print("SlowDown, one prefix:", numbers)
    assert numbers["chunks"] == numbers["new_chunks"] == 8000, numbers
    assert numbers["refused"] > 0 and numbers["sleeps"] == numbers["refused"], numbers
    # every put landed once: the chunks, the marker, the lease, the manifest and the ref
    assert numbers["accepted"] == 8000 + 4, numbers
    floor = (8000 + 4 - 3500) / 3500
    assert floor <= numbers["seconds"] <= floor + 0.25, numbers


def test_puts_spread_over_the_fan_out_prefixes_stay_under_the_limit(space: str) -> None:
    """Partitioned along chunks/xx/: the same 8,000 puts are ~31 a prefix, never refused."""
    numbers = _slowdown_save(space, 8000, fan_out_prefix)
    print("SlowDown, chunks/xx/ prefixes:", numbers)
    assert numbers["refused"] == 0 and numbers["seconds"] == 0.0, numbers
    assert numbers["busiest_prefix"][1] < 100, numbers


# -- pack size and small-tensor limit follow the chunk size -------------------------------------
def test_pack_size_and_small_tensor_limit_follow_the_chunk_size() -> None:
    """Up to 16 MiB chunks: the 1 MiB / 4 MiB it always had; S3's 64 MiB: 4 MiB / 16 MiB;
    capped at 64 MiB packs; values given win."""
    mib = 1 << 20
    assert ChunkingPolicy() == ChunkingPolicy(16 * mib, 1 * mib, 4 * mib)
    assert ChunkingPolicy(chunk_size=64) == ChunkingPolicy(64, 1 * mib, 4 * mib)
    assert ChunkingPolicy(chunk_size=64 * mib) == ChunkingPolicy(64 * mib, 4 * mib, 16 * mib)
    assert ChunkingPolicy(chunk_size=1024 * mib) == ChunkingPolicy(1024 * mib, 16 * mib, 64 * mib)
    assert ChunkingPolicy(chunk_size=64 * mib, small_tensor_limit=0).pack_size == 16 * mib
    assert ChunkingPolicy(chunk_size=64 * mib, pack_size=8 * mib).small_tensor_limit == 2 * mib
    assert ChunkingPolicy(small_tensor_limit=8 * mib).pack_size == 8 * mib
    with pytest.raises(ValueError):
        ChunkingPolicy(small_tensor_limit=10, pack_size=5)


def test_small_shards_on_64_mib_chunks_take_a_quarter_of_the_puts(space: str) -> None:
    """256 shards of 128 KiB (a 70B model's per-rank FSDP shards are 32-896 KiB): 2 packs with
    S3's derived 16 MiB packs (4 MiB limit), 8 with the old fixed 4 MiB packs."""
    state = {f"s{i}": torch.full((32 * 1024,), float(i)) for i in range(256)}
    mib = 1 << 20
    for policy, chunks in ((ChunkingPolicy(chunk_size=64 * mib), 2), (ChunkingPolicy(64 * mib, mib, 4 * mib), 8)):
        counting = CountingBackend(MemoryBackend(f"{space}-{chunks}"))
        try:
            info = Store(counting, chunking=policy).save(0, state)
            assert info.chunks == chunks and counting.calls[("put", "chunks")] == chunks, (policy, info)
        finally:
            drop_memory_space(f"{space}-{chunks}")
