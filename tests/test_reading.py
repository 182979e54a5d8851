"""Reading as users do (issue 14): opening never writes, a read at a URL with no store raises
StoreNotFoundError and creates nothing, and reads work without write access."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore import errors, keys
from ckptstore.url import open_backend


# -- every error derives from CkptStoreError (README), bad arguments too --------------------
@pytest.mark.parametrize("step", [-1, 10**21, 1.5, "x", True])
def test_an_invalid_step_is_a_ckptstore_error_and_a_value_error(tmp_path: Path, step: object) -> None:
    store = ckptstore.open(str(tmp_path / "s"))
    for call in (lambda: store.save(step, {"a": 1}), lambda: store.delete(step)):  # type: ignore[arg-type]
        with pytest.raises(ckptstore.InvalidStepError) as caught:
            call()
        assert isinstance(caught.value, ckptstore.CkptStoreError) and isinstance(caught.value, ValueError)


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
