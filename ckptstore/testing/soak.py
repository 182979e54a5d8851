"""Soak test: every writer of a store at once, with faults, clock skew and SIGKILLs; then a check
that no committed step or tag lost anything.

    python -m ckptstore.testing.soak URL --seconds N [--seed S] [--json] [--workdir DIR]

URL is any store URL several processes can share: a path, s3://bucket/prefix (SeaweedFS,
MinIO, AWS: the SDK's environment), gs://bucket/prefix (STORAGE_EMULATOR_HOST for
fake-gcs-server). Worker processes (forked from a multiprocessing forkserver that has
ckptstore and the SDKs imported, so a restart is quick) run concurrently until the deadline,
each with its own role:

- savers (`--savers`, 2): `save(step, state)` create-only on steps picked from a small range.
  A state is built from a seed: a few tensors drawn from a fixed pool of deterministic
  tensors, a small-tensor pack drawn from another pool, and one tensor of its own. Chunks of
  deleted steps therefore recur in new saves: saves deduplicate against garbage that a gc
  may be sweeping at that moment. The seed goes into the save's `metadata`.
- DCP savers (`--dcp-savers`, 2): create-only saves on steps of the same range through the
  real `ckptstore.dcp.StoreWriter`, 2 simulated ranks in one process
  (`ckptstore.testing.dcpsim.save`: each rank's write_data in turn, then rank 0's finish), so
  the step is a manifest version 2 root with one part per rank and a chunk table
  (docs/FORMAT.md, "Manifest version 2"). The state is a seed's state (`make_dcp_state`: the
  same pools, so its chunks are the plain saves' chunks too) as torch tensors sharded on dim 0,
  plus a `meta` tensor holding the seed and the step (a DCP step has no user metadata). The
  other roles meet these steps: overwriters replace them with plain saves, janitors delete
  them, taggers tag and load them, gc marks them through their chunk tables. A DCP saver
  also loads back (as the taggers load) each step it commits, right after the commit (after
  the next quiet window, if one comes first), and again once a gc has swept after the commit
  (the gc epoch's `last_sweep` passed the epoch it read after the commit; its latest
  DCP_REMEMBERED commits).
- overwriters (`--overwriters`, 1): `save(step, state, overwrite=True)` of existing steps.
- taggers (`--taggers`, 1): `tag(name, step, overwrite=...)`, `untag(name)` from a small pool
  of names, and loads of steps and tags checked against the state their seed regenerates.
- janitors (`--janitors`, 1): `delete(step)` (`ckptstore rm`), and saves with `keep_last=k`
  (retention).
- collectors (`--collectors`, 1): `gc(min_age=0)` in a loop.

Every worker opens the store with the same short `lease_ttl` (`--lease-ttl`, 5 s) and sets its
own clock off by a random offset in +-`--skew` (3600 s): `time.time` and `time.time_ns` are
patched at start (a server's clock is its own). Its backend sits under the retry layer,
wrapped in `RandomFaultBackend`: each request of every kind (get, ranged get, read, head,
list, put, delete, staging cleanup) fails with a TransientError with probability
`--fault-rate`, before it reaches the server or, for puts and deletes, after it landed (the
ambiguous outcome of a timed-out request); a list can also fail part-way. Now and then a
"storm" (`--storm-chance` a second per worker, 0.1) raises the rate to `--storm-rate` for a
second or so, so that some errors outlast `--retries` (2, fewer than the library's default) and
reach ckptstore's own code. Saves, overwrites, retention and loads pause together for
`--quiet-for` s (6.5) every `--quiet-every` s (10) (once their current operation ends), so that
gc finds windows without leases and sweeps; tags, untags and rms do not pause. The
orchestrator SIGKILLs a random worker every 1-4 s (`--kill-min`/`--kill-max`) and starts it
again (a new process, clock and seed), outside the quiet windows (a kill due inside one waits
for its end). A killed worker's lease stays fresh for up to `--lease-ttl` (5 s), so a window
shorter than that, or one a kill can land in, often has a fresh lease all through it and gc
stands down: with 2 s windows every 5 s, kills in them and storms by request, a 60 s run on a
loaded 2-core machine swept 0 times.

Journal: each worker process appends JSON lines to `WORKDIR/journal/<slot>-<incarnation>.jsonl`,
each written with one `write` and fsynced: a `begin` line before each operation (what it is
about to do: step, seed, tag name...) and an `end` line after it (outcome, commit id,
manifest digest, what retention deleted, what gc did, faults injected since the last line).
The orchestrator logs starts, kills and crashes to `WORKDIR/orchestrator.jsonl`.

The check, after every worker has stopped (at the deadline, or SIGKILLed after `--grace` s):

1. Every step ref and tag ref present is loaded (hash-checked) and compared with the state
   regenerated from the seed in its manifest's metadata; a DCP step (a v2 root) is read
   whole: its parts and chunk tables (checked against each other), then every item through
   `StoreReader` into a full-size tensor, and compared with the state of the seed in its
   `meta` tensor. So a commit that landed just before
   its worker was killed, and never got journaled, is checked too. A ref whose manifest or a
   chunk (for a DCP step also a part or chunk table) is missing or corrupt, whose content
   differs, or that has no seed, is lost.
2. Every commit the journal says succeeded (save, DCP save, overwrite, retention save, tag) must still be
   the current ref of its key, unless an operation that may remove or replace it (an rm or
   overwrite of that step, a retention pass that deleted it or whose deletions are unknown, an
   untag or forced tag of that name) ended after the commit began; an operation killed mid-way
   counts as ending when its worker was killed, plus 2 s. A commit gone with no such
   operation vanished: lost.
3. During the run, loads check what they load; every new tag, and every ref a gc reports it
   could not follow, is audited (its manifest read, each chunk headed). A missing or corrupt
   object (or other content) under a ref that named the same commit before and after is lost,
   even if that ref is gone by the end. (A load that raced a delete or overwrite, and a tag
   refused because its step's data went away, are counted apart.)

It prints counts of each kind of operation and outcome (DCP saves committed, and DCP steps
checked at the end and by loads during the run), retention deletions, gc runs (swept,
stood down, busy, failed) and objects deleted, faults injected, kills, refs checked, every
unexpected error (anything but the typed errors concurrency makes normal, listed in
EXPECTED_ERRORS and EXPECTED_PER_OPERATION), and "steps lost: N". `--json` prints the same as JSON; WORKDIR/summary.json
keeps it with the journals and the workers' logs. Exit status: 1 if anything was lost, 3 if
nothing was lost but there were unexpected errors or worker crashes, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ckptstore
from ckptstore import keys
from ckptstore.backends.base import OVERWRITE, Backend, Buffer, GetResult, ObjectInfo, PutMode
from ckptstore.chunking import ChunkingPolicy
from ckptstore.errors import FormatError, IntegrityError, TransientError
from ckptstore.testing.wrappers import ForwardingBackend

__all__ = [
    "CHUNKING",
    "EXPECTED_ERRORS",
    "EXPECTED_PER_OPERATION",
    "NO_EFFECT_ERRORS",
    "RandomFaultBackend",
    "SoakConfig",
    "check_store",
    "format_summary",
    "main",
    "make_state",
    "run",
    "states_equal",
]

# The clock before any worker skews it: journal times and quiet windows use it, ckptstore never.
_REAL_TIME = time.time
_REAL_TIME_NS = time.time_ns

# Typed outcomes that concurrency, faults and kills make normal: counted, not unexpected.
# (By name: some belong to versions of ckptstore newer or older than this file.)
# These say the operation changed no ref:
NO_EFFECT_ERRORS = frozenset({
    "StepExistsError", "StepNotFoundError", "CommitConflictError", "TagExistsError", "TagNotFoundError",
    "ChunkVanishedError",  # a save kept losing a chunk to a sweep; nothing committed
    "EpochContentionError", "GCLockLostError",  # gc under contention stops, deleting nothing more
})
# ... and these leave it open what landed (a retried request may have):
EXPECTED_ERRORS = NO_EFFECT_ERRORS | {"TransientError"}
EXPECTED_PER_OPERATION = {
    # a delete by version that found the ref committed again (a landed try, then a re-commit)
    "rm": frozenset({"PreconditionFailedError"}),
    "untag": frozenset({"PreconditionFailedError"}),
}

# Small tensors, small chunks: many chunks per step, so dedup and gc work on many objects.
CHUNKING = ChunkingPolicy(chunk_size=4 << 10, small_tensor_limit=1 << 10, pack_size=4 << 10)
POOL_TENSORS = 24       # large pool: a state takes 2-5 of them (16 KiB, 4 chunks each)
POOL_ELEMENTS = 4096
SMALL_POOL = 6          # small pool: a state takes 2 of them, packed into one chunk
SMALL_ELEMENTS = 64
OWN_ELEMENTS = 2048     # one tensor of its own per state (8 KiB, 2 chunks)
_POOL_SALT = 0x50A4
TAG_NAMES = 4
_REF_KEY = re.compile(r"refs/(?:steps/[0-9]{20}|tags/[A-Za-z0-9_][A-Za-z0-9._-]*)")  # in gc's messages
# An operation killed mid-way may still land requests it had sent: it ends this long after the kill.
KILL_MARGIN_S = 2.0
ROLES = ("saver", "dcp_saver", "overwriter", "tagger", "janitor", "gc")
DCP_RANKS = 2           # simulated ranks of a DCP save, each writing its own part
DCP_COLUMNS = 64        # pool and own tensors are saved as DCP 2-D tensors of this many columns
DCP_REMEMBERED = 8      # a DCP saver's latest commits it reads back once a gc has swept after them


@dataclass
class SoakConfig:
    """What to run; every field has a command-line option of the same name."""

    url: str
    seconds: float = 60.0
    seed: int | None = None
    workdir: str = ""
    savers: int = 2
    dcp_savers: int = 2
    overwriters: int = 1
    taggers: int = 1
    janitors: int = 1
    collectors: int = 1
    lease_ttl: float = 5.0
    fault_rate: float = 0.03
    storm_chance: float = 0.1  # storms a second, per worker (not per request: see RandomFaultBackend)
    storm_rate: float = 0.6
    retries: int = 2
    skew: float = 3600.0
    kill_min: float = 1.0
    kill_max: float = 4.0
    quiet_every: float = 10.0
    quiet_for: float = 6.5  # longer than lease_ttl: a killed worker's lease goes stale inside it
    steps: int = 32
    keep_last_max: int = 6
    threads: int = 4
    grace: float = 60.0

    def in_quiet_window(self, now: float) -> bool:
        """Whether real time `now` falls in a quiet window (the same for every worker)."""
        return now % self.quiet_every < self.quiet_for

    def slots(self) -> list[tuple[str, str]]:
        """(slot name, role) of every worker."""
        counts = zip(ROLES, (self.savers, self.dcp_savers, self.overwriters, self.taggers, self.janitors,
                             self.collectors), strict=True)
        return [(f"{role}{i}", role) for role, n in counts for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Deterministic states


@functools.cache
def _pool_tensor(index: int) -> Any:
    import numpy as np

    return np.random.default_rng([_POOL_SALT, index]).standard_normal(POOL_ELEMENTS, dtype=np.float32)


@functools.cache
def _small_tensor(index: int) -> Any:
    import numpy as np

    return np.random.default_rng([_POOL_SALT, 1000 + index]).integers(0, 1 << 30, SMALL_ELEMENTS, dtype=np.int32)


def make_state(seed: int) -> dict[str, Any]:
    """The state a save with `seed` stores; the same seed always gives the same state."""
    import numpy as np

    rng = np.random.default_rng(seed)
    picks = sorted(int(i) for i in rng.choice(POOL_TENSORS, size=int(rng.integers(2, 6)), replace=False))
    smalls = sorted(int(i) for i in rng.choice(SMALL_POOL, size=2, replace=False))
    return {
        "layers": {f"p{i:02d}": _pool_tensor(i) for i in picks},
        "norms": {f"s{i}": _small_tensor(i) for i in smalls},
        "own": rng.standard_normal(OWN_ELEMENTS, dtype=np.float32),
        "seed": seed,
        "picks": picks,
    }


def states_equal(a: Any, b: Any) -> bool:
    """Exact equality of two state trees (arrays: same dtype, shape and bytes)."""
    import numpy as np

    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and bool(np.array_equal(a, b)))
    return type(a) is type(b) and bool(a == b)


# ---------------------------------------------------------------------------------------------
# DCP steps (manifest version 2)


def make_dcp_state(seed: int, step: int) -> dict[str, Any]:
    """The DCP state a DCP save of `step` with `seed` stores: `make_state(seed)`'s tensors as
    torch tensors keyed by fqn (pool and own tensors as 2-D, DCP_COLUMNS wide: a dim-0 shard is
    a contiguous run of the plain tensor's bytes, so the chunks are the plain saves'), and
    `meta`, int64 [seed, step] (rank 0 holds the seed, rank 1 the step)."""
    import torch

    plain = make_state(seed)
    state: dict[str, Any] = {}
    for name, array in plain["layers"].items():
        state[f"layers.{name}"] = torch.from_numpy(array).reshape(-1, DCP_COLUMNS)
    for name, array in plain["norms"].items():
        state[f"norms.{name}"] = torch.from_numpy(array)
    state["own"] = torch.from_numpy(plain["own"]).reshape(-1, DCP_COLUMNS)
    state["meta"] = torch.tensor([seed, step], dtype=torch.int64)
    return state


def _shard_of(tensor: Any, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> Any:
    for dim, (start, length) in enumerate(zip(offsets, sizes, strict=True)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


def save_dcp(store: ckptstore.Store, step: int, seed: int) -> dict[str, Any]:
    """Save `make_dcp_state(seed, step)` as `step`, create-only, through the real StoreWriter on
    DCP_RANKS simulated ranks (each writes its dim-0 shard and its own part; rank 0 commits);
    what the journal records of it. Raises StepExistsError and the like as `Store.save` does."""
    from ckptstore.testing import dcpsim

    state = make_dcp_state(seed, step)
    model = {fqn: (tuple(t.shape), t.dtype) for fqn, t in state.items()}
    done = dcpsim.save(store, step, model, DCP_RANKS,
                       lambda fqn, offsets, sizes: _shard_of(state[fqn], offsets, sizes))
    ref = done.writers[0].committed
    assert ref is not None, "rank 0's finish returned without a commit"
    return {"commit_id": ref.commit_id, "manifest": ref.manifest, "replaced": False,
            "chunks": ref.summary.chunks if ref.summary is not None else 0,
            "new_chunks": sum(w.new_chunks for w in done.writers), "parts": len(done.results)}


def is_dcp_manifest(store: ckptstore.Store, digest: str) -> bool:
    """Whether the manifest at `digest` is a version 2 root (a DCP step); IntegrityError or
    FormatError when it is missing or corrupt."""
    from ckptstore.manifestv2 import RootManifest

    return isinstance(store.manifest_object(digest), RootManifest)


class _Landing:
    """What StoreReader.read_data asks of a LoadPlanner: each read item lands in `state`."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def resolve_tensor(self, item: Any) -> Any:
        return _shard_of(self.state[item.dest_index.fqn], tuple(item.dest_offsets), tuple(item.lengths))

    def commit_tensor(self, item: Any, tensor: Any) -> None:
        pass

    def load_bytes(self, item: Any, value: Any) -> None:
        raise FormatError(f"DCP step holds a non-tensor item {item.dest_index.fqn!r}; the soak saves none")


