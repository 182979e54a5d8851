"""The shared backend conformance suite run against the local and memory backends, plus local-only checks."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import ckptstore.backends.memory
from ckptstore.backends.base import PutMode
from ckptstore.backends.local import TMP_DIR, LocalBackend
from ckptstore.backends.memory import MemoryBackend, drop_memory_space
from ckptstore.errors import (
    AlreadyExistsError,
    BackendError,
    InvalidKeyError,
    ObjectNotFoundError,
    PreconditionFailedError,
)
from ckptstore.testing.conformance import BackendConformance


class TestLocalBackend(BackendConformance):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[LocalBackend]:
        backend = LocalBackend(tmp_path / "store")
        yield backend
        backend.close()


class TestMemoryBackend(BackendConformance):
    @pytest.fixture
    def backend(self) -> Iterator[MemoryBackend]:
        name = f"conformance-{uuid.uuid4().hex}"
        backend = MemoryBackend(name)
        yield backend
        backend.close()
        drop_memory_space(name)

    def test_same_name_shares_objects_and_other_names_do_not(self, backend: MemoryBackend) -> None:
        backend.put("shared/key", b"data")
        name = backend.url.removeprefix("memory://")
        assert MemoryBackend(name).get("shared/key").data == b"data"
        other = f"conformance-{uuid.uuid4().hex}"
        try:
            assert list(MemoryBackend(other).list("")) == []
        finally:
            drop_memory_space(other)

    def test_modified_comes_from_the_server_clock_not_the_clients(
        self, backend: MemoryBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600)  # the client's clock is skewed
        backend.put("clock/a", b"x")
        assert abs(backend.head("clock/a").modified - real_time()) < 60
        monkeypatch.setattr(ckptstore.backends.memory, "_server_clock", lambda: 1234.5)  # the server's moves
        backend.put("clock/b", b"y")
        assert backend.head("clock/b").modified == 1234.5
        assert [i.modified for i in backend.list("clock/b")] == [1234.5]
        assert abs(backend.head("clock/a").modified - real_time()) < 60


def _files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


def _staging_files(root: Path) -> list[str]:
    tmp = root / TMP_DIR
    if not tmp.is_dir():
        return []
    return sorted(p.name for p in tmp.iterdir() if not p.name.startswith("lock-"))


class TestLocalBackendOnly:
    """Properties of the filesystem layout that the shared suite cannot see."""

    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        return tmp_path / "store"

    @pytest.fixture
    def backend(self, root: Path) -> LocalBackend:
        return LocalBackend(root)

    @pytest.mark.parametrize("key", ["../escape", "a/../../escape", "../store-sibling/x", "..", "a/..", "/escape"])
    def test_never_writes_outside_root(self, tmp_path: Path, root: Path, backend: LocalBackend, key: str) -> None:
        backend.put("inside", b"x")  # the root exists, so an escape would have somewhere to go
        before = _files_under(tmp_path)
        for mode in (PutMode.OVERWRITE, PutMode.CREATE, PutMode.update("v")):
            with pytest.raises(InvalidKeyError):
                backend.put(key, b"escaped", mode=mode)
        with pytest.raises(InvalidKeyError):
            backend.delete(key)
        after = _files_under(tmp_path)
        assert after == before
        assert all(root in p.parents for p in after)
        assert not (tmp_path / "escape").exists()

    def test_never_reads_or_deletes_outside_root(self, tmp_path: Path, backend: LocalBackend) -> None:
        outside = tmp_path / "outside"
        outside.write_bytes(b"secret")
        backend.put("inside", b"x")
        with pytest.raises(InvalidKeyError):
            backend.get("../outside")
        with pytest.raises(InvalidKeyError):
            backend.head("../outside")
        with pytest.raises(InvalidKeyError):
            backend.get_range("../outside", 0, 6)
        with pytest.raises(InvalidKeyError):
            backend.read_into("../outside", 0, [memoryview(bytearray(6))])
        with pytest.raises(InvalidKeyError):
            backend.delete("../outside")
        assert outside.read_bytes() == b"secret"

    @pytest.mark.parametrize("key", ["tmp", "tmp/x", "tmp/lock-000", "tmp/deadbeef.tmp", "tmp/a/b"])
    def test_tmp_keys_rejected(self, root: Path, backend: LocalBackend, key: str) -> None:
        backend.put("a", b"x")  # creates the tmp/ staging area
        for mode in (PutMode.OVERWRITE, PutMode.CREATE, PutMode.update("v")):
            with pytest.raises(InvalidKeyError):
                backend.put(key, b"x", mode=mode)
        with pytest.raises(InvalidKeyError):
            backend.get(key)
        with pytest.raises(InvalidKeyError):
            backend.head(key)
        with pytest.raises(InvalidKeyError):
            backend.delete(key)
        assert (root / TMP_DIR).is_dir()

    def test_keys_that_merely_start_with_tmp_are_fine(self, backend: LocalBackend) -> None:
        keys = ["tmpx", "tmp_", "tmp.d/x", "a/tmp", "b/tmp/c"]
        for key in keys:
            backend.put(key, key.encode())
            assert backend.get(key).data == key.encode()
        assert [i.key for i in backend.list("")] == sorted(keys)
        assert [i.key for i in backend.list("tmp")] == ["tmp.d/x", "tmp_", "tmpx"]

    def _populate_tmp(self, root: Path, backend: LocalBackend) -> None:
        backend.put("a/b", b"x")
        v = backend.put("refs/r", b"1")
        backend.put("refs/r", b"2", mode=PutMode.update(v))  # takes a lock: creates tmp/lock-*
        backend.delete("a/b")
        # A writer that crashed between staging and publishing leaves its file behind.
        (root / TMP_DIR / f"{uuid.uuid4().hex}.tmp").write_bytes(b"torn half-written object")

    @pytest.mark.parametrize("prefix", ["", "t", "tm", "tmp"])
    def test_list_never_shows_staging_area(self, root: Path, backend: LocalBackend, prefix: str) -> None:
        self._populate_tmp(root, backend)
        assert any(p.name.startswith("lock-") for p in (root / TMP_DIR).iterdir())
        assert _staging_files(root)
        keys = [info.key for info in backend.list(prefix)]
        assert not any(k == TMP_DIR or k.startswith(TMP_DIR + "/") for k in keys)
        if prefix == "":
            assert keys == ["refs/r"]

    def test_list_tmp_slash_prefix_shows_nothing(self, root: Path, backend: LocalBackend) -> None:
        self._populate_tmp(root, backend)
        assert [info.key for info in backend.list("tmp/")] == []

    def test_crashed_staging_file_is_invisible(self, root: Path, backend: LocalBackend) -> None:
        backend.put("real", b"data")
        crashed = root / TMP_DIR / f"{uuid.uuid4().hex}.tmp"
        crashed.write_bytes(b"partial")
        assert [i.key for i in backend.list("")] == ["real"]
        with pytest.raises(InvalidKeyError):
            backend.get(f"{TMP_DIR}/{crashed.name}")
        # Later writes are unaffected by the leftover.
        version = backend.head("real").version
        backend.put("real", b"newer", mode=PutMode.update(version))
        assert backend.get("real").data == b"newer"
        assert [i.key for i in backend.list("")] == ["real"]

    def test_no_staging_file_left_after_puts(self, root: Path, backend: LocalBackend) -> None:
        v = backend.put("k/overwrite", b"1")
        backend.put("k/overwrite", [b"2", b"3"])
        backend.put("k/create", b"c", mode=PutMode.CREATE)
        with pytest.raises(AlreadyExistsError):
            backend.put("k/create", b"again", mode=PutMode.CREATE)
        with pytest.raises(PreconditionFailedError):
            backend.put("k/overwrite", b"stale", mode=PutMode.update(v))
        with pytest.raises(PreconditionFailedError):
            backend.put("k/missing", b"x", mode=PutMode.update(v))
        current = backend.get("k/overwrite").version
        backend.put("k/overwrite", b"4", mode=PutMode.update(current))
        backend.put("k/empty", b"")
        backend.delete("k/create")
        assert (root / TMP_DIR).is_dir()
        assert _staging_files(root) == []

    def test_no_staging_file_left_after_races(self, root: Path, backend: LocalBackend) -> None:
        suite = BackendConformance()
        outcomes = suite.race(lambda i: backend.put("race/k", f"w{i}".encode(), mode=PutMode.CREATE))
        winners, _ = suite.split_race(outcomes, AlreadyExistsError)
        assert len(winners) == 1
        base = backend.get("race/k").version
        outcomes = suite.race(lambda i: backend.put("race/k", f"u{i}".encode(), mode=PutMode.update(base)))
        winners, _ = suite.split_race(outcomes, PreconditionFailedError)
        assert len(winners) == 1
        assert _staging_files(root) == []

    def test_update_race_across_backend_instances(self, root: Path) -> None:
        """Separate LocalBackend objects on one root (as separate processes would be) still serialize."""
        suite = BackendConformance()
        LocalBackend(root).put("shared", b"start")
        for round_ in range(5):
            base = LocalBackend(root).get("shared").version

            def update(i: int, base: str = base, round_: int = round_) -> str:
                return LocalBackend(root).put("shared", f"{i}/{round_}".encode(), mode=PutMode.update(base))

            winners, _ = suite.split_race(suite.race(update), PreconditionFailedError)
            assert len(winners) == 1
            assert LocalBackend(root).get("shared").data == f"{winners[0]}/{round_}".encode()

    def test_cleanup_staging_ages_by_the_given_now(
        self, root: Path, backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        backend.put("a", b"x")  # creates tmp/
        crashed = root / TMP_DIR / f"{uuid.uuid4().hex}.tmp"
        crashed.write_bytes(b"torn")
        fresh_mtime = crashed.stat().st_mtime
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
        assert backend.cleanup_staging(600, now=fresh_mtime + 1) == 0  # the skewed clock is not used
        assert crashed.exists()
        assert backend.cleanup_staging(600, now=fresh_mtime + 601) == 1
        assert not crashed.exists()
        monkeypatch.setattr(time, "time", real_time)
        crashed.write_bytes(b"torn again")
        assert backend.cleanup_staging(600) == 0  # now=None: this machine's clock, which stamped it
        os.utime(crashed, (real_time() - 700, real_time() - 700))
        assert backend.cleanup_staging(600) == 1

    def test_objects_are_plain_files_at_key_paths(self, root: Path, backend: LocalBackend) -> None:
        backend.put("chunks/ab/abcdef", b"payload")
        assert (root / "chunks" / "ab" / "abcdef").read_bytes() == b"payload"
        backend.delete("chunks/ab/abcdef")
        assert not (root / "chunks" / "ab" / "abcdef").exists()
        with pytest.raises(ObjectNotFoundError):
            backend.get("chunks/ab/abcdef")

    def test_root_is_created_lazily_and_listing_a_missing_root_is_empty(self, root: Path) -> None:
        backend = LocalBackend(root)
        assert list(backend.list("")) == []
        assert not os.path.exists(root)
        backend.put("x", b"1")
        assert (root / "x").is_file()


class TestLocalBackendSymlinks:
    """A store directory copied from elsewhere may contain symlinks: never follow them out."""

    def test_symlinked_fanout_directory_cannot_redirect_writes(self, tmp_path: Path) -> None:
        outside = tmp_path / "outside"
        outside.mkdir()
        root = tmp_path / "store"
        (root / "chunks").mkdir(parents=True)
        (root / "chunks" / "ab").symlink_to(outside)
        backend = LocalBackend(root)
        with pytest.raises(InvalidKeyError, match="outside the store root"):
            backend.put("chunks/ab/" + "ab" * 32, b"payload")
        with pytest.raises(InvalidKeyError):
            backend.get("chunks/ab/" + "ab" * 32)
        assert list(outside.iterdir()) == []

    def test_symlinked_object_is_not_followed(self, tmp_path: Path) -> None:
        secret = tmp_path / "secret"
        secret.write_bytes(b"do not read")
        root = tmp_path / "store"
        (root / "refs" / "steps").mkdir(parents=True)
        (root / "refs" / "steps" / "00000000000000000001").symlink_to(secret)
        backend = LocalBackend(root)
        with pytest.raises(BackendError, match="symlink"):
            backend.get("refs/steps/00000000000000000001")
