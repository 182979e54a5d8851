"""Every object key in a store is built and parsed here, and nowhere else.

Layout (see docs/FORMAT.md)::

    CKPTSTORE
    chunks/<2 hex>/<hex hash>
    manifests/<2 hex>/<hex hash>
    refs/steps/<20-digit step>
    refs/tags/<name>
    locks/<name>
"""

from __future__ import annotations

import re

from ckptstore.errors import InvalidKeyError, InvalidStepError

MARKER = "CKPTSTORE"
CHUNKS = "chunks/"
MANIFESTS = "manifests/"
REFS = "refs/"
STEP_REFS = "refs/steps/"
TAG_REFS = "refs/tags/"
LOCKS = "locks/"

STEP_DIGITS = 20
MAX_STEP = 2**64 - 1  # msgpack ints are at most 64 bits; 20 digits hold it

# Keys are plain relative paths of safe characters: no "..", no absolute paths,
# no empty segments, nothing a filesystem or URL would interpret.
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_HEX = re.compile(r"^[0-9a-f]{16,128}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_STEP_KEY = re.compile(rf"[0-9]{{{STEP_DIGITS}}}")


def validate_key(key: str) -> str:
    """Return `key` unchanged if it is a safe relative key; raise InvalidKeyError otherwise."""
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise InvalidKeyError(f"invalid key {key!r}")
    for segment in key.split("/"):
        if not _KEY_SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise InvalidKeyError(f"invalid key {key!r}: bad segment {segment!r}")
    return key


def _fanout(prefix: str, digest_hex: str) -> str:
    if not isinstance(digest_hex, str) or not _HEX.fullmatch(digest_hex):
        raise InvalidKeyError(f"not a lowercase hex digest: {digest_hex!r}")
    return f"{prefix}{digest_hex[:2]}/{digest_hex}"


def chunk_key(digest_hex: str) -> str:
    """Key of the chunk blob whose uncompressed payload hashes to `digest_hex`."""
    return _fanout(CHUNKS, digest_hex)


def manifest_key(digest_hex: str) -> str:
    """Key of the manifest whose encoded bytes hash to `digest_hex`."""
    return _fanout(MANIFESTS, digest_hex)


def digest_from_key(key: str) -> str:
    """The hex digest at the end of a chunk or manifest key."""
    digest = key.rsplit("/", 1)[-1]
    if not _HEX.fullmatch(digest):
        raise InvalidKeyError(f"not a content-addressed key: {key!r}")
    return digest


def check_step(step: object) -> int:
    """Return `step` if it is a valid step number (int in [0, 10**20))."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise InvalidStepError(f"a step is an int in [0, {MAX_STEP}], got {step!r}")
    return step


def step_ref_key(step: int) -> str:
    """Key of the ref for `step`, zero-padded so listing order is numeric order."""
    return f"{STEP_REFS}{check_step(step):0{STEP_DIGITS}d}"


def step_from_ref_key(key: str) -> int | None:
    """The step a ref key names, or None for a key that is not a step ref."""
    if not key.startswith(STEP_REFS):
        return None
    tail = key[len(STEP_REFS):]
    return int(tail) if _STEP_KEY.fullmatch(tail) else None


def tag_ref_key(name: str) -> str:
    """Key of the named ref `name` (e.g. "best")."""
    if not isinstance(name, str) or not _TAG.fullmatch(name):
        raise InvalidKeyError(f"invalid tag name {name!r}: use letters, digits, '.', '_' and '-'")
    return f"{TAG_REFS}{name}"


def lock_key(name: str) -> str:
    """Key of the lease or lock `name`."""
    return validate_key(f"{LOCKS}{name}")
