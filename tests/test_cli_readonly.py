"""The reading commands work without write access (issue 14): ls, show --tree, verify, du
(--history), diff (--values), export and cp (the store as the source) on a read-only mount, as a
user who may only read the store's directory, and on S3 with read-only credentials. Each
succeeds and leaves the store exactly as it was."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore.cli import EXIT_OK, main
from ckptstore.url import open_backend


def _save_store(url: str) -> None:
    with ckptstore.open(url) as store:
        store.save(1, {"w": torch.arange(6.0), "cfg": {"lr": 0.1, "name": "run"}})
        store.save(2, {"w": torch.arange(6.0) * 2, "cfg": {"lr": 0.05, "name": "run"}})
        store.tag("best", 1)


def _commands(url: str, out: str) -> list[list[str]]:
    """Every reading command, writing only under `out` (a directory elsewhere)."""
    return [
        ["ls", url],
        ["show", url, "latest", "--tree"],
        ["show", url, "best", "--tree", "--json"],
        ["verify", url],
        ["verify", url, "--deep"],
        ["du", url],
        ["du", url, "--history"],
        ["diff", url, "best", "latest"],
        ["diff", url, "1", "2", "--values", "--json"],
        ["export", url, "latest", f"{out}/model.safetensors"],
        ["cp", url, f"{out}/copy"],
    ]


def _objects(url: str) -> list[tuple[str, int]]:
    backend = open_backend(url)
    try:
        return sorted((info.key, info.size) for info in backend.list(""))
    finally:
        backend.close()


# The commands in one process (torch imports once), each main()'s code and output as JSON.
_RUNNER = """
import contextlib, io, json, sys
{prelude}
from ckptstore.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([argv, code, out.getvalue()[-2000:], err.getvalue()[-2000:]])
print(json.dumps(results))
"""


def _check(results: list[list], out: Path) -> None:
    failed = [(argv[0], code, err or stdout) for argv, code, stdout, err in results if code != EXIT_OK]
    assert not failed, failed
    assert len(results) == 11
    by_command = {" ".join(argv[0:1] + argv[2:]): stdout for argv, _, stdout, _ in results}
    assert "name: 'run'" in by_command["show latest --tree"]
    assert "changed" in by_command["diff best latest"]
    assert json.loads(by_command["diff 1 2 --values --json"])["changed"][0]["max_abs_diff"] == 5.0
    assert (out / "model.safetensors").stat().st_size > 0
    with ckptstore.open(str(out / "copy"), create=False) as copy:
        assert copy.steps() == [1, 2] and torch.equal(copy.load(2)["w"], torch.arange(6.0) * 2)


@pytest.fixture
def shared_dirs() -> Iterator[tuple[Path, Path]]:
    """(a root-owned store directory others may read, an output directory anyone may write),
    under /tmp, which every user may enter (pytest's tmp_path is private to its user)."""
    root = Path(tempfile.mkdtemp(prefix="ckptstore-ro-cli-", dir="/tmp"))
    try:
        root.chmod(0o755)
        out = root / "out"
        out.mkdir()
        out.chmod(0o777)
        yield root / "store", out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_reading_commands_on_a_read_only_mount(shared_dirs: tuple[Path, Path]) -> None:
    store, out = shared_dirs
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to bind-mount the store read-only")
    _save_store(str(store))
    before = _objects(str(store))
    mount = store.parent / "mnt"
    mount.mkdir()
    # A mount namespace of its own: the read-only bind mount vanishes with the process.
    script = _RUNNER.format(prelude="")
    shell = (f'{{ mount --bind "{store}" "{mount}" && mount -o remount,ro,bind "{mount}"; }} || exit 98; '
             f'touch "{mount}/probe" 2>/dev/null && exit 97; exec "$@"')
    result = subprocess.run(["unshare", "-m", "sh", "-c", shell, "sh", sys.executable, "-c", script,
                             json.dumps(_commands(str(mount), str(out)))],
                            capture_output=True, text=True, timeout=300)
    if result.returncode == 98:
        pytest.skip(f"cannot make a read-only mount here: {result.stderr[-500:]}")
    assert result.returncode != 97, "the bind mount is writable: the test would prove nothing"
    assert result.returncode == 0, result.stderr[-3000:]
    _check(json.loads(result.stdout), out)
    assert _objects(str(store)) == before


def test_reading_commands_as_a_user_who_may_only_read(shared_dirs: tuple[Path, Path]) -> None:
    store, out = shared_dirs
    if os.geteuid() != 0:
        pytest.skip("needs root to run the commands as another user")
    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.access(python, os.X_OK):
        pytest.skip(f"no {python} that another user may run")
    _save_store(str(store))
    before = _objects(str(store))
    # The venv's interpreter lives under /root, which nobody may not enter: run the system's
    # Python of the same version on the venv's packages (their .pth files: the editable install).
    script = _RUNNER.format(prelude=f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})")

    def as_nobody() -> None:
        os.setgid(65534)
        os.setuid(65534)

    result = subprocess.run([python, "-c", script, json.dumps(_commands(str(store), str(out)))],
                            preexec_fn=as_nobody, capture_output=True, text=True, timeout=300, cwd="/",
                            env={**os.environ, "HOME": "/tmp"})
    assert result.returncode == 0, result.stderr[-3000:]
    probe = subprocess.run([python, "-c", f"open({str(store / 'probe')!r}, 'w')"], preexec_fn=as_nobody,
                           capture_output=True, text=True, timeout=60)
    assert "PermissionError" in probe.stderr, "the test's premise: nobody may not write in the store"
    _check(json.loads(result.stdout), out)
    assert _objects(str(store)) == before


def test_reading_commands_with_read_only_s3_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SeaweedFS of its own: the session's shared server keeps its single admin identity."""
    from ckptstore.testing import servers

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
        _save_store(url)
        before = _objects(url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", servers.SEAWEEDFS_READ_ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", servers.SEAWEEDFS_READ_SECRET_KEY)
        assert main(["tag", url, "x", "1"]) != EXIT_OK  # the credentials really are read-only
        out = tmp_path / "out"
        out.mkdir()
        results = []
        for argv in _commands(url, str(out)):
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = main(argv)
            results.append([argv, code, stdout.getvalue(), stderr.getvalue()])
        _check(results, out)
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        assert _objects(url) == before
    finally:
        server.stop()
