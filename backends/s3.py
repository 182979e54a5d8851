"""Amazon S3 and S3-compatible servers (MinIO, SeaweedFS), through boto3.

Put modes on the wire:
- create-only: PutObject with `If-None-Match: *` (412 = exists);
- update-if-version: PutObject with `If-Match: <ETag exactly as returned>` (412, or 404
  when the key vanished = precondition failed; 409 ConditionalRequestConflict = another
  conditional write in flight: retried, then precondition failed);
- overwrite: plain PutObject.
Delete-if-version is DeleteObject with `If-Match: <ETag as returned>`. A 412 means another
ETag *or* no object (SeaweedFS 4.48 answers If-Match on a missing key with 412, AWS with 404),
so a 412 is followed by a head: absent = the no-op the contract asks for, present =
PreconditionFailedError.
Objects above `multipart_threshold` go up as multipart uploads, unconditionally: only
content-addressed chunks are that large, and conditional multipart completion is not
atomic on every server (SeaweedFS). The store relies on conditional puts only for refs and
the marker, which are always single-request puts; a conditional put above the threshold is
refused rather than silently downgraded.

Versions are ETags. An ETag of a single-part upload is the MD5 of the body, so identical
bytes get identical versions: the store makes every ref payload unique (commit id).

Time limits (storage options): every operation must end within `deadline` seconds (default
60), the SDK's retries and ckptstore's included (`ckptstore.deadline`): botocore gets no
new attempt once it has passed, and waits for an answer at most what is left of it (a
per-request read timeout, `read_timeout` at most; `connect_timeout` for a connection, 10 s).
A failure to reach the endpoint, or its silence until the deadline, is a TransientError
that names the endpoint (scheme, host and port).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ckptstore.backends.base import (
    OVERWRITE,
    Backend,
    Buffer,
    DeleteFailures,
    GetResult,
    ObjectInfo,
    PutMode,
    require_version,
)
from ckptstore.backends.parts import PartsReader
from ckptstore.deadline import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DEADLINE,
    check_seconds,
    deadline_in,
    endpoint_name,
    out_of_time,
    progressed,
    seconds_left,
)
from ckptstore.errors import (
    AlreadyExistsError,
    BackendError,
    CkptStoreError,
    ObjectNotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
    TransientError,
)
from ckptstore.keys import CHUNKS, MANIFESTS, validate_key

MiB = 1 << 20
# Above this an object goes up in parts. It leaves room for a default 64 MiB chunk plus its
# header in one request: as 4 x 16 MiB parts plus a 24-byte one it took 6 requests.
DEFAULT_MULTIPART_THRESHOLD = 128 * MiB
DEFAULT_PART_SIZE = 16 * MiB
# A 409 ConditionalRequestConflict means another conditional write to the key is in flight;
# AWS asks clients to retry. After this many tries it is reported as a lost precondition.
_CONFLICT_RETRIES = 4

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_PERMISSION_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                     "InvalidToken", "ExpiredToken", "AccountProblem", "401", "Unauthorized"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "RequestLimitExceeded",
                    "TooManyRequests", "429"}


def _retryable_response(response: Any) -> bool:
    """Whether botocore's (http response, parsed) pair is a failure worth a retry."""
    if not isinstance(response, tuple) or len(response) != 2 or not isinstance(response[1], dict):
        return False
    code, status = _response_codes(response[1])
    return code in _TRANSIENT_CODES or status >= 500 or status == 429


def _response_codes(response: dict[str, Any]) -> tuple[str, int]:
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _error_code(exc: Any) -> tuple[str, int]:
    return _response_codes(getattr(exc, "response", None) or {})


# Key in botocore's request context (shared by the tries of one call): the last exception a try raised.
_LAST_FAILURE = "ckptstore_last_failure"


