"""`python -m benchmarks --scale`: issue 13's scale simulation (no 840 GB needed).

    python -m benchmarks --scale [--only SECTION[,SECTION]] [--steps 10000] [--k 10]
                                 [--chunks 1000000] [--s3-chunks 20000] [--baseline REV]
                                 [--dir DIR] [--json FILE]

Sections (SECTIONS below; `--only` picks some):
- steps-local, steps-s3: a store of --steps steps on local disk / on SeaweedFS S3 (started
  from the pip-installed `weed`, ckptstore.testing.servers). Measured: ls (first, repeated,
  after k new steps) and gc (first, repeated with nothing new, after k new steps).
- gc-chunks: a store of --chunks 64-byte chunks (one "70B" step holding 23.1% of them, 231k
  of 10^6, the rest in steps of <= 250k) on local disk and memory://: a gc that frees nothing,
  then one that frees the big step (memory://: --memory-chunks, 10^5: its listing scans every
  key for each of gc's 514 prefixes, 46 s at 10^5); and on S3 a --s3-chunks store whose freeing gc's
  DeleteObjects requests are extrapolated to 231k chunks.
- dcp-1024: the 70B / 1024-rank DCP save and load; benchmarks/scale_dcp.py (owned by the
  lead) plugs in by defining `section(ctx: ScaleContext) -> list[Row]`.

Every measured operation runs in a fresh process (benchmarks/scale_op.py) through a
counting backend wrapper; `--baseline REV` runs each one again against a `git worktree` of
REV (default: the commit before issue 13's first change) on the same store, as "before".
Stores are built through Store.save (benchmarks/scale_build.py) in --dir, default /dev/shm
(tmpfs) when it exists: request counts do not depend on the filesystem, and this machine's
ext4 takes ~1.3 ms per file created (10^6 chunk files: 22 min).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: The code before issue 13's work: the parent of its first commit (3353df1, "Limits before
#: commit (issue 13)"); 496131f (ref summaries) and 917c446 (gc delete_many) came after it.
BASELINE_REV = "3353df1^"
BASELINE_DIR = Path("/tmp/scale-baseline")
#: One 70B step (issue 13): 231k chunks; S3 DeleteObjects takes 1,000 keys a request.
BIG_STEP_CHUNKS = 231_000
BIG_STEP_SHARE = BIG_STEP_CHUNKS / 1_000_000
CHUNKS_PER_STEP = 250_000

# Targets (issue 13, "Benchmark").
LS_FIRST_PER_STEP = 1.2
LS_REPEATED = 50
GC_REPEATED_READS = 50
FREE_70B_DELETES = 300


@dataclass
class Row:
    section: str
    op: str
    backend: str
    code: str = "after"  # "after": this tree; "before": --baseline REV
    requests: dict[str, int] = field(default_factory=dict)
    reads: int = 0
    list_pages: int = 0
    delete_requests: int = 0
    total_requests: int = 0
    bytes_read: int = 0
    wall_s: float = 0.0
    peak_rss_mib: float = 0.0
    target: str = ""
    value: float | None = None  # what the target is checked against
    met: bool | None = None
    note: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScaleContext:
    args: argparse.Namespace
    dir: Path
    baseline_root: Path | None
    _s3: Any = None
    _steps_local: Path | None = None

    def progress(self, message: str) -> None:
        print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    # -- S3 ------------------------------------------------------------------------------
    def s3(self) -> Any:
        """The SeaweedFS server of this run (started on first use; stopped by `close`)."""
        if self._s3 is None:
            from ckptstore.testing.servers import s3_server_from_env, start_seaweedfs

            self.progress("starting SeaweedFS")
            self._s3 = s3_server_from_env() or start_seaweedfs(self.dir / "seaweedfs", volume_size_limit_mb=None)
        return self._s3

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")}
        if self._s3 is not None:
            env.update(self._s3.env())
        env["PYTHONWARNINGS"] = "ignore"
        return env

    def close(self) -> None:
        if self._s3 is not None:
            self._s3.stop()

    # -- subprocesses ----------------------------------------------------------------------
    def python(self, module: str, *argv: str, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=env or self.env(),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{module} {' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-3000:]}")
        return proc.stdout

    def build(self, *argv: str, workers: int = 1) -> float:
        """benchmarks.scale_build in `workers` processes at once; returns wall seconds."""
        started = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.scale_build", *argv, "--worker", str(i),
                                   "--workers", str(workers)], cwd=REPO, env=self.env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i in range(workers)]
        errors = [p.communicate()[1] for p in procs]
        for p, err in zip(procs, errors, strict=True):
            if p.returncode != 0:
                raise RuntimeError(f"scale_build {' '.join(argv)} failed: {err[-3000:]}")
        return time.perf_counter() - started

    def measure(self, op: str, url: str, *, cache: Path, code_root: Path | None = None,
                extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Run benchmarks.scale_op in a fresh process; its JSON lines."""
        env = self.env()
        env["CKPTSTORE_CACHE_DIR"] = str(cache)
        env["XDG_CACHE_HOME"] = str(cache)
        argv = [op, url, *extra] + (["--code-root", str(code_root)] if code_root else [])
        out = self.python("benchmarks.scale_op", *argv, env=env)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def codes(self) -> list[tuple[str, Path | None]]:
        """("after", None) and, with --baseline, ("before", the baseline checkout)."""
        return [("after", None)] + ([("before", self.baseline_root)] if self.baseline_root else [])

    def new_url(self, name: str, backend: str) -> str:
        if backend == "local":
            path = self.dir / name
            shutil.rmtree(path, ignore_errors=True)
            return str(path)
        if backend == "s3":
            return f"s3://{self.s3().new_bucket('scale')}/{name}"
        raise ValueError(backend)