def load_dcp_state(store: ckptstore.Store, target: int | str) -> tuple[dict[str, Any], str]:
    """Read the DCP step (or tag) `target` whole, as one rank: the ref and root, every part,
    every chunk (each whole, so hash-checked), through the real StoreReader, into zeros of the
    stored shapes. Returns the state and the manifest digest it read (the ref may change
    meanwhile: the reader reads it once). IntegrityError for a missing or corrupt object."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ckptstore.dcp import StoreReader
    from ckptstore.testing import dcpsim

    reader = StoreReader(store, target)
    metadata = reader.read_metadata()
    digest = str(metadata.storage_data["ckptstore_manifest"])
    model: dcpsim.Model = {}
    for fqn, stored in metadata.state_dict_metadata.items():
        if not isinstance(stored, TensorStorageMetadata):
            raise FormatError(f"DCP step {reader.resolved}: item {fqn!r} is not a tensor; the soak saves none")
        model[fqn] = (tuple(stored.size), stored.properties.dtype)
    state = {fqn: torch.zeros(shape, dtype=dtype) for fqn, (shape, dtype) in model.items()}
    reader.set_up_storage_reader(metadata, True)
    reader.read_data(dcpsim.read_plan(metadata, model, 0, 1), _Landing(state)).wait()  # type: ignore[arg-type]
    return state, digest


def dcp_state_problem(state: dict[str, Any], step: int) -> tuple[int | None, str | None]:
    """(seed, problem) of a loaded DCP state of `step`: the seed in its `meta` tensor, and what
    is wrong with it (None: it is exactly `make_dcp_state(seed, step)`)."""
    import torch

    meta = state.get("meta")
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int64 or tuple(meta.shape) != (2,):
        return None, "no meta tensor [seed, step]: cannot tell what it should hold"
    seed, saved_step = (int(v) for v in meta.tolist())
    if seed < 0:  # the savers' seeds are 62-bit
        return None, f"meta holds seed {seed}: not a seed the savers use"
    if saved_step != step:
        return seed, f"holds the state of step {saved_step}"
    expected = make_dcp_state(seed, step)
    same = expected.keys() == state.keys() and all(
        state[k].dtype == t.dtype and state[k].shape == t.shape and torch.equal(state[k], t)
        for k, t in expected.items())
    return seed, None if same else f"content differs from the DCP state of its seed {seed}"


def check_dcp_objects(store: ckptstore.Store, digest: str) -> tuple[int, list[str]]:
    """Read the root at `digest`, all its parts and chunk tables (hash-checked, tables against
    the parts: what gc keeps against what loads read), and head every chunk they name.
    Returns (chunks, missing digests); IntegrityError or FormatError for a missing or corrupt
    root, part or table."""
    from ckptstore.hashing import hasher
    from ckptstore.manifestread import check_tables
    from ckptstore.manifestv2 import RootManifest

    root = store.manifest_object(digest)
    if not isinstance(root, RootManifest):
        raise FormatError(f"manifest {digest} is not a version 2 root")
    whole = store.manifest(digest)  # the root with every part (blobs listed as chunks)
    check_tables(store.backend, hasher(store.marker.hash_algorithm), root, whole, store.threads)
    missing = [c.digest for c in whole.chunks if not store.backend.exists(keys.chunk_key(c.digest))]
    return len(whole.chunks), missing


# ---------------------------------------------------------------------------------------------
# Faults


class RandomFaultBackend(ForwardingBackend):
    """Fails random requests with TransientError; put it *under* the retry layer.

    Each request fails with probability `rate` (`storm_rate` during a storm; storms of
    `storm_seconds` start at `storm_chance` a second, judged at each request): before it reaches
    `inner`, or, for puts and deletes, half the time after it landed. A list fails at the call
    or after yielding a few keys. Thread-safe; `snapshot()` counts what was injected.
    """

    def __init__(self, inner: Backend, *, rate: float, seed: int, storm_chance: float = 0.0,
                 storm_rate: float = 0.0, storm_seconds: tuple[float, float] = (0.3, 1.5)):
        super().__init__(inner)
        self.rate, self.storm_chance, self.storm_rate = rate, storm_chance, storm_rate
        self.storm_seconds = storm_seconds
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._injected: Counter[str] = Counter()
        self._storm_until = 0.0
        # Storms come by time, not by request: gc makes ~600 requests a run (514 LISTs); one
        # chance per request gave 70% of its runs a storm, which fails its listing (fail
        # closed), so a 60 s soak on a loaded machine could end without a single sweep.
        self._checked = time.monotonic()

    def snapshot(self) -> Counter[str]:
        """Faults injected so far, by "<operation> <when>" (and "storms")."""
        with self._lock:
            return Counter(self._injected)

    def _roll(self, op: str, can_land: bool, after: str = "after") -> str | None:
        """None (no fault), "before" or `after` (the request went through, then the caller fails)."""
        with self._lock:
            now = time.monotonic()
            elapsed, self._checked = now - self._checked, now
            if now >= self._storm_until and self._rng.random() < 1.0 - math.exp(-self.storm_chance * elapsed):
                self._storm_until = now + self._rng.uniform(*self.storm_seconds)
                self._injected["storms"] += 1
            if self._rng.random() >= (self.storm_rate if now < self._storm_until else self.rate):
                return None
            when = after if can_land and self._rng.random() < 0.5 else "before"
            self._injected[f"{op} {when}"] += 1
            return when

    @staticmethod
    def _error(op: str, key: str, when: str) -> TransientError:
        return TransientError(f"injected fault ({when} the request)", key=key, operation=op)

    def _call(self, op: str, key: str, call: Callable[[], Any], *, can_land: bool = False) -> Any:
        when = self._roll(op, can_land)
        if when == "before":
            raise self._error(op, key, when)
        result = call()
        if when == "after":
            raise self._error(op, key, when)
        return result

    def get(self, key: str) -> GetResult:
        result: GetResult = self._call("get", key, lambda: self.inner.get(key))
        return result

    def get_range(self, key: str, start: int, length: int) -> bytes:
        data: bytes = self._call("get_range", key, lambda: self.inner.get_range(key, start, length))
        return data

    def read_into(self, key: str, start: int, buffers: Sequence[memoryview]) -> int:
        return int(self._call("read_into", key, lambda: self.inner.read_into(key, start, buffers)))

    def head(self, key: str) -> ObjectInfo:
        info: ObjectInfo = self._call("head", key, lambda: self.inner.head(key))
        return info

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, mode: PutMode = OVERWRITE) -> str:
        return str(self._call("put", key, lambda: self.inner.put(key, data, mode=mode), can_land=True))

    def delete(self, key: str, **options: Any) -> None:  # options: version= where the backend has it
        self._call("delete", key, lambda: self.inner.delete(key, **options), can_land=True)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        when = self._roll("list", True, after="part-way")
        if when == "before":
            raise self._error("list", prefix, when)
        if when is None:
            return self.inner.list(prefix)
        with self._lock:
            cut = self._rng.randrange(4)
        return self._failing_list(prefix, cut)

    def _failing_list(self, prefix: str, cut: int) -> Iterator[ObjectInfo]:
        for n, info in enumerate(self.inner.list(prefix)):
            if n == cut:
                break
            yield info
        raise self._error("list", prefix, "part-way through")

    def cleanup_staging(self, min_age: float, **options: Any) -> int:
        cleanup = getattr(self.inner, "cleanup_staging", None)
        if not callable(cleanup):
            return 0
        return int(self._call("cleanup_staging", "", lambda: cleanup(min_age, **options)))

    def __getattr__(self, name: str) -> Any:
        # Backend-specific extras stay reachable through the wrapper (without faults).
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------------------------
# Journal


class Journal:
    """JSON lines, each written with one write() and fsynced before the call returns."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The records of a journal; a torn last line (a kill mid-write) is skipped."""
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


