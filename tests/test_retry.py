"""The retry layer, and saves, loads and gc under injected faults, on every backend.

Stores here sit on RetryingBackend(FaultInjectingBackend(<the real backend>)): the faults play
the server, the retry layer is what `ckptstore.open` puts in front of every backend.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import ckptstore
from ckptstore import keys
from ckptstore.backends.base import CREATE, OVERWRITE, Backend, ObjectInfo, PutMode
from ckptstore.backends.memory import MemoryBackend
from ckptstore.chunking import ChunkingPolicy
from ckptstore.deadline import seconds_left
from ckptstore.errors import (
    AlreadyExistsError,
    FormatError,
    IntegrityError,
    InvalidArgumentError,
    InvalidURLError,
    ObjectNotFoundError,
    PreconditionFailedError,
    TransientError,
)
from ckptstore.retry import DEFAULT_ATTEMPTS, RetryingBackend
from ckptstore.store import Store
from ckptstore.testing.faults import Fault, FaultInjectingBackend
from ckptstore.testing.scenarios import state_for, tag_of
from ckptstore.testing.wrappers import ForwardingBackend
from ckptstore.url import open_backend
from ckptstore.verify import verify

# Small chunks, so a small state still makes several chunk puts (read_into for tensor slices,
# get_range for packs of small tensors).
SMALL = ChunkingPolicy(chunk_size=4096, small_tensor_limit=1024, pack_size=4096)
THROTTLED = TransientError("SlowDown: please reduce your request rate (HTTP 503)")


class Harness:
    """A store on RetryingBackend(FaultInjectingBackend(real backend)); sleeps are recorded."""

    def __init__(self, url: str, faults: Sequence[Fault] = (), *, attempts: int = DEFAULT_ATTEMPTS,
                 max_delay: float = 0.01):
        self.url = url
        self.sleeps: list[float] = []
        self.faulty = FaultInjectingBackend(open_backend(url), faults)
        self.retrying = RetryingBackend(self.faulty, attempts=attempts, base_delay=0.001, max_delay=max_delay,
                                        sleep=self._sleep)
        self.store = Store(self.retrying, chunking=SMALL)

    def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def fresh_store(self) -> Store:
        """Another process's view of the same store, without faults (a rerun after a crash)."""
        return Store(open_backend(self.url), chunking=SMALL)


def ref_puts(faulty: FaultInjectingBackend, step: int) -> int:
    return faulty.calls.count(("put", keys.step_ref_key(step)))


# -- transient errors and throttling are retried -------------------------------------------
def test_transient_errors_and_throttling_are_retried_and_the_save_succeeds(store_url: str) -> None:
    faults = [
        Fault("put", key=r"^chunks/", times=3),
        Fault("put", key=r"^chunks/", skip=4, times=2, error=THROTTLED),
        Fault("head", key=r"^chunks/", times=2),
        Fault("put", key=r"^manifests/", times=2, error=THROTTLED),
        Fault("put", key=r"^refs/steps/", times=2),  # the commit's create-only put
        Fault(("get", "head", "get_range"), key=r"^refs/steps/", times=2),  # the load's ref read
        Fault(("read_into", "get_range"), key=r"^chunks/", times=2),
    ]
    h = Harness(store_url, faults)
    info = h.store.save(1, state_for(1, elements=4096))
    assert tag_of(h.store.load(1)) == 1
    assert [h.faulty.fired(f) for f in faults] == [3, 2, 2, 2, 2, 2, 2], "every fault must have been hit"
    assert len(h.sleeps) == 15 and all(0 < s <= 0.01 for s in h.sleeps)
    assert info.seq == 1 and h.store.ref(1).commit_id == info.commit_id
    assert ref_puts(h.faulty, 1) == 3  # two failed tries that did not land, then the commit


@pytest.mark.parametrize("target", [r"^chunks/", r"^manifests/", r"^refs/steps/"])
def test_exhausted_retries_raise_typed_transient_error_and_commit_nothing(store_url: str, target: str) -> None:
    h = Harness(store_url, attempts=3)
    h.store.save(1, state_for(1))
    outage = Fault("put", key=target, times=None, error=THROTTLED)
    h.faulty.add(outage)
    with pytest.raises(TransientError, match="gave up after 3 attempts") as caught:
        h.store.save(2, state_for(2))
    assert type(caught.value) is TransientError and "SlowDown" in str(caught.value)
    assert caught.value.key is not None and caught.value.key.startswith(target.lstrip("^"))
    assert h.faulty.fired(outage) >= 3
    after = h.fresh_store()
    assert after.steps() == [1] and tag_of(after.load(1)) == 1
    assert not after.backend.exists(keys.step_ref_key(2))
    info = after.save(2, state_for(2))  # the trainer restarts: the rerun succeeds
    assert info.seq == 1 and tag_of(after.load(2)) == 2 and after.steps() == [1, 2]