def row_from(section: str, op: str, backend: str, code: str, m: dict[str, Any], **kw: Any) -> Row:
    note = kw.pop("note", "")
    gc = m.get("gc")
    if gc is not None and (not gc.get("ran") or gc.get("failed")):
        note = (note + "; " if note else "") + f"gc did not finish: {gc.get('reason')!r}"
    return Row(section, op, backend, code, requests=dict(m["requests"], list_pages=m["list_pages"]),
               reads=m["reads"], list_pages=m["list_pages"], delete_requests=m["delete_requests"],
               total_requests=m["total_requests"], bytes_read=m["bytes_read"], wall_s=m["wall_s"],
               peak_rss_mib=m["peak_rss_mib"], note=note, raw=m, **kw)


def check(row: Row, value: float, limit: float, target: str) -> Row:
    row.value, row.target, row.met = value, target, value <= limit
    return row


# -- steps-local / steps-s3 -------------------------------------------------------------------
def steps_store(ctx: ScaleContext) -> Path:
    """The local store of --steps steps (built once a run, then mirrored for S3)."""
    if ctx._steps_local is None:
        path = ctx.dir / "steps-local"
        shutil.rmtree(path, ignore_errors=True)
        n = ctx.args.steps
        ctx.progress(f"building {n} steps through Store.save ({ctx.args.workers} processes)")
        seconds = ctx.build("steps", str(path), "--first", "0", "--count", str(n), workers=ctx.args.workers)
        ctx.progress(f"built {n} steps in {seconds:.0f} s ({seconds / n * 1000:.1f} ms a step)")
        pristine = ctx.dir / "steps-pristine"
        shutil.rmtree(pristine, ignore_errors=True)
        shutil.copytree(path, pristine)
        ctx._steps_local = pristine
    return ctx._steps_local


def _steps_section(ctx: ScaleContext, backend: str) -> list[Row]:
    """One store; each operation measured with this tree's code and then (--baseline) with
    the baseline's, on the same store and each with a cache dir of its own."""
    section = f"steps-{backend}"
    n, k = ctx.args.steps, ctx.args.k
    pristine = steps_store(ctx)
    url = ctx.new_url(section, backend)
    if backend == "local":
        shutil.copytree(pristine, url)
    else:
        ctx.progress(f"mirroring the {n}-step store into {url}")
        started = time.perf_counter()
        ctx.python("benchmarks.scale_build", "mirror", url, "--source", str(pristine))
        ctx.progress(f"mirrored in {time.perf_counter() - started:.0f} s")
    for code, _ in ctx.codes():
        shutil.rmtree(ctx.dir / f"cache-{section}-{code}", ignore_errors=True)

    def each(op: str, label: str) -> list[Row]:
        rows = []
        for code, root in ctx.codes():
            ctx.progress(f"{section} {code}: {label}")
            (m,) = ctx.measure(op, url, cache=ctx.dir / f"cache-{section}-{code}", code_root=root)
            rows.append(row_from(section, label, backend, code, m))
        return rows

    rows: list[Row] = []
    rows += [check(r, r.total_requests / n, LS_FIRST_PER_STEP, f"<= {LS_FIRST_PER_STEP} req/step")
             for r in each("ls", "ls first")]
    rows += [check(r, r.total_requests, LS_REPEATED, f"<= {LS_REPEATED} requests") for r in each("ls", "ls repeated")]
    rows += each("gc", "gc first")
    rows += [check(r, r.reads, GC_REPEATED_READS, f"<= {GC_REPEATED_READS} reads (GET+HEAD)")
             for r in each("gc", "gc repeated")]
    ctx.progress(f"{section}: saving {k} new steps (this tree's Store.save)")
    ctx.build("steps", url, "--first", str(n), "--count", str(k), "--no-fast")
    rows += [check(r, r.reads, GC_REPEATED_READS + 2 * k, f"<= {GC_REPEATED_READS}+2k reads (O(k))")
             for r in each("gc", f"gc after {k} new")]
    rows += [check(r, r.total_requests, LS_REPEATED + k, f"<= {LS_REPEATED}+k requests")
             for r in each("ls", f"ls after {k} new")]
    if backend == "local":
        shutil.rmtree(url, ignore_errors=True)
    return rows


