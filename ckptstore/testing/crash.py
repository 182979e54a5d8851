"""Run one store operation in a child process and SIGKILL it at an exact stage.

The crash matrix (tests/test_crash_matrix.py) describes each crash point as a `CrashSpec`:
the operation (a save, a retention pass, a gc), the store URL and options, and where to
die: a `KillPoint` (a backend call, through ckptstore.testing.faults' kill_before /
kill_after) or, on S3, the n-th part of a multipart upload.

`run_crash(spec)` forks the child from a forkserver that has torch and ckptstore imported
already, so a crash point costs milliseconds of start-up instead of a fresh interpreter's
seconds, and returns once the child died of SIGKILL. A child that finished, failed or hung
instead raises `CrashNotReached`: a crash test whose kill never fired proves nothing.

One point by hand (the process kills itself; the shell prints "Killed")::

    python -m ckptstore.testing.crash '<CrashSpec.to_json()>'
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import ckptstore
from ckptstore.testing.faults import Fault, FaultInjectingBackend

__all__ = ["CrashNotReached", "CrashResult", "CrashSpec", "KillPoint", "run_crash"]

Operation = Literal["save", "retention", "gc"]


@dataclass(frozen=True)
class KillPoint:
    """SIGKILL the child before or after the (`skip`+1)-th call of `op` on a key matching `key`."""

    op: str
    key: str
    when: Literal["before", "after"] = "before"
    skip: int = 0

    def fault(self) -> Fault:
        return Fault(self.op, key=self.key, action=f"kill_{self.when}", skip=self.skip)


@dataclass(frozen=True)
class CrashSpec:
    """One operation to run and where to kill it. Plain values only: it travels as JSON too."""

    operation: Operation
    url: str
    kill: KillPoint | None = None
    #: S3 only: SIGKILL right after this many UploadPart requests (mid multipart upload).
    kill_after_upload_parts: int | None = None
    step: int = 0
    tag: int = 0  # the state saved is scenarios.state_for(tag, elements=elements)
    elements: int = 4096
    overwrite: bool = False
    keep_last: int | None = None
    chunking: tuple[int, int, int] = (64 << 10, 1024, 4096)  # chunk_size, small_tensor_limit, pack_size
    lease_ttl: float = 600.0
    #: One I/O thread: "after k chunk puts" then means exactly k, with none in flight.
    threads: int = 1
    #: S3Backend keyword arguments (e.g. multipart_threshold, part_size).
    storage_options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CrashSpec:
        raw = json.loads(text)
        kill = raw.pop("kill")
        return cls(**{**raw, "chunking": tuple(raw["chunking"]),
                      "kill": KillPoint(**kill) if kill is not None else None})


@dataclass(frozen=True)
class CrashResult:
    """A child that died of SIGKILL: when (time.time(), just after it was reaped) and how long it ran."""

    spec: CrashSpec
    died_at: float
    seconds: float


class CrashNotReached(AssertionError):
    """The child finished, failed or hung instead of being killed at the crash point."""


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never run past the kill


def _s3_options_killing_mid_upload(parts: int) -> dict[str, Any]:
    """A boto3 client (for the server in the environment) that dies after `parts` UploadParts.

    The hook sits in botocore because the backend's put is one call around the whole
    multipart upload: no backend-level fault can land between its parts.
    """
    from ckptstore.testing.servers import s3_server_from_env

    server = s3_server_from_env()
    if server is None:
        raise RuntimeError("kill_after_upload_parts needs an S3 server in the environment (AWS_ENDPOINT_URL)")
    client = server.client()
    counter = itertools.count(1)

    def after_part(**_: Any) -> None:
        if next(counter) >= parts:
            _kill_self()

    client.meta.events.register("after-call.s3.UploadPart", after_part)
    return {"client": client}


def execute(spec: CrashSpec) -> str:
    """Run `spec`'s operation in this process (which its kill point ends); a summary if it finishes."""
    from ckptstore.store import Store
    from ckptstore.testing.scenarios import state_for
    from ckptstore.url import open_backend

    options = dict(spec.storage_options)
    if spec.kill_after_upload_parts is not None:
        options.update(_s3_options_killing_mid_upload(spec.kill_after_upload_parts))
    backend = open_backend(spec.url, options, threads=spec.threads)
    faulty = FaultInjectingBackend(backend, [spec.kill.fault()] if spec.kill else [])
    chunk_size, small_limit, pack_size = spec.chunking
    store = Store(faulty, chunking=ckptstore.ChunkingPolicy(chunk_size, small_limit, pack_size),
                  threads=spec.threads, lease_ttl=spec.lease_ttl)
    if spec.operation == "save":
        info = store.save(spec.step, state_for(spec.tag, elements=spec.elements), overwrite=spec.overwrite,
                          keep_last=spec.keep_last)
        return f"saved step {info.step} ({info.new_chunks} new chunks)"
    if spec.operation == "retention":
        return f"retention deleted {store.apply_retention(keep_last=spec.keep_last)}"
    if spec.operation == "gc":
        report = store.gc(min_age=0)
        return f"gc ran={report.ran} deleted={report.deleted_chunks + report.deleted_manifests}"
    raise ValueError(f"unknown operation {spec.operation!r}")


def _child(spec: CrashSpec, environ: dict[str, str], conn: Any) -> None:
    # A forkserver child inherits the server's environment, not the caller's: the test's
    # S3/GCS variables may have been set after the server started.
    os.environ.clear()
    os.environ.update(environ)
    try:
        conn.send(("finished", execute(spec)))
    except BaseException:
        conn.send(("failed", traceback.format_exc()))
    finally:
        conn.close()


_PRELOAD = ["torch", "ckptstore.store", "ckptstore.testing.crash", "ckptstore.testing.scenarios", "boto3",
            "google.cloud.storage"]


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # missing optional SDKs are skipped by the forkserver
    return ctx


def run_crash(spec: CrashSpec, *, timeout: float = 120.0) -> CrashResult:
    """Run `spec` in a child process; return once it died of SIGKILL, else raise CrashNotReached."""
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    started = time.monotonic()
    proc = ctx.Process(target=_child, args=(spec, dict(os.environ), sender), daemon=True)
    proc.start()
    sender.close()
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise CrashNotReached(f"child still running after {timeout} s: {spec}")
    died_at, seconds = time.time(), time.monotonic() - started
    message: Any = None
    try:
        if receiver.poll():
            message = receiver.recv()
    except EOFError:
        pass
    finally:
        receiver.close()
    if proc.exitcode != -signal.SIGKILL:
        raise CrashNotReached(f"child exited with {proc.exitcode} instead of dying at the crash point "
                              f"({spec}): {message}")
    if message is not None:
        raise CrashNotReached(f"child reported {message!r} and was then killed: {spec}")
    return CrashResult(spec, died_at, seconds)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m ckptstore.testing.crash '<CrashSpec as JSON>'")
    print(execute(CrashSpec.from_json(sys.argv[1])), flush=True)
    sys.exit(3)  # reaching here means the crash point was never hit
