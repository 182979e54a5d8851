"""Static guarantees about the package's code: nothing on a read path can run code from data.

`scan` is an AST walk over each module that resolves names through the module's imports, so
an alias (`import torch as t`, `from torch import load`, `from numpy import load as L`), a
longer path (`torch.serialization.load`) or `getattr(torch, "load")` is judged by what it
names. It flags:
- importing a pickle-like module, by statement or through `importlib.import_module` /
  `__import__` (a computed module name too, unless it starts with "ckptstore.");
- eval, exec, compile and __import__;
- calling into a pickle-like module (but for its exception classes);
- a loader that unpickles or runs code from what it reads, wherever it is referenced: called,
  passed or stored. `torch.load` (by any path) is allowed only called with
  `weights_only=True`; any call with `allow_pickle=` other than `False` (`np.load`,
  `np.lib.format.read_array`, ...) is flagged, and so is `**kwargs` into either loader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.joinpath("ckptstore").rglob("*.py"), *ROOT.joinpath("backends").rglob("*.py")])
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle",
                     "joblib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
# Loaders that unpickle, or run code, from what they read: not to be referenced at all.
FORBIDDEN_NAMES = {"torch.jit.load", "torch.hub.load", "torch.package.PackageImporter", "pandas.read_pickle",
                   "numpy.lib.npyio.NpzFile", "yaml.load", "yaml.load_all", "yaml.full_load", "yaml.full_load_all",
                   "yaml.unsafe_load", "yaml.unsafe_load_all", "multiprocessing.reduction.ForkingPickler"}
TORCH_LOAD = {"torch.load", "torch.serialization.load"}  # unpickles: only weights_only=True is allowed
IMPORTERS = {"importlib.import_module", "importlib.__import__", "builtins.__import__"}
UNPICKLERS = {"load", "loads", "Unpickler", "_Unpickler", "_loads", "_load"}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted path it stands for, from every absolute import in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """The dotted path a Name / Attribute chain or getattr(x, "name") stands for, or None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        base = _dotted(node.args[0], aliases)
        return f"{base}.{node.args[1].value}" if base else None
    return None


def _in_forbidden_module(path: str) -> bool:
    return path.split(".")[0] in FORBIDDEN_MODULES


def _imported_name(call: ast.Call) -> str | None:
    """The module an import_module / __import__ call imports; None when it is computed (a
    prefix "ckptstore." is enough: everything under it is scanned here)."""
    arg = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "name"), None)
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = str(arg.values[0].value)
        return prefix if prefix.startswith("ckptstore.") else None
    return None


def _judge_call(node: ast.Call, path: str | None) -> list[str]:
    func, found = node.func, []
    keywords = {k.arg: k.value for k in node.keywords}
    if (isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS and path is None) or (
            path in {f"builtins.{name}" for name in FORBIDDEN_CALLS}):
        found.append(f"{path or func.id}()")  # type: ignore[attr-defined]  # func is a Name here
    if path in IMPORTERS or (isinstance(func, ast.Name) and func.id == "__import__" and path is None):
        target = _imported_name(node)
        if target is None:
            found.append("import_module() of a computed name")
        elif _in_forbidden_module(target):
            found.append(f"import_module({target!r})")
    if None in keywords and path in {*TORCH_LOAD, "numpy.load"}:
        found.append(f"{path}(**kwargs)")
    elif path in TORCH_LOAD:
        weights_only = keywords.get("weights_only")
        if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            found.append(f"{path} without weights_only=True")
    allow_pickle = keywords.get("allow_pickle")
    if allow_pickle is not None and not (isinstance(allow_pickle, ast.Constant) and allow_pickle.value is False):
        found.append(f"{path or 'a call'} with allow_pickle not False")
    if path in FORBIDDEN_NAMES or (path and _in_forbidden_module(path) and "." in path
                                   and not path.endswith(("Error", "Warning"))):
        found.append(f"{path}()")
    return found