# ---------------------------------------------------------------------------------------------
# Workers


def skew_clock(offset: float) -> None:
    """Make this process's wall clock (time.time, time.time_ns) run `offset` seconds off."""
    offset_ns = int(offset * 1e9)

    def skewed() -> float:
        return _REAL_TIME() + offset

    def skewed_ns() -> int:
        return _REAL_TIME_NS() + offset_ns

    time.time = skewed
    time.time_ns = skewed_ns


class _Outcome(Exception):
    """Raised by an operation body to end it with a named outcome other than ok."""

    def __init__(self, outcome: str, **fields: Any):
        super().__init__(outcome)
        self.outcome, self.fields = outcome, fields


class Worker:
    """One worker process: its store (faults under the retries), journal, clock and loop."""

    def __init__(self, cfg: SoakConfig, spec: dict[str, Any]):
        self.cfg = cfg
        self.slot, self.role, self.incarnation = spec["slot"], spec["role"], spec["incarnation"]
        self.deadline = float(spec["deadline"])
        self.rng = random.Random(spec["seed"])
        self.skew = self.rng.uniform(-cfg.skew, cfg.skew)
        skew_clock(self.skew)
        self.journal = Journal(Path(spec["journal"]))
        self.journal.write({"ev": "start", "slot": self.slot, "role": self.role, "incarnation": self.incarnation,
                            "pid": os.getpid(), "skew": round(self.skew, 3), "t": _REAL_TIME()})
        self.faults: RandomFaultBackend | None = None
        self._reported: Counter[str] = Counter()
        self._seq = 0
        self._committed: list[tuple[int, str, int]] = []  # DCP saver: (step, commit id, gc epoch after it)
        self.store = self._open()

    def _open(self) -> ckptstore.Store:
        from ckptstore.retry import RetryingBackend
        from ckptstore.url import open_backend

        while True:  # opening reads the marker through the faults too
            backend: Backend = open_backend(self.cfg.url, threads=self.cfg.threads)
            self.faults = RandomFaultBackend(backend, rate=self.cfg.fault_rate, seed=self.rng.getrandbits(62),
                                             storm_chance=self.cfg.storm_chance, storm_rate=self.cfg.storm_rate)
            backend = self.faults
            if self.cfg.retries > 0:
                backend = RetryingBackend(backend, attempts=1 + self.cfg.retries)
            try:
                return ckptstore.Store(backend, chunking=CHUNKING, threads=self.cfg.threads,
                                       lease_ttl=self.cfg.lease_ttl)
            except TransientError:
                backend.close()
                if _REAL_TIME() > self.deadline:
                    raise
                time.sleep(0.2)

    def _faults_since_last(self) -> dict[str, int]:
        assert self.faults is not None
        now = self.faults.snapshot()
        delta = now - self._reported
        self._reported = now
        return dict(delta)

    def op(self, name: str, fields: dict[str, Any], body: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Journal `begin`, run `body`, journal `end` with its outcome; the result if ok."""
        self._seq += 1
        self.journal.write({"ev": "begin", "seq": self._seq, "op": name, "t": _REAL_TIME(), **fields})
        result: dict[str, Any] = {}
        try:
            result = body() or {}
            outcome = "ok"
        except _Outcome as special:
            outcome, result = special.outcome, special.fields
        except Exception as exc:  # every error is classified and journaled, none is lost
            outcome = type(exc).__name__
            result = {"error": str(exc)[:800]}
            if outcome not in EXPECTED_ERRORS | EXPECTED_PER_OPERATION.get(name, frozenset()):
                result["unexpected"] = True
                result["traceback"] = traceback.format_exc()[-4000:]
        self.journal.write({"ev": "end", "seq": self._seq, "op": name, "outcome": outcome, "t": _REAL_TIME(),
                            "faults": self._faults_since_last(), **result})
        return result if outcome == "ok" else None

    # -- helpers -----------------------------------------------------------------------------
    def wait_quiet(self) -> None:
        """Sleep through the quiet part of the cycle (the same for every worker: real time)."""
        now = _REAL_TIME()
        if self.cfg.in_quiet_window(now):
            phase = now % self.cfg.quiet_every
            time.sleep(self.cfg.quiet_for - phase + self.rng.uniform(0, 0.1))

    def pause(self) -> None:
        time.sleep(self.rng.uniform(0.0, 0.2))

    def pick_step(self) -> int:
        """A committed step (listed; journaled as a "list" operation), else any step of the range."""
        listed = self.op("list", {}, lambda: {"steps": self.store.steps()})
        steps = listed["steps"] if listed else []
        return int(self.rng.choice(steps)) if steps else self.rng.randrange(self.cfg.steps)

    def save(self, step: int, seed: int, *, overwrite: bool = False, keep_last: int | None = None) -> dict[str, Any]:
        info = self.store.save(step, make_state(seed), overwrite=overwrite, keep_last=keep_last,
                               metadata={"seed": seed, "step": step, "by": f"{self.slot}.{self.incarnation}"})
        return {"commit_id": info.commit_id, "manifest": info.manifest, "replaced": info.replaced,
                "chunks": info.chunks, "new_chunks": info.new_chunks,
                "retention_deleted": list(info.retention_deleted),
                "retention_errors": list(getattr(info, "retention_errors", ()))}

    def load_and_check(self, target: int | str) -> dict[str, Any]:
        """Load a step or tag and compare it with its seed's state. A missing or corrupt object,
        or other content, while the ref stayed the same throughout is a loss: the operation ends
        as "broken" with the evidence (else as "raced": the ref changed under the load)."""
        before = self.store.ref(target)
        try:
            dcp = is_dcp_manifest(self.store, before.manifest)
            if dcp:  # a DCP step: read whole through the StoreReader (which reads the ref once),
                # then its chunk tables (which loads never read, but gc marks by) and chunks headed
                dcp_state, read = load_dcp_state(self.store, target)
                problem = dcp_state_problem(dcp_state, before.step)[1]
                chunks, missing = check_dcp_objects(self.store, read)
                if missing:
                    raise IntegrityError(f"{len(missing)} of {chunks} chunks of the DCP step missing, e.g. "
                                         f"{keys.chunk_key(missing[0])}")
            else:
                manifest, read = self.store.manifest(before.manifest), before.manifest
                seed = manifest.metadata.get("seed") if isinstance(manifest.metadata, dict) else None
                state = self.store.load(target)
                problem = (None if isinstance(seed, int) and states_equal(state, make_state(seed))
                           else f"content differs from the state of its seed {seed!r}")
        except (IntegrityError, FormatError) as exc:
            found = self.evidence(target, before, f"{type(exc).__name__}: {exc}")
            raise _Outcome("broken" if found else "raced", commit_id=before.commit_id, broken=found,
                           error=f"{type(exc).__name__}: {exc}"[:800]) from exc
        if read != before.manifest or self.store.ref(target).commit_id != before.commit_id:
            # replaced meanwhile: which one we read is unknown
            return {"commit_id": before.commit_id, "checked": False, "dcp": dcp}
        if problem is not None:
            raise _Outcome("broken", commit_id=before.commit_id, error=problem,
                           broken=[{"key": _ref_key(target), "commit_id": before.commit_id,
                                    "manifest": before.manifest, "error": problem}])
        return {"commit_id": before.commit_id, "checked": True, "dcp": dcp}

    def evidence(self, target: int | str, before: Any, problem: str) -> list[dict[str, Any]]:
        """`problem` (a missing or corrupt object under the ref `before` of `target`) as evidence
        of a loss, if the ref still names the same commit now: then it named it throughout, so
        nothing it reaches may be missing. Empty if the ref changed or cannot be read now."""
        try:
            after = self.store.ref(target).commit_id
        except ckptstore.CkptStoreError:
            return []
        if after != before.commit_id:
            return []
        return [{"key": _ref_key(target), "commit_id": before.commit_id, "manifest": before.manifest,
                 "error": problem[:800]}]

    def audit(self, target: int | str) -> list[dict[str, Any]]:
        """Check that everything the ref of `target` reaches exists (the manifest, a head of each
        chunk); evidence of a loss as in `evidence`, else empty (also when it cannot tell)."""
        try:
            before = self.store.ref(target)
        except ckptstore.CkptStoreError:
            return []
        try:
            manifest = self.store.manifest(before.manifest)
            missing = [c.digest for c in manifest.chunks if not self.store.backend.exists(keys.chunk_key(c.digest))]
        except (IntegrityError, FormatError) as exc:
            return self.evidence(target, before, f"{type(exc).__name__}: {exc}")
        except ckptstore.CkptStoreError:
            return []
        if not missing:
            return []
        return self.evidence(target, before, f"{len(missing)} of {len(manifest.chunks)} chunks missing, e.g. "
                                             f"{keys.chunk_key(missing[0])}")

    def new_seed(self) -> int:
        return self.rng.getrandbits(62)

    # -- roles ---------------------------------------------------------------------------------
    def saver(self) -> None:
        self.wait_quiet()
        step, seed = self.rng.randrange(self.cfg.steps), self.new_seed()
        self.op("save", {"step": step, "seed": seed}, lambda: self.save(step, seed))

    def dcp_saver(self) -> None:
        # First a step this worker committed earlier that a gc has swept over since (the gc
        # epoch's last_sweep passed the epoch read after its commit), loaded as a tagger loads
        # (few of the range's steps are DCP steps: the taggers' loads rarely meet one).
        survivor = self._swept_over()
        if survivor is not None:
            old, commit_id = survivor
            self.wait_quiet()
            self.op("load", {"target": old, "swept_after": commit_id}, lambda: self.load_and_check(old))
        self.wait_quiet()
        step, seed = self.rng.randrange(self.cfg.steps), self.new_seed()
        saved = self.op("dcp_save", {"step": step, "seed": seed}, lambda: save_dcp(self.store, step, seed))
        if saved is None:
            return
        epoch = self._epoch_number()
        if epoch is not None:
            self._committed = [*self._committed[-(DCP_REMEMBERED - 1):], (step, saved["commit_id"], epoch)]
        # And read it back now (after the next quiet window, if one comes first: a gc may sweep).
        self.pause()
        self.wait_quiet()
        self.op("load", {"target": step}, lambda: self.load_and_check(step))

    def _epoch_number(self) -> int | None:
        """The gc epoch's number now (None if it cannot be read: faults)."""
        from ckptstore.epoch import read_epoch

        try:
            return read_epoch(self.store.backend)[0].number
        except ckptstore.CkptStoreError:
            return None

    def _swept_over(self) -> tuple[int, str] | None:
        """(step, commit id) of a commit of this worker (one it remembers) that a gc swept
        after: forgotten once returned; None if there is none or the epoch cannot be read."""
        from ckptstore.epoch import read_epoch

        if not self._committed:
            return None
        try:
            last_sweep = read_epoch(self.store.backend)[0].last_sweep
        except ckptstore.CkptStoreError:
            return None
        for i, (step, commit_id, epoch) in enumerate(self._committed):
            if last_sweep > epoch:
                del self._committed[i]
                return step, commit_id
        return None

    def overwriter(self) -> None:
        self.wait_quiet()
        step, seed = self.pick_step(), self.new_seed()
        self.op("overwrite", {"step": step, "seed": seed}, lambda: self.save(step, seed, overwrite=True))

    def tagger(self) -> None:
        name, roll = f"t{self.rng.randrange(TAG_NAMES)}", self.rng.random()
        if roll < 0.45:
            step, force = self.pick_step(), self.rng.random() < 0.5

            def tag() -> dict[str, Any]:
                before = self.store.ref(step)
                try:
                    ref = self.store.tag(name, step, overwrite=force)
                except (IntegrityError, FormatError) as exc:
                    # tag() refuses a step whose manifest or chunks are gone: fine if the step
                    # went away meanwhile ("refused"), a loss if its ref stayed the same.
                    found = self.evidence(step, before, f"{type(exc).__name__}: {exc}")
                    raise _Outcome("broken" if found else "refused", broken=found,
                                   error=f"{type(exc).__name__}: {exc}"[:800]) from exc
                # A tag committed while its step was deleted and swept names a missing manifest.
                return {"commit_id": ref.commit_id, "manifest": ref.manifest, "broken": self.audit(name)}

            self.op("tag", {"name": name, "step": step, "overwrite": force}, tag)
        elif roll < 0.7:
            self.op("untag", {"name": name}, lambda: self.store.untag(name))
        else:
            self.wait_quiet()
            target: int | str = name if self.rng.random() < 0.4 else self.pick_step()
            self.op("load", {"target": target}, lambda: self.load_and_check(target))

    def janitor(self) -> None:
        if self.rng.random() < 0.5:
            step = self.pick_step()
            self.op("rm", {"step": step}, lambda: self.store.delete(step))
        else:
            self.wait_quiet()
            step, seed = self.rng.randrange(self.cfg.steps), self.new_seed()
            keep_last = self.rng.randint(2, self.cfg.keep_last_max)
            self.op("retain", {"step": step, "seed": seed, "keep_last": keep_last},
                    lambda: self.save(step, seed, keep_last=keep_last))

    def gc(self) -> None:
        def collect() -> dict[str, Any]:
            report = self.store.gc(min_age=0)
            out = report.as_dict()
            # A ref gc could not follow: audit it while it may still be there (a gc that
            # fails closed also names refs it could not read for a transient reason).
            named = {m.group(0).rstrip(".-") for text in getattr(report, "broken_refs", [])
                     for m in _REF_KEY.finditer(str(text))}
            out["broken"] = [found for key in sorted(named) for found in self.audit(_ref_target(key))]
            for name, value in list(out.items()):
                if isinstance(value, list) and name != "broken":  # names of leases and refs: a few are enough
                    out[f"{name}_count"], out[name] = len(value), [str(v)[:300] for v in value[:5]]
            return out

        self.op("gc", {}, collect)
        time.sleep(self.rng.uniform(0.05, 0.3))

    def run(self) -> None:
        step: Callable[[], None] = getattr(self, self.role)
        while _REAL_TIME() < self.deadline:
            step()
            if self.role != "gc":
                self.pause()
        self.journal.write({"ev": "exit", "t": _REAL_TIME(), "faults": self._faults_since_last()})
        self.store.close()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (the forkserver) exits, as it does when the
    orchestrator dies: no worker outlives a killed soak."""
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def _worker_entry(spec: dict[str, Any], environ: dict[str, str], log: str) -> None:
    """A worker process, forked from the forkserver: log to `log`, take the caller's
    environment (the server's variables may have been set after the forkserver started), run."""
    _die_with_parent()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(environ)
    Worker(SoakConfig(**spec["config"]), spec).run()


# ---------------------------------------------------------------------------------------------
# Orchestrator


# Imported once in the forkserver, so that a restarted worker is at work in a fraction of a
# second (a fresh interpreter importing boto3 took 2-5 s on 2 busy cores). Missing optional
# SDKs are skipped by the forkserver. Not this module: under `python -m` each child runs it
# again as __mp_main__, and runpy warns when it finds it imported already.
_PRELOAD = ["numpy", "torch", "ckptstore.dcp", "ckptstore.testing.dcpsim", "ckptstore.store", "ckptstore.retry",
            "ckptstore.url", "ckptstore.tensors",
            "ckptstore.testing.wrappers", "ckptstore.backends.local", "ckptstore.backends.s3",
            "ckptstore.backends.gcs", "boto3", "google.cloud.storage"]


@dataclass
class _Running:
    slot: str
    role: str
    incarnation: int
    process: Any  # multiprocessing.Process


@dataclass
class _Orchestra:
    cfg: SoakConfig
    workdir: Path
    deadline: float
    rng: random.Random
    log: Journal
    running: dict[str, _Running] = field(default_factory=dict)
    incarnations: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        import multiprocessing

        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(_PRELOAD)  # no effect if this process's forkserver already runs

    def spawn(self, slot: str, role: str) -> None:
        incarnation = self.incarnations[slot]
        self.incarnations[slot] += 1
        name = f"{slot}-{incarnation:03d}"
        spec = {"slot": slot, "role": role, "incarnation": incarnation, "deadline": self.deadline,
                "seed": random.Random(f"{self.cfg.seed}:{name}").getrandbits(62),
                "journal": str(self.workdir / "journal" / f"{name}.jsonl"), "config": asdict(self.cfg)}
        process = self.context.Process(target=_worker_entry, name=name, daemon=True,
                                       args=(spec, dict(os.environ), str(self.workdir / "logs" / f"{name}.log")))
        process.start()
        self.running[slot] = _Running(slot, role, incarnation, process)
        self.log.write({"ev": "spawn", "slot": slot, "incarnation": incarnation, "pid": process.pid,
                        "t": _REAL_TIME()})

    def kill(self, slot: str, ev: str) -> None:
        worker = self.running[slot]
        worker.process.kill()  # SIGKILL
        worker.process.join()
        self.log.write({"ev": ev, "slot": slot, "incarnation": worker.incarnation, "pid": worker.process.pid,
                        "rc": worker.process.exitcode, "t": _REAL_TIME()})

    def reap_crashed(self) -> None:
        """Record and restart workers that exited on their own before the deadline."""
        for slot, worker in list(self.running.items()):
            rc = worker.process.exitcode
            if rc is None or _REAL_TIME() >= self.deadline - 0.5:
                continue
            log = self.workdir / "logs" / f"{slot}-{worker.incarnation:03d}.log"
            tail = log.read_bytes()[-3000:].decode(errors="replace") if log.exists() else ""
            self.log.write({"ev": "crash", "slot": slot, "incarnation": worker.incarnation, "pid": worker.process.pid,
                            "rc": rc, "log_tail": tail, "t": _REAL_TIME()})
            self.spawn(slot, worker.role)

    def stop_all(self) -> None:
        """Let every worker finish at the deadline; SIGKILL those still running after `grace`."""
        limit = max(self.deadline, _REAL_TIME()) + self.cfg.grace
        for slot, worker in self.running.items():
            worker.process.join(timeout=max(0.1, limit - _REAL_TIME()))
            if worker.process.exitcode is None:
                self.kill(slot, "stop-kill")
            else:
                self.log.write({"ev": "stopped", "slot": slot, "incarnation": worker.incarnation,
                                "rc": worker.process.exitcode, "t": _REAL_TIME()})


def run(cfg: SoakConfig) -> dict[str, Any]:
    """Run the soak and the check; returns the summary (see format_summary)."""
    if cfg.seed is None:
        cfg.seed = random.SystemRandom().getrandbits(32)
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="ckptstore-soak-"))
    cfg.workdir = str(workdir)
    (workdir / "journal").mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    with ckptstore.open(cfg.url) as created:  # create the store once, before the workers race to
        created.marker  # noqa: B018 - a writer's first use of the marker creates the store
    started = _REAL_TIME()
    orchestra = _Orchestra(cfg, workdir, started + cfg.seconds, random.Random(cfg.seed),
                           Journal(workdir / "orchestrator.jsonl"))
    orchestra.log.write({"ev": "config", "t": started, **asdict(cfg)})
    try:
        for slot, role in cfg.slots():
            orchestra.spawn(slot, role)
        next_kill = started + orchestra.rng.uniform(cfg.kill_min, cfg.kill_max)
        while (now := _REAL_TIME()) < orchestra.deadline:
            time.sleep(max(0.0, min(0.2, next_kill - now, orchestra.deadline - now)))
            orchestra.reap_crashed()
            if _REAL_TIME() >= next_kill and _REAL_TIME() < orchestra.deadline - 1.0:
                if cfg.in_quiet_window(_REAL_TIME()):  # keep the window free of fresh leases
                    next_kill = _REAL_TIME() + 0.2
                    continue
                slot = orchestra.rng.choice(sorted(orchestra.running))
                orchestra.kill(slot, "kill")
                orchestra.spawn(slot, orchestra.running[slot].role)
                next_kill = _REAL_TIME() + orchestra.rng.uniform(cfg.kill_min, cfg.kill_max)
        orchestra.stop_all()
    finally:
        for slot, worker in orchestra.running.items():  # an error above: leave no worker behind
            if worker.process.exitcode is None:
                orchestra.kill(slot, "stop-kill")
        orchestra.log.close()
    wall = _REAL_TIME() - started
    summary = check_store(cfg, workdir)
    summary["seconds"] = round(wall, 1)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# ---------------------------------------------------------------------------------------------
