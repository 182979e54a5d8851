"""Text output shared by the `ckptstore` command (ckptstore/cli.py) and the demo
(ckptstore/demo.py): sizes, times, tables, JSON, the step listing of `ckptstore ls`, the tree of
`show --tree`, the report of `diff`, and the plot of `du --history --plot` (matplotlib, imported
only there)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ckptstore
from ckptstore.report import HistoryRow, TensorPlaceholder, step_summaries

if TYPE_CHECKING:
    from ckptstore.diff import StepDiff, TensorDiff


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


# -- show --tree ---------------------------------------------------------------------------------
_INLINE_WIDTH = 80
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def format_tree(tree: Any, indent: str = "  ") -> str:
    """A state tree (report.tree_view) as indented lines, one per value: dict keys and list
    indices as labels, short containers of plain values on one line, tensors as placeholders."""
    lines: list[str] = []

    def walk(node: Any, depth: int, label: str | None) -> None:
        prefix = indent * depth + (f"{label}:" if label is not None else "")
        text = _inline(node)
        if text is not None:
            lines.append(f"{prefix} {text}" if label is not None else prefix + text)
            return
        lines.append(prefix if label is not None else indent * depth + _opener(node))
        for key, value in _items(node):
            walk(value, depth + 1, key)

    if isinstance(tree, dict) and tree:
        for key, value in _items(tree):
            walk(value, 1, key)
    else:
        walk(tree, 1, None)
    return "\n".join(lines)


def _items(node: Any) -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [(k if isinstance(k, str) and _PLAIN_KEY.fullmatch(k) else repr(k), v) for k, v in node.items()]
    return [(f"[{i}]", v) for i, v in enumerate(node)]


def _opener(node: Any) -> str:
    return f"{type(node).__name__} of {len(node)}"


def _inline(node: Any) -> str | None:
    """The node on one line, or None for a dict with keys (one line per key), or a list or tuple
    that holds containers or is too long for one line."""
    if isinstance(node, dict):
        return None if node else "{}"
    if isinstance(node, (list, tuple)):
        parts = [_inline(value) if not isinstance(value, (dict, list, tuple)) or not value else None
                 for value in node]
        if any(part is None for part in parts):
            return None
        body = ", ".join(str(part) for part in parts)
        text = f"[{body}]" if isinstance(node, list) else f"({body}{',' if len(parts) == 1 else ''})"
        return text if len(text) <= _INLINE_WIDTH else None
    if isinstance(node, TensorPlaceholder):
        return str(node)
    if isinstance(node, bytes) and len(node) > 32:
        return f"<bytes, {len(node)}: {node[:16].hex()}...>"
    text = repr(node)
    return text if len(text) <= 200 else text[:200] + f"... ({len(text)} chars)"


# -- diff ----------------------------------------------------------------------------------------
DIFF_LIST_LIMIT = 20


def format_diff(result: StepDiff, *, limit: int | None = DIFF_LIST_LIMIT) -> str:
    """`ckptstore diff`: counts and bytes per category, then the changed, added and removed
    tensors (and, with no limit, the unchanged ones), at most `limit` per category."""
    lines = [f"step {result.a} -> step {result.b}"]
    packed = sum(t.packed for t in result.changed)
    for name, items in result.categories.items():
        line = f"{name:10} {len(items):6} tensors {human_bytes(result.bytes_of(name)):>10}"
        if name == "changed" and packed:
            line += (f"  ({packed} small tensors packed into a chunk that changed: their own bytes may be equal; "
                     "--values reads them)")
        lines.append(line)
    if result.identical:
        lines.append("no tensor was added, removed or changed")
    shown = ("changed", "added", "removed") if limit is not None else ("changed", "added", "removed", "unchanged")
    for name in shown:
        items = result.categories[name]
        if not items:
            continue
        values = result.values and name == "changed"  # only changed tensors are compared
        lines += ["", f"{name}:", _diff_table(items[:limit] if limit is not None else items, values)]
        if limit is not None and len(items) > limit:
            lines.append(f"... and {len(items) - limit} more (--all lists every one, --json gives all)")
    return "\n".join(lines)


def _diff_table(items: Sequence[TensorDiff], values: bool) -> str:
    headers = ["NAME", "DTYPE", "SHAPE", "BYTES", *(["MAX ABS DIFF", "REL L2"] if values else [])]
    notes = any(t.packed for t in items)
    rows = []
    for t in items:
        shape = _shape(t.shape)
        row = [t.name, f"{t.old_dtype} -> {t.dtype}" if t.old_dtype else t.dtype,
               f"{_shape(t.old_shape)} -> {shape}" if t.old_shape is not None else shape, human_bytes(t.bytes)]
        if values:
            row += [_number(t.max_abs_diff), _number(t.rel_l2)]
        rows.append(row + (["packed" if t.packed else ""] if notes else []))
    return table(headers + ([""] if notes else []), rows, right={3, 4, 5} if values else {3})


def _shape(shape: Sequence[int] | None) -> str:
    return "[" + ", ".join(map(str, shape or [])) + "]"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


# -- du --history --plot -------------------------------------------------------------------------
def plot_history(rows: Sequence[HistoryRow], path: str | os.PathLike[str], *, title: str = "") -> None:
    """Draw `du --history` as a PNG at `path`: logical and stored bytes over the steps so far,
    the new bytes of each step, and the dedup ratio. Raises ImportError without matplotlib."""
    from matplotlib.figure import Figure  # the plot extra; no pyplot, so no GUI backend is needed
    from matplotlib.ticker import MaxNLocator

    steps = [r.step for r in rows]
    logical_so_far = list(itertools.accumulate(r.logical_bytes for r in rows))
    peak = max([1, *logical_so_far, *(r.stored_bytes for r in rows)])
    unit, scale = next((u, 1024**p) for p, u in reversed(list(enumerate(("B", "KiB", "MiB", "GiB", "TiB"))))
                       if peak >= 1024**p or p == 0)
    figure = Figure(figsize=(9, 5), dpi=100)
    axes = figure.add_subplot()
    axes.plot(steps, [b / scale for b in logical_so_far], marker=".", label="logical, steps so far")
    axes.plot(steps, [r.stored_bytes / scale for r in rows], marker=".", label="stored, steps so far")
    axes.bar(steps, [r.new_bytes / scale for r in rows], width=_bar_width(steps), alpha=0.4, color="tab:green",
             label="new in the step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step")
    axes.set_ylabel(unit)
    ratio = axes.twinx()
    ratio.plot(steps, [r.dedup_ratio or 0 for r in rows], linestyle="--", color="gray", label="dedup ratio")
    ratio.set_ylabel("dedup ratio (x)")
    handles = axes.get_legend_handles_labels()
    more = ratio.get_legend_handles_labels()
    axes.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left")
    axes.set_title(f"storage growth: {title}" if title else "storage growth")
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png")


def _bar_width(steps: list[int]) -> float:
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    return 0.6 * min(gaps) if gaps else 0.6