def steps_local(ctx: ScaleContext) -> list[Row]:
    return _steps_section(ctx, "local")


def steps_s3(ctx: ScaleContext) -> list[Row]:
    return _steps_section(ctx, "s3")


# -- gc-chunks ------------------------------------------------------------------------------
def chunk_plan(total: int) -> list[tuple[int, int, int]]:
    """(step, chunks, offset): step 0 holds the big step's share, the rest <= 250k a step."""
    big = max(1, round(total * BIG_STEP_SHARE))
    plan, offset, step = [(0, big, 0)], big, 1
    while offset < total:
        count = min(CHUNKS_PER_STEP, total - offset)
        plan.append((step, count, offset))
        offset, step = offset + count, step + 1
    return plan


def build_chunk_store(ctx: ScaleContext, path: Path, total: int) -> float:
    shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    plan = chunk_plan(total)
    for i in range(0, len(plan), ctx.args.workers):
        batch = plan[i:i + ctx.args.workers]
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.scale_build", "chunks", str(path), "--step",
                                   str(s), "--chunks", str(c), "--offset", str(o)], cwd=REPO, env=ctx.env(),
                                  stderr=subprocess.PIPE, text=True) for s, c, o in batch]
        for p in procs:
            err = p.communicate()[1]
            if p.returncode != 0:
                raise RuntimeError(f"scale_build chunks failed: {err[-3000:]}")
    return time.perf_counter() - started


def _link_copy(src: Path, dst: Path) -> None:
    """A hard-link copy (fast; a gc deleting in one copy leaves the other whole)."""
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True)


def gc_chunks(ctx: ScaleContext) -> list[Row]:
    section = "gc-chunks"
    rows: list[Row] = []
    free = ("--min-age", "0", "--free-step", "0")
    built: dict[int, Path] = {}
    sizes = [t for t in (ctx.args.memory_chunks, ctx.args.chunks) if t > 0]
    for backend, total in (("memory", ctx.args.memory_chunks), ("local", ctx.args.chunks)):
        if total <= 0:
            continue
        big = chunk_plan(total)[0][1]
        pristine = built.get(total) or ctx.dir / f"chunks-pristine-{total}"
        if total not in built:
            ctx.progress(f"building a {total}-chunk store through Store.save")
            seconds = build_chunk_store(ctx, pristine, total)
            ctx.progress(f"built in {seconds:.0f} s")
            built[total] = pristine
        for code, root in ctx.codes():
            cache = ctx.dir / f"cache-{section}-{backend}-{code}"
            shutil.rmtree(cache, ignore_errors=True)
            if backend == "memory":  # mirror, gc, gc-free, all in one process
                ctx.progress(f"{section} {code}: memory:// (mirror, gc, gc freeing step 0)")
                ms = ctx.measure("gc", f"memory://scale-{code}", cache=cache, code_root=root,
                                 extra=("--mirror-from", str(pristine), "--ops", "gc,gc-free", *free))
                rows.append(row_from(section, f"gc mark+sweep ({total} chunks)", "memory", code, ms[0],
                                     note="memory:// lists a prefix by scanning every key: 514 scans"))
                rows.append(row_from(section, f"gc freeing {big} chunks", "memory", code, ms[1],
                                     note=f"{r_deleted(ms[1])} chunks deleted"))
                continue
            url = ctx.dir / f"chunks-{code}"
            _link_copy(pristine, url)
            ctx.progress(f"{section} {code}: local gc")
            (m,) = ctx.measure("gc", str(url), cache=cache, code_root=root, extra=("--min-age", "0"))
            rows.append(row_from(section, f"gc mark+sweep ({total} chunks)", "local", code, m))
            ctx.progress(f"{section} {code}: local gc freeing step 0")
            (m,) = ctx.measure("gc-free", str(url), cache=cache, code_root=root, extra=free)
            rows.append(row_from(section, f"gc freeing {big} chunks", "local", code, m,
                                 note=f"{r_deleted(m)} chunks deleted; del req = delete calls plus delete_many "
                                      "calls as the wrapper sees them (local: 100 keys a call, no request cost)"))
            shutil.rmtree(url, ignore_errors=True)
        sizes.remove(total)
        if total not in sizes:
            shutil.rmtree(pristine, ignore_errors=True)
    if ctx.args.s3_chunks > 0:
        rows += _gc_free_s3(ctx)
    return rows