# Check


@dataclass
class _Op:
    """One operation from a journal: its begin line, its end line (None if killed), its times."""

    slot: str
    incarnation: int
    begin: dict[str, Any]
    end: dict[str, Any] | None
    t1: float  # when it ended, or when its worker was killed or stopped (+ KILL_MARGIN_S)

    @property
    def name(self) -> str:
        return str(self.begin["op"])

    @property
    def outcome(self) -> str:
        return str(self.end["outcome"]) if self.end is not None else "killed"

    @property
    def t0(self) -> float:
        return float(self.begin["t"])

    @property
    def unknown(self) -> bool:
        """Whether we cannot tell what it changed: killed, or an error that may follow a landed write."""
        return self.outcome != "ok" and self.outcome not in NO_EFFECT_ERRORS


def _step_key(step: int) -> str:
    return keys.step_ref_key(step)


def _ref_key(target: int | str) -> str:
    """The ref key of a step (int) or tag (str)."""
    return keys.step_ref_key(target) if isinstance(target, int) else keys.tag_ref_key(target)


def _ref_target(key: str) -> int | str:
    """The step (int) or tag name (str) of a ref key."""
    step = keys.step_from_ref_key(key)
    return step if step is not None else key[len(keys.TAG_REFS):]


def _removals(op: _Op) -> list[str]:
    """The ref keys `op` may have deleted or replaced ("refs/steps/*": any step)."""
    ok, unknown, begin = op.outcome == "ok", op.unknown, op.begin
    if op.name in ("rm", "overwrite") and (ok or unknown):
        return [_step_key(begin["step"])]
    if op.name == "retain":
        if ok and op.end is not None and not op.end.get("retention_errors"):
            return [_step_key(s) for s in op.end.get("retention_deleted", [])]
        if ok or unknown:
            return [keys.STEP_REFS + "*"]  # a retention pass whose deletions we do not know
    if op.name == "untag" and (ok or unknown):
        return [keys.tag_ref_key(begin["name"])]
    if op.name == "tag" and begin.get("overwrite") and (ok or unknown):
        return [keys.tag_ref_key(begin["name"])]
    return []