# -- the ambiguous conditional put ---------------------------------------------------------
@pytest.mark.parametrize("layer", ["retry", "commit"])
def test_ref_create_that_landed_but_failed_commits_once(store_url: str, layer: str) -> None:
    """Resolved by the retry layer (retry sees AlreadyExists, reads back our bytes), or with
    retries off by ckptstore.commit itself (re-reads the ref, finds our commit id)."""
    h = Harness(store_url, attempts=DEFAULT_ATTEMPTS if layer == "retry" else 1)
    h.store.save(1, state_for(1))
    ambiguous = Fault("put", key=r"^refs/steps/0*2$", action="apply_then_fail")
    h.faulty.add(ambiguous)
    info = h.store.save(2, state_for(2))  # no StepExistsError against itself
    assert h.faulty.fired(ambiguous) == 1
    stored = h.fresh_store().ref(2)
    assert stored.commit_id == info.commit_id and stored.seq == info.seq == 1
    assert ref_puts(h.faulty, 2) == (2 if layer == "retry" else 1)
    assert tag_of(h.fresh_store().load(2)) == 2


@pytest.mark.parametrize("layer", ["retry", "commit"])
def test_ref_replace_that_landed_but_failed_commits_once(store_url: str, layer: str) -> None:
    h = Harness(store_url, attempts=DEFAULT_ATTEMPTS if layer == "retry" else 1)
    first = h.store.save(2, state_for(1))
    # skip=1: the save's create-only attempt (AlreadyExists) comes first; then the replace.
    ambiguous = Fault("put", key=r"^refs/steps/0*2$", action="apply_then_fail", skip=1)
    h.faulty.add(ambiguous)
    second = h.store.save(2, state_for(2), overwrite=True)  # no CommitConflictError against itself
    assert h.faulty.fired(ambiguous) == 1
    stored = h.fresh_store().ref(2)
    assert stored.commit_id == second.commit_id
    assert stored.seq == second.seq == 2, "replaced exactly once"
    assert second.replaced == first.manifest
    assert tag_of(h.fresh_store().load(2)) == 2


@pytest.mark.parametrize("lock", [r"^locks/save-", r"^locks/gc$", r"^locks/epoch$"])
def test_lease_and_gc_lock_creates_that_landed_but_failed_are_ours(store_url: str, lock: str) -> None:
    """A blind retry of these creates would find our own object: the save would fail with
    AlreadyExistsError, or gc would stand down and leave its lock behind."""
    h = Harness(store_url)
    h.store.save(1, state_for(1))
    h.store.gc(min_age=0)  # locks/epoch exists from here on: its next put is an update
    ambiguous = Fault("put", key=lock, action="apply_then_fail")
    h.faulty.add(ambiguous)
    h.store.save(2, state_for(2))
    h.store.delete(1)
    report = h.store.gc(min_age=0)
    assert h.faulty.fired(ambiguous) == 1
    assert report.ran and report.deleted_chunks > 0, report
    leftovers = [o.key for o in h.fresh_store().backend.list(keys.LOCKS) if o.key != "locks/epoch"]
    assert leftovers == []
    assert tag_of(h.fresh_store().load(2)) == 2


# -- lying and broken backends: typed errors, never wrong data ----------------------------
def _single_tensor_state(tag: int) -> dict[str, Any]:
    return {"w": torch.arange(4096, dtype=torch.float32) + tag, "tag": tag}


def test_truncated_chunk_put_is_caught_at_load_and_by_deep_verify(store_url: str) -> None:
    h = Harness(store_url)
    h.store.save(1, _single_tensor_state(1))
    lie = Fault("put", key=r"^chunks/", action="truncate", keep=10)
    h.faulty.add(lie)
    h.store.save(2, _single_tensor_state(2))  # the backend said every put succeeded
    assert h.faulty.fired(lie) == 1
    store = h.fresh_store()
    manifest = store.info(2).manifest
    short = [keys.chunk_key(c.digest) for c in manifest.chunks
             if store.backend.head(keys.chunk_key(c.digest)).size != c.stored_size]
    assert len(short) == 1 and store.backend.head(short[0]).size == 10
    with pytest.raises(IntegrityError) as caught:
        store.load(2)
    message = str(caught.value)
    assert "step 2" in message and "state['w']" in message and short[0] in message
    report = verify(store, deep=True)
    assert {(p.step, p.key) for p in report.problems} == {(2, short[0])}
    assert verify(store, [1], deep=True).ok
    assert torch.equal(store.load(1)["w"], _single_tensor_state(1)["w"])


