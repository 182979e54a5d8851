"""Naming parts of a state tree by dotted path, and matching a tree against a target tree.

Used by `Store.load(select=..., into=...)`; pure functions on decoded trees, no I/O.

- A dotted path is a tree path's parts joined with "." (int dict keys and list indices as
  their decimal text): the names `export_safetensors` gives, ``state`` for the root. Keys
  may hold dots themselves ("model" -> "0.weight" is ``model.0.weight``), so a name is
  matched against the joined path of each node, never split on ".".
- `select_subtrees` keeps the subtrees a list of dotted paths names, with their original
  nesting. A name that two nodes join to (``{"a.b": x, "a": {"b": y}}``) selects both.
- `compare_targets` sets the tensors of a stored tree against those of a target tree (such as
  ``model.state_dict()``) by path, with `load_state_dict`'s meaning of missing (the target
  has it, the stored tree does not) and unexpected (the other way round).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptstore.errors import InvalidArgumentError, PathNotFoundError

ROOT_NAME = "state"  # the dotted name of the root, as export_safetensors names a bare tensor

Path = tuple[Any, ...]


def dotted_name(path: Path) -> str:
    """The dotted name of a tree path: its parts joined with ".", ``state`` for the root."""
    return ".".join(str(part) for part in path) or ROOT_NAME


def check_select(select: object) -> tuple[str, ...]:
    """`select` as a tuple of dotted paths; InvalidArgumentError unless it is a list (or tuple)
    of non-empty strs."""
    if isinstance(select, str) or not isinstance(select, (list, tuple)):
        raise InvalidArgumentError(f"select takes a list of dotted paths such as ['model', 'optim.state.0'], "
                                   f"got {type(select).__name__} {select!r:.80}")
    for name in select:
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"select holds {name!r:.80}: each entry is a non-empty dotted path "
                                       f"such as 'model' or 'optim.state.0'")
    return tuple(select)


def _children(node: Any) -> list[tuple[Any, Any]]:
    if isinstance(node, Mapping):
        return list(node.items())
    if isinstance(node, (list, tuple)):
        return list(enumerate(node))
    return []


@dataclass(frozen=True)
class Selection:
    """The selected part of a tree: `tree`, and the paths of the subtrees it keeps."""

    tree: Any
    roots: tuple[Path, ...]

    def holds(self, path: Path) -> bool:
        """Whether `path` lies in one of the selected subtrees."""
        return any(path[:len(root)] == root for root in self.roots)


def select_subtrees(tree: Any, names: tuple[str, ...], context: str) -> Selection:
    """The subtrees of `tree` that `names` (dotted paths) name, in their original nesting: a
    dict keeps the selected keys in order; a list or tuple of which only some items are
    selected becomes a dict of those items by index (so indices keep their meaning). Raises
    PathNotFoundError naming every name that names nothing, with what exists where it stopped."""
    found: dict[str, list[Path]] = {name: [] for name in names}
    closest: dict[str, Path] = {name: () for name in names}  # deepest node whose name prefixes it

    def walk(node: Any, path: Path) -> None:
        for key, child in _children(node):
            child_path = (*path, key)
            name = dotted_name(child_path)
            if name in found:
                found[name].append(child_path)
            below = [n for n in names if n.startswith(name + ".")]
            for wanted in below:
                if len(child_path) > len(closest[wanted]):
                    closest[wanted] = child_path
            if below:
                walk(child, child_path)

    walk(tree, ())
    unknown = [name for name, paths in found.items() if not paths]
    if unknown:
        raise PathNotFoundError(unknown, context, {name: _names_under(tree, closest[name]) for name in unknown})
    roots = tuple(path for paths in found.values() for path in paths)
    return Selection(_prune(tree, (), set(roots)), roots)


def _names_under(tree: Any, path: Path) -> list[str]:
    node = tree
    for key in path:
        node = node[key]
    return [dotted_name((*path, key)) for key, _ in _children(node)]


def _prune(node: Any, path: Path, roots: set[Path]) -> Any:
    if path in roots:
        return node
    kept = {key: _prune(child, (*path, key), roots) for key, child in _children(node)
            if any(root[:len(path) + 1] == (*path, key) for root in roots)}
    if isinstance(node, (list, tuple)) and len(kept) == len(node):
        return type(node)(kept.values())
    return kept


def leaves(tree: Any, is_leaf: Callable[[Any], bool]) -> dict[Path, Any]:
    """Path -> value of every node of `tree` for which `is_leaf` holds, in tree order (it is
    not descended into); dicts (any Mapping), lists and tuples are walked."""
    out: dict[Path, Any] = {}

    def walk(node: Any, path: Path) -> None:
        if is_leaf(node):
            out[path] = node
            return
        for key, child in _children(node):
            walk(child, (*path, key))

    walk(tree, ())
    return out


def target_tensors(into: Any, is_tensor: Callable[[Any], bool]) -> dict[Path, Any]:
    """Path -> tensor of every tensor in `into`, a tree such as ``model.state_dict()``.
    Raises InvalidArgumentError when `into` is not a dict, list, tuple or tensor, or holds an
    object that is neither (a module, an optimizer), naming where and what to pass instead."""
    if not (isinstance(into, (Mapping, list, tuple)) or is_tensor(into)):
        raise InvalidArgumentError(f"into must be a state tree of tensors (a dict such as model.state_dict()), "
                                   f"not {_what(into)}{_hint(into)}")
    found = leaves(into, lambda node: not isinstance(node, (Mapping, list, tuple)))
    for path, value in found.items():
        # Other values (ints, strs, dtypes, paths) are what a state tree holds besides tensors;
        # an object with a state_dict (a module, an optimizer) is a mistake with a known fix.
        if _hint(value):
            raise InvalidArgumentError(f"into holds {_what(value)} at {dotted_name(path)}: it can hold dicts, "
                                       f"lists, tuples, tensors and plain values{_hint(value)}")
    return {path: value for path, value in found.items() if is_tensor(value)}


def _what(value: Any) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return f"{kind.__qualname__} {value!r:.40}"
    return f"{kind.__module__}.{kind.__qualname__}"


def _hint(value: Any) -> str:
    return "; pass its .state_dict(), not the object itself" if callable(getattr(value, "state_dict", None)) else ""


@dataclass
class Comparison:
    """A stored tree's tensors set against a target tree's, by path (dotted names in lists)."""

    matched: dict[Path, Any] = field(default_factory=dict)  # stored path -> its target tensor
    missing: list[str] = field(default_factory=list)  # the target has a tensor there, the stored tree not
    unexpected: list[str] = field(default_factory=list)  # the stored tree has a tensor there, the target not


def compare_targets(stored: dict[Path, Any], targets: dict[Path, Any]) -> Comparison:
    """Match the stored tensors (path -> anything) with the target tensors (path -> tensor)."""
    result = Comparison()
    for path in stored:
        if path in targets:
            result.matched[path] = targets[path]
        else:
            result.unexpected.append(dotted_name(path))
    result.missing = [dotted_name(path) for path in targets if path not in stored]
    return result