class _DeadlinePassed(Exception):
    """Raised from botocore's event hooks to stop an operation whose deadline passed; turned
    into a TransientError naming the endpoint by `translate_errors`. Not a botocore error, so
    botocore never retries it."""

    def __init__(self, last: BaseException | None):
        super().__init__("deadline passed")
        self.last = last


def typed_error(code: str, status: int, key: str, operation: str, mode: PutMode | None = None) -> CkptStoreError:
    """The typed error for an S3 error `code` / HTTP `status` (a whole request's, or one key's in
    a DeleteObjects answer, which carries a code only)."""
    if status == 412 or code == "PreconditionFailed":
        if mode is not None and mode.kind == "create":
            return AlreadyExistsError("object exists", key=key, operation=operation)
        return PreconditionFailedError("version changed", key=key, operation=operation)
    if code == "NoSuchBucket":
        return BackendError("the bucket does not exist", key=key, operation=operation)
    if code in _NOT_FOUND_CODES or status == 404:
        if mode is not None and mode.kind == "update":
            # AWS and moto answer If-Match on a missing key with 404 (SeaweedFS with 412).
            return PreconditionFailedError("object vanished", key=key, operation=operation)
        return ObjectNotFoundError("no such object", key=key, operation=operation)
    if code in _PERMISSION_CODES or status in (401, 403):
        return PermissionDeniedError(f"access denied ({code or status})", key=key, operation=operation)
    if code in _TRANSIENT_CODES or status >= 500 or status == 429:
        return TransientError(f"server busy or failing ({code or status})", key=key, operation=operation)
    return BackendError(f"S3 error {code or status}", key=key, operation=operation)


def delete_objects_errors(response: dict[str, Any], names: dict[str, str]) -> DeleteFailures:
    """The failed keys of a DeleteObjects answer (`Errors`: Key, Code, Message), each with its
    typed error; `names` maps object names to our keys. A missing key is not a failure."""
    failures: DeleteFailures = []
    for error in response.get("Errors", ()):
        key = names.get(str(error.get("Key", "")))
        if key is None:
            continue  # not a key we sent: nothing of ours to report
        typed = typed_error(str(error.get("Code", "")), 0, key, "delete many")
        if not isinstance(typed, ObjectNotFoundError):
            failures.append((key, typed))
    return failures


@contextlib.contextmanager
def translate_errors(key: str, operation: str, mode: PutMode | None = None, *, endpoint: str = "the S3 endpoint",
                     deadline: float = DEFAULT_DEADLINE) -> Iterator[None]:
    """Map boto3/botocore failures to ckptstore's typed errors, in this one place."""
    from botocore import exceptions as bex

    try:
        yield
    except _DeadlinePassed as exc:
        raise out_of_time(endpoint, deadline, key=key, operation=operation, last=exc.last) from exc.last
    except bex.ClientError as exc:
        raise typed_error(*_error_code(exc), key, operation, mode) from exc
    except bex.NoCredentialsError as exc:
        raise PermissionDeniedError(
            "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or an instance role)",
            key=key, operation=operation) from exc
    except (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ReadTimeoutError,
            bex.ConnectTimeoutError, bex.ResponseStreamingError, bex.IncompleteReadError) as exc:
        raise TransientError(f"connection to {endpoint} failed: {type(exc).__name__}", key=key,
                             operation=operation) from exc
    except bex.BotoCoreError as exc:
        raise BackendError(f"S3 client error: {type(exc).__name__}", key=key, operation=operation) from exc


_loader_lock = threading.Lock()
_shared_loader: Any = None


def _botocore_session() -> Any:
    """A new botocore session (credentials, profile and config resolved afresh, as a new
    boto3 session would) that shares one data loader with every other: the S3 API model
    and endpoint rules are parsed once per process instead of once per `ckptstore.open`."""
    import botocore.session

    global _shared_loader
    session = botocore.session.get_session()
    with _loader_lock:
        if _shared_loader is None:
            _shared_loader = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _shared_loader)
    return session