def _commit_key(op: _Op) -> str | None:
    """The ref key a successful `op` committed, if it commits one."""
    if op.outcome != "ok":
        return None
    if op.name in ("save", "dcp_save", "overwrite", "retain"):
        return _step_key(op.begin["step"])
    if op.name == "tag":
        return keys.tag_ref_key(op.begin["name"])
    return None


def _read_run(workdir: Path) -> tuple[list[_Op], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Operations, worker start/exit records and orchestrator events of a run."""
    events = read_journal(workdir / "orchestrator.jsonl")
    ended_at = {(e["slot"], e["incarnation"]): float(e["t"]) for e in events
                if e["ev"] in ("kill", "stop-kill", "crash", "stopped")}
    last = max((float(e["t"]) for e in events), default=_REAL_TIME())
    ops: list[_Op] = []
    lifecycle: list[dict[str, Any]] = []
    for path in sorted((workdir / "journal").glob("*.jsonl")):
        records = read_journal(path)
        start = next((r for r in records if r.get("ev") == "start"), None)
        slot, incarnation = path.stem.rsplit("-", 1)
        begins: dict[int, dict[str, Any]] = {}
        ends: dict[int, dict[str, Any]] = {}
        for record in records:
            if record.get("ev") == "begin":
                begins[record["seq"]] = record
            elif record.get("ev") == "end":
                ends[record["seq"]] = record
            elif record.get("ev") in ("start", "exit"):
                lifecycle.append({**record, "slot": slot})
        stopped = ended_at.get((slot, int(incarnation)), last) + KILL_MARGIN_S
        for seq, begin in begins.items():
            end = ends.get(seq)
            ops.append(_Op(slot, int(incarnation), begin, end, float(end["t"]) if end else stopped))
        if start is None:
            lifecycle.append({"ev": "no-start", "slot": slot})
    return ops, lifecycle, events, [e for e in events if e["ev"] == "crash"]


def _check_ref(store: ckptstore.Store, key: str, ref: Any) -> tuple[dict[str, Any] | None, int | None, bool]:
    """Load the ref at `key` and compare it with its seed's state: (a problem or None, the seed
    it holds if it could be read, whether it is a DCP step)."""
    target: int | str = ref.step if key.startswith(keys.STEP_REFS) else key[len(keys.TAG_REFS):]
    problem = {"key": key, "step": ref.step, "commit_id": ref.commit_id, "manifest": ref.manifest,
               "writer": ref.writer, "committed": ref.committed}
    try:
        dcp = is_dcp_manifest(store, ref.manifest)
    except (IntegrityError, FormatError) as exc:
        return {**problem, "why": f"manifest: {type(exc).__name__}: {exc}"}, None, False
    if dcp:
        return (*_check_dcp_ref(store, target, ref, problem), True)
    try:
        manifest = store.manifest(ref.manifest)
    except (IntegrityError, FormatError) as exc:
        return {**problem, "why": f"manifest: {type(exc).__name__}: {exc}"}, None, False
    problem["metadata"] = manifest.metadata
    try:
        state = store.load(target)
    except (IntegrityError, FormatError) as exc:
        missing = [c.digest for c in manifest.chunks if not store.backend.exists(keys.chunk_key(c.digest))]
        return {**problem, "why": f"load: {type(exc).__name__}: {exc}", "chunks": len(manifest.chunks),
                "missing_chunks": len(missing), "missing": missing[:10]}, None, False
    metadata = manifest.metadata if isinstance(manifest.metadata, dict) else {}
    seed = metadata.get("seed")
    if not isinstance(seed, int):
        return {**problem, "why": "no seed in its metadata: cannot tell what it should hold"}, None, False
    if manifest.step != ref.step or metadata.get("step") != ref.step:
        return {**problem, "why": f"manifest of step {manifest.step} (metadata: {metadata.get('step')})"}, seed, False
    if not states_equal(state, make_state(seed)):
        return {**problem, "why": f"content differs from the state of its seed {seed}"}, seed, False
    return None, seed, False


def _check_dcp_ref(store: ckptstore.Store, target: int | str, ref: Any,
                   problem: dict[str, Any]) -> tuple[dict[str, Any] | None, int | None]:
    """`_check_ref` of a DCP step: its root, parts and chunk tables, every chunk headed, then
    every item read through the StoreReader and compared with its seed's DCP state."""
    try:
        chunks, missing = check_dcp_objects(store, ref.manifest)
    except (IntegrityError, FormatError) as exc:
        return {**problem, "why": f"DCP step: {type(exc).__name__}: {exc}"}, None
    problem.update(chunks=chunks, missing_chunks=len(missing), missing=missing[:10])
    try:
        state, read = load_dcp_state(store, target)
    except (IntegrityError, FormatError) as exc:
        return {**problem, "why": f"DCP load: {type(exc).__name__}: {exc}"}, None
    if missing:
        return {**problem, "why": f"DCP step: {len(missing)} of {chunks} chunks missing"}, None
    if read != ref.manifest:
        return {**problem, "why": f"the DCP reader read manifest {read}, not the ref's"}, None
    root = store.manifest_object(ref.manifest)
    seed, why = dcp_state_problem(state, ref.step)
    if why is None and root.step != ref.step:
        why = f"root of step {root.step}"
    return ({**problem, "why": f"DCP step: {why}"} if why is not None else None), seed


