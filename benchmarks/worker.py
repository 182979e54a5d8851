"""One measured operation in a fresh process: `python -m benchmarks.worker '<json task>'`.

A fresh process per operation keeps the measurements independent (no allocator, page-cache
or import state carried over) and makes its peak RSS that operation's own. The task names
an op from OPS; the worker builds what the op needs *outside* the timed region, times only
the op, and prints one line `RESULT {json}` with seconds, RSS and op-specific numbers.

Only ckptstore's public API is used: ckptstore.open(...), Store.save/load(into=...), and the
options ChunkingPolicy / Compression exactly as given on the command line.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.states import StateSpec, build_state, change_tenth, empty_like_state, state_bytes, tensors

MiB = 1 << 20
S3_OBJECT = 64 * MiB  # object size of the plain boto3 baseline


# -- measurement helpers -----------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM so the peak we read after the op is the op's own (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(reset_ok: bool) -> int:
    hwm = _status_kib("VmHWM") if reset_ok else None
    if hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def touch_pages(state: Any) -> int:
    """Read one byte of every 4 KiB page of every tensor: an mmapped or lazily read result
    must really be in memory before the clock stops (same for every loader)."""
    import torch

    total = 0
    for _, t in tensors(state):
        if t.numel():
            flat = t.reshape(-1).view(torch.uint8)
            total += int(flat[::4096].sum())
    return total


def fsync_path(path: Path) -> None:
    """fsync a file, or every file and directory under a directory."""
    targets = [path] if path.is_file() else [p for p in path.rglob("*")] + [path]
    for p in targets:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tensor_bytes(t: Any) -> memoryview:
    import torch

    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def flat_tensors(state: Any) -> dict[str, Any]:
    """Dotted-name -> tensor: the form safetensors needs (non-tensor values are left out)."""
    return {name: t for name, t in tensors(state)}


def unflatten_like(flat: dict[str, Any], like: Any, prefix: str = "") -> Any:
    """Rebuild `like`'s tree from dotted names (non-tensor leaves are taken from `like`)."""
    import torch

    if isinstance(like, dict):
        return {k: unflatten_like(flat, v, f"{prefix}{k}.") for k, v in like.items()}
    if isinstance(like, list):
        return [unflatten_like(flat, v, f"{prefix}{i}.") for i, v in enumerate(like)]
    if isinstance(like, torch.Tensor):
        return flat[prefix[:-1]]
    return like


def verify_equal(spec: StateSpec, loaded: Any, changed: bool = False) -> None:
    """Check a loaded state against a freshly built one (tiny states only: --verify)."""
    import torch

    expected = build_state(spec)
    if changed:
        change_tenth(expected)
    want, got = tensors(expected), tensors(loaded)
    if [n for n, _ in want] != [n for n, _ in got]:
        raise AssertionError(f"loaded tensor names differ: {[n for n, _ in got][:5]}...")
    for (name, a), (_, b) in zip(want, got, strict=True):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            raise AssertionError(f"loaded tensor {name} differs from the saved one")


# -- ckptstore options ---------------------------------------------------------------------------

def open_store(task: dict[str, Any], url: str) -> Any:
    """ckptstore.open with the command line's options passed through unchanged."""
    import ckptstore

    kwargs: dict[str, Any] = {"threads": task["threads"]}
    if task.get("chunking"):
        kwargs["chunking"] = ckptstore.ChunkingPolicy(**task["chunking"])
    if task.get("compression"):
        kwargs["compression"] = ckptstore.Compression(**task["compression"])
    if task.get("s3"):
        kwargs["storage_options"] = {"endpoint_url": task["s3"]["endpoint"], "region": task["s3"]["region"]}
    return ckptstore.open(url, **kwargs)


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def s3_client(task: dict[str, Any]) -> Any:
    import boto3
    from botocore.config import Config

    s3 = task["s3"]
    return boto3.session.Session().client(
        "s3", endpoint_url=s3["endpoint"], region_name=s3["region"],
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=max(10, task["threads"] * 2)))


