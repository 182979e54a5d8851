"""The client-side cache of refs that `ckptstore ls` read, keyed by ref key and version.

A listing of refs/steps/ returns each ref's version (ETag, generation, inode and mtime), so
a ref whose version is unchanged since the last `ls` needs no GET: a repeated `ls` with
nothing new reads the listing and the marker only, and k new steps cost k GETs. The cache
is a hint for display: a missing, unreadable or corrupt file is ignored (entries are
re-decoded by the real ref decoder), and nothing that deletes (gc, rm) ever reads it. gc
keeps its own, stricter cache (ckptstore/gccache.py: checksummed files, store identity, and
no trust in versions that can repeat, such as the local backend's).

Location: `cache_dir()` (ckptstore/gccache.py: $CKPTSTORE_CACHE_DIR, else
$XDG_CACHE_HOME/ckptstore, else ~/.cache/ckptstore); one file per store URL.
"""

from __future__ import annotations

import hashlib
import json

from ckptstore.errors import FormatError
from ckptstore.gccache import cache_dir, write_atomically
from ckptstore.manifest import Ref, decode_ref, encode_ref

CACHE_VERSION = 1


class RefCache:
    """Refs by key, each valid only at the version it was listed with."""

    def __init__(self, url: str):
        self.url = url
        self.path = cache_dir() / f"refs-{hashlib.sha256(url.encode()).hexdigest()[:32]}.json"
        self._entries = self._load()

    def _load(self) -> dict[str, tuple[str, str]]:
        try:
            obj = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(obj, dict) or obj.get("v") != CACHE_VERSION or obj.get("url") != self.url:
            return {}
        refs = obj.get("refs")
        if not isinstance(refs, dict):
            return {}
        return {key: (entry[0], entry[1]) for key, entry in refs.items()
                if isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)}

    def get(self, key: str, version: str) -> Ref | None:
        """The ref cached for `key` at exactly `version`, or None."""
        entry = self._entries.get(key)
        if entry is None or entry[0] != version or not version:
            return None
        try:
            return decode_ref(bytes.fromhex(entry[1]))
        except (ValueError, FormatError):
            return None  # a corrupt entry is a miss

    def replace_all(self, refs: dict[str, tuple[str, Ref]]) -> None:
        """Keep exactly `refs` (key -> (version, ref)): what the last listing showed.
        Written atomically; a cache that cannot be written is skipped."""
        self._entries = {key: (version, encode_ref(ref).hex()) for key, (version, ref) in refs.items() if version}
        body = json.dumps({"v": CACHE_VERSION, "url": self.url,
                           "refs": {key: list(entry) for key, entry in self._entries.items()}})
        write_atomically(self.path, body.encode("utf-8"))