def check_store(cfg: SoakConfig, workdir: Path) -> dict[str, Any]:
    """Check the store against the journals in `workdir` and tally the run; returns the summary."""
    from ckptstore.commit import read_ref

    ops, lifecycle, events, crashes = _read_run(workdir)
    store = ckptstore.open(cfg.url, create=False, lease_ttl=cfg.lease_ttl)
    lost: dict[tuple[str, str], dict[str, Any]] = {}
    current: dict[str, Any] = {}
    for info in store.backend.list("refs/"):
        try:
            found = read_ref(store.backend, info.key)
        except FormatError as exc:
            lost[(info.key, "?")] = {"key": info.key, "why": f"ref: {exc}"}
            continue
        if found is not None:
            current[info.key] = found[0]
    checked = Counter("steps" if key.startswith(keys.STEP_REFS) else "tags" for key in current)
    seeds: dict[str, int] = {}  # the seed each current ref holds, where it could be read
    for key, ref in sorted(current.items()):
        problem, seed, dcp = _check_ref(store, key, ref)
        if dcp:
            checked["dcp_steps" if key.startswith(keys.STEP_REFS) else "dcp_tags"] += 1
        if problem is not None:
            lost[(key, ref.commit_id)] = problem
        elif seed is not None:
            seeds[key] = seed

    # Journaled commits that are gone without an operation that could have removed them.
    removers: dict[str, list[_Op]] = {}
    for op in ops:
        for removed in _removals(op):
            removers.setdefault(removed, []).append(op)
    commits = Counter[str]()
    for op in ops:
        committed = _commit_key(op)
        if committed is None or op.end is None:
            continue
        key = committed
        commit_id = op.end["commit_id"]
        now = current.get(key)
        if now is not None and now.commit_id == commit_id:
            commits["still current"] += 1
            if now.manifest != op.end["manifest"]:
                lost[(key, commit_id)] = {"key": key, "commit_id": commit_id, "why": "ref names another manifest"}
            elif (op.name != "tag" and (journaled_seed := op.begin.get("seed")) is not None
                  and key in seeds and seeds[key] != journaled_seed):  # (a broken ref is lost above)
                lost[(key, commit_id)] = {"key": key, "commit_id": commit_id,
                                          "why": f"holds the state of seed {seeds[key]}, the journal says "
                                                 f"{journaled_seed}"}
            continue
        wildcard = keys.STEP_REFS + "*" if key.startswith(keys.STEP_REFS) else None
        excuses = [r for r in removers.get(key, []) + removers.get(wildcard or "", [])
                   if r is not op and r.t1 >= op.t0]
        if excuses:
            commits["removed or replaced"] += 1
        else:
            commits["vanished"] += 1
            lost[(key, commit_id)] = {
                "key": key, "commit_id": commit_id, "manifest": op.end["manifest"], "by": f"{op.slot}.{op.incarnation}",
                "op": op.name, "t": op.t0, "why": "journaled commit vanished: no rm, overwrite, retention or untag "
                                                  "could have removed it",
                "now": current[key].commit_id if key in current else None}

    # Loads, tags and gc audits during the run that found a ref, unchanged throughout, naming a
    # missing or corrupt object (or other content).
    for op in ops:
        for found in (op.end or {}).get("broken", []):
            lost.setdefault((found["key"], found["commit_id"]), {
                **found, "by": f"{op.slot}.{op.incarnation}", "t": op.t0,
                "why": f"found by a {op.name} during the run: {found['error']}"})

    summary = _tally(cfg, ops, lifecycle, events, crashes)
    summary["check"] = {"refs_checked": checked["steps"] + checked["tags"], "step_refs_checked": checked["steps"],
                        "tag_refs_checked": checked["tags"], "dcp_step_refs_checked": checked["dcp_steps"],
                        "dcp_tag_refs_checked": checked["dcp_tags"], "journaled_commits": sum(commits.values()),
                        **{f"journaled_{k.replace(' ', '_')}": v for k, v in commits.items()}}
    summary["lost"] = sorted(lost.values(), key=lambda p: (p["key"], str(p.get("commit_id"))))
    summary["steps_lost"] = len(lost)
    store.close()
    return summary


