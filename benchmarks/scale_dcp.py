"""The dcp-1024 section of `python -m benchmarks --scale`: a 70B model's DCP save and load over
R ranks, with the real metadata and write results, the real coordinator (`StoreWriter.finish`)
and the real reader (`StoreReader.read_metadata`, and for sampled ranks the parts their plans
need), on memory:// in one process; tensors are one-element stand-ins, since only metadata is
measured (ckptstore/testing/dcpsim.py: Llama-3 70B, params + Adam, dim-0 shards, 2,892 fqns).

    python -m benchmarks.scale_dcp --ranks 1024 [--code-root DIR]   # one JSON line

Measured (each phase after a peak-RSS reset, through benchmarks.scale_op's counting wrapper):
- write: every rank's write_data in turn (not a target: R ranks run it in parallel);
- finish: the coordinator's finish: wall, extra peak RSS over the RSS before it, requests;
  the root (or v1 manifest) size;
- metadata: one rank's read_metadata: wall, bytes read, requests (every rank does the same);
- parts: for ranks 0, R/2, R-1, the parts their plans (the saved sharding) need: requests,
  bytes, and that every planned item is found ("loads");
- resave: the whole DCP save of the same data again (step 2: every rank's prepare_local_plan,
  the coordinator's prepare_global_plan, every rank's write_data, finish), all requests. With
  one-element stand-ins the step has few chunks, so requests per chunk are computed against
  the chunk count the real 840 GB would have (`real_chunks`: the real shard sizes through the
  real `plan_chunks`, for the local default chunk size and for S3's): valid because a re-save
  of unchanged data makes no request per data chunk, which the phase checks (no chunk put, and
  chunk reads and heads only of parts and tables).
--code-root runs the same against another checkout (the "before"): dcpsim is loaded from
this tree's file, and uses whatever `ckptstore.dcp` the checkout has.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DCPSIM = HERE.parent / "ckptstore" / "testing" / "dcpsim.py"

# Targets (issue 13, "Benchmark").
FINISH_S = 10.0
FINISH_EXTRA_MIB = 1024.0
METADATA_S = 2.0
METADATA_MIB = 16.0
RESAVE_PER_CHUNK = 0.1
S3_DELETE_BATCH = 1000  # DeleteObjects keys a request (memory:// counts batches of 100)


def _dcpsim() -> Any:
    spec = importlib.util.spec_from_file_location("dcpsim_for_scale", DCPSIM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _measured(fn: Any, counting: Any) -> dict[str, Any]:
    from benchmarks.scale_op import _peak_rss_reset, _status_kib, summary

    counting.calls.clear()
    counting.by_key.clear()
    counting.bytes_read = 0
    rss_before = _peak_rss_reset()
    started = time.perf_counter()
    out: dict[str, Any] = {}
    try:
        out["result"] = fn()
        out["ok"] = True
    except Exception as exc:  # the "before" code fails at 1024 ranks: that is a result
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        out["traceback"] = traceback.format_exc()[-1500:]
    out["wall_s"] = time.perf_counter() - started
    out["peak_rss_mib"] = _status_kib("VmHWM") / 1024
    out["rss_before_mib"] = rss_before / 2**20
    out["extra_rss_mib"] = out["peak_rss_mib"] - out["rss_before_mib"]
    out.update(summary(counting))
    return out


def real_chunks(model: Any, ranks: int, chunk_size: int | None, sim: Any) -> int:
    """Chunks the real step would have: each rank's real shard sizes through plan_chunks with the
    default policy for `chunk_size` (None: the local default)."""
    import torch

    from ckptstore.chunking import ChunkingPolicy, plan_chunks

    policy = ChunkingPolicy() if chunk_size is None else ChunkingPolicy(chunk_size=chunk_size)
    total = 0
    for rank in range(ranks):
        sizes = []
        for shape, dtype in model.values():
            found = sim.shard(shape, rank, ranks)
            if found is not None:
                sizes.append(torch.Size(found[1]).numel() * torch.empty((), dtype=dtype).element_size())
        total += len(plan_chunks(sizes, policy).chunks)
    return total


def run(ranks: int, code_root: str = "") -> dict[str, Any]:
    from benchmarks.scale_op import counting_backend, use_checkout

    if code_root:
        use_checkout(Path(code_root))
    import torch

    import ckptstore

    sim = _dcpsim()
    model = sim.llama_70b()
    params = sum(torch.Size(s).numel() for n, (s, _) in model.items() if n.startswith("model."))
    out: dict[str, Any] = {"ranks": ranks, "fqns": len(model), "params": params,
                           "code": str(Path(ckptstore.__file__).parent.parent)}
    url = f"memory://scale-dcp-{ranks}"
    store = ckptstore.open(url)
    counting = counting_backend(store.backend)
    store.backend = counting

    def tiny(_fqn: str, _offsets: Any, _sizes: Any) -> Any:
        return torch.zeros(1, dtype=torch.float32)

    started = time.perf_counter()
    written = [sim.write_ranks(store, 1, model, ranks, tiny)]
    out["write_all_ranks_s"] = time.perf_counter() - started
    out["items"] = sum(len(p.items) for p in written[0].plans)
    out["write_results"] = sum(len(r) for r in written[0].results)

    def finish() -> None:
        done = written[0]
        try:
            done.writers[0].finish(done.metadata, done.results)
        finally:
            for writer in done.writers:
                writer.release()

    out["finish"] = _measured(finish, counting)
    written.clear()  # the plans and results: not part of what a reader holds
    if not out["finish"]["ok"]:
        return out
    digest = store.ref(1).manifest
    out["manifest_bytes"] = len(counting.inner.get(f"manifests/{digest[:2]}/{digest}").data)

    reader_store = ckptstore.open(url, create=False)
    reader_counting = counting_backend(reader_store.backend)
    reader_store.backend = reader_counting
    from ckptstore.dcp import StoreReader

    reader = StoreReader(reader_store, 1)
    out["metadata"] = _measured(lambda: len(reader.read_metadata().state_dict_metadata), reader_counting)
    if not out["metadata"]["ok"]:
        return out
    metadata = reader.read_metadata()
    out["parts"] = []
    for rank in sorted({0, ranks // 2, ranks - 1}):
        plan = sim.read_plan(metadata, model, rank, ranks)
        wanted = {item.storage_index for item in plan.items}
        load_parts = getattr(reader, "_load_parts", lambda _w: None)  # the v1 reader holds every item already

        def parts(wanted: set[Any] = wanted, load_parts: Any = load_parts) -> dict[str, int]:
            load_parts(wanted)
            found = sum(1 for index in wanted if index in reader._items)
            return {"planned": len(wanted), "found": found}

        row = _measured(parts, reader_counting)
        row["rank"] = rank
        out["parts"].append(row)

    # A re-save of the same data: the whole DCP save of step 2, planning included. A gc has run
    # before (not counted), as in any store that lives: the epoch exists, so reading it is a
    # head and a get.
    store.gc(min_age=3600)
    step1 = store.manifest_object(digest)
    blob_keys = {f"chunks/{b.digest[:2]}/{b.digest}" for b in getattr(step1, "blobs", ())}
    from ckptstore.testing.wrappers import CountingBackend

    def resave() -> dict[str, Any]:
        done = sim.write_ranks(store, 2, model, ranks, tiny)
        try:
            done.writers[0].finish(done.metadata, done.results)
        finally:
            for writer in done.writers:
                writer.release()
        return {"chunks": getattr(step1, "chunks", 0)}

    memory = counting.inner
    logged = counting.inner = CountingBackend(memory)  # which keys, not only prefixes (few: a re-save)
    try:
        out["resave"] = _measured(resave, counting)
    finally:
        counting.inner = memory
    chunk_log = [(op, key) for op, key in logged.log if key.startswith("chunks/") and op in ("put", "head", "get")]
    if out["resave"]["ok"]:
        step2 = store.manifest_object(store.ref(2).manifest)
        new_blobs = {f"chunks/{b.digest[:2]}/{b.digest}" for b in getattr(step2, "blobs", ())}
        out["resave"]["data_chunk_requests"] = sum(1 for _, key in chunk_log if key not in blob_keys | new_blobs)
        out["resave"]["chunk_puts"] = sum(1 for op, _ in chunk_log if op == "put")
        out["resave"]["chunk_requests"] = dict(Counter(op for op, _ in chunk_log))
        leases = out["resave"]["delete_keys"]
        out["resave"]["s3_delete_requests"] = -(-leases // S3_DELETE_BATCH) if leases else 0
        out["real_chunks"] = {"local": real_chunks(model, ranks, None, sim),
                              "s3": real_chunks(model, ranks, 64 * 2**20, sim)}
    return out


def section(ctx: Any) -> list[Any]:
    """Rows for benchmarks/scale.py: each --dcp-ranks size, after (and before with --baseline)."""
    from benchmarks.scale import Row

    rows: list[Row] = []
    for ranks in [int(r) for r in str(getattr(ctx.args, "dcp_ranks", "1024")).split(",")]:
        for code, root in ctx.codes():
            ctx.progress(f"dcp-1024: {ranks} ranks, {code}")
            argv = ["--ranks", str(ranks)] + (["--code-root", str(root)] if root else [])
            lines = [json.loads(line) for line in ctx.python("benchmarks.scale_dcp", *argv).splitlines()
                     if line.startswith("{")]
            rows.extend(rows_from(lines[-1], code))
    return rows


def rows_from(m: dict[str, Any], code: str) -> list[Any]:
    from benchmarks.scale import Row, check

    ranks = m["ranks"]
    backend = f"memory, {ranks} ranks"

    def row(op: str, phase: dict[str, Any], note: str = "") -> Row:
        return Row("dcp-1024", op, backend, code, requests=dict(phase["requests"], list_pages=phase["list_pages"]),
                   reads=phase["reads"], list_pages=phase["list_pages"], delete_requests=phase["delete_requests"],
                   total_requests=phase["total_requests"], bytes_read=phase["bytes_read"], wall_s=phase["wall_s"],
                   peak_rss_mib=phase["peak_rss_mib"],
                   note=(note if phase["ok"] else f"FAILED: {phase['error']}"), raw=phase)

    finish = m["finish"]
    out = [check(row("coordinator finish", finish,
                     f"extra RSS {finish['extra_rss_mib']:.0f} MiB; manifest {m.get('manifest_bytes', 0) / 2**20:.2f} "
                     f"MiB; {m['items']} items, {m['write_results']} write results"),
                 finish["wall_s"] if finish["ok"] else float("inf"), FINISH_S, f"<= {FINISH_S:.0f} s")]
    out.append(check(row("coordinator finish RSS", finish, "extra peak RSS over the RSS before finish"),
                     finish["extra_rss_mib"], FINISH_EXTRA_MIB, f"<= {FINISH_EXTRA_MIB:.0f} MiB extra"))
    if "metadata" in m:
        md = m["metadata"]
        out.append(check(row("read_metadata (one rank)", md, "every rank does the same"),
                         md["wall_s"] if md["ok"] else float("inf"), METADATA_S, f"<= {METADATA_S:.0f} s"))
        out.append(check(row("read_metadata bytes", md), md["bytes_read"] / 2**20 if md["ok"] else float("inf"),
                         METADATA_MIB, f"<= {METADATA_MIB:.0f} MiB read"))
    if "resave" in m:
        rs = m["resave"]
        ok = rs["ok"] and rs.get("data_chunk_requests") == 0 and rs.get("chunk_puts") == 0
        total = rs["total_requests"]
        s3_total = total - rs["delete_requests"] + rs.get("s3_delete_requests", 0)
        real = m.get("real_chunks", {})
        per_rank = total / ranks
        note = (f"{total} requests ({per_rank:.2f} a rank), {rs.get('data_chunk_requests')} on data chunks, "
                f"{rs.get('chunk_puts')} chunk puts; stand-in step {rs.get('result', {}).get('chunks')} chunks")
        if not ok and rs["ok"]:
            note = "FAILED: a re-save touched data chunks; " + note
        out.append(check(row("re-save, unchanged data (local chunk size)", rs,
                             note + f"; real step {real.get('local', 0):,} chunks (16 MiB chunks, 4 MiB packs)"),
                         total / real["local"] if ok and real.get("local") else float("inf"),
                         RESAVE_PER_CHUNK, f"<= {RESAVE_PER_CHUNK} requests a chunk"))
        out.append(check(row("re-save, unchanged data (S3 chunk size)", rs,
                             f"{s3_total} requests with DeleteObjects batches of {S3_DELETE_BATCH}; real step "
                             f"{real.get('s3', 0):,} chunks (64 MiB chunks, 16 MiB packs)"),
                         s3_total / real["s3"] if ok and real.get("s3") else float("inf"),
                         RESAVE_PER_CHUNK, f"<= {RESAVE_PER_CHUNK} requests a chunk"))
    for p in m.get("parts", []):
        res = p.get("result") or {}
        loads = p["ok"] and res.get("found") == res.get("planned")
        out.append(check(row(f"rank {p['rank']}: parts its plan needs", p,
                             f"{res.get('found')} of {res.get('planned')} planned items found"),
                         0.0 if loads else 1.0, 0.0, "every planned item found (loads)"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_dcp")
    p.add_argument("--ranks", type=int, default=1024)
    p.add_argument("--code-root", default="")
    args = p.parse_args(argv)
    print(json.dumps(run(args.ranks, args.code_root), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
