"""Google Cloud Storage, through google-cloud-storage (JSON API over `requests`).

Keys are object names under an optional prefix: `gs://bucket/prefix` stores `key` as
`prefix/key`. Versions are GCS *generations* (decimal strings): every write of an object,
even of identical bytes, and every re-creation after a delete mints a new, larger one.

Put modes on the wire:
- create-only: simple (single-request multipart) upload with `ifGenerationMatch=0`
  (412 = exists);
- update-if-version: simple upload with `ifGenerationMatch=<generation>` (412 = another
  generation, or no object);
- overwrite: upload without a precondition.
Delete-if-version is a delete with `ifGenerationMatch=<generation>` (412 = another
generation: PreconditionFailedError, unless a head then finds no object; 404 = nothing to
delete). fake-gcs-server 1.54 ignores that precondition and deletes anyway; real GCS honours it.
Simple uploads hold at most `SIMPLE_UPLOAD_LIMIT` (8 MiB) bytes; anything larger goes up as a
resumable upload. GCS enforces preconditions on resumable uploads, but emulators do not
(fake-gcs-server 1.54 ignores them), so create-only is only *guaranteed* for single-request
uploads. The store relies on conditional puts only for refs and the marker, which are tiny;
large create-only puts are content-addressed chunks, where a lost race writes the same bytes.
An update-if-version put above the limit is refused with ValueError rather than silently
sent as an upload whose condition might not be enforced.

Retries: the library retries idempotent requests itself, and in 3.x it also retries uploads
(`DEFAULT_RETRY`'s predicate, passed explicitly below), here at most `max_attempts` tries per
call (default 5, as boto3 here) with backoff from 0.25 s. A conditional upload that timed out or was
retried may have landed before the retry saw 412: the outcome is ambiguous. The backend
reports what it saw (AlreadyExistsError / PreconditionFailedError); `ckptstore.commit`
resolves the ambiguity by re-reading the ref and comparing commit ids.

Time limits (storage options): every operation must end within `deadline` seconds (default
60), the library's retries and ckptstore's included (`ckptstore.deadline`): the library's
retry gets what is left of it as its timeout, and each request waits at most
`connect_timeout` (10 s) to connect and `read_timeout` (60 s; the older name `timeout` is
kept) for data, both cut to what is left. Before, a dead endpoint took 114 s (refused) to
124 s (never answering): the library's own retry ran for 120 s per call. A failure to reach
the endpoint, or its silence until the deadline, is a TransientError naming the endpoint.

Credentials: application default credentials; with STORAGE_EMULATOR_HOST set, the library
talks to that emulator anonymously. google-cloud-storage is imported when a backend is
created, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import itertools
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    capped,
    check_seconds,
    deadline_in,
    endpoint_name,
    out_of_time,
    seconds_left,
)
from ckptstore.errors import (
    AlreadyExistsError,
    BackendError,
    CkptStoreError,
    InvalidArgumentError,
    InvalidURLError,
    ObjectNotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
    TransientError,
)
from ckptstore.keys import validate_key

#: Largest put that google-cloud-storage sends as one request (its `_MAX_MULTIPART_SIZE`).
SIMPLE_UPLOAD_LIMIT = 8 * 1024 * 1024
#: Project used with an emulator when neither the argument nor GOOGLE_CLOUD_PROJECT gives one.
EMULATOR_PROJECT = "ckptstore-emulator"

_CONTENT_TYPE = "application/octet-stream"
_LIST_FIELDS = "items(name,size,generation,updated),nextPageToken"
# A generation is a positive integer. "0" would turn update-if-version into create-only.
_GENERATION = re.compile(r"[1-9][0-9]{0,19}")
# Only a short, plain token from the server (e.g. "insufficientPermissions") goes into a
# permission error message: never the server's free text, never anything from the request.
_REASON = re.compile(r"[A-Za-z][A-Za-z ]{0,40}")
_MESSAGE_LIMIT = 300
# The library's retry of one call: first delay, and its cap (it doubles in between).
_RETRY_INITIAL_DELAY = 0.25
_RETRY_MAX_DELAY = 8.0


# -- error translation -------------------------------------------------------------------------


def _not_found_says(exc: BaseException) -> str | None:
    """'bucket' or 'object' when a 404's text says which is missing, None when it does not."""
    text = str(exc).lower()
    # Real GCS: "The specified bucket does not exist." / "No such object: bucket/name".
    if "bucket does not exist" in text:
        return "bucket"
    if "no such object" in text:
        return "object"
    return None  # fake-gcs-server answers a bare "Not Found" for both


