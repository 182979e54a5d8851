"""The backend conformance suite: one set of tests every `Backend` must pass unchanged.

Subclass `BackendConformance` in a test module, name the subclass `Test...`, and give it one
pytest fixture, `backend`, that returns (or yields) a fresh, empty backend::

    import pytest
    from ckptstore.backends.memory import MemoryBackend
    from ckptstore.testing.conformance import BackendConformance

    class TestMemoryBackend(BackendConformance):
        @pytest.fixture
        def backend(self):
            return MemoryBackend(uuid.uuid4().hex)

The canary tests come first: a backend that does not enforce create-only and
update-if-version puts cannot hold a checkpoint store, so those failures are the ones to read.
Class attributes tune the slow parts for backends behind a network (`race_rounds`,
`race_threads`, `many_keys`).

This module imports pytest; `import ckptstore` never imports it.
"""

from __future__ import annotations

import array
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ckptstore.backends.base import Backend, Buffer, ObjectInfo, PutMode
from ckptstore.errors import (
    AlreadyExistsError,
    FormatError,
    InvalidKeyError,
    ObjectNotFoundError,
    PreconditionFailedError,
)

#: Keys every backend must refuse: escapes, absolute paths, empty or dot segments, odd characters.
INVALID_KEYS: tuple[Any, ...] = (
    "",
    ".",
    "..",
    "../x",
    "a/../../x",
    "/abs",
    "/",
    "a//b",
    "a/./b",
    "a/b/",
    "./a",
    "a b",
    "a\\b",
    "..\\x",
    "a/b c/d",
    "a\nb",
    "a\n",  # a regex `$` would accept a trailing newline
    "a/b\n",
)


class RequestCounter:
    """Requests a backend sent on the thread that made this counter (the test's) and the body
    sizes (Content-Length) of their answers, fed by a subclass's `request_counter` from its
    client's own hooks (boto3 events, requests hooks). Requests a library sends from threads
    of its own are not the operation's: google-cloud-storage 3.17 fetches a bucket's metadata
    in the background on a client's first use, and checks that the bucket exists after a 404."""

    def __init__(self) -> None:
        self.requests = 0
        self.answer_bytes: list[int] = []
        self.log: list[str] = []  # what each request was, for the failure message
        self._thread = threading.get_ident()
        self._lock = threading.Lock()

    def sent(self, what: str = "") -> None:
        if threading.get_ident() != self._thread:
            return
        with self._lock:
            self.requests += 1
            self.log.append(what)

    def answered(self, nbytes: int) -> None:
        if threading.get_ident() != self._thread:
            return
        with self._lock:
            self.answer_bytes.append(nbytes)

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.answer_bytes.clear()
            self.log.clear()


