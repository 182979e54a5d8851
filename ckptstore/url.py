"""Store URLs -> backends. The only place that looks at a URL scheme."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from ckptstore.backends.base import Backend
from ckptstore.errors import InvalidURLError

SCHEMES = ("file", "memory")


def open_backend(url: str | os.PathLike[str]) -> Backend:
    """The backend for `url`: a path or file:// URL, or memory://name (unit tests only)."""
    text = os.fspath(url)
    if "://" not in text:
        from ckptstore.backends.local import LocalBackend

        return LocalBackend(text)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidURLError(f"file URL with a host is not supported: {text!r}")
        from ckptstore.backends.local import LocalBackend

        return LocalBackend(unquote(parsed.path))
    if parsed.scheme == "memory":
        from ckptstore.backends.memory import MemoryBackend

        return MemoryBackend(parsed.netloc + parsed.path)
    if parsed.scheme in ("s3", "gs"):
        raise InvalidURLError(f"{parsed.scheme}:// stores are not supported by this version of ckptstore yet")
    raise InvalidURLError(f"unknown store URL scheme {parsed.scheme!r} in {text!r}; use a path, file://, or memory://")

