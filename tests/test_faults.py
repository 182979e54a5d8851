"""The fault-injecting backend itself: which calls a fault affects, and what each action does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from ckptstore.backends.base import CREATE, OVERWRITE, Backend
from ckptstore.backends.local import TMP_DIR, LocalBackend
from ckptstore.backends.memory import MemoryBackend
from ckptstore.errors import ObjectNotFoundError, PermissionDeniedError, PreconditionFailedError, TransientError
from ckptstore.retry import RetryingBackend
from ckptstore.testing.faults import Fault, FaultInjectingBackend
from ckptstore.testing.wrappers import CountingBackend, GatedDeleteBackend, SlowDeleteBackend


def memory() -> MemoryBackend:
    return MemoryBackend(uuid.uuid4().hex)


def outcomes(backend: FaultInjectingBackend, key: str, n: int) -> str:
    """'.' for each put that succeeded, 'x' for each that raised TransientError."""
    result = ""
    for i in range(n):
        try:
            backend.put(key, b"%d" % i)
            result += "."
        except TransientError:
            result += "x"
    return result


def test_skip_then_times_then_through() -> None:
    fault = Fault("put", skip=2, times=3)
    backend = FaultInjectingBackend(memory(), [fault])
    assert outcomes(backend, "a", 8) == "..xxx..."
    assert backend.fired(fault) == 3
    assert backend.calls == [("put", "a")] * 8


def test_times_none_affects_every_call_after_skip() -> None:
    fault = Fault("put", skip=1, times=None)
    backend = FaultInjectingBackend(memory(), [fault])
    assert outcomes(backend, "a", 6) == ".xxxxx"
    assert backend.fired(fault) == 5


def test_key_is_a_regex_searched_in_the_key() -> None:
    chunks = Fault("put", key=r"^chunks/", times=None)
    step_one = Fault("put", key=r"steps/0*1$", times=None)
    backend = FaultInjectingBackend(memory(), [chunks, step_one])
    assert outcomes(backend, "chunks/ab/abcd", 1) == "x"
    assert outcomes(backend, "x/chunks/ab", 1) == "."  # anchored: not at the start
    assert outcomes(backend, "refs/steps/00000000000000000001", 1) == "x"
    assert outcomes(backend, "refs/steps/00000000000000000011", 1) == "."
    assert (backend.fired(chunks), backend.fired(step_one)) == (1, 1)


def test_op_names_a_tuple_or_star_and_list_matches_its_prefix() -> None:
    inner = memory()
    inner.put("refs/a", b"1")
    reads = Fault(("get", "head"), times=None)
    listing = Fault("list", key="^refs/", times=1)
    backend = FaultInjectingBackend(inner, [reads, listing])
    for call in (lambda: backend.get("refs/a"), lambda: backend.head("refs/a"),
                 lambda: list(backend.list("refs/"))):
        with pytest.raises(TransientError):
            call()
    assert [o.key for o in backend.list("refs/")] == ["refs/a"]  # times=1: spent
    assert [o.key for o in backend.list("")] == ["refs/a"]  # prefix "" does not match ^refs/
    everything = Fault("*", times=None)
    backend.add(everything)
    with pytest.raises(TransientError):
        backend.delete("refs/a")
    with pytest.raises(TransientError):
        backend.exists("refs/a")
    assert inner.exists("refs/a")


def test_an_earlier_fault_that_is_spent_lets_a_later_one_act_and_skip_counts_every_match() -> None:
    first = Fault("put", times=1, error=PermissionDeniedError)
    second = Fault("put", skip=1, times=1)
    backend = FaultInjectingBackend(memory(), [first, second])
    with pytest.raises(PermissionDeniedError):
        backend.put("k", b"1")  # first acts; second sees its first (skipped) match
    with pytest.raises(TransientError):
        backend.put("k", b"2")
    backend.put("k", b"3")
    assert (backend.fired(first), backend.fired(second)) == (1, 1)


def test_error_instance_is_raised_as_given_and_a_class_gets_key_and_operation() -> None:
    throttled = TransientError("SlowDown: reduce your request rate")
    backend = FaultInjectingBackend(memory(), [Fault("put", key="^a", error=throttled),
                                               Fault("get", error=ObjectNotFoundError)])
    with pytest.raises(TransientError) as caught:
        backend.put("a", b"x")
    assert caught.value is throttled
    with pytest.raises(ObjectNotFoundError) as missing:
        backend.get("b")
    assert missing.value.key == "b" and missing.value.operation == "get"
    with pytest.raises(ObjectNotFoundError):
        backend.inner.get("a")  # a failed put never reached the inner backend


def test_apply_then_fail_lands_the_write_and_raises() -> None:
    inner = memory()
    backend = FaultInjectingBackend(inner, [Fault("put", action="apply_then_fail")])
    with pytest.raises(TransientError):
        backend.put("k", b"landed", mode=CREATE)
    assert inner.get("k").data == b"landed"


def test_delay_sleeps_then_does_the_operation() -> None:
    inner = memory()
    backend = FaultInjectingBackend(inner, [Fault("put", action="delay", seconds=0.2)])
    started = time.monotonic()
    backend.put("k", b"v")
    assert time.monotonic() - started >= 0.2
    assert inner.get("k").data == b"v"


def test_hang_blocks_until_release_then_does_the_operation() -> None:
    inner = memory()
    backend = FaultInjectingBackend(inner, [Fault("put", action="hang")])
    worker = threading.Thread(target=backend.put, args=("k", b"v"))
    worker.start()
    time.sleep(0.2)
    assert worker.is_alive() and not inner.exists("k")
    backend.release()
    worker.join(timeout=10)
    assert not worker.is_alive() and inner.get("k").data == b"v"
    backend.add(Fault("put", action="hang"))
    backend.put("k2", b"v")  # released for good: later hangs pass at once


def test_hang_with_a_timeout_raises_the_error_without_the_operation() -> None:
    inner = memory()
    backend = FaultInjectingBackend(inner, [Fault("put", action="hang", seconds=0.1)])
    with pytest.raises(TransientError):
        backend.put("k", b"v")
    assert not inner.exists("k")


def test_truncate_put_stores_a_prefix_and_reports_success() -> None:
    inner = memory()
    backend = FaultInjectingBackend(inner, [Fault("put", action="truncate", keep=3)])
    version = backend.put("k", [b"abc", memoryview(b"defg")], mode=CREATE)
    assert inner.get("k").data == b"abc"
    assert inner.head("k").version == version


def test_truncate_reads_return_or_fill_only_keep_bytes() -> None:
    inner = memory()
    inner.put("k", b"0123456789")
    backend = FaultInjectingBackend(inner, [Fault(("get", "get_range", "read_into"), action="truncate",
                                                  keep=4, times=None)])
    assert backend.get("k").data == b"0123"
    assert backend.get_range("k", 2, 6) == b"2345"
    first, second = bytearray(3), bytearray(5)
    assert backend.read_into("k", 0, [memoryview(first), memoryview(second)]) == 4
    assert (bytes(first), bytes(second)) == (b"012", b"3\0\0\0\0")


def test_concurrent_calls_are_counted_exactly() -> None:
    fault = Fault("put", skip=11, times=37)
    backend = FaultInjectingBackend(memory(), [fault])
    failures = []

    def hammer(worker: int) -> None:
        for i in range(50):
            try:
                backend.put(f"k/{worker}/{i}", b"x")
            except TransientError:
                failures.append(1)

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(failures) == 37 == backend.fired(fault)
    assert len(backend.calls) == 400


def test_bad_faults_are_refused() -> None:
    with pytest.raises(ValueError, match="operation"):
        Fault("upload")
    with pytest.raises(ValueError, match="action"):
        Fault("put", action="explode")
    with pytest.raises(ValueError, match="truncate"):
        Fault("delete", action="truncate")
    with pytest.raises(ValueError):
        Fault("put", times=-1)


def test_cleanup_staging_and_backend_attributes_are_forwarded(tmp_path: Path) -> None:
    inner = LocalBackend(str(tmp_path / "store"))
    backend = FaultInjectingBackend(inner, [Fault("cleanup_staging")])
    with pytest.raises(TransientError):
        backend.cleanup_staging(0)
    assert backend.cleanup_staging(0) == 0
    assert backend.url == inner.url and backend.needs_canary == inner.needs_canary
    assert backend.root == inner.root  # a LocalBackend attribute, read through the wrapper


_WRAPPERS = {
    "faults": lambda inner: FaultInjectingBackend(inner),
    "retrying": lambda inner: RetryingBackend(inner),
    "counting": lambda inner: CountingBackend(inner),
    "gated": lambda inner: GatedDeleteBackend(inner, key="k", gate=_open_gate()),
    "slow": lambda inner: SlowDeleteBackend(inner, delay=0),
}


def _open_gate() -> threading.Event:
    gate = threading.Event()
    gate.set()
    return gate


@pytest.mark.parametrize("wrapper", sorted(_WRAPPERS))
def test_wrappers_forward_delete_if_version_and_server_time(tmp_path: Path, wrapper: str) -> None:
    inner = LocalBackend(str(tmp_path / "store"))
    backend: Backend = _WRAPPERS[wrapper](inner)
    old = backend.put("k", b"one")
    current = backend.put("k", b"two")
    with pytest.raises(PreconditionFailedError):
        backend.delete("k", version=old)
    assert inner.get("k").data == b"two"
    backend.delete("k", version=current)
    assert not inner.exists("k")
    # cleanup_staging gets the caller's (server) time, not the wrapper's clock.
    leftover = tmp_path / "store" / TMP_DIR / "crashed.tmp"
    leftover.write_bytes(b"torn")
    os.utime(leftover, (1000.0, 1000.0))
    assert backend.cleanup_staging(600, now=1500.0) == 0  # 500 s old by that clock
    assert leftover.exists()
    assert backend.cleanup_staging(600, now=1700.0) == 1
    assert not leftover.exists()


def test_retried_conditional_delete_that_landed_is_a_noop() -> None:
    inner = FaultInjectingBackend(memory(), [Fault("delete", action="apply_then_fail")])
    backend = RetryingBackend(inner, sleep=lambda _: None)
    version = backend.put("refs/steps/1", b"commit a")
    backend.delete("refs/steps/1", version=version)  # landed, reported failed, retried: absent
    assert not backend.exists("refs/steps/1")
    assert [op for op, _ in inner.calls].count("delete") == 2


def test_retried_conditional_delete_spares_an_object_recreated_in_between() -> None:
    """The delete lands, the caller is told it failed, the step is committed again, then the
    retry runs: it must fail (PreconditionFailedError, not retried) and leave the new commit."""
    inner = FaultInjectingBackend(memory(), [Fault("delete", action="apply_then_fail")])
    recommit = lambda _: inner.put("refs/steps/1", b"commit b", mode=CREATE)  # noqa: E731
    backend = RetryingBackend(inner, sleep=recommit)
    version = backend.put("refs/steps/1", b"commit a")
    with pytest.raises(PreconditionFailedError):
        backend.delete("refs/steps/1", version=version)
    assert backend.get("refs/steps/1").data == b"commit b"
    assert [op for op, _ in inner.calls].count("delete") == 2


_CHILD = """
import sys
from ckptstore.backends.base import OVERWRITE
from ckptstore.backends.local import LocalBackend
from ckptstore.testing.faults import Fault, FaultInjectingBackend
backend = FaultInjectingBackend(LocalBackend(sys.argv[1]), [Fault("put", key="^victim$", action=sys.argv[2])])
backend.put("before", b"written first", mode=OVERWRITE)
backend.put("victim", b"the payload " * 1000, mode=OVERWRITE)
backend.put("after", b"never", mode=OVERWRITE)
print("survived", flush=True)
"""


@pytest.mark.parametrize("action", ["kill_after", "kill_before"])
def test_kill_in_a_child_process_kills_it_around_the_write(tmp_path: Path, action: str) -> None:
    root = str(tmp_path / "store")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHILD), root, action],
                            capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert "survived" not in result.stdout
    store = LocalBackend(root)
    assert store.get("before").data == b"written first"
    assert not store.exists("after")
    if action == "kill_after":
        assert store.get("victim").data == b"the payload " * 1000  # the whole write landed first
    else:
        assert not store.exists("victim")


def test_unused_fault_never_fires() -> None:
    fault = Fault("delete", key="^nothing$")
    backend = FaultInjectingBackend(memory(), [fault])
    backend.put("k", b"v", mode=OVERWRITE)
    backend.delete("k")
    assert backend.fired(fault) == 0


# -- get_small: one operation through the wrappers -----------------------------------------------

def test_get_small_is_one_operation_through_the_wrappers() -> None:
    """A store's bounded read of a ref is ONE call of the inner backend's get_small through the
    retrying, fault-injecting and counting wrappers (one request on S3 and GCS), faulted and
    retried as a whole; before, every wrapper saw a head and a get_range."""
    inner = memory()
    version = inner.put("refs/steps/1", b"ref")
    fault = Fault("get_small", key=r"^refs/", times=1)
    faulty = FaultInjectingBackend(inner, [fault])
    counting = CountingBackend(faulty)
    backend = RetryingBackend(counting, sleep=lambda _: None)
    got = backend.get_small("refs/steps/1", 64)
    assert (got.data, got.version) == (b"ref", version)
    assert faulty.fired(fault) == 1
    assert faulty.calls == [("get_small", "refs/steps/1")] * 2  # the faulted try and its retry
    assert dict(counting.calls) == {("get", "refs"): 2}


def test_a_fault_on_head_still_sees_get_small_as_a_head_and_a_bounded_read() -> None:
    """Faults (and hooks) written for the head + get_range of get_small keep seeing those two calls."""
    inner = memory()
    inner.put("locks/epoch", b"epoch")
    faulty = FaultInjectingBackend(inner, [Fault("head", key=r"^locks/epoch$", times=1)])
    with pytest.raises(TransientError):
        faulty.get_small("locks/epoch", 64)
    assert faulty.get_small("locks/epoch", 64).data == b"epoch"
    assert faulty.calls == [("head", "locks/epoch"), ("head", "locks/epoch"), ("get_range", "locks/epoch")]


def test_truncate_on_get_small_returns_the_first_bytes() -> None:
    inner = memory()
    inner.put("refs/steps/1", b"0123456789")
    faulty = FaultInjectingBackend(inner, [Fault("get_small", action="truncate", keep=4)])
    assert faulty.get_small("refs/steps/1", 64).data == b"0123"
