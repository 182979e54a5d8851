"""How a local store's costs grow with the number of tensors and of steps (small tensors).

`tensors`: one save of N 256-byte tensors; save time, manifest size, `steps()`, the `ls`
report (ckptstore.report.step_summaries) and gc time.
`steps`: N saves of a 10-tensor state, one tensor changed per step; per-save time, `steps()`,
the `ls` report, then retention keeps the last 10 and gc frees the rest (min_age=0).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

SMALL = 64  # float32 elements per tensor (256 bytes)


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _manifest_bytes(root: Path) -> int:
    files = [p for p in (root / "manifests").rglob("*") if p.is_file()]
    return max((p.stat().st_size for p in files), default=0)


def run_scaling_task(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    from benchmarks.worker import open_store
    from ckptstore.report import step_summaries

    root = Path(task["path"])
    n = int(task["n"])
    store = open_store(task, str(root))
    if task["kind"] == "tensors":
        state = {f"t{i:06d}": torch.full((SMALL,), float(i)) for i in range(n)}
        save_s, _ = _timed(lambda: store.save(1, state))
        out: dict[str, Any] = {"save_seconds": save_s, "manifest_bytes": _manifest_bytes(root)}
    else:
        state = {f"t{i}": torch.zeros(SMALL) for i in range(10)}
        total = 0.0
        for step in range(1, n + 1):
            state[f"t{step % 10}"].fill_(float(step))
            seconds, _ = _timed(lambda s=step: store.save(s, state))
            total += seconds
        out = {"save_seconds": total / n, "manifest_bytes": _manifest_bytes(root)}
    out["steps_seconds"], steps = _timed(store.steps)
    out["ls_seconds"], rows = _timed(lambda: step_summaries(store))
    if len(steps) != len(rows):
        raise AssertionError(f"steps() found {len(steps)} steps but the ls report {len(rows)}")
    if task["kind"] == "steps":
        store.apply_retention(keep_last=10)
    out["gc_seconds"], report = _timed(lambda: store.gc(min_age=0))
    out["gc_deleted_manifests"] = report.deleted_manifests
    out["gc_deleted_chunks"] = report.deleted_chunks
    store.close()
    return out


def gc_reachable_set_bytes(n: int, kind: str) -> int:
    """tracemalloc's peak while gc's reachable-chunk set for `n` synthetic 32-byte digests is
    built, fed as from manifests of 10,000 chunks each (hex str): `kind` "hex_str" (a set of
    str, gc before issue 13), "bytes" (a set of bytes.fromhex) or "digest_set" (gc.DigestSet,
    what gc keeps now). The hex strings of one manifest at a time count too."""
    import hashlib
    import tracemalloc

    from ckptstore.gc import DigestSet

    def manifests() -> Any:
        for start in range(0, n, 10_000):
            yield [hashlib.sha256(i.to_bytes(8, "little")).hexdigest() for i in range(start, min(n, start + 10_000))]

    tracemalloc.start()
    try:
        reachable: Any = DigestSet() if kind == "digest_set" else set()
        for digests in manifests():
            if kind == "digest_set":
                reachable.add(digests)
            else:
                reachable.update(map(bytes.fromhex, digests) if kind == "bytes" else digests)
        if kind == "digest_set":
            reachable.freeze()
        _, peak = tracemalloc.get_traced_memory()
        assert len(reachable) == n
    finally:
        tracemalloc.stop()
    return peak


def gc_memory(n: int = 1_000_000) -> dict[str, float]:
    """`python -m benchmarks.scaling --gc-memory [N]`: gc's reachable-set memory for N chunks
    (hex str before, DigestSet now, and a set of bytes for comparison), each extrapolated
    (linearly) to 10^7 chunks."""
    out: dict[str, float] = {"chunks": n}
    for kind in ("hex_str", "bytes", "digest_set"):
        peak = gc_reachable_set_bytes(n, kind)
        out[f"{kind}_bytes_per_chunk"] = round(peak / n, 1)
        out[f"{kind}_MB_at_n"] = round(peak / 1e6, 1)
        out[f"{kind}_GB_at_1e7"] = round(peak / n * 1e7 / 1e9, 3)
    return out


if __name__ == "__main__":
    import json
    import sys

    args = sys.argv[1:]
    if not args or args[0] != "--gc-memory":
        sys.exit("usage: python -m benchmarks.scaling --gc-memory [N]")
    print(json.dumps(gc_memory(int(args[1]) if len(args) > 1 else 1_000_000), indent=2))