def s3_prefix_bytes(task: dict[str, Any], prefix: str) -> int:
    client, total = s3_client(task), 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=task["s3"]["bucket"], Prefix=prefix + "/"):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total


# -- ops: each returns (prepared, timed callable, after callable) via a small protocol -----------
# An op function gets the task and returns a dict; it calls `clock(fn)` for the timed part.

class Clock:
    def __init__(self) -> None:
        self.seconds: float | None = None
        self.rss_before = 0
        self.peak = 0

    def __call__(self, fn: Callable[[], Any]) -> Any:
        self.rss_before = (_status_kib("VmRSS") or 0) * 1024
        reset_ok = reset_peak_rss()
        start = time.perf_counter()
        result = fn()
        self.seconds = time.perf_counter() - start
        self.peak = peak_rss_bytes(reset_ok)
        return result


def op_raw_write(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    state = build_state(StateSpec.from_json(task["state"]))
    path = Path(task["path"])

    def run() -> None:
        with open(path, "wb") as f:
            for _, t in tensors(state):
                f.write(tensor_bytes(t))
            f.flush()
            os.fsync(f.fileno())

    clock(run)
    return {"state_bytes": state_bytes(state)}


def op_torch_save(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    import torch

    state = build_state(StateSpec.from_json(task["state"]))
    if task.get("change"):
        change_tenth(state)
    path = Path(task["path"])

    def run() -> None:
        torch.save(state, path)
        fsync_path(path)

    clock(run)
    return {"state_bytes": state_bytes(state), "stored_bytes": path.stat().st_size}


def op_safetensors_save(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    from safetensors.torch import save_file

    state = build_state(StateSpec.from_json(task["state"]))
    path = Path(task["path"])

    def run() -> None:
        save_file(flat_tensors(state), str(path))
        fsync_path(path)

    clock(run)
    return {"state_bytes": state_bytes(state)}


def op_dcp_save(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    state = build_state(StateSpec.from_json(task["state"]))
    path = Path(task["path"])
    # Single process, no process group: DCP runs without collectives. sync_files=True fsyncs.
    clock(lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), sync_files=True)))
    return {"state_bytes": state_bytes(state)}


def op_ckptstore_save(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    state = build_state(StateSpec.from_json(task["state"]))
    store = open_store(task, task["url"])  # opening (marker, canary) is one-time setup: untimed
    info = clock(lambda: store.save(1, state))
    store.close()
    return {"state_bytes": state_bytes(state), "new_bytes": info.new_bytes, "chunks": info.chunks}


def op_ckptstore_resave(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    """Save step 1 (untimed), change 10% of the tensors, time the save of step 2, and
    measure how many bytes the store grew by compared with the bytes that changed."""
    state = build_state(StateSpec.from_json(task["state"]))
    store = open_store(task, task["url"])
    store.save(1, state)
    before = du_bytes(Path(task["path"])) if task.get("path") else s3_prefix_bytes(task, task["s3"]["prefix"])
    changed = change_tenth(state)
    info = clock(lambda: store.save(2, state))
    after = du_bytes(Path(task["path"])) if task.get("path") else s3_prefix_bytes(task, task["s3"]["prefix"])
    store.close()
    return {"state_bytes": state_bytes(state), "changed_bytes": changed, "growth_bytes": after - before,
            "new_bytes": info.new_bytes}


def op_async_save(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    """The blocking part of Store.save_async (until it returns its Future).

    The first call allocates the staging buffers that later calls reuse, so it is reported
    apart (`first_blocking_seconds`); the timed number is the second call, the steady state.
    """
    state = build_state(StateSpec.from_json(task["state"]))
    store = open_store(task, task["url"])
    if not hasattr(store, "save_async"):
        return {"skipped": "Store.save_async does not exist in this ckptstore"}
    start = time.perf_counter()
    first = store.save_async(1, state)
    first_blocking = time.perf_counter() - start
    first.result()
    future = clock(lambda: store.save_async(2, state))
    start = time.perf_counter()
    future.result()
    total = clock.seconds + (time.perf_counter() - start)  # type: ignore[operator]
    store.close()
    return {"state_bytes": state_bytes(state), "total_seconds": total, "first_blocking_seconds": first_blocking}


def op_staging_clone(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    """One staging copy: copy the state into memory preallocated (and touched) beforehand."""
    state = build_state(StateSpec.from_json(task["state"]))
    staging = empty_like_state(state)
    for _, t in tensors(staging):
        t.zero_()  # fault the pages in now: a real trainer allocates its staging buffer once

    def run() -> None:
        for (_, src), (_, dst) in zip(tensors(state), tensors(staging), strict=True):
            dst.copy_(src)

    clock(run)
    return {"state_bytes": state_bytes(state)}


def op_raw_read(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    import torch

    path = Path(task["path"])

    def run() -> Any:
        size = path.stat().st_size
        buf = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buf.numpy())  # type: ignore[arg-type]
        with open(path, "rb", buffering=0) as f:
            got = 0
            while got < size:
                n = f.readinto(view[got:got + 64 * MiB])
                if not n:
                    raise OSError(f"{path}: short read at {got} of {size}")
                got += n
        return buf

    buf = clock(run)
    return {"loaded_bytes": buf.numel()}


def op_raw_read_threads(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    """The raw file read by 4 threads, 16 MiB pieces, into fresh memory: what a copying
    loader can reach on this disk (ckptstore reads its chunk files the same way)."""
    import torch

    path = Path(task["path"])

    def run() -> Any:
        size = path.stat().st_size
        buf = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buf.numpy())  # type: ignore[arg-type]
        fd = os.open(path, os.O_RDONLY)

        def read(start: int) -> None:
            piece = view[start:start + 16 * MiB]
            while piece.nbytes:
                n = os.preadv(fd, [piece], start)
                if not n:
                    raise OSError(f"{path}: short read at {start}")
                piece, start = piece[n:], start + n

        try:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(read, range(0, size, 16 * MiB)))
        finally:
            os.close(fd)
        return buf

    buf = clock(run)
    return {"loaded_bytes": buf.numel()}


def _timed_load(task: dict[str, Any], clock: Clock, load: Callable[[], Any], changed: bool = False) -> dict[str, Any]:
    def run() -> Any:
        state = load()
        touch_pages(state)
        return state

    state = clock(run)
    if task.get("verify"):
        verify_equal(StateSpec.from_json(task["state"]), state, changed)
    return {"loaded_bytes": state_bytes(state)}


def op_torch_load(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    import torch

    return _timed_load(task, clock, lambda: torch.load(task["path"], weights_only=True))


def op_torch_load_mmap(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    import torch

    return _timed_load(task, clock, lambda: torch.load(task["path"], weights_only=True, mmap=True))


def op_safetensors_load(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    from safetensors.torch import load_file

    like = empty_like_state(StateSpec.from_json(task["state"]))  # tree only; tensors unused
    return _timed_load(task, clock, lambda: unflatten_like(load_file(task["path"]), like))


def op_dcp_load(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    # DCP loads in place only: the target tree is allocated (untimed), like ckptstore_load_into.
    target = empty_like_state(StateSpec.from_json(task["state"]))

    def load() -> Any:
        dcp.load(target, storage_reader=dcp.FileSystemReader(task["path"]))
        return target

    return _timed_load(task, clock, load)


def op_ckptstore_load(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    store = open_store(task, task["url"])
    out = _timed_load(task, clock, lambda: store.load(1))
    store.close()
    return out


def op_ckptstore_load_into(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    store = open_store(task, task["url"])
    target = empty_like_state(StateSpec.from_json(task["state"]))
    out = _timed_load(task, clock, lambda: store.load(1, into=target))
    store.close()
    return out


# -- S3 ops -------------------------------------------------------------------------------------

def _pieces(state: Any) -> list[memoryview]:
    """The state's bytes cut into S3_OBJECT-sized pieces (tensor boundaries ignored)."""
    out: list[memoryview] = []
    for _, t in tensors(state):
        mv = tensor_bytes(t)
        out += [mv[i:i + S3_OBJECT] for i in range(0, len(mv), S3_OBJECT)] if len(mv) else []
    # Pack consecutive small pieces into one object, like a plain uploader would.
    objects: list[list[memoryview]] = [[]]
    size = 0
    for piece in out:
        if size + len(piece) > S3_OBJECT and objects[-1]:
            objects.append([])
            size = 0
        objects[-1].append(piece)
        size += len(piece)
    return [memoryview(b"".join(parts)) if len(parts) > 1 else parts[0] for parts in objects]


def op_boto3_put(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    state = build_state(StateSpec.from_json(task["state"]))
    objects = _pieces(state)
    client, s3 = s3_client(task), task["s3"]

    def put(i: int) -> None:
        client.put_object(Bucket=s3["bucket"], Key=f"{s3['prefix']}/{i:06d}", Body=bytes(objects[i]))

    def run() -> None:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(put, range(len(objects))))

    clock(run)
    return {"state_bytes": state_bytes(state), "objects": len(objects)}


def op_boto3_get(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    import torch

    client, s3 = s3_client(task), task["s3"]
    listed = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=s3["prefix"] + "/"):
        listed += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
    listed.sort()

    def run() -> Any:
        buf = torch.empty(sum(size for _, size in listed), dtype=torch.uint8)
        view = memoryview(buf.numpy())  # type: ignore[arg-type]
        offsets = [0]
        for _, size in listed:
            offsets.append(offsets[-1] + size)

        def get(i: int) -> None:
            body = client.get_object(Bucket=s3["bucket"], Key=listed[i][0])["Body"].read()
            view[offsets[i]:offsets[i + 1]] = body

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(get, range(len(listed))))
        return buf

    buf = clock(run)
    return {"objects": len(listed), "loaded_bytes": buf.numel()}


def _s3tc_config(task: dict[str, Any]) -> Any:
    from s3torchconnector import S3ClientConfig

    return S3ClientConfig(force_path_style=True)


def op_s3tc_dcp_save(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from s3torchconnector.dcp import S3StorageWriter

    state = build_state(StateSpec.from_json(task["state"]))
    s3 = task["s3"]
    writer = S3StorageWriter(region=s3["region"], path=f"s3://{s3['bucket']}/{s3['prefix']}",
                             s3client_config=_s3tc_config(task), thread_count=task["threads"])
    clock(lambda: dcp.save(state, storage_writer=writer))
    return {"state_bytes": state_bytes(state)}


def op_s3tc_dcp_load(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    from s3torchconnector.dcp import S3StorageReader

    s3 = task["s3"]
    reader = S3StorageReader(region=s3["region"], path=f"s3://{s3['bucket']}/{s3['prefix']}",
                             s3client_config=_s3tc_config(task))
    return _timed_dcp_load(task, clock, reader)


def _timed_dcp_load(task: dict[str, Any], clock: Clock, reader: Any) -> dict[str, Any]:
    """dcp.load through `reader` (built untimed) into a preallocated, untimed tree."""
    import torch.distributed.checkpoint as dcp

    target = empty_like_state(StateSpec.from_json(task["state"]))

    def load() -> Any:
        dcp.load(target, storage_reader=reader)
        return target

    return _timed_load(task, clock, load)


def _fsspec_path_and_options(task: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    s3 = task["s3"]
    # Credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, as for every peer.
    return (f"s3://{s3['bucket']}/{s3['prefix']}",
            {"client_kwargs": {"endpoint_url": s3["endpoint"], "region_name": s3["region"]}})


def op_fsspec_dcp_save(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    state = build_state(StateSpec.from_json(task["state"]))
    path, options = _fsspec_path_and_options(task)
    # sync_files: object stores have no fsync; an upload is durable when its PUT returns.
    writer = FsspecWriter(path, thread_count=task["threads"], sync_files=False, **options)
    clock(lambda: dcp.save(state, storage_writer=writer))
    return {"state_bytes": state_bytes(state)}


def op_fsspec_dcp_load(task: dict[str, Any], clock: Clock) -> dict[str, Any]:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    path, options = _fsspec_path_and_options(task)
    return _timed_dcp_load(task, clock, FsspecReader(path, **options))


ZSTD = {"codec": "zstd"}
OPS: dict[str, Callable[[dict[str, Any], Clock], dict[str, Any]]] = {
    "raw_write": op_raw_write, "torch_save": op_torch_save, "safetensors_save": op_safetensors_save,
    "dcp_save": op_dcp_save, "ckptstore_save": op_ckptstore_save, "ckptstore_resave": op_ckptstore_resave,
    "async_save": op_async_save, "staging_clone": op_staging_clone,
    "raw_read": op_raw_read, "torch_load": op_torch_load, "torch_load_mmap": op_torch_load_mmap,
    "safetensors_load": op_safetensors_load, "dcp_load": op_dcp_load, "ckptstore_load": op_ckptstore_load,
    "ckptstore_load_into": op_ckptstore_load_into, "raw_read_4t": op_raw_read_threads,
    # The same ckptstore ops with adaptive zstd forced on, whatever --codec says.
    "ckptstore_zstd_save": lambda task, clock: op_ckptstore_save({**task, "compression": ZSTD}, clock),
    "ckptstore_zstd_load": lambda task, clock: op_ckptstore_load({**task, "compression": ZSTD}, clock),
    "boto3_put": op_boto3_put, "boto3_get": op_boto3_get,
    "s3tc_dcp_save": op_s3tc_dcp_save, "s3tc_dcp_load": op_s3tc_dcp_load,
    "fsspec_dcp_save": op_fsspec_dcp_save, "fsspec_dcp_load": op_fsspec_dcp_load,
}


def warm_up(op: str, task: dict[str, Any]) -> None:
    """One untimed call of the same API on a one-tensor state in a scratch directory, so
    lazy imports (read from disk after the page cache was dropped) are not timed."""
    import shutil
    import tempfile

    import torch

    tiny = {"model": {"w": torch.ones(4)}}
    scratch = Path(tempfile.mkdtemp(prefix="warmup-", dir=task.get("scratch")))
    try:
        if op.startswith("torch"):
            torch.save(tiny, scratch / "t.pt")
            torch.load(scratch / "t.pt", weights_only=True, mmap=op.endswith("mmap"))
        elif op.startswith("safetensors"):
            from safetensors.torch import load_file, save_file

            save_file(flat_tensors(tiny), str(scratch / "t.st"))
            load_file(str(scratch / "t.st"))
        elif op.startswith(("dcp", "s3tc", "fsspec")):
            import torch.distributed.checkpoint as dcp

            dcp.save(tiny, storage_writer=dcp.FileSystemWriter(str(scratch / "dcp")))
            dcp.load(tiny, storage_reader=dcp.FileSystemReader(str(scratch / "dcp")))
        elif op.startswith(("ckptstore", "async")):
            store = open_store({**task, "s3": None}, str(scratch / "store"))
            store.save(1, tiny)
            store.load(1)
            store.load(1, into=tiny)
            store.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str]) -> int:
    task = json.loads(argv[0])
    if task["op"] == "scaling":
        from benchmarks.scaling import run_scaling_task

        out = run_scaling_task(task)
    else:
        clock = Clock()
        warm_up(task["op"], task)
        out = OPS[task["op"]](task, clock)
        if clock.seconds is not None:
            out.update(seconds=clock.seconds, rss_before=clock.rss_before, peak_rss=clock.peak)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