class BackendConformance:
    """Tests every backend must pass. Subclasses provide the `backend` fixture."""

    #: How many times each race is run; each round uses fresh keys.
    race_rounds: int = 10
    #: How many threads contend in each race round.
    race_threads: int = 8
    #: Keys written by the large-listing test (more than one S3/GCS page of 1000).
    many_keys: int = 1200
    #: Whether every put mints a new version even for identical bytes (local, memory, GCS
    #: generations). S3 ETags are content hashes, so an S3 subclass sets this False: there the
    #: contract holds only because callers make payloads unique, and the stricter tests skip.
    distinct_versions_for_identical_bytes: bool = True
    #: Whether list() yields keys in lexicographic order. SeaweedFS walks its filer's
    #: directories and does not; callers that need an order sort (Store.steps does).
    sorted_listing: bool = True

    @pytest.fixture
    def backend(self) -> Backend:
        """A fresh, empty backend. Subclasses must override this fixture."""
        raise NotImplementedError(f"{type(self).__name__} must define a `backend` pytest fixture")

    # -- helpers a subclass may reuse or tune -----------------------------------------------

    @staticmethod
    def keys_of(infos: Iterable[ObjectInfo]) -> list[str]:
        """The keys of a listing, in the order the backend returned them."""
        return [info.key for info in infos]

    def race(self, fn: Callable[[int], Any], threads: int | None = None) -> list[tuple[str, Any]]:
        """Run `fn(i)` in `threads` threads released together; return ("ok", value) or ("err", exc) per thread."""
        n = self.race_threads if threads is None else threads
        barrier = threading.Barrier(n)

        def contender(i: int) -> tuple[str, Any]:
            barrier.wait()
            try:
                return ("ok", fn(i))
            except Exception as exc:  # collected and checked by the caller
                return ("err", exc)

        with ThreadPoolExecutor(max_workers=n) as pool:
            return list(pool.map(contender, range(n)))

    def split_race(
        self, outcomes: Sequence[tuple[str, Any]], loser_error: type[BaseException]
    ) -> tuple[list[int], list[BaseException]]:
        """Indices of the winners; fails if any loser raised anything but `loser_error`."""
        winners = [i for i, (status, _) in enumerate(outcomes) if status == "ok"]
        errors = [value for status, value in outcomes if status == "err"]
        unexpected = [e for e in errors if not isinstance(e, loser_error)]
        assert not unexpected, f"losers must raise {loser_error.__name__}, got {unexpected!r}"
        return winners, errors

    def request_counter(self, backend: Backend) -> RequestCounter | None:
        """A RequestCounter that `backend`'s requests from now on feed, for the tests that count
        them; None (this default: local and memory send none) skips those tests."""
        return None

    # -- canaries: the two guarantees a checkpoint commit stands on ----------------------------

    def test_canary_create_only_is_enforced(self, backend: Backend) -> None:
        version = backend.put("canary/create", b"first", mode=PutMode.CREATE)
        assert version
        with pytest.raises(AlreadyExistsError):
            backend.put("canary/create", b"second", mode=PutMode.CREATE)
        got = backend.get("canary/create")
        assert got.data == b"first"
        assert got.version == version

    def test_canary_update_if_version_is_enforced(self, backend: Backend) -> None:
        v1 = backend.put("canary/update", b"one")
        v2 = backend.put("canary/update", b"two")
        assert v1 != v2
        with pytest.raises(PreconditionFailedError):
            backend.put("canary/update", b"stale", mode=PutMode.update(v1))
        got = backend.get("canary/update")
        assert got.data == b"two"
        assert got.version == v2
        with pytest.raises(PreconditionFailedError):
            backend.put("canary/missing", b"x", mode=PutMode.update(v2))
        with pytest.raises(ObjectNotFoundError):
            backend.get("canary/missing")

    # -- put / get -----------------------------------------------------------------------------

    def test_put_get_bytes(self, backend: Backend) -> None:
        payload = bytes(range(256)) * 3
        version = backend.put("rt/bytes", payload)
        got = backend.get("rt/bytes")
        assert got.data == payload
        assert isinstance(got.data, bytes)
        assert got.version == version

    def test_put_get_bytearray(self, backend: Backend) -> None:
        payload = bytearray(b"mutable payload")
        backend.put("rt/bytearray", payload)
        payload[:] = b"X" * len(payload)  # the backend must not keep a reference to the caller's buffer
        assert backend.get("rt/bytearray").data == b"mutable payload"

    def test_put_get_memoryview(self, backend: Backend) -> None:
        source = bytes(range(200))
        backend.put("rt/view", memoryview(source)[10:110])
        assert backend.get("rt/view").data == source[10:110]

    def test_put_memoryview_of_wider_items_stores_raw_bytes(self, backend: Backend) -> None:
        words = array.array("I", [1, 2, 0xDEADBEEF, 7])
        backend.put("rt/words", memoryview(words))
        got = backend.get("rt/words")
        assert got.data == words.tobytes()
        assert len(got.data) == 4 * words.itemsize

    def test_put_list_of_parts_concatenates(self, backend: Backend) -> None:
        parts: list[Buffer] = [b"head-", memoryview(b"--middle--")[2:8], bytearray(b"-tail"), b"", memoryview(b"!")]
        expected = b"head-middle-tail!"
        version = backend.put("rt/parts", parts)
        got = backend.get("rt/parts")
        assert got.data == expected
        assert got.version == version
        assert backend.head("rt/parts").size == len(expected)

    def test_put_tuple_of_parts(self, backend: Backend) -> None:
        backend.put("rt/tuple", (b"ab", b"cd"))
        assert backend.get("rt/tuple").data == b"abcd"

    def test_empty_object(self, backend: Backend) -> None:
        version = backend.put("rt/empty", b"")
        got = backend.get("rt/empty")
        assert got.data == b""
        assert got.version == version
        info = backend.head("rt/empty")
        assert info.size == 0
        assert info.version == version
        assert backend.exists("rt/empty")
        assert backend.get_range("rt/empty", 0, 10) == b""
        assert self.keys_of(backend.list("rt/")) == ["rt/empty"]

    def test_empty_list_of_parts(self, backend: Backend) -> None:
        backend.put("rt/noparts", [])
        assert backend.get("rt/noparts").data == b""

    def test_create_only_on_fresh_key_succeeds(self, backend: Backend) -> None:
        version = backend.put("create/fresh", [b"a", b"b"], mode=PutMode.CREATE)
        assert backend.get("create/fresh").data == b"ab"
        assert backend.head("create/fresh").version == version

    def test_large_object_round_trip(self, backend: Backend) -> None:
        payload = bytes(range(251)) * (1 << 12) + b"tail"  # ~1 MiB, not a multiple of anything
        version = backend.put("rt/large", [payload[:1000], payload[1000:]])
        got = backend.get("rt/large")
        assert got.data == payload
        assert got.version == version
        assert backend.head("rt/large").size == len(payload)
        assert backend.get_range("rt/large", len(payload) - 10, 100) == payload[-10:]

    # -- missing keys --------------------------------------------------------------------------

    def test_missing_key_raises_not_found(self, backend: Backend) -> None:
        with pytest.raises(ObjectNotFoundError):
            backend.get("missing/key")
        with pytest.raises(ObjectNotFoundError):
            backend.head("missing/key")
        with pytest.raises(ObjectNotFoundError):
            backend.get_range("missing/key", 0, 1)
        with pytest.raises(ObjectNotFoundError):
            backend.read_into("missing/key", 0, [memoryview(bytearray(4))])
        assert not backend.exists("missing/key")

    def test_missing_key_under_an_existing_prefix(self, backend: Backend) -> None:
        backend.put("dir/present", b"x")
        with pytest.raises(ObjectNotFoundError):
            backend.get("dir/absent")
        with pytest.raises(ObjectNotFoundError):
            backend.get("dir")  # a prefix of a key is not an object
        with pytest.raises(ObjectNotFoundError):
            backend.head("dir")

    def test_not_found_error_names_key_and_operation(self, backend: Backend) -> None:
        with pytest.raises(ObjectNotFoundError) as info:
            backend.get("missing/named")
        assert info.value.key == "missing/named"
        assert "missing/named" in str(info.value)

    # -- ranges and read_into ------------------------------------------------------------------

    def test_get_range(self, backend: Backend) -> None:
        payload = bytes(range(100))
        backend.put("range/obj", payload)
        assert backend.get_range("range/obj", 0, 10) == payload[:10]
        assert backend.get_range("range/obj", 37, 21) == payload[37:58]
        assert backend.get_range("range/obj", 0, 100) == payload
        assert backend.get_range("range/obj", 99, 1) == payload[99:]
        assert backend.get_range("range/obj", 42, 0) == b""

    def test_get_range_at_end_is_short(self, backend: Backend) -> None:
        payload = bytes(range(100))
        backend.put("range/obj", payload)
        assert backend.get_range("range/obj", 90, 50) == payload[90:]
        assert backend.get_range("range/obj", 0, 1000) == payload

    def test_get_range_past_end_is_empty(self, backend: Backend) -> None:
        backend.put("range/obj", b"0123456789")
        assert backend.get_range("range/obj", 10, 5) == b""
        assert backend.get_range("range/obj", 500, 5) == b""

    def test_read_into_fills_buffers_in_order(self, backend: Backend) -> None:
        payload = bytes(range(64))
        backend.put("into/obj", payload)
        bufs = [bytearray(5), bytearray(0), bytearray(11), bytearray(16)]
        n = backend.read_into("into/obj", 3, [memoryview(b) for b in bufs])
        assert n == 32
        assert bytes(bufs[0]) == payload[3:8]
        assert bytes(bufs[2]) == payload[8:19]
        assert bytes(bufs[3]) == payload[19:35]

    def test_read_into_short_object(self, backend: Backend) -> None:
        payload = b"abcdefghij"
        backend.put("into/short", payload)
        bufs = [bytearray(b"\xee" * 4), bytearray(b"\xee" * 4), bytearray(b"\xee" * 4)]
        n = backend.read_into("into/short", 2, [memoryview(b) for b in bufs])
        assert n == 8
        assert bytes(bufs[0]) == b"cdef"
        assert bytes(bufs[1]) == b"ghij"
        assert bytes(bufs[2]) == b"\xee" * 4  # nothing past the end is written

    def test_read_into_partial_buffer_and_past_end(self, backend: Backend) -> None:
        backend.put("into/tiny", b"xyz")
        buf = bytearray(b"\x00" * 8)
        assert backend.read_into("into/tiny", 0, [memoryview(buf)]) == 3
        assert bytes(buf) == b"xyz" + b"\x00" * 5
        assert backend.read_into("into/tiny", 3, [memoryview(bytearray(4))]) == 0
        assert backend.read_into("into/tiny", 100, [memoryview(bytearray(4))]) == 0

    def test_read_into_wider_item_buffer(self, backend: Backend) -> None:
        words = array.array("I", [11, 22, 33, 44])
        backend.put("into/words", words.tobytes())
        target = array.array("I", [0, 0, 0, 0])
        n = backend.read_into("into/words", 0, [memoryview(target)])
        assert n == 4 * target.itemsize
        assert target.tolist() == [11, 22, 33, 44]

    # -- versions ------------------------------------------------------------------------------

    def test_head_reports_size_and_version(self, backend: Backend) -> None:
        payload = b"h" * 1234
        version = backend.put("ver/obj", payload)
        info = backend.head("ver/obj")
        assert info.key == "ver/obj"
        assert info.size == len(payload)
        assert info.version == version
        assert backend.get("ver/obj").version == version
        assert isinstance(info.modified, float)
        assert info.modified > 0

    def test_versions_are_stable_across_reads(self, backend: Backend) -> None:
        version = backend.put("ver/stable", b"payload")
        assert {backend.get("ver/stable").version for _ in range(3)} == {version}
        assert {backend.head("ver/stable").version for _ in range(3)} == {version}
        [listed] = backend.list("ver/stable")
        assert listed.version == version
        assert listed.size == len(b"payload")

    def test_overwrite_changes_version(self, backend: Backend) -> None:
        v1 = backend.put("ver/ow", b"one")
        v2 = backend.put("ver/ow", b"two")
        assert v1 != v2
        got = backend.get("ver/ow")
        assert got.data == b"two"
        assert got.version == v2
        assert backend.head("ver/ow").version == v2

    def test_identical_rewrite_keeps_a_working_version_chain(self, backend: Backend) -> None:
        payload = b"same bytes every time"
        versions = [backend.put("ver/same", payload)]
        for _ in range(5):
            versions.append(backend.put("ver/same", payload, mode=PutMode.OVERWRITE))
            assert backend.get("ver/same").version == versions[-1]
            assert backend.head("ver/same").version == versions[-1]
        # Update from the latest read succeeds, and so does the next one in the chain.
        latest = backend.get("ver/same").version
        updated = backend.put("ver/same", payload, mode=PutMode.update(latest))
        assert backend.get("ver/same").version == updated
        again = backend.put("ver/same", payload, mode=PutMode.update(updated))
        assert backend.head("ver/same").version == again
        assert backend.get("ver/same").data == payload
        # The chain still rejects a writer that read the object before a change of bytes.
        changed = backend.put("ver/same", b"different bytes", mode=PutMode.update(again))
        with pytest.raises(PreconditionFailedError):
            backend.put("ver/same", b"stale writer", mode=PutMode.update(again))
        assert backend.get("ver/same").version == changed

    def test_identical_rewrite_mints_new_versions(self, backend: Backend) -> None:
        if not self.distinct_versions_for_identical_bytes:
            pytest.skip("versions are content hashes on this backend")
        payload = b"same bytes every time"
        versions = [backend.put("ver/same", payload)]
        for _ in range(5):
            versions.append(backend.put("ver/same", payload))
        latest = backend.get("ver/same").version
        updated = backend.put("ver/same", payload, mode=PutMode.update(latest))
        versions.append(updated)
        assert len(set(versions)) == len(versions), f"repeated versions: {versions}"
        # Every version read before a rewrite is stale, even though the bytes never changed.
        for stale in versions[:-1]:
            with pytest.raises(PreconditionFailedError):
                backend.put("ver/same", b"stale writer", mode=PutMode.update(stale))
        assert backend.get("ver/same").data == payload
        assert backend.get("ver/same").version == updated

    def test_delete_and_recreate_invalidates_old_version(self, backend: Backend) -> None:
        old = backend.put("ver/recreated", b"first life")
        backend.delete("ver/recreated")
        new = backend.put("ver/recreated", b"second life", mode=PutMode.CREATE)
        assert new != old
        with pytest.raises(PreconditionFailedError):
            backend.put("ver/recreated", b"stale", mode=PutMode.update(old))
        assert backend.get("ver/recreated").data == b"second life"

    def test_delete_and_recreate_identical_bytes_invalidates_old_version(self, backend: Backend) -> None:
        if not self.distinct_versions_for_identical_bytes:
            pytest.skip("versions are content hashes on this backend")
        payload = b"ref payload"
        for round_ in range(5):
            old = backend.put("ver/reborn", payload)
            backend.delete("ver/reborn")
            new = backend.put("ver/reborn", payload, mode=PutMode.CREATE)
            assert new != old, f"round {round_}: recreated object got the deleted one's version"
            with pytest.raises(PreconditionFailedError):
                backend.put("ver/reborn", b"stale", mode=PutMode.update(old))
            assert backend.get("ver/reborn").data == payload
            backend.delete("ver/reborn")

    def test_update_with_current_version(self, backend: Backend) -> None:
        v1 = backend.put("upd/obj", b"one")
        v2 = backend.put("upd/obj", [b"t", b"wo"], mode=PutMode.update(v1))
        assert v2 != v1
        got = backend.get("upd/obj")
        assert got.data == b"two"
        assert got.version == v2
        v3 = backend.put("upd/obj", b"three", mode=PutMode.update(got.version))
        assert v3 not in (v1, v2)
        with pytest.raises(PreconditionFailedError):
            backend.put("upd/obj", b"late", mode=PutMode.update(v2))
        assert backend.get("upd/obj").data == b"three"

    def test_update_after_create_only(self, backend: Backend) -> None:
        v1 = backend.put("upd/created", b"created", mode=PutMode.CREATE)
        v2 = backend.put("upd/created", b"updated", mode=PutMode.update(v1))
        assert v2 != v1
        assert backend.get("upd/created").data == b"updated"

    def test_update_with_version_from_head(self, backend: Backend) -> None:
        backend.put("upd/head", b"one")
        version = backend.head("upd/head").version
        backend.put("upd/head", b"two", mode=PutMode.update(version))
        assert backend.get("upd/head").data == b"two"

    def test_update_with_version_of_another_key_fails(self, backend: Backend) -> None:
        other = backend.put("upd/other", b"other payload")
        backend.put("upd/target", b"target payload")
        with pytest.raises(PreconditionFailedError):
            backend.put("upd/target", b"x", mode=PutMode.update(other))
        assert backend.get("upd/target").data == b"target payload"

    def test_update_with_made_up_version_fails(self, backend: Backend) -> None:
        backend.put("upd/bogus", b"data")
        with pytest.raises(PreconditionFailedError):
            backend.put("upd/bogus", b"x", mode=PutMode.update("not-a-real-version"))
        assert backend.get("upd/bogus").data == b"data"

    def test_failed_conditional_puts_leave_no_object(self, backend: Backend) -> None:
        with pytest.raises(PreconditionFailedError):
            backend.put("cond/none", b"x", mode=PutMode.update("whatever"))
        assert not backend.exists("cond/none")
        assert self.keys_of(backend.list("cond/")) == []

    # -- delete --------------------------------------------------------------------------------

    def test_delete_then_get_raises(self, backend: Backend) -> None:
        backend.put("del/obj", b"x")
        backend.put("del/keep", b"y")
        backend.delete("del/obj")
        with pytest.raises(ObjectNotFoundError):
            backend.get("del/obj")
        with pytest.raises(ObjectNotFoundError):
            backend.head("del/obj")
        assert not backend.exists("del/obj")
        assert self.keys_of(backend.list("del/")) == ["del/keep"]
        assert backend.get("del/keep").data == b"y"

    def test_delete_missing_is_noop(self, backend: Backend) -> None:
        backend.delete("del/never-existed")
        backend.delete("nowhere/at/all")
        backend.put("del/once", b"x")
        backend.delete("del/once")
        backend.delete("del/once")
        assert self.keys_of(backend.list("")) == []

    def test_delete_many_deletes_every_key_and_nothing_else(self, backend: Backend) -> None:
        doomed = [f"many/{i}" for i in range(7)]
        for key in [*doomed, "many-keep/a", "many/keep/b"]:
            backend.put(key, b"x")
        backend.max_delete_batch = 3  # several batch requests: 3 + 3 + 1
        assert backend.delete_many(doomed) == []
        assert sorted(self.keys_of(backend.list(""))) == ["many-keep/a", "many/keep/b"]

    def test_delete_many_of_a_missing_key_is_not_an_error(self, backend: Backend) -> None:
        backend.put("many/here", b"x")
        assert backend.delete_many(["many/never-existed", "many/here", "nowhere/at/all"]) == []
        assert backend.delete_many([]) == []
        assert self.keys_of(backend.list("")) == []

    def test_delete_many_returns_each_failed_key_with_its_typed_error(self, backend: Backend) -> None:
        for key in ("many/a", "many/b"):
            backend.put(key, b"x")
        failures = backend.delete_many(["many/a", "a b", "many/b", "../x"])
        assert [key for key, _ in failures] == ["a b", "../x"]
        assert all(isinstance(error, InvalidKeyError) for _, error in failures)
        assert self.keys_of(backend.list("")) == []  # the valid keys went, whatever the others did

    def test_update_after_delete_fails(self, backend: Backend) -> None:
        version = backend.put("del/upd", b"x")
        backend.delete("del/upd")
        with pytest.raises(PreconditionFailedError):
            backend.put("del/upd", b"y", mode=PutMode.update(version))
        assert not backend.exists("del/upd")

    def test_create_after_delete_succeeds(self, backend: Backend) -> None:
        backend.put("del/create", b"x", mode=PutMode.CREATE)
        backend.delete("del/create")
        backend.put("del/create", b"y", mode=PutMode.CREATE)
        assert backend.get("del/create").data == b"y"

    # -- delete-if-version ---------------------------------------------------------------------

    def test_delete_with_current_version_deletes(self, backend: Backend) -> None:
        version = backend.put("cdel/obj", b"current")
        backend.put("cdel/keep", b"neighbour")
        backend.delete("cdel/obj", version=version)
        assert not backend.exists("cdel/obj")
        with pytest.raises(ObjectNotFoundError):
            backend.get("cdel/obj")
        backend.put("cdel/headed", b"read by head")
        backend.delete("cdel/headed", version=backend.head("cdel/headed").version)
        assert not backend.exists("cdel/headed")
        assert self.keys_of(backend.list("cdel/")) == ["cdel/keep"]

    def test_delete_with_stale_version_fails_and_keeps_the_object(self, backend: Backend) -> None:
        v1 = backend.put("cdel/stale", b"one")
        v2 = backend.put("cdel/stale", b"two")
        assert v1 != v2
        with pytest.raises(PreconditionFailedError):
            backend.delete("cdel/stale", version=v1)
        got = backend.get("cdel/stale")
        assert (got.data, got.version) == (b"two", v2)
        other = backend.put("cdel/other", b"another key's object")
        with pytest.raises(PreconditionFailedError):
            backend.delete("cdel/stale", version=other)
        with pytest.raises(PreconditionFailedError):
            backend.delete("cdel/stale", version="not-a-real-version")
        assert backend.get("cdel/stale").version == v2
        backend.delete("cdel/stale", version=v2)
        assert not backend.exists("cdel/stale")

    def test_delete_with_version_of_missing_key_is_noop(self, backend: Backend) -> None:
        version = backend.put("cdel/gone", b"x")
        backend.delete("cdel/gone", version=version)
        backend.delete("cdel/gone", version=version)  # a retry after the first one landed
        backend.delete("cdel/never", version=version)
        backend.delete("cdel/never", version="not-a-real-version")
        backend.delete("nowhere/at/all", version=version)
        assert self.keys_of(backend.list("")) == []

    def test_delete_with_empty_version_is_refused(self, backend: Backend) -> None:
        backend.put("cdel/empty", b"x")
        with pytest.raises(ValueError):
            backend.delete("cdel/empty", version="")  # never mistaken for "no condition"
        assert backend.exists("cdel/empty")

    def test_delete_with_old_version_spares_a_recreated_object(self, backend: Backend) -> None:
        """A delete that landed, a re-commit of the key, then a retry of the delete: the
        retry must not remove the new object."""
        old = backend.put("cdel/ref", b"commit 1")
        backend.delete("cdel/ref", version=old)
        new = backend.put("cdel/ref", b"commit 2", mode=PutMode.CREATE)
        with pytest.raises(PreconditionFailedError):
            backend.delete("cdel/ref", version=old)
        got = backend.get("cdel/ref")
        assert (got.data, got.version) == (b"commit 2", new)

    def test_delete_with_old_version_spares_a_recreated_identical_object(self, backend: Backend) -> None:
        """As above, with the same bytes re-created: only the version tells them apart."""
        if not self.distinct_versions_for_identical_bytes:
            pytest.skip("versions are content hashes on this backend")
        payload = b"ref payload"
        for round_ in range(5):
            old = backend.put("cdel/reborn", payload)
            backend.delete("cdel/reborn", version=old)
            new = backend.put("cdel/reborn", payload, mode=PutMode.CREATE)
            assert new != old, f"round {round_}: recreated object got the deleted one's version"
            with pytest.raises(PreconditionFailedError):
                backend.delete("cdel/reborn", version=old)
            assert backend.get("cdel/reborn").version == new, f"round {round_}"
            backend.delete("cdel/reborn", version=new)
            assert not backend.exists("cdel/reborn")

    def test_race_delete_and_update_from_one_version(self, backend: Backend) -> None:
        """Half the threads delete at version v, half update from v: either one update wins
        and every delete fails, or the object is deleted and every update fails."""
        for round_ in range(self.race_rounds):
            key = f"race/cdel/{round_:03d}"
            base = backend.put(key, f"base {round_}".encode())

            def contend(i: int, key: str = key, base: str = base, round_: int = round_) -> str | None:
                if i % 2:
                    backend.delete(key, version=base)
                    return None
                return backend.put(key, f"updater {i} round {round_}".encode(), mode=PutMode.update(base))

            outcomes = self.race(contend)
            winners, _ = self.split_race(outcomes, PreconditionFailedError)
            updaters = [i for i in winners if i % 2 == 0]
            deleters_ok = [i for i in winners if i % 2]
            if updaters:
                assert len(updaters) == 1, f"round {round_}: {len(updaters)} update winners"
                assert not deleters_ok, f"round {round_}: deletes at a replaced version returned normally"
                got = backend.get(key)
                assert got.data == f"updater {updaters[0]} round {round_}".encode()
                assert got.version == outcomes[updaters[0]][1]
            else:
                assert not backend.exists(key), f"round {round_}: no winner, yet the object stays"
                assert deleters_ok, f"round {round_}: every delete and every update failed"

    # -- list ----------------------------------------------------------------------------------

    LIST_KEYS: tuple[str, ...] = (
        "CKPTSTORE",
        "chunks/ab/x",
        "chunks/ab/y",
        "chunks/ac",
        "chunks/b0/z",
        "chunksX",
        "manifests/00/deep/er/still",
        "refs/steps/00000000000000000001",
        "refs/steps/00000000000000000010",
        "refs/tags/best",
        "top",
    )

    def _fill(self, backend: Backend, keys: Iterable[str]) -> dict[str, int]:
        sizes = {}
        for i, key in enumerate(keys):
            payload = f"{key}#{i}".encode() * (i + 1)
            backend.put(key, payload)
            sizes[key] = len(payload)
        return sizes

    @pytest.mark.parametrize(
        "prefix",
        [
            "",
            "c",
            "chunks",
            "chunks/",
            "chunks/a",
            "chunks/ab",
            "chunks/ab/",
            "chunks/ab/x",
            "chunks/ac",
            "chunks/b",
            "manifests/00/deep/",
            "manifests/00/deep/er/s",
            "refs/",
            "refs/steps/0000000000000000001",
            "top",
            "nothing",
            "chunks/zz/",
            "top/",
            "CKPTSTORE/",
        ],
    )
    def test_list_prefix(self, backend: Backend, prefix: str) -> None:
        sizes = self._fill(backend, self.LIST_KEYS)
        infos = list(backend.list(prefix))
        expected = sorted(k for k in self.LIST_KEYS if k.startswith(prefix))
        assert self.keys_of(infos) == expected
        for info in infos:
            assert isinstance(info, ObjectInfo)
            assert info.size == sizes[info.key]
            assert info.version == backend.head(info.key).version

    def test_list_partial_segment_prefix(self, backend: Backend) -> None:
        self._fill(backend, self.LIST_KEYS)
        assert self.keys_of(backend.list("chunks/a")) == ["chunks/ab/x", "chunks/ab/y", "chunks/ac"]
        assert self.keys_of(backend.list("chunks")) == [
            "chunks/ab/x",
            "chunks/ab/y",
            "chunks/ac",
            "chunks/b0/z",
            "chunksX",
        ]
        assert self.keys_of(backend.list("nothing/here")) == []

    def test_list_empty_backend(self, backend: Backend) -> None:
        assert list(backend.list()) == []
        assert list(backend.list("")) == []
        assert list(backend.list("a/b/")) == []

    def test_list_order_is_lexicographic_over_whole_keys(self, backend: Backend) -> None:
        # '-' < '.' < '/' < '0' < 'A' < '_' < 'a': a per-directory walk gets this wrong.
        keys = ["ord/a-b", "ord/a.b", "ord/a/b/c", "ord/a0", "ord/A", "ord/a_b", "ord/B/x", "ord/a/_"]
        for key in reversed(keys):
            backend.put(key, key.encode())
        listed, listed_a = self.keys_of(backend.list("ord/")), self.keys_of(backend.list("ord/a"))
        if not self.sorted_listing:
            listed, listed_a = sorted(listed), sorted(listed_a)
        assert listed == sorted(keys)
        assert listed_a == sorted(k for k in keys if k.startswith("ord/a"))

    def test_list_reflects_overwrite_and_delete(self, backend: Backend) -> None:
        backend.put("lst/a", b"1")
        backend.put("lst/b", b"22")
        v = backend.put("lst/a", b"333")
        backend.delete("lst/b")
        [info] = backend.list("lst/")
        assert (info.key, info.size, info.version) == ("lst/a", 3, v)

    def test_list_many_keys_is_complete(self, backend: Backend) -> None:
        keys = [f"many/{i % 3}/k{i:05d}" for i in range(self.many_keys)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda k: backend.put(k, k.encode()), keys))
        backend.put("manz", b"outside the prefix")
        listed = list(backend.list("many/"))
        assert self.keys_of(listed) == sorted(keys)
        assert all(info.size == len(info.key) for info in listed)
        assert len(self.keys_of(backend.list("many/1/"))) == len([k for k in keys if k.startswith("many/1/")])
        assert len(list(backend.list(""))) == self.many_keys + 1

    # -- keys ----------------------------------------------------------------------------------

    @pytest.mark.parametrize("key", INVALID_KEYS)
    def test_invalid_key_rejected(self, backend: Backend, key: str) -> None:
        for mode in (PutMode.OVERWRITE, PutMode.CREATE, PutMode.update("v")):
            with pytest.raises(InvalidKeyError):
                backend.put(key, b"x", mode=mode)
        with pytest.raises(InvalidKeyError):
            backend.get(key)
        with pytest.raises(InvalidKeyError):
            backend.head(key)
        with pytest.raises(InvalidKeyError):
            backend.get_range(key, 0, 1)
        with pytest.raises(InvalidKeyError):
            backend.delete(key)
        with pytest.raises(InvalidKeyError):
            backend.delete(key, version="v")
        assert list(backend.list("")) == []

    def test_valid_key_characters(self, backend: Backend) -> None:
        keys = ["a", "A.b-c_d", "_x/y.z", "0/1/2/3/4/5/6/7/8/9", "x" * 200, "b/c..d"]
        for key in keys:
            backend.put(key, key.encode())
        for key in keys:
            assert backend.get(key).data == key.encode()
        assert self.keys_of(backend.list("")) == sorted(keys)

    # -- races ---------------------------------------------------------------------------------

    def test_race_create_only_has_one_winner(self, backend: Backend) -> None:
        for round_ in range(self.race_rounds):
            key = f"race/create/{round_:03d}"

            def create(i: int, key: str = key, round_: int = round_) -> str:
                return backend.put(key, f"writer {i} round {round_}".encode(), mode=PutMode.CREATE)

            outcomes = self.race(create)
            winners, errors = self.split_race(outcomes, AlreadyExistsError)
            assert len(winners) == 1, f"round {round_}: {len(winners)} create-only winners"
            assert len(errors) == self.race_threads - 1
            [winner] = winners
            got = backend.get(key)
            assert got.data == f"writer {winner} round {round_}".encode()
            assert got.version == outcomes[winner][1]

    def test_race_update_has_one_winner(self, backend: Backend) -> None:
        key = "race/update"
        backend.put(key, b"initial")
        for round_ in range(self.race_rounds):
            base = backend.get(key).version

            def update(i: int, base: str = base, round_: int = round_) -> str:
                return backend.put(key, f"writer {i} round {round_}".encode(), mode=PutMode.update(base))

            outcomes = self.race(update)
            winners, errors = self.split_race(outcomes, PreconditionFailedError)
            assert len(winners) == 1, f"round {round_}: {len(winners)} update winners"
            assert len(errors) == self.race_threads - 1
            [winner] = winners
            got = backend.get(key)
            assert got.data == f"writer {winner} round {round_}".encode()
            assert got.version == outcomes[winner][1]
            assert got.version != base

    def test_race_identical_payload_updates_have_one_winner(self, backend: Backend) -> None:
        """Writers that all put the same bytes still serialize: only one update from a version lands."""
        if not self.distinct_versions_for_identical_bytes:
            pytest.skip("versions are content hashes on this backend")
        key = "race/update-same"
        backend.put(key, b"same")
        for round_ in range(self.race_rounds):
            base = backend.get(key).version

            def update(i: int, base: str = base) -> str:
                return backend.put(key, b"same", mode=PutMode.update(base))

            winners, _ = self.split_race(self.race(update), PreconditionFailedError)
            assert len(winners) == 1, f"round {round_}: {len(winners)} update winners"
            assert backend.get(key).version != base

    def test_race_create_then_update_chain(self, backend: Backend) -> None:
        """Threads loop read-modify-write on one counter; no increment is lost."""
        key = "race/counter"
        backend.put(key, b"0", mode=PutMode.CREATE)
        per_thread = max(2, self.race_rounds // 2)

        def bump(i: int) -> int:
            done = 0
            while done < per_thread:
                got = backend.get(key)
                try:
                    count = int(got.data.split(b" ")[0]) + 1
                    backend.put(key, f"{count} by {i}".encode(), mode=PutMode.update(got.version))
                except PreconditionFailedError:
                    continue
                done += 1
            return done

        outcomes = self.race(bump, threads=min(4, self.race_threads))
        winners, _ = self.split_race(outcomes, PreconditionFailedError)
        assert len(winners) == len(outcomes)
        assert int(backend.get(key).data.split(b" ")[0]) == per_thread * len(outcomes)

    # -- get_small: the bounded read of refs, the gc epoch, locks and the marker -----------------

    def test_get_small_returns_the_bytes_and_heads_version(self, backend: Backend) -> None:
        backend.put("small/ref", b"step 1")
        got = backend.get_small("small/ref", 64)
        assert got.data == b"step 1" and got.version == backend.head("small/ref").version
        backend.put("small/ref", b"step 2, longer")
        again = backend.get_small("small/ref", 64)
        assert again.data == b"step 2, longer" and again.version == backend.head("small/ref").version
        assert again.version == backend.get("small/ref").version

    def test_get_small_of_a_missing_key_raises_not_found(self, backend: Backend) -> None:
        with pytest.raises(ObjectNotFoundError):
            backend.get_small("small/missing", 64)
        backend.put("small/present", b"x")
        with pytest.raises(ObjectNotFoundError):
            backend.get_small("small/present/below", 64)

    def test_get_small_of_an_empty_object(self, backend: Backend) -> None:
        """A range of an empty object is unsatisfiable on S3 and GCS (416): still its bytes and
        version, and the version serves a compare-and-swap."""
        backend.put("small/empty", b"")
        got = backend.get_small("small/empty", 64)
        assert got.data == b"" and got.version == backend.head("small/empty").version
        backend.put("small/empty", b"filled", mode=PutMode.update(got.version))
        assert backend.get_small("small/empty", 64).data == b"filled"

    def test_get_small_up_to_the_limit_and_over_it(self, backend: Backend) -> None:
        backend.put("small/at", b"a" * 100)
        assert backend.get_small("small/at", 100).data == b"a" * 100
        backend.put("small/over", b"a" * 101)
        with pytest.raises(FormatError, match="over the 100-byte limit"):
            backend.get_small("small/over", 100)

    def test_get_small_of_a_planted_huge_object_reads_at_most_limit_plus_one(self, backend: Backend) -> None:
        """Anyone with write access can plant a huge object at a ref's key: get_small refuses it
        (FormatError) after one request whose answer carries at most `limit` + 1 bytes."""
        backend.put("small/huge", bytes(4 << 20))
        counter = self.request_counter(backend)
        with pytest.raises(FormatError, match="over the 100-byte limit"):
            backend.get_small("small/huge", 100)
        if counter is not None:
            assert counter.requests == 1, counter.log
            assert all(n <= 101 for n in counter.answer_bytes), counter.answer_bytes

    def test_get_small_is_one_request(self, backend: Backend) -> None:
        backend.put("small/ref", b"step 1")
        counter = self.request_counter(backend)
        if counter is None:
            pytest.skip("this backend sends no requests")
        got = backend.get_small("small/ref", 64)
        assert got.data == b"step 1" and counter.requests == 1, counter.log
        counter.reset()
        with pytest.raises(ObjectNotFoundError):
            backend.get_small("small/missing", 64)
        assert counter.requests == 1, counter.log

    def test_get_small_version_serves_compare_and_swap(self, backend: Backend) -> None:
        """The version get_small returns works as a head's does for conditional puts and deletes,
        and goes stale when another writer replaces the object."""
        backend.put("small/ref", b"v1", mode=PutMode.CREATE)
        first = backend.get_small("small/ref", 64)
        backend.put("small/ref", b"v2", mode=PutMode.update(first.version))
        second = backend.get_small("small/ref", 64)
        assert second.data == b"v2" and second.version != first.version
        backend.put("small/ref", b"v3 by another writer")  # a concurrent replace
        with pytest.raises(PreconditionFailedError):
            backend.put("small/ref", b"v3 by us", mode=PutMode.update(second.version))
        assert backend.get("small/ref").data == b"v3 by another writer"
        third = backend.get_small("small/ref", 64)
        backend.delete("small/ref", version=third.version)
        with pytest.raises(ObjectNotFoundError):
            backend.head("small/ref")
