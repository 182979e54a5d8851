"""gc's mark cache: what an earlier mark learned, on the client's disk, so that a repeated gc
reads only what is new (issue 13). Argued in docs/FORMAT.md, "The mark cache".

Two kinds of entry, each trusted only under its own key:

- **A manifest's chunk set**, keyed by the manifest's digest. A manifest is content-addressed
  and immutable, and a set is cached only from bytes gc hash-checked against that digest
  (`gc._read_manifest_chunks`), so the set is a function of the key. Stored as one file per
  manifest, `m/<digest>`: the manifest's distinct raw chunk digests, sorted, in one byte
  string (32 B a chunk for a 32-byte hash), which `gc.DigestSet` merges without a Python
  object per chunk. k new steps write k files.
- **A ref's target** (the manifest digest it names), keyed by the ref's key *and* the version
  the ref had when it was read: used only when a listing of refs/ shows exactly that version
  again. The shipped backends' `get_small` returns bytes and version from one response, but
  the `Backend` default (other backends, test wrappers) takes the version from a head before
  the read, so gc assumes the bytes may be newer than the version (`pairing_is_safe`): where a
  version is never reused (GCS, memory://) such an entry can never match a later listing; on
  S3 an ETag equal to the MD5 of the bytes read names exactly them; otherwise an entry is
  recorded only if a second head after the read shows the same version. The version must never
  come back with other bytes:
  - S3: an ETag is the MD5 of the bytes (or unique per upload when encrypted), so the same
    ETag means the same bytes and the same target; GCS: a generation is never reused for a
    name; memory://: a process-wide counter (and the store's marker, in the identity below,
    differs between processes).
  - The local backend's version is the inode, mtime (ns), size and a CRC32 of the bytes. An
    inode is reused once the file holding it is replaced, mtimes are as coarse as the
    filesystem's timestamps, and a CRC32 is 32 bits: a ref rewritten in place within one
    timestamp tick can come back with the version of bytes it no longer has
    (tests/test_gc_incremental.py makes one). So on local (and any backend not named above)
    an entry is recorded only for a ref whose mtime was at least `SETTLED_SECONDS` older
    than the server's time at the mark. Any later rewrite that could reuse the inode is
    created after the file holding it was replaced, hence after the read, so its mtime is
    later than the read and differs from the entry's: a repeat needs the server's clock to
    step back by more than `SETTLED_SECONDS` on top of an inode reuse, an equal size and a
    CRC32 collision. Younger refs are read again by the next gc (a local read).

Every file says what it belongs to: the store's URL, the sha256 of its CKPTSTORE marker's
bytes (a store deleted and created again at the same URL gets a new marker), the digest its
hash function gives a fixed probe (the algorithm), `CACHE_FORMAT` and the mark's own format
number (bumped whenever what gc reads from a manifest changes). Files carry a sha256 of
their content. Any doubt (missing, truncated, corrupt, another store, another version of the
code) is a miss: gc reads the object from the store instead. A cache that cannot be written
is skipped. Nothing in it can make gc keep less than the store says, only read less.

Location: `cache_dir()/gc-<sha256(url)[:32]>/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ckptstore import keys
from ckptstore.backends.base import Backend
from ckptstore.errors import CkptStoreError

#: Bump when the layout of the files below changes.
CACHE_FORMAT = 1
#: The bytes whose digest identifies the store's hash algorithm in a cache file.
_HASH_PROBE = b"ckptstore gc mark cache: which hash function?"
_REFS_MAGIC = b"ckptstore-gc-refs 1\n"
_CHUNKS_MAGIC = b"ckptstore-gc-chunks 1\n"
_SUM = hashlib.sha256().digest_size
_HEX = re.compile(r"[0-9a-f]{2,256}")
#: Markers are tiny; this only bounds what a planted object could make us read.
_MARKER_LIMIT = 64 << 10
#: On a backend whose versions can repeat (local), a ref's target is cached only once its
#: mtime is this much older than the server's time (module docstring): more than the
#: coarsest filesystem timestamp (2 s) and any clock adjustment short of a step.
SETTLED_SECONDS = 10.0


def cache_dir() -> Path:
    """Where ckptstore keeps client-side caches: $CKPTSTORE_CACHE_DIR, else
    $XDG_CACHE_HOME/ckptstore, else ~/.cache/ckptstore."""
    explicit = os.environ.get("CKPTSTORE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ckptstore"


def versions_identify_bytes(url: str) -> bool:
    """Whether a version of an object at `url` can only ever belong to the bytes it was first
    seen with, whenever it was seen (module docstring): S3, GCS and memory://, not local paths."""
    return _scheme(url) in ("s3", "gs", "memory")