@pytest.mark.parametrize(("op", "key", "keep"), [
    ("read_into", r"^chunks/", 100),  # whole tensor slices land directly in the tensor
    ("read_into", r"^chunks/", 24),  # exactly the chunk header, no payload
    ("read_into", r"^chunks/", 30),  # packs of small tensors are read whole into a buffer (58 bytes here)
    ("get_range", r"^manifests/", 20),
])
def test_truncated_reads_raise_typed_errors_never_wrong_data(store_url: str, op: str, key: str,
                                                             keep: int) -> None:
    h = Harness(store_url)
    h.store.save(1, state_for(1))
    assert tag_of(h.store.load(1)) == 1
    short = Fault(op, key=key, action="truncate", keep=keep, times=None)
    h.faulty.add(short)
    with pytest.raises((IntegrityError, FormatError)):
        h.store.load(1)
    assert h.faulty.fired(short) >= 1
    assert tag_of(h.fresh_store().load(1)) == 1, "the stored step itself is intact"


def test_read_into_that_lands_nothing_falls_back_to_a_checked_read(store_url: str) -> None:
    """A direct read that returns before the header is not an error: the chunk is read again
    through the general path, which checks it; the data is right or the load fails."""
    h = Harness(store_url)
    h.store.save(1, state_for(1))
    manifest = h.store.info(1).manifest
    biggest = max(manifest.tensors, key=lambda t: t.nbytes)  # model.w: whole chunks, read directly
    truncated_key = keys.chunk_key(manifest.chunks[biggest.segments[0][0]].digest)
    short = Fault("read_into", key=f"^{truncated_key}$", action="truncate", keep=0, times=1)
    h.faulty.add(short)
    assert tag_of(h.store.load(1)) == 1
    assert h.faulty.fired(short) == 1
    assert sum(op == "read_into" and k == truncated_key for op, k in h.faulty.calls) == 2, "read again"
    assert tag_of(h.fresh_store().load(1)) == 1, "the stored step itself is intact"


