"""Summaries of measured runs: medians, min-max, ratios, and the markdown tables printed."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

GB = 1e9


@dataclass
class Row:
    """One tool in one section for one state: its per-run results and how it compares."""

    section: str
    state: str
    tool: str
    baseline: str | None  # tool whose median is 1.00 in this section
    runs: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"  # ok | skipped | unavailable | failed
    note: str = ""

    @property
    def id(self) -> str:
        return f"{self.section}/{self.state}/{self.tool}"


def spread(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def _metric(row: Row, key: str) -> list[float]:
    return [float(r[key]) for r in row.runs if r.get(key) is not None]


def summarize(rows: list[Row]) -> list[dict[str, Any]]:
    """JSON-able rows with the medians and the ratio to the section baseline (same run)."""
    by_id = {row.id: row for row in rows}
    out = []
    for row in rows:
        seconds = spread(_metric(row, "seconds"))
        entry: dict[str, Any] = {
            "id": row.id, "section": row.section, "state": row.state, "tool": row.tool,
            "baseline": row.baseline, "status": row.status, "note": row.note, "seconds": seconds,
            "runs": row.runs,
        }
        base = by_id.get(f"{row.section}/{row.state}/{row.baseline}") if row.baseline else None
        base_s = spread(_metric(base, "seconds")) if base is not None else None
        if seconds and base_s and base_s["median"] > 0:
            entry["ratio"] = seconds["median"] / base_s["median"]
        size = _metric(row, "state_bytes") or _metric(row, "loaded_bytes") or (
            _metric(base, "state_bytes") if base is not None else [])
        if seconds and size and seconds["median"] > 0:
            entry["gb_per_s"] = size[0] / seconds["median"] / GB
        if size:
            entry["state_bytes"] = size[0]
            peaks = [p / size[0] for p in _metric(row, "peak_rss")]
            extra = [(r["peak_rss"] - r["rss_before"]) / size[0] for r in row.runs
                     if r.get("peak_rss") is not None and r.get("rss_before") is not None]
            entry["peak_rss_ratio"] = spread(peaks)
            entry["extra_rss_ratio"] = spread(extra)
        for key in ("total_seconds", "first_blocking_seconds", "changed_bytes", "growth_bytes", "new_bytes",
                    "save_seconds", "manifest_bytes", "steps_seconds", "ls_seconds", "gc_seconds", "gc_deleted_chunks"):
            values = _metric(row, key)
            if values:
                entry[key] = spread(values)
        if "growth_bytes" in entry and "changed_bytes" in entry and entry["changed_bytes"]["median"]:
            entry["growth_over_changed"] = entry["growth_bytes"]["median"] / entry["changed_bytes"]["median"]
        out.append(entry)
    return out


def _fmt_s(s: dict[str, Any] | None) -> tuple[str, str]:
    if not s:
        return "—", "—"
    return f"{s['median']:.3f}", f"{s['min']:.3f}-{s['max']:.3f}"


def _fmt_x(s: dict[str, Any] | None) -> str:
    return f"{s['median']:.2f}" if s else "—"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def markdown(entries: list[dict[str, Any]]) -> str:
    """Tables per section and state (medians over runs; ratio = median / baseline median)."""
    lines: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault((e["section"], e["state"]), []).append(e)
    for (section, state), items in groups.items():
        base = items[0]["baseline"]
        lines.append(f"\n### {section} — {state}" + (f" (ratio: vs `{base}` = 1.00)" if base else ""))
        if section == "scaling":
            lines.append("| case | save s | manifest | steps() s | ls s | gc s | gc freed chunks |")
            lines.append("|---|---|---|---|---|---|---|")
            for e in items:
                if e["status"] != "ok":
                    lines.append(f"| {e['tool']} | {e['status']}: {e['note']} | | | | | |")
                    continue
                m = {k: e[k]["median"] for k in ("save_seconds", "manifest_bytes", "steps_seconds",
                                                    "ls_seconds", "gc_seconds", "gc_deleted_chunks") if k in e}
                lines.append(f"| {e['tool']} | {m.get('save_seconds', 0):.4f} | {_mb(m.get('manifest_bytes', 0))} "
                             f"| {m.get('steps_seconds', 0):.4f} | {m.get('ls_seconds', 0):.4f} "
                             f"| {m.get('gc_seconds', 0):.4f} | {int(m.get('gc_deleted_chunks', 0))} |")
            continue
        lines.append("| tool | median s | min-max s | ratio | GB/s | peak RSS / state | extra RSS / state | notes |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for e in items:
            if e["status"] != "ok":
                lines.append(f"| {e['tool']} | {e['status']} | | | | | | {e['note']} |")
                continue
            med, rng = _fmt_s(e["seconds"])
            notes = [e["note"]] if e["note"] else []
            if "total_seconds" in e:
                notes.append(f"until the Future finished: {e['total_seconds']['median']:.3f} s")
            if "first_blocking_seconds" in e:
                notes.append(f"first call (allocates staging): {e['first_blocking_seconds']['median']:.3f} s")
            if "growth_over_changed" in e:
                notes.append(f"changed {_mb(e['changed_bytes']['median'])}, store grew "
                             f"{_mb(e['growth_bytes']['median'])} (x{e['growth_over_changed']:.2f})")
            ratio = f"{e['ratio']:.2f}" if "ratio" in e else "—"
            gbps = f"{e['gb_per_s']:.2f}" if "gb_per_s" in e else "—"
            lines.append(f"| {e['tool']} | {med} | {rng} | {ratio} | {gbps} | {_fmt_x(e.get('peak_rss_ratio'))} "
                         f"| {_fmt_x(e.get('extra_rss_ratio'))} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"
