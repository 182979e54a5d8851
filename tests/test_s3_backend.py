"""The S3 backend against a real server: SeaweedFS started by the session (or the server
AWS_ENDPOINT_URL names, e.g. MinIO from docker-compose)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptstore
from ckptstore import errors
from ckptstore.backends.base import CREATE, Backend, PutMode
from ckptstore.backends.s3 import S3Backend, translate_errors
from ckptstore.testing.conformance import BackendConformance, RequestCounter
from ckptstore.testing.servers import S3Server


class TestS3Backend(BackendConformance):
    # A single-part ETag is the MD5 of the body: identical bytes, identical version.
    distinct_versions_for_identical_bytes = False
    # SeaweedFS lists in its filer's directory-walk order, not whole-key order.
    sorted_listing = False

    @pytest.fixture
    def backend(self, s3_server: S3Server, s3_bucket: str) -> Iterator[S3Backend]:
        backend = S3Backend(s3_bucket, f"conformance/{uuid.uuid4().hex[:8]}")
        yield backend
        backend.close()

    def request_counter(self, backend: Backend) -> RequestCounter:
        return count_s3_requests(backend)


def count_s3_requests(backend: Backend) -> RequestCounter:
    """Every HTTP request `backend` sends from now on (botocore's before-send, retries included)
    and the Content-Length of every GetObject answer."""
    assert isinstance(backend, S3Backend)
    counter = RequestCounter()

    def answered(http_response: Any = None, model: Any = None, **_: Any) -> None:
        if model is not None and model.name == "GetObject":  # a head's Content-Length is no body
            counter.answered(int(http_response.headers.get("Content-Length", 0) or 0))

    for client in {id(c): c for c in (backend._client, backend._data_client)}.values():
        client.meta.events.register("before-send.s3", lambda request, **_: counter.sent(
            f"{request.method} {request.url} {request.headers.get('Range', b'')!r}"))
        client.meta.events.register("after-call.s3", answered)
    return counter


@pytest.fixture
def backend(s3_server: S3Server, s3_bucket: str) -> Iterator[S3Backend]:
    backend = S3Backend(s3_bucket, "runs/exp-1", multipart_threshold=5 << 20, part_size=5 << 20)
    yield backend
    backend.close()


def test_keys_live_under_the_prefix(backend: S3Backend, s3_server: S3Server, s3_bucket: str) -> None:
    backend.put("refs/steps/1", b"x")
    names = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert names == ["runs/exp-1/refs/steps/1"]
    assert backend.url == f"s3://{s3_bucket}/runs/exp-1"


def test_list_does_not_leak_sibling_prefixes(backend: S3Backend, s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="runs/exp-10/a", Body=b"other run")
    backend.put("a", b"mine")
    assert [o.key for o in backend.list()] == ["a"]


def test_multipart_upload_round_trip(backend: S3Backend) -> None:
    payload = bytes(range(256)) * (48 * 1024)  # 12 MiB: three 5 MiB parts
    backend.put("chunks/big", [payload[:100], memoryview(payload)[100:]], mode=CREATE)
    assert backend.get("chunks/big").data == payload
    assert backend.head("chunks/big").size == len(payload)
    with pytest.raises(errors.AlreadyExistsError):
        backend.put("chunks/big", payload, mode=CREATE)
    target = bytearray(1 << 20)
    assert backend.read_into("chunks/big", 5 << 20, [memoryview(target)]) == 1 << 20
    assert bytes(target) == payload[5 << 20:6 << 20]


def test_conditional_put_above_single_request_limit_is_refused(backend: S3Backend) -> None:
    version = backend.put("refs/steps/1", b"small")
    with pytest.raises(ValueError, match="single-request"):
        backend.put("refs/steps/1", b"x" * (6 << 20), mode=PutMode.update(version))
    assert backend.get("refs/steps/1").data == b"small"


def test_wrong_credentials_are_permission_denied(s3_server: S3Server, s3_bucket: str) -> None:
    if s3_server.external:
        pytest.skip("the external server's auth settings are unknown")
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
                          aws_secret_access_key="not-the-secret", region_name=s3_server.region,
                          config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    backend = S3Backend(s3_bucket, "x", client=client)
    with pytest.raises(errors.PermissionDeniedError) as caught:
        backend.get("CKPTSTORE")
    assert "not-the-secret" not in str(caught.value) and "testsecret" not in str(caught.value)
    assert caught.value.key == "CKPTSTORE" and caught.value.operation == "get"
    with pytest.raises(errors.PermissionDeniedError):
        ckptstore.open(f"s3://{s3_bucket}/x", storage_options={"client": client})


def test_missing_bucket_is_a_clear_error(s3_server: S3Server) -> None:
    backend = S3Backend(f"no-such-bucket-{uuid.uuid4().hex[:8]}", "p")
    with pytest.raises(errors.BackendError, match="bucket does not exist"):
        backend.get("CKPTSTORE")


def test_unreachable_endpoint_is_transient() -> None:
    backend = S3Backend("b", "p", endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout=1)
    with pytest.raises(errors.TransientError):
        backend.head("CKPTSTORE")


def _client_error(code: str, status: int) -> Any:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


@pytest.mark.parametrize(("code", "status", "mode", "expected"), [
    ("PreconditionFailed", 412, CREATE, errors.AlreadyExistsError),
    ("PreconditionFailed", 412, PutMode.update('"e"'), errors.PreconditionFailedError),
    ("NoSuchKey", 404, PutMode.update('"e"'), errors.PreconditionFailedError),  # AWS/moto on If-Match
    ("NoSuchKey", 404, None, errors.ObjectNotFoundError),
    ("AccessDenied", 403, None, errors.PermissionDeniedError),
    ("InvalidAccessKeyId", 403, None, errors.PermissionDeniedError),
    ("SlowDown", 503, None, errors.TransientError),
    ("InternalError", 500, None, errors.TransientError),
    ("RequestTimeout", 400, None, errors.TransientError),
    ("NoSuchBucket", 404, None, errors.BackendError),
    ("InvalidArgument", 400, None, errors.BackendError),
])
def test_translator_maps_wire_errors(code: str, status: int, mode: PutMode | None, expected: type) -> None:
    with pytest.raises(expected) as caught, translate_errors("k", "op", mode):
        raise _client_error(code, status)
    assert type(caught.value) is expected
    assert isinstance(caught.value, errors.BackendError) and caught.value.key == "k"


def test_conditional_request_conflict_is_retried(backend: S3Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    real_put = backend._client.put_object
    calls = []

    def flaky_put(**kwargs: Any) -> Any:
        calls.append(kwargs)
        if len(calls) < 3:  # the server saw another conditional write in flight
            raise _client_error("ConditionalRequestConflict", 409)
        return real_put(**kwargs)

    monkeypatch.setattr(backend._client, "put_object", flaky_put)
    backend.put("refs/steps/9", b"v", mode=CREATE)
    assert len(calls) == 3 and all(c.get("IfNoneMatch") == "*" for c in calls)
    assert backend.get("refs/steps/9").data == b"v"


def test_server_honours_if_match_on_delete(s3_server: S3Server, s3_bucket: str) -> None:
    """The wire facts delete-if-version stands on (docs/INTEGRATION.md), with a raw client."""
    client = s3_server.client()
    old = client.put_object(Bucket=s3_bucket, Key="cdel/k", Body=b"one")["ETag"]
    current = client.put_object(Bucket=s3_bucket, Key="cdel/k", Body=b"two")["ETag"]
    with pytest.raises(Exception) as stale:
        client.delete_object(Bucket=s3_bucket, Key="cdel/k", IfMatch=old)
    assert _wire_error(stale.value) == ("PreconditionFailed", 412)
    assert client.get_object(Bucket=s3_bucket, Key="cdel/k")["Body"].read() == b"two"
    client.delete_object(Bucket=s3_bucket, Key="cdel/k", IfMatch=current)
    with pytest.raises(Exception) as missing:
        client.delete_object(Bucket=s3_bucket, Key="cdel/k", IfMatch=current)
    # SeaweedFS 4.48: 412 (the backend then heads the key); AWS and moto: 404 NoSuchKey.
    assert _wire_error(missing.value)[1] in (412, 404)


def _wire_error(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", {})
    return str(response["Error"]["Code"]), int(response["ResponseMetadata"]["HTTPStatusCode"])


def test_delete_if_version_sends_the_etag_as_returned(backend: S3Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    version = backend.put("refs/steps/3", b"ref")
    real_delete = backend._client.delete_object
    calls: list[dict[str, Any]] = []

    def recording_delete(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_delete(**kwargs)

    monkeypatch.setattr(backend._client, "delete_object", recording_delete)
    backend.delete("refs/steps/3", version=version)
    assert [c.get("IfMatch") for c in calls] == [version] and version.startswith('"')
    backend.delete("refs/steps/3")
    assert "IfMatch" not in calls[-1]
    backend.put("refs/steps/4", b"ref")
    with pytest.raises(errors.PreconditionFailedError):
        backend.delete("refs/steps/4", version="*")  # never sent: If-Match: * matches anything
    assert len(calls) == 2 and backend.exists("refs/steps/4")


def test_conditional_delete_conflict_is_retried(backend: S3Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    version = backend.put("refs/steps/5", b"ref")
    real_delete = backend._client.delete_object
    calls = []

    def flaky_delete(**kwargs: Any) -> Any:
        calls.append(kwargs)
        if len(calls) < 3:
            raise _client_error("ConditionalRequestConflict", 409)
        return real_delete(**kwargs)

    monkeypatch.setattr(backend._client, "delete_object", flaky_delete)
    backend.delete("refs/steps/5", version=version)
    assert len(calls) == 3 and not backend.exists("refs/steps/5")


def _open_uploads(s3_server: S3Server, bucket: str) -> list[str]:
    return [u["UploadId"] for u in s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", ())]


def test_cleanup_staging_judges_upload_age_by_the_given_server_time(
    backend: S3Backend, s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client clock an hour ahead must not make a fresh multipart upload look abandoned."""
    upload = s3_server.client().create_multipart_upload(Bucket=s3_bucket, Key="runs/exp-1/chunks/fresh")["UploadId"]
    backend.put("locks/probe", b"x")
    server_now = backend.head("locks/probe").modified  # the server's clock, as gc measures it
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    assert backend.cleanup_staging(600, now=server_now) == 0
    assert upload in _open_uploads(s3_server, s3_bucket)
    # `now` is what the upload's age is measured against: ten minutes later by the server it goes.
    assert backend.cleanup_staging(600, now=server_now + 605) == 1
    assert upload not in _open_uploads(s3_server, s3_bucket)


def test_store_on_s3_url_passes_the_canary(s3_bucket: str) -> None:
    from ckptstore.canary import run_canary

    store = ckptstore.open(f"s3://{s3_bucket}/canary-check")
    assert run_canary(store.backend).ok


def test_url_options_and_secrets(s3_server: S3Server, s3_bucket: str) -> None:
    store = ckptstore.open(f"s3://{s3_bucket}/opts?endpoint={s3_server.endpoint}&region=us-east-1")
    store.save(1, {"a": 1})
    assert store.load(1) == {"a": 1}
    with pytest.raises(ckptstore.InvalidURLError, match="credentials"):
        ckptstore.open(f"s3://{s3_bucket}/x?secret_key=abc")
    with pytest.raises(ckptstore.InvalidURLError, match="unknown option"):
        ckptstore.open(f"s3://{s3_bucket}/x?colour=blue")


def test_s3_stores_default_to_the_benchmarked_chunk_size(s3_bucket: str, tmp_path: Path) -> None:
    """64 MiB chunks on S3 (benchmarks/RESULTS.md); an explicit policy wins; local keeps 16 MiB."""
    from ckptstore.chunking import ChunkingPolicy

    MiB = 1 << 20
    with ckptstore.open(f"s3://{s3_bucket}/default") as store:
        assert store.chunking == ChunkingPolicy(chunk_size=64 * MiB)
        state = {"w": torch.arange(20 * MiB // 4, dtype=torch.float32)}  # 20 MiB: one chunk here
        assert store.save(1, state).chunks == 1
        assert torch.equal(store.load(1)["w"], state["w"])
    with ckptstore.open(f"s3://{s3_bucket}/explicit", chunking=ChunkingPolicy(chunk_size=MiB)) as store:
        assert store.chunking.chunk_size == MiB
    with ckptstore.open(str(tmp_path / "local")) as store:
        assert store.chunking == ChunkingPolicy()


@pytest.mark.parametrize("key", ["chunks/corrupted", "refs/steps/7"])
@pytest.mark.parametrize("size", [1000, 12 << 20], ids=["single-request", "multipart"])
def test_a_body_corrupted_in_transit_is_refused_by_the_server(backend: S3Backend, size: int, key: str) -> None:
    """Bodies go up with a CRC32 the server checks (backends/s3.py): flip a byte after the
    client computed it, as a bad link would, and nothing may be stored."""
    if key.startswith("refs/") and size > backend.multipart_threshold:
        pytest.skip("refs are always small")
    payload = bytes(range(256)) * (size // 256)

    def corrupt(request: Any, **_: Any) -> None:
        if request.method == "PUT" and request.body is not None:
            body = request.body.read() if hasattr(request.body, "read") else bytes(request.body)
            if body:
                request.body = bytes([body[0] ^ 1]) + body[1:]

    for client in (backend._client, backend._data_client):
        client.meta.events.register("before-send.s3.PutObject", corrupt)
        client.meta.events.register("before-send.s3.UploadPart", corrupt)
    with pytest.raises(errors.CkptStoreError):
        backend.put(key, payload, mode=CREATE)
    assert not backend.exists(key)


def test_only_content_addressed_bodies_go_up_unsigned(backend: S3Backend) -> None:
    """Chunks and manifests (checked against their hash on every read) skip the SHA-256
    payload signature; refs, the marker and locks keep it."""
    seen: dict[str, bytes] = {}

    def record(request: Any, **_: Any) -> None:
        seen[request.url.rsplit("/", 1)[-1]] = request.headers["X-Amz-Content-SHA256"]

    for client in (backend._client, backend._data_client):
        client.meta.events.register("before-send.s3.PutObject", record)
    for key in ("chunks/ab/c1", "manifests/ab/m1", "refs/steps/1", "CKPTSTORE", "locks/gc"):
        backend.put(key, b"x" * 100)
    assert len(seen) == 5
    assert {name for name, value in seen.items() if value == b"UNSIGNED-PAYLOAD"} == {"c1", "m1"}
    assert all(len(value) == 64 for name, value in seen.items() if name not in ("c1", "m1"))  # hex SHA-256