def _tally(cfg: SoakConfig, ops: list[_Op], lifecycle: list[dict[str, Any]], events: list[dict[str, Any]],
           crashes: list[dict[str, Any]]) -> dict[str, Any]:
    outcomes: dict[str, Counter[str]] = {}
    faults: Counter[str] = Counter()
    unexpected = []
    for op in ops:
        outcomes.setdefault(op.name, Counter())[op.outcome] += 1
        if op.end is not None:
            faults.update(op.end.get("faults", {}))
            if op.end.get("unexpected"):
                unexpected.append({"worker": f"{op.slot}.{op.incarnation}", "op": op.name, "outcome": op.outcome,
                                   "begin": {k: v for k, v in op.begin.items() if k not in ("ev", "seq")},
                                   "error": op.end.get("error"), "traceback": op.end.get("traceback")})
    for record in lifecycle:
        faults.update(record.get("faults", {}))
    for crash in crashes:
        unexpected.append({"worker": f"{crash['slot']}.{crash['incarnation']}", "op": "process",
                           "outcome": f"exited {crash['rc']}", "error": crash.get("log_tail")})
    ok = {name: [op for op in ops if op.name == name and op.outcome == "ok" and op.end is not None]
          for name in outcomes}
    saves = [op.end for name in ("save", "dcp_save", "overwrite", "retain") for op in ok.get(name, []) if op.end]
    gcs = [op.end for op in ok.get("gc", []) if op.end]
    kills = Counter(e["slot"].rstrip("0123456789") for e in events if e["ev"] == "kill")
    skews = [r["skew"] for r in lifecycle if r.get("ev") == "start"]
    storms = faults.pop("storms", 0)
    counts = {
        "saves": len(ok.get("save", [])),
        "dcp_saves": len(ok.get("dcp_save", [])),
        "overwrites": len(ok.get("overwrite", [])),
        "overwrites_replacing": sum(1 for op in ok.get("overwrite", []) if op.end and op.end.get("replaced")),
        "retention_saves": len(ok.get("retain", [])),
        "retention_deleted": sum(len(op.end.get("retention_deleted", [])) for op in ok.get("retain", []) if op.end),
        "rms": len(ok.get("rm", [])),
        "tags": len(ok.get("tag", [])),
        "untags": len(ok.get("untag", [])),
        "loads_checked": sum(1 for op in ok.get("load", []) if op.end and op.end.get("checked")),
        "dcp_loads_checked": sum(1 for op in ok.get("load", []) if op.end and op.end.get("checked")
                                 and op.end.get("dcp")),
        "dcp_loads_after_sweep": sum(1 for op in ok.get("load", []) if op.end and op.end.get("checked")
                                     and op.end.get("dcp") and op.begin.get("swept_after") == op.end["commit_id"]),
        "chunks_saved": sum(int(s.get("chunks", 0)) for s in saves),
        "chunks_deduplicated": sum(int(s.get("chunks", 0)) - int(s.get("new_chunks", 0)) for s in saves),
        "gc_runs": sum(outcomes.get("gc", Counter()).values()),
        "gc_swept": sum(1 for g in gcs if g.get("ran")),
        "gc_stood_down": sum(1 for g in gcs if not g.get("ran") and "another gc" not in str(g.get("reason"))),
        "gc_busy": sum(1 for g in gcs if not g.get("ran") and "another gc" in str(g.get("reason"))),
        "gc_failed": sum(n for outcome, n in outcomes.get("gc", {}).items() if outcome != "ok"),
        "gc_deleted_chunks": sum(int(g.get("deleted_chunks", 0)) for g in gcs),
        "gc_deleted_manifests": sum(int(g.get("deleted_manifests", 0)) for g in gcs),
        "gc_broken_refs": sum(int(g.get("broken_refs_count", 0)) for g in gcs),
        "faults": sum(faults.values()),
        "fault_storms": storms,
        "kills": sum(kills.values()),
        "worker_starts": sum(1 for e in events if e["ev"] == "spawn"),
        "worker_crashes": len(crashes),
        "broken_refs_found_during_run": sum(len(op.end.get("broken", [])) for op in ops if op.end),
        "loads_raced": sum(1 for op in ops if op.name == "load" and op.outcome == "raced"),
        "tags_refused": sum(1 for op in ops if op.name == "tag" and op.outcome == "refused"),
        "unexpected_errors": len(unexpected),
    }
    counts["gc_deleted_objects"] = counts["gc_deleted_chunks"] + counts["gc_deleted_manifests"]
    return {
        "url": cfg.url, "seed": cfg.seed, "workdir": cfg.workdir,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("url", "seed", "workdir")},
        "counts": counts,
        "outcomes": {name: dict(sorted(c.items())) for name, c in sorted(outcomes.items())},
        "faults_by_request": dict(sorted(faults.items())),
        "kills_by_role": dict(sorted(kills.items())),
        "clock_skew_s": [round(min(skews), 1), round(max(skews), 1)] if skews else [],
        "gc_broken_refs": [ref for g in gcs for ref in g.get("broken_refs", [])][:10],
        "unexpected": unexpected[:50],
    }