def r_deleted(m: dict[str, Any]) -> str:
    gc = m.get("gc") or {}
    return f"{gc.get('deleted_chunks')}"


def project_free(m: dict[str, Any]) -> tuple[int, str]:
    """The delete requests of a gc freeing one 70B step's 231k chunks, from a measured gc that
    freed fewer: batched (delete_many), ceil(231k / keys a request) plus the other deletes
    (gc's lock); key by key (the code before issue 13), 231k plus the other deletes."""
    gc = m.get("gc") or {}
    deleted = int(gc.get("deleted_chunks") or 0)
    singles = m["delete_requests"] - m["delete_many_requests"]
    if m["delete_many_requests"]:
        batch = m["delete_batch_max"]
        projected = math.ceil(BIG_STEP_CHUNKS / batch) + singles
        formula = f"ceil({BIG_STEP_CHUNKS} / {batch} keys a request) + {singles} = {projected}"
    else:
        other = max(0, singles - deleted - int(gc.get("deleted_manifests") or 0))
        projected = BIG_STEP_CHUNKS + other
        formula = f"{BIG_STEP_CHUNKS} (one a key) + {other} = {projected}"
    return projected, (f"{deleted} chunks deleted in {m['delete_requests']} delete requests ({singles} single); "
                       f"70B step: {formula}")


def _gc_free_s3(ctx: ScaleContext) -> list[Row]:
    section, n = "gc-chunks", ctx.args.s3_chunks
    path = ctx.dir / "chunks-s3-src"
    ctx.progress(f"building a {n}-chunk step for S3")
    shutil.rmtree(path, ignore_errors=True)
    ctx.build("chunks", str(path), "--step", "0", "--chunks", str(n), "--offset", "0")
    ctx.build("chunks", str(path), "--step", "1", "--chunks", "16", "--offset", str(n))
    rows = []
    for code, root in ctx.codes():
        url = ctx.new_url(f"chunks-{code}", "s3")
        ctx.python("benchmarks.scale_build", "mirror", url, "--source", str(path))
        ctx.progress(f"{section} {code}: S3 gc freeing {n} chunks")
        (m,) = ctx.measure("gc-free", url, cache=ctx.dir / f"cache-s3free-{code}", code_root=root,
                           extra=("--min-age", "0", "--free-step", "0"))
        projected, formula = project_free(m)
        r = row_from(section, f"gc freeing {n} chunks", "s3", code, m, note=formula)
        rows.append(check(r, projected, FREE_70B_DELETES, f"<= {FREE_70B_DELETES} deletes for 231k chunks"))
    shutil.rmtree(path, ignore_errors=True)
    return rows


# -- registry --------------------------------------------------------------------------------
Section = Callable[[ScaleContext], "list[Row]"]


def _dcp_section() -> Section | None:
    """benchmarks/scale_dcp.py's `section`, once the lead has written it."""
    try:
        from benchmarks import scale_dcp
    except ImportError:
        return None
    return getattr(scale_dcp, "section", None)


SECTIONS: dict[str, Section | None] = {
    "steps-local": steps_local,
    "steps-s3": steps_s3,
    "gc-chunks": gc_chunks,
    "dcp-1024": _dcp_section(),  # the lead's benchmarks/scale_dcp.py: section(ctx) -> list[Row]
}


