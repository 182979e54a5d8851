"""Static guarantees about the package's code: nothing on a read path can run code from data."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.joinpath("ckptstore").rglob("*.py"), *ROOT.joinpath("backends").rglob("*.py")])
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if isinstance(func, ast.Name) and name in FORBIDDEN_CALLS:
                found.append(f"{name}() at line {node.lineno}")
            if name == "load" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch":
                # torch.load unpickles; only its restricted mode is allowed (importing user files).
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    found.append(f"torch.load without weights_only=True at line {node.lineno}")
            if name in ("load", "loads") and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") in (
                    "yaml", "pickle", "dill", "marshal"):
                found.append(f"{func.value.id}.{name}() at line {node.lineno}")  # type: ignore[attr-defined]
    return found


def test_there_are_sources_to_check() -> None:
    names = {p.name for p in SOURCES}
    assert {"store.py", "manifest.py", "tree.py", "local.py", "s3.py", "gcs.py"} <= names


# Importing a foreign checkpoint (a DCP directory's pickled .metadata) is the one place that
# must read pickle; it does so with an Unpickler whose find_class admits only DCP's metadata
# classes. The store's own read path (manifests, refs, chunks) never unpickles.
ALLOWED = {"ckptstore/interop.py": ["import pickle"]}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_eval_or_unrestricted_torch_load(path: Path) -> None:
    assert _violations(path) == ALLOWED.get(str(path.relative_to(ROOT)), [])


def test_the_one_unpickler_is_restricted() -> None:
    tree = ast.parse((ROOT / "ckptstore" / "interop.py").read_text())
    unpicklers = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                  and any(getattr(b, "attr", "") == "Unpickler" for b in node.bases)]
    assert unpicklers, "interop.py imports pickle but defines no restricted Unpickler"
    for cls in unpicklers:
        assert any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in cls.body), cls.name
    for module in ("store", "manifest", "tree", "chunkblob", "chunkio", "commit", "leases", "gc"):
        assert _violations(ROOT / "ckptstore" / f"{module}.py") == [], module


def test_the_checker_catches_what_it_forbids(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nfrom marshal import loads\nimport torch, yaml\n"
                   "eval('1')\ntorch.load('f')\ntorch.load('f', weights_only=False)\nyaml.load('x')\n")
    assert len(_violations(bad)) == 6
    good = tmp_path / "good.py"
    good.write_text("import torch\ntorch.load('f', map_location='cpu', weights_only=True)\n")
    assert _violations(good) == []
