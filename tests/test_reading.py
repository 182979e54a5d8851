"""Reading as users do (issue 14): opening never writes, a read at a URL with no store raises
StoreNotFoundError and creates nothing, and reads work without write access."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore import errors, keys
from ckptstore.url import open_backend


def _objects(url: str) -> list[str]:
    backend = open_backend(url)
    try:
        return [info.key for info in backend.list("")]
    finally:
        backend.close()


@pytest.fixture(params=("local", "memory", "s3"))
def missing_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(URL with no store, URL of what must stay empty: the parent dir, the space, the bucket)."""
    if request.param == "local":
        yield str(tmp_path / "ckpts-typo"), str(tmp_path)
    elif request.param == "memory":
        from ckptstore.backends.memory import drop_memory_space

        name = uuid.uuid4().hex
        yield f"memory://{name}", f"memory://{name}"
        drop_memory_space(name)
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield f"s3://{bucket}/ckpts-typo", f"s3://{bucket}"


READS = {
    "load": lambda s: s.load(),
    "load_step": lambda s: s.load(3),
    "latest": lambda s: s.latest(),
    "steps": lambda s: s.steps(),
    "ref": lambda s: s.ref(3),
    "ref_tag": lambda s: s.ref("best"),
    "info": lambda s: s.info(3),
    "tags": lambda s: s.tags(),
    "delete": lambda s: s.delete(3),
    "untag": lambda s: s.untag("best"),
    "tag": lambda s: s.tag("best", 3),
    "gc": lambda s: s.gc(),
    "locks": lambda s: s.locks(),
}


@pytest.mark.parametrize("read", sorted(READS))
def test_reading_a_url_with_no_store_raises_and_creates_nothing(missing_store: tuple[str, str], read: str) -> None:
    url, container = missing_store
    with ckptstore.open(url) as store, pytest.raises(errors.StoreNotFoundError,
                                                      match=re.escape(f"no ckptstore store at {store.url} ")):
        READS[read](store)
    assert _objects(container) == []
    if "://" not in url:
        assert not Path(url).exists()


def test_latest_on_a_typo_is_not_none(missing_store: tuple[str, str]) -> None:
    """A resume script must not silently train from scratch."""
    url, container = missing_store
    with pytest.raises(errors.StoreNotFoundError):
        ckptstore.open(url).latest()
    assert _objects(container) == []


def test_open_create_false_still_raises_at_open(missing_store: tuple[str, str]) -> None:
    url, container = missing_store
    with pytest.raises(errors.StoreNotFoundError):
        ckptstore.open(url, create=False)
    assert _objects(container) == []


def test_the_first_save_creates_the_store(missing_store: tuple[str, str]) -> None:
    url, _ = missing_store
    with ckptstore.open(url, hash_algorithm="sha256") as store:
        with pytest.raises(errors.StoreNotFoundError):
            store.latest()
        store.save(3, {"w": torch.arange(4.0)})
        assert store.latest() == 3
    with ckptstore.open(url, create=False) as store:
        assert store.marker.hash_algorithm == "sha256"  # the option applies when the first write creates it
        assert torch.equal(store.load(3)["w"], torch.arange(4.0))
        assert keys.MARKER in _objects(url)


