"""The package's modules import each other one way only: the import graph has no cycle.

Every module of the package (ckptstore/ and backends/, which installs as ckptstore.backends)
is parsed, and every import counts: at module top, inside functions (lazy imports), and
under `if TYPE_CHECKING:`; a cycle hidden in any of them fails the test. An import of a
package's child does not count as an import of the package itself (Python runs the
package's __init__ first, but that is not an arrow between the modules); `import ckptstore`
or `from ckptstore import open` does count as an import of ckptstore/__init__.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"ckptstore": ROOT / "ckptstore", "ckptstore.backends": ROOT / "backends"}


def package_modules() -> dict[str, Path]:
    """Module name -> source file, for every module of the installed package."""
    found: dict[str, Path] = {}
    for package, directory in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` (at `path`) imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                if child in modules:
                    out.add(child)
                elif base in modules:
                    out.add(base)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm):
    each is a set of modules that all reach each other through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each tangle, as [a, b, ..., a]."""
    return [_cycle_in(graph, set(component)) for component in tangles(graph)]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first back to it)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle in component {sorted(component)}")


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "ckptstore.store" in graph and "ckptstore.backends.base" in graph  # the walk found the package
    found = tangles(graph)
    assert not found, "modules that import each other in a circle:\n" + "\n".join(
        f"{', '.join(component)}; e.g. {' -> '.join(_cycle_in(graph, set(component)))}" for component in found)


def test_the_cycle_check_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    """The checker itself: imports inside functions and under TYPE_CHECKING close a cycle."""
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import X\n")
    (tmp_path / "c.py").write_text("import pkg.a\n")
    (tmp_path / "d.py").write_text("from . import a\n")
    modules = {f"pkg.{n}": tmp_path / f"{n}.py" for n in "abcd"}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}, "pkg.d": {"pkg.a"}}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


#: The package's layers, bottom up (docs/FORMAT.md describes the first three). A module may
#: import modules of its own layer or of lower ones, never of a higher one; a new module must
#: be placed here, which is where a newcomer reads the architecture off.
LAYERS: dict[str, tuple[str, ...]] = {
    # The pure format: bytes <-> values, no I/O.
    "format": ("errors", "keys", "dtypes", "hashing", "chunkblob", "chunking", "manifest", "tree", "tensors",
               "treevalues", "selection", "sysmem", "progress", "threads", "manifestv2", "dcpformat"),
    # Byte-level storage with conditional puts.
    "storage": ("backends", "backends.base", "backends.parts", "backends.local", "backends.memory", "backends.s3",
                "backends.gcs", "deadline", "retry", "url"),
    # The protocol: commits, leases, the gc lock and epoch, gc.
    "protocol": ("commit", "canary", "liveness", "lockfile", "serverclock", "leases", "epoch", "gclock", "manifestread",
                 "gccache", "gc"),
    # The store and its I/O.
    "store": ("chunkio", "knownchunks", "kernel", "distributed", "async_save", "store", "dcp", "stepreader", "diff"),
    # Operator tools and the package's front door.
    "tools": ("verify", "lscache", "report", "copy", "interop", "display", "demo", "cli", ""),
    # Trainer integrations: each imports its trainer's package and the store's DCP layer.
    "integrations": ("integrations", "integrations.olmo_core", "integrations.torchtitan", "integrations.lightning",
                     "integrations.transformers"),
    # Test kits shipped with the package.
    "testing": ("testing", "testing.conformance", "testing.crash", "testing.faults", "testing.fuzz",
                "testing.interleave", "testing.load", "testing.dcpsim", "testing.scenarios", "testing.servers",
                "testing.soak", "testing.wrappers"),
}


def _layer_of() -> dict[str, int]:
    out = {}
    for rank, names in enumerate(LAYERS.values()):
        for short in names:
            out["ckptstore" + (f".{short}" if short else "")] = rank
    return out


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_layers() -> None:
    layer_of = _layer_of()
    graph = import_graph()
    unplaced = sorted(set(graph) - set(layer_of))
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"
    stale = sorted(set(layer_of) - set(graph))
    assert not stale, f"LAYERS names modules that do not exist: {stale}"
    names = list(LAYERS)
    upward = sorted(f"{module} ({names[layer_of[module]]}) imports {target} ({names[layer_of[target]]})"
                    for module, targets in graph.items() for target in targets
                    if layer_of[target] > layer_of[module])
    assert not upward, upward