def _reason(exc: Any) -> str:
    errors = getattr(exc, "errors", None) or []
    first = errors[0] if errors and isinstance(errors[0], dict) else {}
    reason = str(first.get("reason", ""))
    return reason if _REASON.fullmatch(reason) else ""


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."


def translate_error(
    exc: BaseException,
    *,
    key: str | None,
    operation: str,
    mode: PutMode | None = None,
    bucket: str = "",
    bucket_missing: bool | None = None,
    endpoint: str = "GCS",
    deadline: float = DEFAULT_DEADLINE,
) -> BackendError | None:
    """The typed ckptstore error for a google-cloud-storage / transport failure, or None.

    None means `exc` is not a storage failure (a bug, a KeyboardInterrupt, our own ValueError)
    and must propagate unchanged. `bucket_missing` tells a 404 whose text does not say what
    is missing (fake-gcs-server's bare "Not Found") whether the bucket exists; when it is None
    the text decides and an undecided 404 is about the object. Failures to reach the server
    name `endpoint` (scheme, host and port).
    """
    import http.client

    import requests
    import urllib3
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc
    from google.cloud.storage import exceptions as storage_exc

    where = {"key": key, "operation": operation}
    where_text = f"gs://{bucket}" if bucket else "the bucket"

    if isinstance(exc, gexc.RetryError):
        # The library's retry gave up on a retryable failure: its timeout, our deadline, passed.
        return out_of_time(endpoint, deadline, key=key, operation=operation, last=exc.cause)

    if isinstance(exc, gexc.GoogleAPICallError):
        code = exc.code or 0
        if code == 412 or isinstance(exc, gexc.PreconditionFailed):
            if mode is not None and mode.kind == "create":
                return AlreadyExistsError("object exists", **where)
            return PreconditionFailedError("generation changed (or the object is gone)", **where)
        if code == 404 or isinstance(exc, gexc.NotFound):
            says = _not_found_says(exc)
            if says == "bucket" or (says is None and bucket_missing):
                return BackendError(f"bucket {where_text} does not exist (or this project cannot see it)", **where)
            if mode is not None and mode.kind == "update":
                # GCS answers ifGenerationMatch on a missing object with 412; S3-style 404s are
                # mapped the same way so a vanished object is always "precondition failed".
                return PreconditionFailedError("object vanished", **where)
            return ObjectNotFoundError("no such object", **where)
        if code in (401, 403) or isinstance(exc, (gexc.Forbidden, gexc.Unauthorized)):
            # Never echo the server's text or the request: only the status and a plain reason.
            reason = _reason(exc)
            return PermissionDeniedError(
                f"GCS refused the request for {where_text} (HTTP {code}{', ' + reason if reason else ''}); "
                f"check that the credentials in use have the storage.objects.* permissions it needs",
                **where,
            )
        if code in (408, 429) or code >= 500:
            # 408 request timeout, 429 throttling, 5xx (InternalServerError, BadGateway,
            # ServiceUnavailable, GatewayTimeout): retryable, exactly as the library treats them.
            return TransientError(f"GCS answered HTTP {code}: {_short(exc)}", **where)
        return BackendError(f"GCS answered HTTP {code}: {_short(exc)}", **where)

    if isinstance(exc, storage_exc.DataCorruption):
        # The crc32c of the bytes received differs from the server's: corrupted in transit.
        return TransientError(f"checksum mismatch on transfer: {_short(exc)}", **where)
    if isinstance(exc, storage_exc.InvalidResponse):
        status = getattr(getattr(exc, "response", None), "status_code", 0) or 0
        kind = TransientError if status in (408, 429) or status >= 500 else BackendError
        return kind(f"unexpected GCS response (HTTP {status})", **where)

    if isinstance(exc, auth_exc.RefreshError):
        # Credentials could not be refreshed: an outage of the token endpoint is retryable,
        # revoked or invalid credentials are not. The message never carries the token.
        if getattr(exc, "retryable", False):
            return TransientError("could not refresh Google credentials (retryable)", **where)
        return PermissionDeniedError("could not refresh Google credentials; re-authenticate", **where)
    if isinstance(exc, (auth_exc.TransportError, auth_exc.TimeoutError)):
        return TransientError(f"transport error while authenticating: {type(exc).__name__}", **where)
    if isinstance(exc, auth_exc.DefaultCredentialsError):
        return PermissionDeniedError(
            "no Google credentials found: run `gcloud auth application-default login`, set "
            "GOOGLE_APPLICATION_CREDENTIALS, or set STORAGE_EMULATOR_HOST for an emulator",
            **where,
        )
    if isinstance(exc, auth_exc.GoogleAuthError):
        return PermissionDeniedError(f"Google authentication failed ({type(exc).__name__})", **where)

    transient = (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.HTTPError,
        http.client.HTTPException,
        ConnectionError,  # builtin: resets and refusals that escape requests' wrapping
        TimeoutError,
    )
    if isinstance(exc, transient):
        return TransientError(f"connection to GCS at {endpoint} failed: {type(exc).__name__}: {_short(exc)}", **where)
    if isinstance(exc, requests.RequestException):
        return BackendError(f"request to GCS failed: {type(exc).__name__}: {_short(exc)}", **where)
    return None


