"""Store URLs -> backends. The only place that looks at a URL scheme.

    ./ckpts, /abs/path, file:///abs/path    local filesystem
    s3://bucket/prefix                      S3 or S3-compatible (?endpoint=...&region=...&profile=...)
    gs://bucket/prefix                      Google Cloud Storage (?project=...)
    memory://name                           in-process, for unit tests

s3:// and gs:// also take `?retries=N`: how often the store retries transient failures
(ckptstore.retry; default 4, 0 = off). It is the store's option and never reaches the backend.

Options can also be passed as `storage_options` (keyword arguments of the backend class);
options in the URL query win over nothing else and must not repeat one given explicitly.
Credentials never go in URLs: the SDKs' standard credential chains supply them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlparse

from ckptstore.backends.base import Backend
from ckptstore.errors import InvalidArgumentError, InvalidURLError

SCHEMES = ("file", "memory", "s3", "gs")

# URL query names -> backend keyword arguments.
_S3_QUERY = {"endpoint": "endpoint_url", "endpoint_url": "endpoint_url", "region": "region", "profile": "profile"}
_GCS_QUERY = {"project": "project"}
# Options of the store, not of the backend: stripped before the backend sees the query.
_STORE_QUERY = {"retries": "retries"}
_SECRET_WORDS = ("secret", "password", "token", "key")


def _query_options(query: str, allowed: Mapping[str, str], text: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if any(word in name.lower() for word in _SECRET_WORDS):
            raise InvalidURLError(f"credentials do not go in store URLs (found {name!r}); use the SDK's "
                                  f"credential chain (environment, profile, instance role)")
        if name not in allowed:
            raise InvalidURLError(f"unknown option {name!r} in {redact(text)!r}; known: {sorted(allowed)}")
        options[allowed[name]] = value
    return options


def redact(url: str) -> str:
    """`url` without a query string or user info, safe to print."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    return f"{parsed.scheme}://{host}{parsed.path}" if parsed.scheme else url


def open_backend(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *,
                 threads: int = 4) -> Backend:
    """The backend for `url` (see the module docstring); `storage_options` go to its constructor.

    Remote backends size their connection pools for `threads` concurrent requests.
    """
    text = os.fspath(url)
    options = dict(storage_options or {})
    if "://" not in text:
        from ckptstore.backends.local import LocalBackend

        return LocalBackend(text, **options)
    parsed = urlparse(text)
    if parsed.username or parsed.password:
        raise InvalidURLError("credentials do not go in store URLs; use the SDK's credential chain")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidURLError(f"file URL with a host is not supported: {text!r}")
        from ckptstore.backends.local import LocalBackend

        return LocalBackend(unquote(parsed.path), **options)
    if parsed.scheme == "memory":
        from ckptstore.backends.memory import MemoryBackend

        return MemoryBackend(parsed.netloc + parsed.path, **options)
    if parsed.scheme in ("s3", "gs"):
        bucket, prefix = parsed.netloc, parsed.path.strip("/")
        if not bucket:
            raise InvalidURLError(f"no bucket in {redact(text)!r}; use {parsed.scheme}://BUCKET/PREFIX")
        allowed = {**(_S3_QUERY if parsed.scheme == "s3" else _GCS_QUERY), **_STORE_QUERY}
        query = _query_options(parsed.query, allowed, text)
        for name in _STORE_QUERY.values():
            query.pop(name, None)
        clash = set(query) & set(options)
        if clash:
            raise InvalidURLError(f"{sorted(clash)} given both in the URL and in storage_options")
        options.update(query)
        options.setdefault("threads", threads)
        if parsed.scheme == "s3":
            return _import_backend("s3", "S3Backend", "boto3")(bucket, prefix, **options)
        return _import_backend("gcs", "GCSBackend", "google-cloud-storage")(bucket, prefix, **options)
    raise InvalidURLError(f"unknown store URL scheme {parsed.scheme!r} in {redact(text)!r}; "
                          f"use a path, file://, s3://, gs:// or memory://")


def retries_option(url: str | os.PathLike[str], explicit: int | None, default: int) -> int:
    """How often a store opened from `url` retries transient failures: `explicit` if given,
    else the URL's `?retries=N` (s3:// and gs:// only), else `default`.

    Raises InvalidURLError for a value that is not a non-negative int, or one given both ways.
    """
    text = os.fspath(url)
    parsed = urlparse(text) if "://" in text else None
    found: list[str] = []
    if parsed is not None and parsed.scheme in ("s3", "gs"):
        found = [value for name, value in parse_qsl(parsed.query, keep_blank_values=True) if name == "retries"]
    if found and explicit is not None:
        raise InvalidURLError(f"retries given both in the URL and as an argument ({redact(text)!r})")
    if explicit is not None:
        if isinstance(explicit, bool) or not isinstance(explicit, int) or explicit < 0:
            raise InvalidArgumentError(f"retries must be a non-negative int, got {explicit!r}")
        return explicit
    if not found:
        return default
    if len(found) > 1 or not found[0].isdigit():
        raise InvalidURLError(f"retries in {redact(text)!r} must be one non-negative integer, got {found}")
    return int(found[0])


def _import_backend(module: str, cls: str, package: str) -> Any:
    import importlib
    import importlib.util

    sdk = "boto3" if module == "s3" else "google.cloud.storage"
    try:
        found = importlib.util.find_spec(sdk) is not None
    except ModuleNotFoundError:  # find_spec of a dotted name whose parent is missing
        found = False
    if not found:
        extra = "s3" if module == "s3" else "gcs"
        raise InvalidURLError(f"{cls} needs {package}: pip install 'ckptstore[{extra}]'")
    return getattr(importlib.import_module(f"ckptstore.backends.{module}"), cls)
