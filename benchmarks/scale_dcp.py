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
  bytes, and that every planned item is found ("loads").
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DCPSIM = HERE.parent / "ckptstore" / "testing" / "dcpsim.py"

# Targets (issue 13, "Benchmark").
FINISH_S = 10.0
FINISH_EXTRA_MIB = 1024.0
METADATA_S = 2.0
METADATA_MIB = 16.0


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
