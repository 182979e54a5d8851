"""Text output shared by the `ckptstore` command (ckptstore/cli.py) and the demo
(ckptstore/demo.py): sizes, times, tables, JSON, and the step listing of `ckptstore ls`."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import ckptstore
from ckptstore.report import step_summaries


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_time(ts: float) -> str:
    """A POSIX timestamp as 'YYYY-MM-DD HH:MM:SS' in UTC."""
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    """Aligned columns; the columns numbered in `right` are right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=lambda o: o.hex() if isinstance(o, bytes) else repr(o)))


def print_steps(url: str, *, as_json: bool) -> None:
    """Print the steps of the existing store at `url` with their sizes and tags (`ckptstore ls`)."""
    with ckptstore.open(url, create=False) as store:
        rows = step_summaries(store)
        tags: dict[int, list[str]] = {}
        for name, step in store.tags().items():
            tags.setdefault(step, []).append(name)
    if as_json:
        print_json([{**r.as_dict(), "tags": tags.get(r.step, [])} for r in rows])
        return
    if not rows:
        print(f"no steps in {url}")
        return
    print(table(
        ["STEP", "COMMITTED (UTC)", "TENSORS", "LOGICAL", "STORED", "NEW", "SEQ", "TAGS"],
        [[str(r.step), format_time(r.committed), str(r.tensors), human_bytes(r.logical_bytes),
          human_bytes(r.stored_bytes), human_bytes(r.new_bytes), str(r.seq), ",".join(tags.get(r.step, []))]
         for r in rows],
        right={0, 2, 3, 4, 5, 6},
    ))
    logical = sum(r.logical_bytes for r in rows)
    stored = sum(r.new_bytes for r in rows)
    ratio = f"{logical / stored:.2f}x" if stored else "-"
    print(f"{len(rows)} steps, {human_bytes(logical)} logical, {human_bytes(stored)} stored (dedup {ratio})")
