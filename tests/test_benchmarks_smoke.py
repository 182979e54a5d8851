"""The benchmark harness in its smallest mode: a 2 MB model, one run, local section only.

Runs the real command line (`python -m benchmarks`) and checks the JSON it writes has a row
for every tool the local section must measure, each with a measured time, and that loads
return every byte saved (--verify also compares every loaded tensor with the saved one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

SAVES = ["raw_write", "torch_save", "safetensors_save", "dcp_save", "ckptstore_save"]
LOADS = ["raw_read", "raw_read_4t", "torch_load", "torch_load_mmap", "safetensors_load", "dcp_load", "ckptstore_load",
         "ckptstore_load_into"]


def test_quick_local_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--size-gb", "0.002", "--runs", "1", "--only", "local",
         "--states", "model-fp32", "--in-process", "--cache-drop", "fadvise", "--verify",
         "--tmp", str(tmp_path), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {row["id"]: row for row in data["rows"]}
    state = "model fp32"
    expected = ([f"local-save/{state}/{t}" for t in SAVES] + [f"local-load/{state}/{t}" for t in LOADS]
                + [f"local-resave/{state}/torch_save_changed", f"local-resave/{state}/ckptstore_resave",
                   f"async/{state}/staging_clone", f"async/{state}/async_save"])
    assert sorted(rows) == sorted(expected)
    for row_id in expected:
        row = rows[row_id]
        if row_id.endswith("async_save") and row["status"] == "skipped":
            assert "save_async" in row["note"]  # only when the package has no save_async
            continue
        assert row["status"] == "ok", (row_id, row["note"])
        assert len(row["runs"]) == 1 and row["seconds"]["median"] > 0, row_id
    state_bytes = rows[f"local-save/{state}/raw_write"]["state_bytes"]
    assert 1_500_000 < state_bytes < 2_500_000
    for tool in LOADS:
        assert rows[f"local-load/{state}/{tool}"]["state_bytes"] == state_bytes, tool
    assert rows[f"local-save/{state}/torch_save"]["ratio"] > 0
    resave = rows[f"local-resave/{state}/ckptstore_resave"]
    assert 0 < resave["changed_bytes"]["median"] < state_bytes
    assert resave["growth_bytes"]["median"] > 0
    assert "model fp32" in proc.stdout and "local-load" in proc.stdout  # the printed table
    assert data["meta"]["cache_drop"].startswith("posix_fadvise")


def test_integrations_times_lightning_save_and_resume(tmp_path: Path) -> None:
    """`--integrations`: the Lightning row has all four ops timed and both ratios; an unknown
    integration name is a usage error naming the known ones."""
    out = tmp_path / "integrations.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--integrations", "--runs", "1", "--which", "lightning",
         "--tmp", str(tmp_path), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["integration"] == "lightning" and row["status"] == "ok", row
    assert all(row["seconds"][op] > 0 for op in ("own_save", "store_save", "own_resume", "store_resume"))
    assert row["save_ratio"] == row["seconds"]["store_save"] / row["seconds"]["own_save"]
    assert "| lightning |" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["integrations.json"]  # scratch removed
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "--integrations", "--which", "nope"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown integration(s) nope; known: lightning, " in bad.stderr


def _scale(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--scale", *argv, "--dir", str(tmp_path / "scratch"),
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_scale_steps_and_gc_chunks_at_tiny_size(tmp_path: Path) -> None:
    """`--scale` (issue 13) at tiny N: every row has requests by kind, bytes, wall and peak RSS;
    ls reads one ref per step the first time and only the listing and the marker when repeated
    (the same count after k new steps, plus k: constant in N); a gc that frees a step deletes in
    delete_many batches, not key by key."""
    steps, k, chunks = 20, 2, 1000
    proc, data = _scale(tmp_path, "--only", "steps-local,gc-chunks", "--steps", str(steps), "--k", str(k),
                        "--chunks", str(chunks), "--memory-chunks", str(chunks), "--s3-chunks", "0")
    rows = {(r["section"], r["op"], r["backend"]): r for r in data["rows"]}
    big = round(chunks * 0.231)
    assert sorted(rows) == sorted(
        [("steps-local", op, "local") for op in ("ls first", "ls repeated", "gc first", "gc repeated",
                                                 f"gc after {k} new", f"ls after {k} new")]
        + [("gc-chunks", op, b) for op in (f"gc mark+sweep ({chunks} chunks)", f"gc freeing {big} chunks")
           for b in ("memory", "local")])
    for row in rows.values():
        assert row["code"] == "after" and row["wall_s"] > 0 and row["peak_rss_mib"] > 0, row
        assert row["total_requests"] > 0 and row["requests"], row
        assert row["raw"]["gc"]["ran"] and not row["raw"]["gc"]["failed"] if "gc" in row["raw"] else True, row
    first, again = rows[("steps-local", "ls first", "local")], rows[("steps-local", "ls repeated", "local")]
    later = rows[("steps-local", f"ls after {k} new", "local")]
    assert first["raw"]["by_key"]["get refs"] == steps and "get manifests" not in first["raw"]["by_key"]
    assert first["met"] is True and first["value"] <= 1.2
    assert again["met"] is True and "get refs" not in again["raw"]["by_key"]
    assert first["total_requests"] - steps == again["total_requests"] == later["total_requests"] - k
    for row in rows.values():
        assert (row["met"] is None) == (row["target"] == ""), row
    freed = rows[("gc-chunks", f"gc freeing {big} chunks", "local")]
    assert freed["raw"]["gc"]["deleted_chunks"] == big
    # In batches of 100 keys locally (the manifest may take a batch of its own), none key by key.
    assert -(-big // 100) <= freed["requests"]["delete_many"] <= -(-big // 100) + 1
    assert "delete chunks" not in freed["raw"]["by_key"]
    assert "## steps-local" in proc.stdout and "## gc-chunks" in proc.stdout and "met" in proc.stdout
    assert data["meta"]["skipped"] == [] and data["meta"]["loadavg_before"]


def test_scale_section_registry_and_usage() -> None:
    """An unknown section is a usage error naming the registry's sections, the lead's dcp-1024
    hook among them."""
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "--scale", "--only", "nope"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "unknown section(s) nope; known: steps-local, steps-s3, gc-chunks, dcp-1024" in bad.stderr