def write_atomically(path: Path, body: bytes | Iterable[bytes]) -> None:
    """Write `path` by a rename, so a reader sees the old file or the whole new one. A cache
    that cannot be written is skipped (no error)."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                for part in [body] if isinstance(body, bytes) else body:
                    out.write(part)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else ""


class MarkCache:
    """The mark cache of one store (see the module docstring). Build with `open`."""

    def __init__(self, url: str, identity: str, *, versions_unique: bool):
        self.url = url
        self.identity = identity
        #: False: record a ref only once it is SETTLED_SECONDS old (module docstring).
        self.versions_unique = versions_unique
        self.path = cache_dir() / f"gc-{hashlib.sha256(url.encode()).hexdigest()[:32]}"
        self._refs = self._load_refs()
        self._seen: dict[str, tuple[str, str]] = {}  # what this run confirmed: key -> (version, manifest)

    @classmethod
    def open(cls, backend: Backend, hash_: Callable[[Any], str], mark_format: int) -> MarkCache | None:
        """The cache for the store on `backend`, or None when its marker cannot be read (no
        cache this run: gc reads everything)."""
        try:
            marker = backend.get_small(keys.MARKER, _MARKER_LIMIT).data
            probe = hash_(_HASH_PROBE)
        except CkptStoreError:
            return None
        identity = hashlib.sha256(json.dumps(
            [CACHE_FORMAT, mark_format, backend.url, hashlib.sha256(marker).hexdigest(), probe]).encode()).hexdigest()
        return cls(backend.url, identity, versions_unique=versions_identify_bytes(backend.url))

    # -- refs ------------------------------------------------------------------------------
    @property
    def _refs_path(self) -> Path:
        return self.path / "refs"

    def _load_refs(self) -> dict[str, tuple[str, str]]:
        try:
            data = self._refs_path.read_bytes()
        except OSError:
            return {}
        if not data.startswith(_REFS_MAGIC) or len(data) < len(_REFS_MAGIC) + _SUM:
            return {}
        body, checksum = data[len(_REFS_MAGIC):-_SUM], data[-_SUM:]
        if hashlib.sha256(body).digest() != checksum:
            return {}
        try:
            obj = json.loads(body)
        except ValueError:
            return {}
        if not isinstance(obj, dict) or obj.get("identity") != self.identity or obj.get("url") != self.url:
            return {}
        refs = obj.get("refs")
        if not isinstance(refs, dict):
            return {}
        return {key: (entry[0], entry[1]) for key, entry in refs.items()
                if isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) and e for e in entry)
                and _HEX.fullmatch(entry[1])}

    def ref_target(self, key: str, version: str) -> str | None:
        """The manifest digest the ref at `key` named when it had exactly `version` (as listed
        now), or None: unknown, or another version."""
        if not version:
            return None
        entry = self._refs.get(key)
        if entry is None or entry[0] != version:
            return None
        self._seen[key] = entry
        return entry[1]

    def pairing_is_safe(self, version: str, data: bytes) -> bool:
        """Whether a ref read as `data` under `version` (possibly from a head before the read: the
        `Backend.get_small` default) may be recorded without a head after it: GCS generations
        and memory's counter are never reused, so if `data` is newer the entry can never match
        a listing; an S3 ETag that is the MD5 of `data` is the version of exactly these bytes.
        Else (local, an encrypted or changed S3 object): False, confirm with a head."""
        scheme = _scheme(self.url)
        if scheme in ("gs", "memory"):
            return True
        return scheme == "s3" and version.strip('"') == hashlib.md5(data, usedforsecurity=False).hexdigest()

    def remember_ref(self, key: str, version: str, manifest: str, *, modified: float | None,
                     now: float | None) -> bool:
        """The ref at `key` had `version` (server mtime `modified`) before and after gc read
        that it names `manifest`; `now`: the server's time at the mark (None: unknown, as in a
        dry run). Returns whether it was recorded: always where versions never repeat, else
        only once the ref has settled (SETTLED_SECONDS)."""
        settled = self.versions_unique or (
            now is not None and modified is not None and now - modified >= SETTLED_SECONDS)
        if settled and version and _HEX.fullmatch(manifest):
            self._seen[key] = (version, manifest)
            return True
        return False

    def save_refs(self) -> None:
        """Keep exactly the refs this run used or confirmed (a ref not listed any more drops out)."""
        body = json.dumps({"identity": self.identity, "url": self.url,
                           "refs": {key: list(entry) for key, entry in sorted(self._seen.items())}}).encode()
        write_atomically(self._refs_path, [_REFS_MAGIC, body, hashlib.sha256(body).digest()])

    # -- manifests' chunk sets -------------------------------------------------------------
    def _chunks_path(self, manifest: str) -> Path | None:
        return self.path / "m" / manifest if _HEX.fullmatch(manifest) else None

    def chunks(self, manifest: str) -> tuple[bytes, int] | None:
        """The chunk digests of `manifest` as (sorted raw digests concatenated, width), or None."""
        path = self._chunks_path(manifest)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if not data.startswith(_CHUNKS_MAGIC) or len(data) < len(_CHUNKS_MAGIC) + 4 + _SUM:
            return None
        if hashlib.sha256(data[:-_SUM]).digest() != data[-_SUM:]:
            return None
        at = len(_CHUNKS_MAGIC)
        header_len = int.from_bytes(data[at:at + 4], "big")
        header_end = at + 4 + header_len
        try:
            header = json.loads(data[at + 4:header_end])
        except ValueError:
            return None
        if not isinstance(header, dict) or header.get("identity") != self.identity or header.get("url") != self.url \
                or header.get("manifest") != manifest:
            return None
        width, count = header.get("width"), header.get("count")
        raw = data[header_end:-_SUM]
        if not isinstance(width, int) or not isinstance(count, int) or width < 0 or count < 0 \
                or len(raw) != width * count or (count and not width):
            return None
        return raw, width

    def remember_chunks(self, manifest: str, hex_digests: Iterable[str]) -> None:
        """Cache the chunk digests gc read from `manifest`'s hash-checked bytes. A set whose
        digests differ in width (no store mixes hashes) is not cached."""
        path = self._chunks_path(manifest)
        if path is None:
            return
        raw_digests = sorted({bytes.fromhex(d) for d in hex_digests})
        width = len(raw_digests[0]) if raw_digests else 0
        if any(len(d) != width for d in raw_digests):
            return
        header = json.dumps({"identity": self.identity, "url": self.url, "manifest": manifest, "width": width,
                             "count": len(raw_digests)}).encode()
        content = b"".join([_CHUNKS_MAGIC, len(header).to_bytes(4, "big"), header, *raw_digests])
        write_atomically(path, [content, hashlib.sha256(content).digest()])

    def prune(self, reachable: set[str]) -> int:
        """Remove the cached chunk sets of manifests no ref reaches any more; return how many."""
        removed = 0
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.path / "m"):
                if entry.name not in reachable:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed += 1
        return removed