def _total_size(response: dict[str, Any]) -> int:
    """The whole object's size from a GetObject answer: Content-Range's total ("bytes 0-N/TOTAL")
    for a ranged one, Content-Length for a whole one (a server that ignored the range)."""
    content_range = str(response.get("ContentRange") or "")
    total = content_range.rpartition("/")[2]
    if total.isdigit():
        return int(total)
    return int(response.get("ContentLength") or 0)


def _slice_parts(parts: Sequence[Buffer], start: int, length: int) -> list[memoryview]:
    """Views of the bytes [start, start + length) of the concatenated `parts`, without copying."""
    out = []
    pos = 0
    for part in parts:
        view = memoryview(part).cast("B")
        lo, hi = max(start, pos), min(start + length, pos + view.nbytes)
        if lo < hi:
            out.append(view[lo - pos:hi - pos])
        pos += view.nbytes
    return out


class S3Backend(Backend):
    """Objects under `s3://bucket/prefix`."""

    needs_canary = True
    # Measured (benchmarks/RESULTS.md, SeaweedFS, 1.24 GB fp32, 3 runs, same runs as a plain
    # 4-thread boto3 upload of 64 MiB objects): with 16 MiB chunks a save took 0.98x its time,
    # with 64 MiB chunks 0.86-0.87x; a re-save of 10% 0.19x against 0.13-0.14x.
    preferred_chunk_size = 64 * MiB
    max_delete_batch = 1000  # DeleteObjects' limit

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        client: Any = None,
        threads: int = 4,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
        max_attempts: int = 5,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = 60.0,
        deadline: float = DEFAULT_DEADLINE,
    ):
        for name, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout),
                            ("deadline", deadline)):
            check_seconds(name, value)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        make = functools.partial(self._make_client, endpoint_url, region, profile, threads, max_attempts,
                                 connect_timeout, read_timeout)
        # Two clients that differ in one setting: bodies of content-addressed objects (chunks,
        # manifests; every read checks them against their hash) go up unsigned with a CRC32;
        # everything else (refs, the marker, locks) keeps a signed payload as well.
        self._client = client or make(sign_payload=True)
        self._data_client = client or make(sign_payload=False)
        #: Seconds an operation may take, retries included (RetryingBackend uses the same).
        self.deadline = float(deadline)
        self._read_timeout = float(read_timeout)
        self.endpoint = endpoint_name(str(getattr(self._client.meta, "endpoint_url", "") or ""))
        for each in {id(c): c for c in (self._client, self._data_client)}.values():
            events = each.meta.events
            events.register_first("before-send.s3", self._before_send)
            events.register_first("needs-retry.s3", self._before_retry)

    # -- the deadline (module docstring) -------------------------------------------------
    def _errors(self, key: str, operation: str, mode: PutMode | None = None) -> contextlib.ExitStack:
        """The block of one operation: its deadline starts, and failures become typed errors."""
        stack = contextlib.ExitStack()
        stack.enter_context(deadline_in(self.deadline))
        stack.enter_context(translate_errors(key, operation, mode, endpoint=self.endpoint, deadline=self.deadline))
        return stack

    def _before_send(self, request: Any, **_: Any) -> None:
        """botocore is about to send a request (a first try or a retry) of one of our operations."""
        left = seconds_left()
        context = getattr(request, "context", None)
        context = context if isinstance(context, dict) else {}
        if left is None:
            return
        if left <= 0:  # a retry whose backoff ended past the deadline
            raise _DeadlinePassed(context.get(_LAST_FAILURE))
        context["read_timeout"] = min(self._read_timeout, left)  # botocore's per-request read timeout

    def _before_retry(self, caught_exception: BaseException | None = None, response: Any = None,
                      request_dict: Any = None, **_: Any) -> None:
        """botocore is deciding whether to retry: a failure past the deadline is final."""
        if isinstance(caught_exception, _DeadlinePassed):
            return
        if caught_exception is not None and isinstance(request_dict, dict) and "context" in request_dict:
            request_dict["context"][_LAST_FAILURE] = caught_exception  # one context for all tries of a call
        left = seconds_left()
        if left is None or left > 0:
            return
        if caught_exception is not None or _retryable_response(response):
            raise _DeadlinePassed(caught_exception)

    @staticmethod
    def _make_client(endpoint_url: str | None, region: str | None, profile: str | None, threads: int,
                     max_attempts: int, connect_timeout: float, read_timeout: float, *, sign_payload: bool) -> Any:
        import boto3
        from botocore.config import Config

        # boto3 reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself; we only need to know
        # whether a custom endpoint is in play, because those need path-style addressing.
        custom_endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        session = boto3.session.Session(botocore_session=_botocore_session(), profile_name=profile)
        config = Config(
            region_name=region or session.region_name or "us-east-1",
            max_pool_connections=max(10, 2 * threads + 2),
            # "standard" retries throttling, 5xx and connection errors with exponential
            # backoff and jitter. A retried conditional put may already have landed: the
            # store resolves that by re-reading the ref (ckptstore.commit).
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Request bodies carry a CRC32 (x-amz-checksum-crc32, checked by the server). Without
            # `sign_payload` that replaces a signed SHA-256 of the payload: AWS's own default
            # integrity model, at 4 GB/s instead of 1.8 GB/s of client CPU (botocore signs
            # payloads on plain-HTTP endpoints unless told not to; headers, the checksum
            # included, stay signed). Measured on SeaweedFS, 1.24 GB: client CPU per save
            # 1.8 -> 1.1-1.4 s.
            s3={**({"addressing_style": "path"} if custom_endpoint else {}), "payload_signing_enabled": sign_payload},
            request_checksum_calculation="when_supported",
            response_checksum_validation="when_required",
        )
        return session.client("s3", endpoint_url=endpoint_url, config=config)

    def _name(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key(self, name: str) -> str:
        return name[len(self.prefix) + 1:] if self.prefix else name

    # -- reads ---------------------------------------------------------------------------
    def get(self, key: str) -> GetResult:
        with self._errors(key, "get"):
            response = self._client.get_object(Bucket=self.bucket, Key=self._name(key))
            return GetResult(response["Body"].read(), response["ETag"])

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            self.head(key)  # still report a missing key
            return b""
        with self._errors(key, "get_range"):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=self._name(key),
                                                   Range=f"bytes={start}-{start + length - 1}")
            except Exception as exc:
                if _error_code(exc)[0] == "InvalidRange":  # start at or past the end
                    self.head(key)
                    return b""
                raise
            return response["Body"].read()

    def get_small(self, key: str, limit: int) -> GetResult:
        """One GetObject with `Range: bytes=0-<limit>`: the ETag (the version head reports; a
        ranged GET carries the whole object's) and the bytes come from one response, so they
        describe the same object. The total size in Content-Range tells an object over `limit`
        without reading it, and never more than `limit` + 1 bytes are read from the body (even
        from a server that ignored the range). An empty object has no satisfiable range (416
        InvalidRange): a head then describes it whole."""
        with self._errors(key, "get_small"):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=self._name(key), Range=f"bytes=0-{limit}")
            except Exception as exc:
                if _error_code(exc)[0] != "InvalidRange":
                    raise
                response = None
            if response is not None:
                body = response["Body"]
                try:
                    self._check_small(key, _total_size(response), limit)
                    data = body.read(limit + 1)
                    self._check_small(key, len(data), limit, read=True)
                except BaseException:
                    body.close()  # drop the rest unread (and the connection with it)
                    raise
                return GetResult(data, response["ETag"])
        info = self.head(key)  # 416: empty (or gone: ObjectNotFoundError)
        if info.size == 0:
            return GetResult(b"", info.version)
        return super().get_small(key, limit)  # written since the 416: a head, then a bounded read

    def read_into(self, key: str, start: int, buffers: Sequence[memoryview]) -> int:
        wanted = sum(b.nbytes for b in buffers)
        if wanted == 0:
            return 0
        with self._errors(key, "read_into"):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=self._name(key),
                                                   Range=f"bytes={start}-{start + wanted - 1}")
            except Exception as exc:
                if _error_code(exc)[0] == "InvalidRange":
                    self.head(key)
                    return 0
                raise
            body = response["Body"]
            total = 0
            try:
                for buffer in buffers:
                    view = buffer.cast("B")
                    while view.nbytes:  # straight from the socket into the caller's memory
                        n = body.readinto(view)
                        if not n:
                            return total
                        total += n
                        view = view[n:]
            finally:
                body.close()
            return total

    def head(self, key: str) -> ObjectInfo:
        with self._errors(key, "head"):
            response = self._client.head_object(Bucket=self.bucket, Key=self._name(key))
            return ObjectInfo(key, int(response["ContentLength"]), response["ETag"],
                              response["LastModified"].timestamp())

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        pages = iter(self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full))
        while True:
            # Each page is one request with a deadline of its own; the caller's work between
            # pages runs outside it.
            with self._errors(prefix, "list"):
                page = next(pages, None)
            if page is None:
                return
            for item in page.get("Contents", ()):
                yield ObjectInfo(self._key(item["Key"]), int(item["Size"]), item["ETag"],
                                 item["LastModified"].timestamp())

    # -- writes --------------------------------------------------------------------------
    def _writer(self, key: str) -> Any:
        """The client that uploads `key`'s body (see __init__)."""
        return self._data_client if key.startswith((CHUNKS, MANIFESTS)) else self._client

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        name = self._name(key)
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        size = sum(memoryview(p).nbytes for p in parts)
        operation = f"put {mode.kind}"
        if size > self.multipart_threshold:
            if mode.kind == "update":
                raise ValueError(f"conditional put of {size} bytes exceeds the single-request limit; "
                                 f"refs are small, so this is a caller bug ({key!r})")
            if mode.kind == "create" and self.exists(key):
                # Only content-addressed chunks are this large: an existing one holds these bytes.
                raise AlreadyExistsError("object exists", key=key, operation=operation)
            return self._put_multipart(key, name, parts)
        conditions: dict[str, str] = {}
        if mode.kind == "create":
            conditions["IfNoneMatch"] = "*"
        elif mode.kind == "update":
            assert mode.version is not None
            conditions["IfMatch"] = mode.version
        for attempt in range(_CONFLICT_RETRIES + 1):
            with self._errors(key, operation, mode):
                try:
                    response = self._writer(key).put_object(Bucket=self.bucket, Key=name,
                                                            Body=PartsReader(parts), **conditions)
                    return str(response["ETag"])
                except Exception as exc:
                    code, status = _error_code(exc)
                    if (status == 409 or code == "ConditionalRequestConflict") and conditions:
                        if attempt < _CONFLICT_RETRIES:
                            time.sleep(0.05 * 2**attempt)
                            continue
                        if mode.kind == "create":
                            raise AlreadyExistsError("concurrent conditional write", key=key,
                                                     operation=operation) from exc
                        raise PreconditionFailedError("concurrent conditional write", key=key,
                                                      operation=operation) from exc
                    raise
        raise AssertionError("unreachable")

    def _put_multipart(self, key: str, name: str, parts: Sequence[Buffer]) -> str:
        size = sum(memoryview(p).nbytes for p in parts)
        operation = "put multipart"
        with self._errors(key, operation):
            upload = self._client.create_multipart_upload(Bucket=self.bucket, Key=name)
            upload_id = upload["UploadId"]
            try:
                done = []
                for number, start in enumerate(range(0, size, self.part_size), start=1):
                    piece = PartsReader(_slice_parts(parts, start, self.part_size))
                    response = self._writer(key).upload_part(Bucket=self.bucket, Key=name, UploadId=upload_id,
                                                             PartNumber=number, Body=piece)
                    done.append({"PartNumber": number, "ETag": response["ETag"]})
                    progressed()  # the deadline bounds a wait, not the whole upload
                result = self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": done})
                return str(result["ETag"])
            except BaseException:
                with contextlib.suppress(Exception):
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
                raise

    def cleanup_staging(self, min_age: float, *, now: float | None = None) -> int:
        """Abort multipart uploads under this prefix started more than `min_age` seconds ago
        (a killed save leaves them; they are invisible to listings and cost storage).

        `now` is the current time by the server's clock (gc passes the server time it
        measured); an upload's `Initiated` is a server timestamp, so comparing it with this
        machine's clock (`now=None`) misjudges ages by the clock skew.
        """
        aborted = 0
        prefix = f"{self.prefix}/" if self.prefix else ""
        cutoff = (time.time() if now is None else now) - min_age
        with self._errors(prefix, "cleanup_staging"):
            paginator = self._client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                progressed()  # one deadline per request, not for the whole clean-up
                for upload in page.get("Uploads", ()):
                    if upload["Initiated"].timestamp() < cutoff:
                        with contextlib.suppress(Exception):
                            self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                                UploadId=upload["UploadId"])
                            aborted += 1
                        progressed()
        return aborted

    def delete(self, key: str, *, version: str | None = None) -> None:
        name = self._name(key)
        if version is None:
            with self._errors(key, "delete"):
                self._client.delete_object(Bucket=self.bucket, Key=name)
            return
        operation = "delete if-version"
        require_version(version)
        if version.strip() == "*":  # If-Match: * would delete whatever is there
            if self.exists(key):
                raise PreconditionFailedError("not an ETag", key=key, operation=operation)
            return
        for attempt in range(_CONFLICT_RETRIES + 1):
            try:
                with self._errors(key, operation):
                    try:
                        self._client.delete_object(Bucket=self.bucket, Key=name, IfMatch=version)
                        return
                    except Exception as exc:
                        code, status = _error_code(exc)
                        if status == 409 or code == "ConditionalRequestConflict":  # as in put
                            if attempt < _CONFLICT_RETRIES:
                                time.sleep(0.05 * 2**attempt)
                                continue
                            raise PreconditionFailedError("concurrent conditional write", key=key,
                                                          operation=operation) from exc
                        raise
            except ObjectNotFoundError:
                return  # AWS and moto: 404 for a missing key (or for our own retried delete)
            except PreconditionFailedError:
                if self.exists(key):  # 412 is also SeaweedFS's answer for a missing key
                    raise
                return
        raise AssertionError("unreachable")

    def delete_many(self, keys: Sequence[str]) -> DeleteFailures:
        """DeleteObjects, `max_delete_batch` keys a request, in Quiet mode: the answer lists only
        the keys that failed, each mapped to a typed error (a missing key is not one). A request
        that fails as a whole fails every key it carried."""
        failures: DeleteFailures = []
        names: dict[str, str] = {}
        for key in keys:
            try:
                names[self._name(key)] = key
            except CkptStoreError as exc:
                failures.append((key, exc))
        batch = list(names)
        for start in range(0, len(batch), self.max_delete_batch):
            part = batch[start:start + self.max_delete_batch]
            try:
                with self._errors(names[part[0]], "delete many"):
                    response = self._client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": [{"Key": n} for n in part], "Quiet": True})
            except CkptStoreError as exc:
                failures.extend((names[n], exc) for n in part)
                continue
            failures += delete_objects_errors(response, names)
        return failures

    def close(self) -> None:
        for client in {id(c): c for c in (self._client, self._data_client)}.values():
            with contextlib.suppress(Exception):
                client.close()