# -- output ----------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def table(rows: list[Row]) -> str:
    lines = []
    for section in dict.fromkeys(r.section for r in rows):
        lines.append(f"\n## {section}")
        head = ("op", "backend", "code", "requests by kind", "reads", "list pages", "del req", "MiB read",
                "wall s", "peak RSS MiB", "target", "met")
        body = []
        for r in (r for r in rows if r.section == section):
            kinds = " ".join(f"{k}={v}" for k, v in r.requests.items() if k != "list_pages")
            met = "" if r.met is None else ("yes" if r.met else "NO")
            target = f"{r.target} (got {r.value:g})" if r.target and r.value is not None else r.target
            body.append((r.op, r.backend, r.code, kinds, str(r.reads), str(r.list_pages), str(r.delete_requests),
                         _mib(r.bytes_read), f"{r.wall_s:.2f}", f"{r.peak_rss_mib:.0f}", target, met))
        widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
        fmt = " | ".join(f"{{:{w}}}" for w in widths)
        lines.append(fmt.format(*head))
        lines.append("-+-".join("-" * w for w in widths))
        lines += [fmt.format(*b) for b in body]
        notes = [f"  {r.op} ({r.backend}, {r.code}): {r.note}" for r in rows if r.section == section and r.note]
        lines += notes
    return "\n".join(lines)


@contextmanager
def baseline_checkout(rev: str) -> Iterator[Path]:
    """`git worktree add` of `rev` at /tmp/scale-baseline (removed afterwards)."""
    path = BASELINE_DIR
    if path.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=REPO, check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks --scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--k", type=int, default=10, help="new steps before the last gc and ls")
    p.add_argument("--chunks", type=int, default=1_000_000)
    p.add_argument("--memory-chunks", type=int, default=100_000,
                   help="the memory:// gc store (its list scans every key per prefix: O(keys) x 514)")
    p.add_argument("--s3-chunks", type=int, default=10_000, help="0: no S3 part in gc-chunks")
    p.add_argument("--workers", type=int, default=2, help="build processes")
    p.add_argument("--baseline", nargs="?", const=BASELINE_REV, default=None, metavar="REV",
                   help=f"also measure REV's code on the same stores (default REV: {BASELINE_REV})")
    p.add_argument("--dir", default="", help="scratch dir (default: /dev/shm if present, else the temp dir)")
    p.add_argument("--json", default="", metavar="FILE")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    base = Path(args.dir) if args.dir else Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ckptstore-scale-", dir=base))
    rows: list[Row] = []
    skipped: list[str] = []
    failed: list[str] = []
    started = time.perf_counter()
    load_before = os.getloadavg()
    with (baseline_checkout(args.baseline) if args.baseline else _nothing()) as root:
        ctx = ScaleContext(args, work, root)
        try:
            for name in names:
                section = SECTIONS[name]
                if section is None:
                    skipped.append(name)
                    ctx.progress(f"{name}: not built yet (benchmarks/scale_dcp.py)")
                    continue
                try:
                    rows += section(ctx)
                except Exception as exc:  # report it, and measure the other sections
                    failed.append(f"{name}: {exc!r}"[:2000])
                    ctx.progress(f"{name} failed: {exc!r}"[:2000])
                _write_json(args, rows, {"sections": names, "complete": False, "failed": failed})
        finally:
            ctx.close()
            shutil.rmtree(work, ignore_errors=True)
    meta = {"sections": names, "complete": True, "skipped": skipped, "failed": failed,
            "steps": args.steps, "k": args.k, "chunks": args.chunks,
            "memory_chunks": args.memory_chunks,
            "s3_chunks": args.s3_chunks, "baseline": args.baseline, "dir": str(base),
            "wall_s": time.perf_counter() - started, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "cpus": os.cpu_count(),
            "rss": "VmHWM of each operation's own process, reset just before the operation"}
    print(table(rows))
    print(f"\nload average before/after: {load_before} / {meta['loadavg_after']}; wall {meta['wall_s']:.0f} s")
    if skipped:
        print(f"not built yet: {', '.join(skipped)}")
    if failed:
        print("failed: " + "; ".join(failed))
    _write_json(args, rows, meta)
    return 1 if failed else 0


def _write_json(args: argparse.Namespace, rows: list[Row], meta: dict[str, Any]) -> None:
    """--json FILE: written after each section (meta.complete False) and at the end."""
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    with suppress(KeyboardInterrupt):
        sys.exit(main())
