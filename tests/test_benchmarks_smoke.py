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
