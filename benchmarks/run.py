"""Benchmark harness: `python -m benchmarks [--quick] [--only local,s3,scaling] [--json PATH]`.

Every tool is measured in the same invocation, interleaved round-robin per run (run 1: each
tool once, run 2: each tool once in a rotated order, ...), so machine noise hits all tools
alike; tables report medians, min-max and the ratio to the baseline named per section.
See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import Row, markdown, summarize
from benchmarks.states import StateSpec

REPO = Path(__file__).resolve().parent.parent
STATES = {
    "model-fp32": ("float32", False), "model-bf16": ("bfloat16", False),
    "adam-fp32": ("float32", True), "adam-bf16": ("bfloat16", True),
}
# Local formats: the save op, then the loads of what it wrote (the first is the baseline).
LOCAL = {
    "raw": ("raw_write", ["raw_read", "raw_read_4t"]),
    "torch": ("torch_save", ["torch_load", "torch_load_mmap"]),
    "safetensors": ("safetensors_save", ["safetensors_load"]),
    "dcp": ("dcp_save", ["dcp_load"]),
    "ckptstore": ("ckptstore_save", ["ckptstore_load", "ckptstore_load_into"]),
}
LOCAL_SAVE_TOOLS = [save for save, _ in LOCAL.values()]
LOCAL_LOAD_TOOLS = [load for _, loads in LOCAL.values() for load in loads]
# Ops that run in --peer-python's interpreter (their packages conflict with ckptstore's).
PEER_OPS = ("fsspec_",)
TENSOR_COUNTS = [10, 100, 1000, 10_000, 100_000]
STEP_COUNTS = [1, 10, 100, 1000]


def rotate(items: list[Any], by: int) -> list[Any]:
    by %= max(1, len(items))
    return items[by:] + items[:by]


# -- page cache -----------------------------------------------------------------------------------

class PageCache:
    """Drops cached pages of what a save wrote: drop_caches when permitted, else fadvise."""

    def __init__(self, mode: str = "auto") -> None:
        self.method = "posix_fadvise(POSIX_FADV_DONTNEED) on every file after fsync"
        if mode == "fadvise":
            return
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3")
            self.method = "echo 3 > /proc/sys/vm/drop_caches"
        except OSError as exc:
            self.method += f" (drop_caches refused: {exc.strerror})"

    def drop(self, *paths: Path) -> None:
        if self.method.startswith("echo"):
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3")
            return
        for path in paths:
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for f in files:
                try:
                    fd = os.open(f, os.O_RDONLY)
                except OSError:
                    continue  # vanished (a server's temp file): nothing cached to drop
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


# -- running one measured op ------------------------------------------------------------------------

class Runner:
    def __init__(self, args: argparse.Namespace, env: dict[str, str] | None = None):
        self.args = args
        self.env = dict(env or os.environ)
        self.peer_python: str | None = args.peer_python

    def base_task(self) -> dict[str, Any]:
        return {"threads": self.args.threads, "chunking": self.args.chunking_opts, "scratch": str(self.args.scratch),
                "compression": self.args.compression_opts, "verify": self.args.verify}

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        """Run one op in a fresh process (or in this one with --in-process); raise on failure."""
        task = {**self.base_task(), **task}
        if self.args.in_process:
            return _run_in_process(task)
        env = {**self.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))}
        python = self.peer_python if task["op"].startswith(PEER_OPS) and self.peer_python else sys.executable
        proc = subprocess.run([python, "-m", "benchmarks.worker", json.dumps(task)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=self.args.op_timeout)
        results = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not results:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{task['op']} exited {proc.returncode}: {tail[:300]}")
        return dict(json.loads(results[-1]))


def _run_in_process(task: dict[str, Any]) -> dict[str, Any]:
    from benchmarks import worker

    if task["op"] == "scaling":
        from benchmarks.scaling import run_scaling_task

        return run_scaling_task(task)
    clock = worker.Clock()
    worker.warm_up(task["op"], task)
    out = worker.OPS[task["op"]](task, clock)
    if clock.seconds is not None:
        out.update(seconds=clock.seconds, rss_before=clock.rss_before, peak_rss=clock.peak)
    return out


def record(row: Row, runner: Runner, task: dict[str, Any]) -> dict[str, Any] | None:
    """Run one measurement into `row`; a failure marks the row failed and keeps going."""
    try:
        out = runner.run(task)
    except Exception as exc:  # a peer that breaks must not stop the other measurements
        row.status, row.note = "failed", f"{type(exc).__name__}: {exc}"[:400]
        print(f"  FAILED {row.id}: {row.note}", file=sys.stderr)
        return None
    if out.get("skipped"):
        row.status, row.note = "skipped", out["skipped"]
        return out
    row.runs.append(out)
    return out


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- sections ---------------------------------------------------------------------------------------

def local_section(args: argparse.Namespace, spec: StateSpec, runner: Runner, cache: PageCache,
                  tmp: Path) -> list[Row]:
    label = spec.label
    rows = {t: Row("local-save", label, t, "raw_write") for t in LOCAL_SAVE_TOOLS}
    rows.update({t: Row("local-load", label, t, "raw_read") for t in LOCAL_LOAD_TOOLS})
    resave = {"torch_save_changed": Row("local-resave", label, "torch_save_changed", "torch_save_changed",
                                        note="full torch.save of the state with 10% of tensors changed"),
              "ckptstore_resave": Row("local-resave", label, "ckptstore_resave", "torch_save_changed")}
    asyncs = {"staging_clone": Row("async", label, "staging_clone", "staging_clone",
                                   note="copy_ into preallocated, touched tensors"),
              "async_save": Row("async", label, "async_save", "staging_clone", note="blocking part only")}
    import ckptstore

    has_async = hasattr(ckptstore.Store, "save_async")
    if not has_async:
        asyncs["async_save"].status = "skipped"
        asyncs["async_save"].note = "Store.save_async does not exist in this ckptstore"
    state = spec.to_json()
    for r in range(args.runs):
        for fmt in rotate(list(LOCAL), r):
            save_op, load_ops = LOCAL[fmt]
            out = tmp / f"{fmt}-{r}"
            _progress(f"local {label} run {r + 1}/{args.runs}: {save_op}")
            task = {"state": state, "path": str(out), "url": str(out)}
            if record(rows[save_op], runner, {**task, "op": save_op}) is None:
                for load_op in load_ops:
                    rows[load_op].status, rows[load_op].note = "failed", f"its save failed: {rows[save_op].note}"
            else:
                for load_op in rotate(load_ops, r):
                    cache.drop(out)
                    _progress(f"local {label} run {r + 1}/{args.runs}: {load_op}")
                    record(rows[load_op], runner, {**task, "op": load_op})
            _rmtree(out)
        for tool in rotate(list(resave), r):
            out = tmp / f"{tool}-{r}"
            _progress(f"local {label} run {r + 1}/{args.runs}: {tool}")
            op = "torch_save" if tool == "torch_save_changed" else tool
            record(resave[tool], runner, {"op": op, "state": state, "path": str(out), "url": str(out),
                                          "change": True})
            _rmtree(out)
        if has_async:
            for tool in rotate(list(asyncs), r):
                out = tmp / f"{tool}-{r}"
                _progress(f"local {label} run {r + 1}/{args.runs}: {tool}")
                record(asyncs[tool], runner, {"op": tool, "state": state, "url": str(out)})
                _rmtree(out)
    return [*rows.values(), *resave.values(), *asyncs.values()]


def s3_section(args: argparse.Namespace, spec: StateSpec, runner: Runner, cache: PageCache, tmp: Path,
               server: Any, bucket: str) -> list[Row]:
    label = spec.label
    saves = {"boto3_put": Row("s3-save", label, "boto3_put", "boto3_put", note="64 MiB objects, 4 threads"),
             "ckptstore_save": Row("s3-save", label, "ckptstore_save", "boto3_put"),
             "ckptstore_resave": Row("s3-save", label, "ckptstore_resave", "boto3_put",
                                     note="10% of tensors changed"),
             "ckptstore_zstd_save": Row("s3-save", label, "ckptstore_zstd_save", "boto3_put",
                                        note='Compression("zstd"), adaptive'),
             "s3tc_dcp_save": Row("s3-save", label, "s3tc_dcp_save", "boto3_put",
                                  note=f"s3torchconnector DCP writer, thread_count={args.threads}"),
             "fsspec_dcp_save": Row("s3-save", label, "fsspec_dcp_save", "boto3_put")}
    loads = {"boto3_get": Row("s3-load", label, "boto3_get", "boto3_get", note="4 threads"),
             "ckptstore_load": Row("s3-load", label, "ckptstore_load", "boto3_get"),
             "ckptstore_zstd_load": Row("s3-load", label, "ckptstore_zstd_load", "boto3_get"),
             "s3tc_dcp_load": Row("s3-load", label, "s3tc_dcp_load", "boto3_get"),
             "fsspec_dcp_load": Row("s3-load", label, "fsspec_dcp_load", "boto3_get")}
    why_not_s3tc = _import_problem("s3torchconnector.dcp")
    if why_not_s3tc:
        for row in (saves["s3tc_dcp_save"], loads["s3tc_dcp_load"]):
            row.status, row.note = "unavailable", why_not_s3tc
    # DCP + fsspec needs s3fs; s3fs needs aiobotocore, which pins an older botocore than
    # ckptstore's boto3, so its ops run in the interpreter of a venv of their own (--peer-python).
    why_not_s3fs = _peer_problem(runner.peer_python)
    if why_not_s3fs:
        for row in (saves["fsspec_dcp_save"], loads["fsspec_dcp_load"]):
            row.status, row.note = "unavailable", why_not_s3fs
    else:
        saves["fsspec_dcp_save"].note = f"FsspecWriter, thread_count={args.threads}; {runner.peer_python}"
    pairs = {"boto3": ("boto3_put", "boto3_get"), "ckptstore": ("ckptstore_save", "ckptstore_load"),
             "s3tc": ("s3tc_dcp_save", "s3tc_dcp_load"), "ckptstore-resave": ("ckptstore_resave", None),
             "ckptstore-zstd": ("ckptstore_zstd_save", "ckptstore_zstd_load"),
             "fsspec": ("fsspec_dcp_save", "fsspec_dcp_load")}
    state = spec.to_json()
    s3 = {"endpoint": server.endpoint, "region": server.region, "bucket": bucket}
    for r in range(args.runs):
        for name in rotate(list(pairs), r):
            save_op, load_op = pairs[name]
            if saves[save_op].status not in ("ok", "failed"):
                continue
            prefix = f"{name}-{r}"
            task = {"state": state, "s3": {**s3, "prefix": prefix}, "url": f"s3://{bucket}/{prefix}"}
            _progress(f"s3 {label} run {r + 1}/{args.runs}: {save_op}")
            saved = record(saves[save_op], runner, {**task, "op": save_op})
            if load_op and saved is not None:
                cache.drop(server.data_dir)
                _progress(f"s3 {label} run {r + 1}/{args.runs}: {load_op}")
                record(loads[load_op], runner, {**task, "op": load_op})
            elif load_op:
                loads[load_op].status, loads[load_op].note = "failed", f"its save failed: {saves[save_op].note}"
            _delete_prefix(server, bucket, prefix)
    return [*saves.values(), *loads.values()]


def scaling_section(args: argparse.Namespace, runner: Runner, tmp: Path) -> list[Row]:
    tensor_counts = [n for n in TENSOR_COUNTS if n <= args.max_tensors]
    step_counts = [n for n in STEP_COUNTS if n <= args.max_steps]
    rows = {("tensors", n): Row("scaling", "local, 256-byte tensors", f"{n} tensors, 1 step", None)
            for n in tensor_counts}
    rows.update({("steps", n): Row("scaling", "local, 256-byte tensors", f"{n} steps of 10 tensors", None)
                 for n in step_counts})
    for r in range(args.runs):
        for kind, n in rotate(list(rows), r):
            out = tmp / f"scaling-{kind}-{n}-{r}"
            _progress(f"scaling run {r + 1}/{args.runs}: {kind}={n}")
            record(rows[(kind, n)], runner, {"op": "scaling", "kind": kind, "n": n, "path": str(out)})
            _rmtree(out)
    return list(rows.values())


# -- helpers ---------------------------------------------------------------------------------------

def _import_problem(module: str) -> str | None:
    try:
        __import__(module)
        return None
    except Exception as exc:
        return f"not installed ({type(exc).__name__}: {exc})"[:300]


def _peer_problem(python: str | None) -> str | None:
    """Why the DCP + fsspec ops cannot run in `python` (None: they can)."""
    if not python:
        return ("needs --peer-python: s3fs's aiobotocore pins an older botocore (newest: <1.43.118) than "
                "ckptstore's boto3, so s3fs goes in a venv of its own (benchmarks/README.md)")
    try:
        proc = subprocess.run([python, "-c", "import s3fs, torch.distributed.checkpoint"], capture_output=True,
                              text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"--peer-python {python} does not run: {exc}"
    if proc.returncode:
        return f"--peer-python {python} cannot import s3fs and torch: {proc.stderr.strip()[-200:]}"
    return None


def _rmtree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _delete_prefix(server: Any, bucket: str, prefix: str) -> None:
    client = server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objs:
            client.delete_objects(Bucket=bucket, Delete={"Objects": objs, "Quiet": True})


def machine_info(tmp: Path) -> dict[str, Any]:
    import torch

    import ckptstore

    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), "0")
    disk = shutil.disk_usage(tmp)
    try:
        source = subprocess.run(["df", "--output=source,fstype", str(tmp)], capture_output=True, text=True,
                                timeout=10).stdout.split("\n")[1].split()
    except (OSError, IndexError, subprocess.SubprocessError):
        source = ["?", "?"]
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "nproc": os.cpu_count(),
        "ram_gib": round(int(mem) / 2**20, 1), "tmp_disk": f"{source[0]} ({source[-1]}), {disk.total / 1e9:.0f} GB",
        "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
        "ckptstore": ckptstore.__version__, "loadavg_start": os.getloadavg(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small states (20 MB model), 1 run, small scaling")
    p.add_argument("--runs", type=int, help="runs per tool, interleaved (default 3; --quick: 1)")
    p.add_argument("--only", default="local,s3,scaling", help="comma list of sections: local, s3, scaling")
    p.add_argument("--size-gb", type=float, help="model parameter bytes in GB (default 1.24; --quick: 0.02)")
    p.add_argument("--states", default=",".join(STATES), help=f"comma list of {', '.join(STATES)}")
    p.add_argument("--s3-states", default="model-fp32", help="states for the s3 section (default model-fp32)")
    p.add_argument("--json", type=Path, help="write every run and summary here")
    p.add_argument("--threads", type=int, default=4, help="ckptstore threads= (and s3torchconnector thread_count)")
    p.add_argument("--codec", help="ckptstore Compression(codec=...); passed through unchanged")
    p.add_argument("--codec-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Compression(...) keyword, e.g. level=3 (repeatable; ints/floats parsed)")
    p.add_argument("--chunk-size-mib", type=float, help="ChunkingPolicy(chunk_size=...)")
    p.add_argument("--pack-size-mib", type=float, help="ChunkingPolicy(pack_size=...)")
    p.add_argument("--small-tensor-limit-mib", type=float, help="ChunkingPolicy(small_tensor_limit=...)")
    p.add_argument("--max-tensors", type=int, help="largest tensor count in scaling (default 100000; --quick 1000)")
    p.add_argument("--max-steps", type=int, help="largest step count in scaling (default 1000; --quick 10)")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()),
                   help="scratch parent dir (deleted after)")
    p.add_argument("--verify", action="store_true",
                   help="check every loaded tensor equals the saved one (small states)")
    p.add_argument("--in-process", action="store_true",
                   help="run ops in this process (fast smoke tests; RSS numbers are then not per-op)")
    p.add_argument("--cache-drop", choices=("auto", "fadvise"), default="auto",
                   help="auto: drop_caches when permitted (system-wide), else fadvise; fadvise: only our files")
    p.add_argument("--peer-python", help="python of a venv with torch and s3fs, for the DCP + fsspec rows")
    p.add_argument("--pin-server", action="store_true",
                   help="s3: run SeaweedFS on the last CPU and every measured op on the others, so the "
                        "server's CPU is not shared with the client's (as with a remote server)")
    p.add_argument("--op-timeout", type=float, default=1800.0, help="seconds before one op is killed")
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.size_gb = args.size_gb or (0.02 if args.quick else 1.24)
    args.max_tensors = args.max_tensors or (1000 if args.quick else 100_000)
    args.max_steps = args.max_steps or (10 if args.quick else 1000)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    for section in args.sections:
        if section not in ("local", "s3", "scaling"):
            p.error(f"--only: unknown section {section!r}")
    for name in [*args.states.split(","), *args.s3_states.split(",")]:
        if name not in STATES:
            p.error(f"unknown state {name!r}; choose from {', '.join(STATES)}")
    args.compression_opts = None
    if args.codec or args.codec_opt:
        opts: dict[str, Any] = {"codec": args.codec} if args.codec else {}
        for item in args.codec_opt:
            key, _, value = item.partition("=")
            opts[key] = _number(value)
        args.compression_opts = opts
    mib = 1 << 20
    chunking = {k: int(v * mib) for k, v in (("chunk_size", args.chunk_size_mib), ("pack_size", args.pack_size_mib),
                                             ("small_tensor_limit", args.small_tensor_limit_mib)) if v is not None}
    args.chunking_opts = chunking or None
    return args


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def spec_for(name: str, size_gb: float) -> StateSpec:
    dtype, adam = STATES[name]
    return StateSpec(model_bytes=int(size_gb * 1e9), dtype=dtype, adam=adam)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.tmp.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ckptstore-bench-", dir=args.tmp))
    args.scratch = tmp
    cache = PageCache(args.cache_drop)
    meta = {**machine_info(tmp), "cache_drop": cache.method, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "isolation": "in-process" if args.in_process else "fresh subprocess per measured op"}
    rows: list[Row] = []
    try:
        if "local" in args.sections:
            runner = Runner(args)
            for name in args.states.split(","):
                rows += local_section(args, spec_for(name, args.size_gb), runner, cache, tmp)
        if "s3" in args.sections:
            rows += _with_seaweedfs(args, cache, tmp)
        if "scaling" in args.sections:
            rows += scaling_section(args, Runner(args), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["loadavg_end"] = os.getloadavg()
    meta["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    entries = summarize(rows)
    print(f"# ckptstore benchmarks, {meta['date_utc']} UTC\n")
    for key in ("nproc", "ram_gib", "tmp_disk", "kernel", "python", "torch", "cache_drop", "isolation",
                "loadavg_start", "loadavg_end"):
        print(f"- {key}: {meta[key]}")
    print(markdown(entries))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": entries}, indent=1))
    return 0


def _with_seaweedfs(args: argparse.Namespace, cache: PageCache, tmp: Path) -> list[Row]:
    from ckptstore.testing.servers import start_seaweedfs

    workdir = tmp / "seaweedfs"
    _progress("starting SeaweedFS")
    # weed mini's own volume size (128 MiB), not the 16 MiB the test suite uses to fit a
    # volume per test bucket: with 16 MiB volumes the server spent most of an upload creating
    # volumes (4-thread boto3 upload of 1.24 GB: 15-17 s; 7.6-8.6 s with 128 MiB volumes,
    # 7.2-7.8 s with 1 GiB).
    server = start_seaweedfs(workdir, volume_size_limit_mb=None)
    server.data_dir = workdir  # type: ignore[attr-defined]  # what PageCache.drop walks
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")}
    env.update(server.env())
    saved_env = dict(os.environ)
    os.environ.update(server.env())  # --in-process ops and the s3torchconnector client read these
    saved_cpus = os.sched_getaffinity(0)
    if args.pin_server:
        _progress(_pin_apart(server.pid))
    try:
        bucket = server.new_bucket("bench")
        runner = Runner(args, env)
        rows: list[Row] = []
        for name in args.s3_states.split(","):
            rows += s3_section(args, spec_for(name, args.size_gb), runner, cache, tmp, server, bucket)
        return rows
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.sched_setaffinity(0, saved_cpus)
        server.stop()


def _pin_apart(server_pid: int) -> str:
    """Every thread of the server onto the last CPU, this process (and so the ops it starts)
    onto the rest; returns what was done, for the log."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return f"--pin-server ignored: only CPU {cpus} available"
    for tid in os.listdir(f"/proc/{server_pid}/task"):  # threads started later inherit it
        os.sched_setaffinity(int(tid), {cpus[-1]})
    os.sched_setaffinity(0, cpus[:-1])
    return f"SeaweedFS pinned to CPU {cpus[-1]}, measured ops to CPUs {cpus[:-1]}"


if __name__ == "__main__":
    sys.exit(main())