def scan(source: str, filename: str = "<snippet>") -> list[tuple[int, str]]:
    """(line, what) for each forbidden form in `source`, sorted."""
    tree = ast.parse(source, filename=filename)
    aliases = _aliases(tree)
    found: set[tuple[int, str]] = set()
    judged: set[int] = set()  # callees (judged with their call) and class bases (see ALLOWED)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((node.lineno, f"import {a.name}") for a in node.names if _in_forbidden_module(a.name))
        elif isinstance(node, ast.ImportFrom) and _in_forbidden_module(node.module or ""):
            found.add((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.ClassDef):
            judged.update(id(base) for base in node.bases)
        elif isinstance(node, ast.Call):
            judged.add(id(node.func))
            found.update((node.lineno, what) for what in _judge_call(node, _dotted(node.func, aliases)))
    for node in ast.walk(tree):  # a loader passed or stored rather than called
        if isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in judged:
            path = _dotted(node, aliases) or ""
            if path in FORBIDDEN_NAMES or path in TORCH_LOAD or (
                    _in_forbidden_module(path) and path.rpartition(".")[2] in UNPICKLERS):
                found.add((node.lineno, f"{path} referenced"))
    return sorted(found)


def _violations(path: Path) -> list[str]:
    return [what for _, what in scan(path.read_text(), filename=str(path))]


def test_there_are_sources_to_check() -> None:
    names = {p.name for p in SOURCES}
    assert {"store.py", "manifest.py", "tree.py", "local.py", "s3.py", "gcs.py"} <= names


# What the scan finds on purpose, each with why it is safe. Every entry must still be found
# (a stale entry fails too). torch.load(..., weights_only=True) is not listed: the scan allows it.
ALLOWED: dict[str, dict[str, str]] = {
    # Importing a foreign checkpoint (a DCP directory's pickled .metadata) is the one place
    # that must read pickle; it does so with an Unpickler subclass whose find_class admits
    # only DCP's metadata classes (test_the_one_unpickler_is_restricted). The store's own read
    # path (manifests, refs, chunks) never unpickles.
    "ckptstore/interop.py": {"import pickle": "the restricted DCP .metadata unpickler"},
    # The atheris engine instruments the decoder modules named in fuzz.INSTRUMENTED, a tuple
    # of "ckptstore." constants; the fuzzer never runs on a read path.
    "ckptstore/testing/fuzz.py": {"import_module() of a computed name": "fuzz.INSTRUMENTED, ckptstore modules"},
}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_eval_or_unrestricted_torch_load(path: Path) -> None:
    assert sorted(_violations(path)) == sorted(ALLOWED.get(str(path.relative_to(ROOT)), {}))


def test_the_one_unpickler_is_restricted() -> None:
    tree = ast.parse((ROOT / "ckptstore" / "interop.py").read_text())
    unpicklers = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                  and any(getattr(b, "attr", "") == "Unpickler" for b in node.bases)]
    assert unpicklers, "interop.py imports pickle but defines no restricted Unpickler"
    for cls in unpicklers:
        assert any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in cls.body), cls.name
    for module in ("store", "manifest", "tree", "chunkblob", "chunkio", "commit", "leases", "gc"):
        assert _violations(ROOT / "ckptstore" / f"{module}.py") == [], module