# -- buffers -----------------------------------------------------------------------------------


def _views(data: Buffer | Sequence[Buffer]) -> list[memoryview]:
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    return [memoryview(p).cast("B") for p in parts]


class _BuffersWriter:
    """A write-only file that lands downloaded bytes in the caller's buffers, in order."""

    def __init__(self, buffers: Sequence[memoryview]):
        self._buffers = [b.cast("B") for b in buffers if b.nbytes]
        self.capacity = sum(b.nbytes for b in self._buffers)
        self.filled = 0  # high-water mark of bytes landed
        self._pos = 0
        self._index = 0  # the buffer that receives the next byte
        self._offset = 0  # and where in it

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        taken = 0
        while taken < n and self._index < len(self._buffers):
            buf = self._buffers[self._index]
            take = min(buf.nbytes - self._offset, n - taken)
            buf[self._offset:self._offset + take] = view[taken:taken + take]
            taken += take
            self._offset += take
            if self._offset == buf.nbytes:
                self._index += 1
                self._offset = 0
        self._pos += n  # bytes past the capacity (a server over-sending) are dropped
        self.filled = max(self.filled, min(self._pos, self.capacity))
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        # The library rewinds only for decompressive transcoding (we never store gzip), but
        # a seek is cheap to support: find the buffer that holds the new position.
        if whence != io.SEEK_SET or offset < 0:
            raise io.UnsupportedOperation("only absolute seeks are supported")
        self._pos = offset
        self._index, self._offset = 0, offset
        while self._index < len(self._buffers) and self._offset >= self._buffers[self._index].nbytes:
            self._offset -= self._buffers[self._index].nbytes
            self._index += 1
        return offset

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass


# -- the backend -------------------------------------------------------------------------------