def exit_status(summary: dict[str, Any]) -> int:
    """1 if anything was lost, 3 if not but something unexpected happened, else 0."""
    if summary["steps_lost"]:
        return 1
    return 3 if summary["counts"]["unexpected_errors"] else 0


def format_summary(s: dict[str, Any]) -> str:
    c, cfg, chk = s["counts"], s["config"], s["check"]
    roles = ", ".join(f"{cfg.get(k, 0)} {k.replace('_', ' ')}"
                      for k in ("savers", "dcp_savers", "overwriters", "taggers", "janitors", "collectors"))
    lines = [
        f"soak: {s['seconds']} s against {s['url']} (seed {s['seed']}): {roles}; lease TTL {cfg['lease_ttl']} s, "
        f"clock skew {s['clock_skew_s']} s, fault rate {cfg['fault_rate']}, retries {cfg['retries']}",
        f"saves {c['saves']}, DCP saves {c.get('dcp_saves', 0)}, overwrites {c['overwrites']} "
        f"({c['overwrites_replacing']} replacing a step), "
        f"retention saves {c['retention_saves']} (deleted {c['retention_deleted']} steps), rms {c['rms']}, "
        f"tags {c['tags']} (+{c['tags_refused']} refused: the step's data went away), untags {c['untags']}, "
        f"loads checked {c['loads_checked']} ({c.get('dcp_loads_checked', 0)} of DCP steps, "
        f"{c.get('dcp_loads_after_sweep', 0)} of them a DCP saver's commit a gc swept after; "
        f"+{c['loads_raced']} raced a delete)",
        f"chunks: {c['chunks_saved']} in committed saves, {c['chunks_deduplicated']} of them deduplicated",
        f"gc: {c['gc_runs']} runs: {c['gc_swept']} swept, {c['gc_stood_down']} stood down, {c['gc_busy']} busy, "
        f"{c['gc_failed']} failed or killed; deleted {c['gc_deleted_objects']} objects ({c['gc_deleted_chunks']} "
        f"chunks, {c['gc_deleted_manifests']} manifests); refs it could not read: {c['gc_broken_refs']}",
        f"faults injected: {c['faults']} ({c['fault_storms']} storms) {s['faults_by_request']}",
        f"kills: {c['kills']} {s['kills_by_role']}; worker starts {c['worker_starts']}, crashes {c['worker_crashes']}",
        "outcomes: " + "; ".join(f"{name} {dict(v)}" for name, v in s["outcomes"].items()),
        f"check: {chk['refs_checked']} refs loaded and compared ({chk['step_refs_checked']} steps, "
        f"{chk['tag_refs_checked']} tags; DCP: {chk.get('dcp_step_refs_checked', 0)} steps, "
        f"{chk.get('dcp_tag_refs_checked', 0)} tags); journaled commits {chk['journaled_commits']}: "
        f"{chk.get('journaled_still_current', 0)} still current, "
        f"{chk.get('journaled_removed_or_replaced', 0)} removed or replaced, "
        f"{chk.get('journaled_vanished', 0)} vanished",
        f"refs found broken during the run (unchanged throughout): {c['broken_refs_found_during_run']}",
        f"unexpected errors: {c['unexpected_errors']}",
    ]
    for u in s["unexpected"][:10]:
        lines.append(f"  UNEXPECTED {u['worker']} {u['op']}: {u['outcome']}: {str(u.get('error'))[:300]}")
    for problem in s["lost"]:
        lines.append(f"  LOST {problem['key']} commit {problem.get('commit_id')}: {problem['why'][:400]}")
    lines.append(f"steps lost: {s['steps_lost']}")
    lines.append(f"artifacts: {s['workdir']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    defaults = SoakConfig(url="")
    parser = argparse.ArgumentParser(prog="python -m ckptstore.testing.soak", description=__doc__.split("\n")[0])
    parser.add_argument("url", help="store URL (a path, s3://bucket/prefix, gs://bucket/prefix)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    for name, value in asdict(defaults).items():
        if name == "url":
            continue
        kind = int if name == "seed" else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value,
                            help=f"default: {value if value not in (None, '') else 'random / a new temp dir'}")
    ns = vars(parser.parse_args(args))
    as_json = ns.pop("json")
    summary = run(SoakConfig(**ns))
    print(json.dumps(summary, indent=2, default=str) if as_json else format_summary(summary))
    return exit_status(summary)


if __name__ == "__main__":
    # Run from the imported module, not from __main__: workers are forked from a forkserver,
    # which finds their entry point by its module's name.
    from ckptstore.testing.soak import main as _main

    sys.exit(_main())