# -- the scanner itself: each forbidden form is flagged, the allowed forms are not ----------------
# Each snippet and exactly what the scan must report for it: (line, what).
FORBIDDEN_SNIPPETS: dict[str, tuple[str, list[tuple[int, str]]]] = {
    "import": ("import pickle", [(1, "import pickle")]),
    "import as": ("import cloudpickle as cp", [(1, "import cloudpickle")]),
    "import submodule": ("import dill.source", [(1, "import dill.source")]),
    "from import": ("from marshal import loads", [(1, "from marshal import ...")]),
    "from _pickle": ("from _pickle import Unpickler", [(1, "from _pickle import ...")]),
    "joblib": ("import joblib", [(1, "import joblib")]),
    "eval": ("eval('1')", [(1, "eval()")]),
    "exec": ("exec('x = 1')", [(1, "exec()")]),
    "compile": ("compile('1', 'f', 'eval')", [(1, "compile()")]),
    "__import__": ("__import__('os')", [(1, "__import__()")]),
    "builtins.eval": ("import builtins\nbuiltins.eval('1')", [(2, "builtins.eval()")]),
    "import_module pickle": ("import importlib\nimportlib.import_module('pickle')", [(2, "import_module('pickle')")]),
    "import_module from": ("from importlib import import_module\nimport_module('_pickle')",
                           [(2, "import_module('_pickle')")]),
    "import_module computed": ("import importlib\nname = 'pick' + 'le'\nimportlib.import_module(name)",
                               [(3, "import_module() of a computed name")]),
    "import_module f-string": ("import importlib\nimportlib.import_module(f'{1}pickle')",
                               [(2, "import_module() of a computed name")]),
    "torch.load": ("import torch\ntorch.load('f')", [(2, "torch.load without weights_only=True")]),
    "torch.load weights_only=False": ("import torch\ntorch.load('f', weights_only=False)",
                                      [(2, "torch.load without weights_only=True")]),
    "torch.load weights_only=variable": ("import torch\nsafe = True\ntorch.load('f', weights_only=safe)",
                                         [(3, "torch.load without weights_only=True")]),
    "torch.load **kwargs": ("import torch\nkw = {'weights_only': True}\ntorch.load('f', **kw)",
                            [(3, "torch.load(**kwargs)")]),
    "torch as alias": ("import torch as th\nth.load('f')", [(2, "torch.load without weights_only=True")]),
    "torch.serialization.load": ("import torch\ntorch.serialization.load('f')",
                                 [(2, "torch.serialization.load without weights_only=True")]),
    "import torch.serialization": ("import torch.serialization\ntorch.serialization.load('f')",
                                   [(2, "torch.serialization.load without weights_only=True")]),
    "from torch import serialization": ("from torch import serialization\nserialization.load('f')",
                                        [(2, "torch.serialization.load without weights_only=True")]),
    "from torch import load": ("from torch import load\nload('f')", [(2, "torch.load without weights_only=True")]),
    "from torch import load as": ("from torch import load as restore\nrestore('f')",
                                  [(2, "torch.load without weights_only=True")]),
    "from torch.serialization import load": ("from torch.serialization import load\nload('f')",
                                             [(2, "torch.serialization.load without weights_only=True")]),
    "getattr(torch, 'load')": ("import torch\ngetattr(torch, 'load')('f')",
                               [(2, "torch.load without weights_only=True")]),
    "torch.load passed": ("import torch\nread = torch.load\nread('f', weights_only=True)",
                          [(2, "torch.load referenced")]),
    "torch.load as argument": ("import functools\nfrom torch import load\nfunctools.partial(load, 'f')",
                               [(3, "torch.load referenced")]),
    "torch.jit.load": ("import torch\ntorch.jit.load('f')", [(2, "torch.jit.load()")]),
    "np.load allow_pickle": ("import numpy as np\nnp.load('f', allow_pickle=True)",
                             [(2, "numpy.load with allow_pickle not False")]),
    "numpy.load allow_pickle": ("import numpy\nnumpy.load('f', allow_pickle=True)",
                                [(2, "numpy.load with allow_pickle not False")]),
    "from numpy import load": ("from numpy import load\nload('f', allow_pickle=True)",
                               [(2, "numpy.load with allow_pickle not False")]),
    "np.load allow_pickle=variable": ("import numpy as np\nflag = True\nnp.load('f', allow_pickle=flag)",
                                      [(3, "numpy.load with allow_pickle not False")]),
    "np.load **kwargs": ("import numpy as np\nkw = {}\nnp.load('f', **kw)", [(3, "numpy.load(**kwargs)")]),
    "read_array allow_pickle": ("import numpy as np\nnp.lib.format.read_array(f, allow_pickle=True)",
                                [(2, "numpy.lib.format.read_array with allow_pickle not False")]),
    "pickle.loads (import allowed)": ("import pickle\npickle.loads(b'')",
                                      [(1, "import pickle"), (2, "pickle.loads()")]),
    "pickle.Unpickler call": ("import pickle\npickle.Unpickler(f).load()",
                              [(1, "import pickle"), (2, "pickle.Unpickler()")]),
    "pickle.load passed": ("import pickle\nread = pickle.load", [(1, "import pickle"), (2, "pickle.load referenced")]),
    "yaml.load": ("import yaml\nyaml.load('x')", [(2, "yaml.load()")]),
    "yaml.unsafe_load": ("from yaml import unsafe_load\nunsafe_load('x')", [(2, "yaml.unsafe_load()")]),
    "pandas.read_pickle": ("import pandas as pd\npd.read_pickle('f')", [(2, "pandas.read_pickle()")]),
}


@pytest.mark.parametrize(("source", "expected"), FORBIDDEN_SNIPPETS.values(), ids=FORBIDDEN_SNIPPETS.keys())
def test_the_scanner_flags(source: str, expected: list[tuple[int, str]]) -> None:
    assert scan(source) == expected


ALLOWED_SNIPPETS = {
    "torch.load weights_only=True": "import torch\ntorch.load('f', map_location='cpu', weights_only=True)",
    "from torch import load, weights_only=True": "from torch import load\nload('f', weights_only=True)",
    "torch.serialization.load weights_only": "import torch\ntorch.serialization.load('f', weights_only=True)",
    "torch.serialization other names": "import torch\nx = torch.serialization._get_layout",
    "np.load": "import numpy as np\nnp.load('f')\nnp.load('f', allow_pickle=False)",
    "import_module ckptstore": "import importlib\nm = 'local'\nimportlib.import_module(f'ckptstore.backends.{m}')",
    "import_module constant": "import importlib\nimportlib.import_module('json')",
    "methods named like builtins": "model.eval()\nimport re\nre.compile('x')\nobj.load('f')",
    "pickle exceptions": "import pickle\ntry:\n    f()\nexcept pickle.UnpicklingError:\n    raise pickle.PickleError()",
    "restricted Unpickler subclass": "import pickle\nclass R(pickle.Unpickler):\n    def find_class(self, m, n): ...",
    "a local function named load": "def load(f): ...\nload('f')",
    "json and msgpack": "import json, msgpack\njson.loads('1')\nmsgpack.unpackb(b'')",
}


@pytest.mark.parametrize("source", ALLOWED_SNIPPETS.values(), ids=ALLOWED_SNIPPETS.keys())
def test_the_scanner_allows(source: str) -> None:
    expected = [(1, "import pickle")] if source.startswith("import pickle") else []
    assert scan(source) == expected