class GCSBackend(Backend):
    """Objects in a GCS bucket under an optional prefix; versions are generations."""

    #: Remote servers differ in what they enforce: the store runs its canary on open.
    needs_canary = True
    #: Objects per list request (GCS allows up to 1000). Tests lower it to exercise paging.
    list_page_size: int = 1000

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        project: str | None = None,
        client: Any = None,
        threads: int = 4,
        read_timeout: float = 60.0,
        timeout: float | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        deadline: float = DEFAULT_DEADLINE,
        max_attempts: int = 5,
    ):
        if not bucket or "/" in bucket or bucket != bucket.strip():
            raise InvalidURLError(f"invalid GCS bucket name {bucket!r}")
        if threads < 1:
            raise InvalidArgumentError(f"threads must be at least 1, got {threads}")
        read_timeout = read_timeout if timeout is None else timeout
        for name, value in (("read_timeout", read_timeout), ("connect_timeout", connect_timeout),
                            ("deadline", deadline)):
            check_seconds(name, value)
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise InvalidArgumentError(f"max_attempts must be a positive int, got {max_attempts!r}")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"gs://{bucket}/{prefix}" if prefix else f"gs://{bucket}"
        self._root = f"{prefix}/" if prefix else ""
        self._timeout = float(read_timeout)
        self._connect_timeout = float(connect_timeout)
        #: Seconds an operation may take, retries included (RetryingBackend uses the same).
        self.deadline = float(deadline)
        self.max_attempts = max_attempts
        self._owns_client = client is None
        self._threads = threads

        from google.cloud import storage
        from google.cloud.storage import blob as blob_module
        from google.cloud.storage.retry import DEFAULT_RETRY

        # Conditional puts must stay single-request: never trust a limit above the library's.
        self._simple_limit = min(SIMPLE_UPLOAD_LIMIT, getattr(blob_module, "_MAX_MULTIPART_SIZE", 0))

        # Every request names this policy explicitly, bounded per call by `_call_retry`
        # (see the module docstring on retries).
        self._retry: Any = DEFAULT_RETRY.with_delay(initial=_RETRY_INITIAL_DELAY, maximum=_RETRY_MAX_DELAY)
        if client is None:
            client = self._make_client(storage, project, threads)
        self._client = client
        self.endpoint = endpoint_name(str(getattr(client, "api_endpoint", "") or ""))
        self._bucket = client.bucket(bucket)
        # Set once any request proves the bucket exists: fake-gcs-server's 404s do not say
        # whether the bucket or the object is missing, so an undecided 404 before that asks once.
        self._bucket_known = False
        self._bucket_lock = threading.Lock()

    @staticmethod
    def _make_client(storage: Any, project: str | None, threads: int) -> Any:
        emulator = bool(os.environ.get("STORAGE_EMULATOR_HOST"))
        project = project or os.environ.get("GOOGLE_CLOUD_PROJECT") or (EMULATOR_PROJECT if emulator else None)
        try:
            client = storage.Client(project=project) if project else storage.Client()
        except Exception as exc:
            error = translate_error(exc, key=None, operation="connect")
            if error is None:
                raise
            raise error from exc
        _size_connection_pool(client, threads)
        return client

    # -- names ---------------------------------------------------------------------------
    def _name(self, key: str) -> str:
        return self._root + validate_key(key)

    def _blob(self, key: str) -> Any:
        # A fresh Blob per call: download/upload store response properties on the Blob, so
        # sharing one between threads would mix generations.
        return self._bucket.blob(self._name(key))

    # -- errors --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, key: str | None, operation: str, mode: PutMode | None = None) -> Iterator[None]:
        """The block of one operation: its deadline starts (`_timeouts` and `_call_retry` read
        what is left of it), and failures become typed errors (see `translate_error`)."""
        with deadline_in(self.deadline):
            try:
                yield
            except Exception as exc:
                bucket_missing = None
                if _is_not_found(exc) and _not_found_says(exc) is None:
                    bucket_missing = not self._bucket_exists()
                error = translate_error(
                    exc, key=key, operation=operation, mode=mode, bucket=self.bucket, bucket_missing=bucket_missing,
                    endpoint=self.endpoint, deadline=self.deadline,
                )
                if error is None:
                    raise
                raise error from exc
            else:
                self._bucket_known = True

    def _timeouts(self) -> tuple[float, float]:
        """(connect, read) timeouts of a request now: the configured ones, cut to the deadline."""
        return capped(self._connect_timeout), capped(self._timeout)

    def _call_retry(self) -> Any:
        """The library's retry for one call: at most `max_attempts` tries, none started after
        the deadline (None when retries are off)."""
        if self._retry is None:
            return None
        left = seconds_left()
        retry = self._retry.with_timeout(self.deadline if left is None else max(0.001, left))
        return retry.with_predicate(_first_tries(retry._predicate, self.max_attempts))

    def _bucket_exists(self) -> bool:
        """Whether the bucket exists; asked only after a 404, until some request proves it exists."""
        if self._bucket_known:
            return True
        with self._bucket_lock:
            if self._bucket_known:
                return True
            try:
                exists = bool(self._bucket.exists(timeout=self._timeouts(), retry=self._call_retry()))
            except Exception:
                # Credentials limited to objects may not read bucket metadata (403): assume
                # the bucket is there and let the 404 stand as "no such object".
                return True
            self._bucket_known = exists
            return exists

    # -- reads ---------------------------------------------------------------------------
    def get(self, key: str) -> GetResult:
        blob = self._blob(key)
        with self._errors(key, "get"):
            data = blob.download_as_bytes(raw_download=True, checksum="auto", timeout=self._timeouts(),
                                          retry=self._call_retry())
        # The generation comes from the X-Goog-Generation header of the download response
        # (stored into the Blob by the library), so it is the generation of exactly these
        # bytes; a retried download pins that generation (the library adds ?generation=).
        return GetResult(data, self._generation_of(blob, key, "get"))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise InvalidArgumentError(f"start and length must be >= 0, got {start}, {length}")
        if length == 0:
            self.head(key)  # a missing key is still ObjectNotFoundError
            return b""
        from google.api_core.exceptions import RequestRangeNotSatisfiable

        blob = self._blob(key)
        with self._errors(key, "get_range"):
            try:
                return bytes(
                    blob.download_as_bytes(
                        start=start,
                        end=start + length - 1,  # inclusive
                        raw_download=True,
                        checksum=None,  # GCS has no checksum of a range
                        timeout=self._timeouts(),
                        retry=self._call_retry(),
                    )
                )
            except RequestRangeNotSatisfiable:
                # 416: `start` is at or past the end (any range of an empty object, too).
                return b""

    def get_small(self, key: str, limit: int) -> GetResult:
        """One ranged download of bytes [0, `limit`]: the generation comes from the same response
        (X-Goog-Generation, stored into the Blob by the library, as in `get`), so bytes and
        version describe the same object generation, and at most `limit` + 1 bytes are read. An
        empty object has no satisfiable range (416): a head then describes it whole."""
        from google.api_core.exceptions import RequestRangeNotSatisfiable

        blob = self._blob(key)
        with self._errors(key, "get_small"):
            try:
                data = bytes(blob.download_as_bytes(start=0, end=limit, raw_download=True, checksum=None,
                                                    timeout=self._timeouts(), retry=self._call_retry()))
            except RequestRangeNotSatisfiable:
                data = None
        if data is not None:
            self._check_small(key, len(data), limit, read=True)
            return GetResult(data, self._generation_of(blob, key, "get_small"))
        info = self.head(key)  # 416: empty (a missing key was a 404 above)
        if info.size == 0:
            return GetResult(b"", info.version)
        return super().get_small(key, limit)  # written since the 416: a head, then a bounded read

    def read_into(self, key: str, start: int, buffers: Sequence[memoryview]) -> int:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        writer = _BuffersWriter(buffers)
        if writer.capacity == 0:
            self.head(key)
            return 0
        from google.api_core.exceptions import RequestRangeNotSatisfiable

        blob = self._blob(key)
        with self._errors(key, "read_into"):
            try:
                blob.download_to_file(
                    writer,
                    start=start,
                    end=start + writer.capacity - 1,
                    raw_download=True,
                    checksum=None,
                    timeout=self._timeouts(),
                    retry=self._call_retry(),
                )
            except RequestRangeNotSatisfiable:
                return 0
        return writer.filled

    def head(self, key: str) -> ObjectInfo:
        blob = self._blob(key)
        with self._errors(key, "head"):
            blob.reload(timeout=self._timeouts(), retry=self._call_retry())
        return self._info(key, blob)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        iterator = self._client.list_blobs(  # no request yet: each page is fetched below
            self._bucket,
            prefix=self._root + prefix,
            page_size=self.list_page_size,
            fields=_LIST_FIELDS,
            # Fixed for every page, each of which has the whole `deadline` (a long listing is
            # not one wait): no request of a page waits, and no retry of it starts, past it.
            timeout=(min(self._connect_timeout, self.deadline), min(self._timeout, self.deadline)),
            retry=self._call_retry(),
        )
        pages = iter(iterator.pages)
        while True:
            # Each page is one request: translate its failures, but yield outside the block.
            with self._errors(prefix or None, "list"):
                page = next(pages, None)
                blobs = list(page) if page is not None else []
            if page is None:
                return
            for blob in blobs:
                key = blob.name[len(self._root):]
                if not _is_valid_key(key):
                    # Not a key this backend could have written: e.g. the "folder/" placeholder
                    # objects the Cloud Console creates. Listing them would hand callers keys
                    # that every other operation refuses.
                    continue
                yield self._info(key, blob)

    # -- writes --------------------------------------------------------------------------
    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        name = self._name(key)
        operation = f"put {mode.kind}"
        if mode.kind == "update":
            assert mode.version is not None
            if not _GENERATION.fullmatch(mode.version):
                # Not a generation GCS could have minted, so it cannot be the current one.
                raise PreconditionFailedError("not a GCS generation", key=key, operation=operation)
            condition: int | None = int(mode.version)
        elif mode.kind == "create":
            condition = 0
        else:
            condition = None
        reader = PartsReader(_views(data))
        if mode.kind == "update" and reader.size > self._simple_limit:
            raise ValueError(
                f"update-if-version put of {reader.size} bytes to {key!r}: conditional puts must fit one "
                f"request ({self._simple_limit} bytes); larger uploads are resumable and their "
                f"preconditions are not enforced everywhere"
            )
        blob = self._bucket.blob(name)
        blob.chunk_size = None  # with a size up to the library's limit: one multipart request
        with self._errors(key, operation, mode):
            blob.upload_from_file(
                reader,
                size=reader.size,
                content_type=_CONTENT_TYPE,
                if_generation_match=condition,
                checksum="auto",
                timeout=self._timeouts(),
                # Retried even when conditional: a retry after a lost response may see 412 for
                # our own write. The caller resolves that (module docstring).
                retry=self._call_retry(),
            )
        return self._generation_of(blob, key, operation)

    def delete(self, key: str, *, version: str | None = None) -> None:
        blob = self._blob(key)
        operation = "delete" if version is None else "delete if-version"
        condition: int | None = None
        if version is not None:
            require_version(version)
            if not _GENERATION.fullmatch(version):
                # Not a generation GCS could have minted, so not the current one (and an
                # unchecked "0" would mean "only if absent").
                if self.exists(key):
                    raise PreconditionFailedError("not a GCS generation", key=key, operation=operation)
                return
            condition = int(version)
        try:
            with self._errors(key, operation):
                # The library retries the delete; a retry after a lost response finds the
                # object gone (404, below) or, if it was re-created meanwhile, at another
                # generation (412): the new object is never touched.
                blob.delete(if_generation_match=condition, timeout=self._timeouts(), retry=self._call_retry())
        except ObjectNotFoundError:
            return  # missing (or deleted by our own first attempt before a retry)
        except PreconditionFailedError:
            if self.exists(key):
                raise

    def delete_many(self, keys: Sequence[str]) -> DeleteFailures:
        """One delete per key, `threads` at a time. The library's `client.batch()` would send 100
        a request, but fake-gcs-server 1.54 answers a batch request with a non-multipart body
        ("Bad response: not multi-part"), so it could not be tested here; per-key deletes cost
        the same on the server and run concurrently."""
        def one(key: str) -> CkptStoreError | None:
            try:
                self.delete(key)
            except CkptStoreError as exc:
                return exc
            return None

        with ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="ckptstore-gcs-delete") as pool:
            # Each delete runs in a copy of the caller's context: its deadline (gc's) holds there too.
            futures = [pool.submit(contextvars.copy_context().run, one, key) for key in keys]
            errors = [future.result() for future in futures]
        return [(key, error) for key, error in zip(keys, errors, strict=True) if error is not None]

    def close(self) -> None:
        if self._owns_client:
            with contextlib.suppress(Exception):
                self._client.close()

    # -- helpers -------------------------------------------------------------------------
    def _generation_of(self, blob: Any, key: str, operation: str) -> str:
        generation = blob.generation
        if generation is None:
            raise BackendError("GCS reported no generation for the object", key=key, operation=operation)
        return str(int(generation))

    def _info(self, key: str, blob: Any) -> ObjectInfo:
        updated = blob.updated
        return ObjectInfo(
            key,
            int(blob.size or 0),
            self._generation_of(blob, key, "head"),
            updated.timestamp() if updated is not None else 0.0,
        )


def _first_tries(predicate: Callable[[BaseException], bool], attempts: int) -> Callable[[BaseException], bool]:
    """`predicate` for the first `attempts - 1` failures of one call, then False: no more tries."""
    failures = itertools.count(1)
    return lambda exc: next(failures) < attempts and predicate(exc)


def _is_valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except Exception:
        return False
    return True


def _is_not_found(exc: BaseException) -> bool:
    from google.api_core import exceptions as gexc

    return isinstance(exc, gexc.GoogleAPICallError) and (exc.code == 404 or isinstance(exc, gexc.NotFound))


def _size_connection_pool(client: Any, threads: int) -> None:
    """Give the client's `requests` session a pool of `threads` connections per host.

    requests' default adapter keeps 10 connections per host and discards extras (with a
    warning) when more threads than that share a session. Only clients this backend creates
    are changed; a session configured for mutual TLS keeps its own adapter.
    """
    import requests
    from requests.adapters import HTTPAdapter

    session = client._http
    if not isinstance(session, requests.Session) or getattr(session, "_is_mtls", False):
        return
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=threads)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