def test_a_store_created_by_another_process_meanwhile_is_seen(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    reader = ckptstore.open(url)
    with pytest.raises(errors.StoreNotFoundError):
        reader.steps()
    ckptstore.open(url, hash_algorithm="sha256").save(1, {"x": 1})
    assert reader.steps() == [1]
    assert reader.marker.hash_algorithm == "sha256"


def test_concurrent_creators_use_the_first_marker(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    first, second = ckptstore.open(url), ckptstore.open(url, hash_algorithm="sha256")
    first.save(1, {"x": 1})
    second.save(2, {"x": 2})  # its marker read at open found nothing: the create-only put loses
    assert second.marker.hash_algorithm == first.marker.hash_algorithm != "sha256"
    assert second.steps() == [1, 2]


def test_a_regular_file_path_is_an_error_saying_so(tmp_path: Path) -> None:
    path = tmp_path / "ckpts.pt"
    path.write_bytes(b"not a store")
    with pytest.raises(errors.InvalidURLError, match=r"ckpts\.pt is a regular file, not a store directory"):
        ckptstore.open(str(path))
    with pytest.raises(errors.InvalidURLError, match="regular file"):
        ckptstore.open(f"file://{path}", create=False)
    assert path.read_bytes() == b"not a store"


# -- every error derives from CkptStoreError (README), bad arguments too --------------------
@pytest.mark.parametrize("step", [-1, 10**21, 1.5, "x", True])
def test_an_invalid_step_is_a_ckptstore_error_and_a_value_error(tmp_path: Path, step: object) -> None:
    store = ckptstore.open(str(tmp_path / "s"))
    for call in (lambda: store.save(step, {"a": 1}), lambda: store.delete(step)):  # type: ignore[arg-type]
        with pytest.raises(ckptstore.InvalidStepError) as caught:
            call()
        assert isinstance(caught.value, ckptstore.CkptStoreError) and isinstance(caught.value, ValueError)
    assert not (tmp_path / "s").exists()


def test_bad_arguments_are_ckptstore_errors(tmp_path: Path) -> None:
    store = ckptstore.open(str(tmp_path / "s"))
    for name in ("keep_last", "keep_every"):
        with pytest.raises(ckptstore.InvalidArgumentError, match=name):
            store.save(1, {"a": 1}, **{name: 0})
    with pytest.raises(ckptstore.InvalidArgumentError, match="retries"):
        ckptstore.open(str(tmp_path / "s"), retries=-1)
    from ckptstore.async_save import AsyncSaver

    with pytest.raises(ckptstore.InvalidArgumentError, match="max_in_flight"):
        AsyncSaver(store, max_in_flight=0)
    assert issubclass(ckptstore.InvalidArgumentError, ValueError)


# -- a save of a committed step fails before it writes anything -----------------------------
def test_save_of_a_committed_step_writes_no_chunk(tmp_path: Path) -> None:
    from ckptstore.testing.wrappers import CountingBackend

    url = str(tmp_path / "s")
    ckptstore.open(url).save(4, {"w": torch.arange(1000.0)})
    counting = CountingBackend(open_backend(url))
    store = ckptstore.Store(counting)
    with pytest.raises(ckptstore.StepExistsError):
        store.save(4, {"w": torch.arange(2000.0)})
    puts = [key for op, key in counting.log if op == "put"]
    assert not [k for k in puts if k.startswith((keys.CHUNKS, keys.MANIFESTS))], puts
    with pytest.raises(ckptstore.StepExistsError):
        store.save_async(4, {"w": torch.arange(3000.0)})  # at submit, not in the Future
    assert not [k for op, k in counting.log if op == "put" and k.startswith((keys.CHUNKS, keys.MANIFESTS))]
    store.save(4, {"w": torch.arange(2000.0)}, overwrite=True)
    assert torch.equal(store.load(4)["w"], torch.arange(2000.0))
    store.close()


# -- reads work without write access --------------------------------------------------------
def _saved_store(root: Path) -> str:
    url = str(root / "store")
    with ckptstore.open(url) as store:
        store.save(1, {"w": torch.arange(6.0), "cfg": {"lr": 0.1}})
        store.tag("best", 1)
    return url


def test_read_only_filesystem_reads_without_a_lease_and_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import errno
    import logging

    from ckptstore.backends.local import LocalBackend
    from ckptstore.verify import verify

    url = _saved_store(tmp_path)

    def read_only(self: LocalBackend, path: str) -> None:  # what a read-only mount answers any write
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(LocalBackend, "_ensure_dir", read_only)
    with ckptstore.open(url) as store:
        with pytest.raises(errors.PermissionDeniedError, match="read-only file system"):
            store.backend.put("locks/x", b"x", mode=__import__("ckptstore.backends.base", fromlist=["CREATE"]).CREATE)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ckptstore"):
            assert torch.equal(store.load(1)["w"], torch.arange(6.0))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "gc might run during it" in warnings[0], warnings
        assert store.steps() == [1] and store.latest() == 1 and store.ref("best").step == 1
        assert store.load("best")["cfg"] == {"lr": 0.1}
        assert verify(store).ok


def test_reads_by_a_user_who_may_only_read(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import sysconfig
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to run the read as another user")
    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.access(python, os.X_OK):
        pytest.skip(f"no {python} that another user may run")
    root = Path(tempfile.mkdtemp(prefix="ckptstore-ro-", dir="/tmp"))
    try:
        root.chmod(0o755)
        url = _saved_store(root)
        # The venv's interpreter lives under /root, which nobody may not enter: run the system's
        # Python of the same version on the venv's packages (their .pth files: the editable install).
        script = (
            f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
            "import ckptstore, torch\n"
            "from ckptstore.verify import verify\n"
            f"s = ckptstore.open({url!r})\n"
            "assert torch.equal(s.load()['w'], torch.arange(6.0))\n"
            "assert s.steps() == [1] and s.ref('best').step == 1 and s.load('best')['cfg'] == {'lr': 0.1}\n"
            "assert verify(s).ok\n"
            "print('READ-OK')\n"
        )

        def as_nobody() -> None:
            os.setgid(65534)
            os.setuid(65534)

        before = sorted(p.relative_to(root) for p in root.rglob("*"))
        env = {**os.environ, "HOME": "/tmp"}
        result = subprocess.run([python, "-c", script], preexec_fn=as_nobody, capture_output=True, text=True,
                                timeout=120, cwd="/", env=env)
        assert result.returncode == 0 and "READ-OK" in result.stdout, result.stderr[-2000:]
        assert "gc might run during it" in result.stderr
        assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # the read created nothing
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_s3_reads_with_read_only_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server of its own: the session's shared server keeps its single admin identity."""
    from ckptstore.testing import servers
    from ckptstore.verify import verify

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
        with ckptstore.open(url) as store:
            store.save(1, {"w": torch.arange(6.0)})
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", servers.SEAWEEDFS_READ_ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", servers.SEAWEEDFS_READ_SECRET_KEY)
        with ckptstore.open(url) as store:
            with pytest.raises(errors.PermissionDeniedError):
                store.save(2, {"w": torch.zeros(1)})  # the credentials really are read-only
            assert torch.equal(store.load(1)["w"], torch.arange(6.0))
            assert store.steps() == [1] and store.ref(1).step == 1
            assert verify(store).ok
    finally:
        server.stop()