# -- hangs and slow sweeps -----------------------------------------------------------------
def _wait_until(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_save_blocked_by_a_hanging_put_finishes_after_release(store_url: str) -> None:
    hang = Fault("put", key=r"^manifests/", action="hang")
    h = Harness(store_url, [hang])
    results: list[Any] = []
    saver = threading.Thread(target=lambda: results.append(h.store.save(1, state_for(1))))
    saver.start()
    _wait_until(lambda: h.faulty.fired(hang) == 1)
    time.sleep(0.2)
    assert saver.is_alive() and h.fresh_store().steps() == [], "nothing commits while the put hangs"
    h.faulty.release()
    saver.join(timeout=60)
    assert not saver.is_alive() and len(results) == 1
    assert tag_of(h.fresh_store().load(1)) == 1


def test_slow_gc_sweep_and_a_concurrent_save_both_finish_and_every_step_loads(store_url: str) -> None:
    slow = Fault("delete", key=r"^(chunks|manifests)/", action="delay", seconds=0.05, times=None)
    h = Harness(store_url, [slow])
    for step in (1, 2, 3):
        h.store.save(step, state_for(step))
    h.store.delete(1)
    h.store.delete(2)
    reports: list[Any] = []
    collector = threading.Thread(target=lambda: reports.append(h.store.gc(min_age=0)))
    collector.start()
    _wait_until(lambda: h.faulty.fired(slow) >= 1 or not collector.is_alive())
    # Mid-sweep: a save that deduplicates against the chunks being swept (step 1's state).
    saver_store = Store(RetryingBackend(open_backend(store_url), base_delay=0.001), chunking=SMALL)
    saved = saver_store.save(4, state_for(1))
    collector.join(timeout=120)
    assert not collector.is_alive() and reports[0].ran, reports
    assert h.faulty.fired(slow) == reports[0].deleted_chunks + reports[0].deleted_manifests > 0
    store = h.fresh_store()
    assert store.steps() == [3, 4] and saved.seq == 1
    assert tag_of(store.load(3)) == 3 and tag_of(store.load(4)) == 1
    assert verify(store, deep=True).ok


# -- ckptstore.open wires the retry layer ---------------------------------------------------
def test_open_wraps_the_backend_and_forwards_what_its_users_need(store_url: str) -> None:
    store = ckptstore.open(store_url)
    backend = store.backend
    assert isinstance(backend, RetryingBackend) and backend.attempts == DEFAULT_ATTEMPTS
    assert backend.url == backend.inner.url == store.url
    assert backend.needs_canary == backend.inner.needs_canary
    assert backend.cleanup_staging(3600) == 0  # gc calls it; forwarded or 0
    store.save(1, {"a": 1})
    assert store.gc(min_age=0).ran and store.locks() != [] and store.load(1) == {"a": 1}
    assert not isinstance(ckptstore.open(store_url, retries=0).backend, RetryingBackend)
    three = ckptstore.open(store_url, retries=2).backend
    assert isinstance(three, RetryingBackend) and three.attempts == 3


def test_retries_in_the_url_query(s3_bucket: str, gcs_bucket: str) -> None:
    for url in (f"s3://{s3_bucket}/q?retries=2", f"gs://{gcs_bucket}/q?retries=2"):
        store = ckptstore.open(url)
        assert isinstance(store.backend, RetryingBackend) and store.backend.attempts == 3
        assert store.url == url.split("?")[0]
        store.save(1, {"a": 1})
        assert not isinstance(ckptstore.open(url.replace("=2", "=0")).backend, RetryingBackend)
        with pytest.raises(InvalidURLError, match="both"):
            ckptstore.open(url, retries=1)
        with pytest.raises(InvalidURLError, match="non-negative"):
            ckptstore.open(url.replace("=2", "=-1"))
    assert ckptstore.open(f"s3://{s3_bucket}/q").backend.bucket == s3_bucket  # forwarded attribute


# -- RetryingBackend on its own --------------------------------------------------------------
def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    retrying = RetryingBackend(MemoryBackend(uuid.uuid4().hex), base_delay=0.2, max_delay=5.0)
    for n in range(10):
        cap = min(5.0, 0.2 * 2**n)
        samples = [retrying.backoff(n) for _ in range(50)]
        assert all(cap / 2 <= s <= cap for s in samples)
    assert len({retrying.backoff(3) for _ in range(20)}) > 1, "jittered"


def test_non_transient_errors_are_not_retried() -> None:
    faulty = FaultInjectingBackend(MemoryBackend(uuid.uuid4().hex))
    sleeps: list[float] = []
    retrying = RetryingBackend(faulty, sleep=sleeps.append)
    with pytest.raises(ObjectNotFoundError):
        retrying.get("missing")
    retrying.put("k", b"v", mode=CREATE)
    with pytest.raises(AlreadyExistsError):
        retrying.put("k", b"v", mode=CREATE)  # not after an ambiguous try: the plain answer
    assert sleeps == [] and faulty.calls == [("get", "missing"), ("put", "k"), ("put", "k")]


class TickingFailures(ForwardingBackend):
    """Every put takes `seconds` on `clock` (a fake monotonic clock), then fails transiently."""

    def __init__(self, inner: Backend, clock: list[float], seconds: float):
        super().__init__(inner)
        self.clock, self.seconds, self.tries = clock, seconds, 0

    def put(self, key: str, data: Any, *, mode: PutMode = OVERWRITE) -> str:
        self.tries += 1
        self.clock[0] += self.seconds
        raise TransientError("injected: slow and failing", key=key, operation="put")


def test_deadline_stops_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    # The retry layer reads the time through a fake clock that only the tries (0.1 s each) and
    # the backoff sleeps it asks for move: no wall time is involved.
    clock = [1000.0]
    monkeypatch.setattr("ckptstore.retry.time", SimpleNamespace(monotonic=lambda: clock[0]))
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    failing = TickingFailures(MemoryBackend(uuid.uuid4().hex), clock, 0.1)
    retrying = RetryingBackend(failing, attempts=100, base_delay=0.01, max_delay=0.01, deadline=0.35, sleep=sleep)
    with pytest.raises(TransientError, match=r"gave up after 4 attempts"):
        retrying.put("k", b"v")
    # Tries end at 0.1, 0.2 + s1, 0.3 + s1 + s2 (< 0.35, as each backoff s is at most 0.01 s) and
    # 0.4 + ...: the fourth is the last, and only the three before it asked for a backoff.
    assert failing.tries == 4 and len(sleeps) == 3 and all(0.005 <= s <= 0.01 for s in sleeps)


def test_no_backoff_is_slept_that_would_end_past_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fake clock as above: a try takes 0.9 s of a 1 s deadline, and any backoff (0.1-0.2 s)
    # would end at or past it, when no try could start any more: give up at once.
    clock = [1000.0]
    monkeypatch.setattr("ckptstore.retry.time", SimpleNamespace(monotonic=lambda: clock[0]))
    sleeps: list[float] = []
    failing = TickingFailures(MemoryBackend(uuid.uuid4().hex), clock, 0.9)
    retrying = RetryingBackend(failing, attempts=5, base_delay=0.2, max_delay=0.2, deadline=1.0, sleep=sleeps.append)
    with pytest.raises(TransientError, match=r"gave up after 1 attempt;"):
        retrying.put("k", b"v")
    assert failing.tries == 1 and sleeps == []


class DeadlineRecorder(ForwardingBackend):
    """Records what is left of the operation's deadline (ckptstore.deadline) inside each call."""

    def __init__(self, inner: Backend, deadline: float | None = None):
        super().__init__(inner)
        if deadline is not None:
            self.deadline = deadline
        self.seen: list[float | None] = []

    def get(self, key: str) -> Any:
        self.seen.append(seconds_left())
        return self.inner.get(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for info in self.inner.list(prefix):
            self.seen.append(seconds_left())
            yield info


def test_the_inner_backend_runs_under_the_operations_deadline() -> None:
    inner = MemoryBackend(uuid.uuid4().hex)
    for key in ("a/1", "a/2", "a/3"):
        inner.put(key, b"v")
    own = DeadlineRecorder(inner, deadline=7.0)  # a backend's own deadline is the default
    retrying = RetryingBackend(own)
    assert retrying.deadline == 7.0 and RetryingBackend(DeadlineRecorder(inner)).deadline == 60.0
    retrying.get("a/1")
    listed = []
    for info in retrying.list("a/"):
        listed.append(info.key)
        assert seconds_left() is None  # the caller's work between keys runs under no deadline
    assert listed == ["a/1", "a/2", "a/3"]
    assert len(own.seen) == 4 and all(left is not None and 0 < left <= 7.0 for left in own.seen)
    assert seconds_left() is None


@pytest.mark.parametrize("settings", [{"attempts": 0}, {"attempts": 2.5}, {"base_delay": -1}, {"max_delay": "1"},
                                      {"deadline": 0}, {"deadline": -5.0}])
def test_bad_retry_settings_are_invalid_arguments(settings: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        RetryingBackend(MemoryBackend(uuid.uuid4().hex), **settings)
    assert isinstance(caught.value, ValueError) and next(iter(settings)) in str(caught.value)


def test_conditional_retry_reports_a_real_conflict() -> None:
    """The first try failed without landing and another writer created the key meanwhile:
    the retry's AlreadyExists is theirs, not ours, and must be reported."""
    inner = MemoryBackend(uuid.uuid4().hex)
    faulty = FaultInjectingBackend(inner, [Fault("put", key="^k$")])
    retrying = RetryingBackend(faulty, sleep=lambda s: inner.put("k", b"theirs", mode=OVERWRITE))
    with pytest.raises(AlreadyExistsError):
        retrying.put("k", b"ours!!", mode=CREATE)  # the same size: compared byte by byte
    assert inner.get("k").data == b"theirs"
    version = inner.get("k").version
    faulty.add(Fault("put", key="^k$"))
    with pytest.raises(PreconditionFailedError):
        retrying.put("k", b"ours again", mode=PutMode.update(version))  # "theirs" rewritten meanwhile


def test_conditional_retry_that_finds_our_bytes_returns_the_stored_version() -> None:
    inner = MemoryBackend(uuid.uuid4().hex)
    faulty = FaultInjectingBackend(inner, [Fault("put", action="apply_then_fail", times=2)])
    retrying = RetryingBackend(faulty, sleep=lambda s: None)
    created = retrying.put("k", [b"our ", b"bytes"], mode=CREATE)
    assert created == inner.head("k").version
    updated = retrying.put("k", b"new bytes", mode=PutMode.update(created))
    assert updated == inner.head("k").version and inner.get("k").data == b"new bytes"


class ListFailsMidway(ForwardingBackend):
    """The first listing raises TransientError after yielding `after` objects."""

    def __init__(self, inner: Backend, after: int):
        super().__init__(inner)
        self.after, self.listings = after, 0

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.listings += 1
        for n, info in enumerate(self.inner.list(prefix)):
            if self.listings == 1 and n == self.after:
                raise TransientError("connection reset", key=prefix, operation="list")
            yield info


def test_list_that_fails_midway_starts_over_without_duplicates() -> None:
    inner = MemoryBackend(uuid.uuid4().hex)
    for i in range(10):
        inner.put(f"x/{i}", b"v")
    flaky = ListFailsMidway(inner, after=4)
    listed = [o.key for o in RetryingBackend(flaky, sleep=lambda s: None).list("x/")]
    assert sorted(listed) == [f"x/{i}" for i in range(10)] and len(listed) == 10
    assert flaky.listings == 2
