"""Moving steps in and out of other checkpoint formats: safetensors, torch.save files, DCP.

Export (`export_safetensors`) writes one step as safetensors, the format inference stacks
load without running code:

- Tensor names are the tree paths joined with ".": ``{"model": {"layer.weight": t}}`` gives
  ``model.layer.weight``, ``{"optim": {"state": {0: {"exp_avg": t}}}}`` gives
  ``optim.state.0.exp_avg`` (list and tuple items by index). A tensor at the root is named
  ``state``. When two paths join to the same name (``{"a.b": t1, "a": {"b": t2}}``), the
  later one gets ``#2``, ``#3``, ... appended (``a.b#2``).
- numpy arrays and numpy scalars are converted with ``torch.from_numpy`` (a scalar becomes a
  0-d tensor). A tensor whose dtype safetensors cannot hold (complex128, complex32, the
  sub-byte and bits dtypes, numpy strings and datetimes) is an `InteropError` naming it.
- Everything else in the tree goes into the file's metadata, as JSON under the key
  ``ckptstore.tree``: the state with each tensor replaced by ``{"$tensor": name}``. JSON
  lacks tuples, int dict keys, bytes and non-finite floats, so they are tagged:
  ``{"$tuple": [...]}``, ``{"$dict": [[key, value], ...]}`` (for a dict with an int key or a
  key starting with "$"), ``{"$bytes": base64}``, ``{"$float": "nan"}``. Every value a step
  can hold is representable, so nothing is skipped. The step's `metadata=` goes under
  ``ckptstore.metadata`` the same way, the step number under ``ckptstore.step``, and
  ``format`` is ``pt`` (what Hugging Face loaders expect).
- A single file unless `path` ends with "/", is an existing directory, or `max_shard_bytes`
  is given: then a directory of ``model-00001-of-0000N.safetensors`` shards (tensors in tree
  order, a new shard whenever the next tensor would pass `max_shard_bytes`; a larger tensor
  gets a shard of its own) and ``model.safetensors.index.json`` in the Hugging Face layout,
  ``{"metadata": {"total_size": N, ...}, "weight_map": {name: file}}``, whose metadata also
  holds the ``ckptstore.*`` keys. Files are written under a temporary name and renamed.

Export to DCP (`export_dcp`) writes one step as a torch.distributed.checkpoint directory in
``FileSystemWriter``'s layout (``.metadata`` plus ``__0_0.distcp``), so that
``torch.distributed.checkpoint.load(state, checkpoint_id=DIR)`` reads it at any world size:

- A step saved through DCP (`ckptstore.dcp.StoreWriter`) is read back through
  `ckptstore.dcp.StoreReader` into full tensors and saved again with DCP's own writer: the
  fqns, dtypes, global shapes and values are the ones the trainer saved; the shard layout is
  not kept (each tensor becomes one chunk), which DCP's resharding on load does not need.
  Non-tensor values pass the same ``torch.load(weights_only=True)`` check as in StoreReader
  unless ``trust_pickle=True``.
- Any other step (`Store.save`) is `Store.load`-ed and saved with DCP as it is: DCP flattens
  nested dicts to dotted fqns (int keys become strings on load, as for any DCP checkpoint),
  numpy values become torch tensors, other non-tensor values become DCP's bytes items.
- Runs in one process without a process group and holds the whole step in memory. The
  directory is written under a temporary name beside `path` and renamed into place; `path`
  must not exist or be an empty directory.

Import (`import_checkpoint`) saves a foreign checkpoint as a step:

- a ``.safetensors`` file, or a directory with ``*.safetensors.index.json``: read with
  safetensors (no code runs). A file exported by ckptstore comes back as the tree it was
  exported from (tuples, int keys and plain values included, numpy values as torch
  tensors); any other file as a flat ``{name: tensor}`` dict.
- a ``torch.save`` file: ``torch.load(path, map_location="cpu", weights_only=True)``. torch's
  restricted unpickler admits tensors, containers and plain values and refuses anything
  that would run code; such a file is an `InteropError`.
- a DCP checkpoint directory (it has a ``.metadata`` file): read with torch's DCP reader
  in this process, without a process group. Stock DCP loading unpickles ``.metadata`` and
  every non-tensor value with *unrestricted* pickle; ckptstore replaces both: ``.metadata``
  is read with an unpickler that only admits DCP's own metadata dataclasses and enums,
  torch dtypes, layouts, ``torch.Size`` and paths, and non-tensor values with
  ``torch.load(weights_only=True)``. DCP flattens dict keys to strings, so int keys (an
  optimizer's ``state``) come back as ``"0"``, ``"1"``, ...

- a Hugging Face Trainer ``checkpoint-N/`` directory (it has ``trainer_state.json``): one
  tree keyed by file name (`read_trainer_dir`): ``model.safetensors`` as its tensors,
  ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` (and ``pytorch_model.bin``) through
  ``torch.load(weights_only=True)``, ``*.json`` parsed, other files as bytes (also
  ``training_args.bin``, a pickled TrainingArguments object: kept, never unpickled).
  ``rng_state.pth`` holds numpy's RNG state, which ``weights_only`` refuses; exactly the
  globals it names are admitted (numpy's array rebuilder ``_reconstruct``, ``ndarray``,
  ``dtype`` and the uint32 dtype class), for every torch.save file.

Importing a torch.save file or a DCP directory necessarily goes through a (restricted)
unpickler; ckptstore's own read path never unpickles anything.
"""

from __future__ import annotations

import base64
import builtins
import dataclasses
import enum
import functools
import json
import math
import os
import pathlib
import pickle
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptstore.errors import InteropError, InvalidArgumentError
from ckptstore.progress import Progress
from ckptstore.store import SaveInfo, Store

INDEX_NAME = "model.safetensors.index.json"
TREE_KEY = "ckptstore.tree"
METADATA_KEY = "ckptstore.metadata"
STEP_KEY = "ckptstore.step"

# torch dtypes safetensors 0.4+ stores (measured: save_file and load_file round-trip them).
_SAFETENSORS_DTYPES = frozenset({
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "bfloat16",
    "float32", "float64", "complex64", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    "float8_e8m0fnu", "float4_e2m1fn_x2",
})


# -- export -----------------------------------------------------------------------------------
def _shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


class _Flattener:
    """Walks a loaded state: tensors out by unique name, the rest into a JSON skeleton."""

    def __init__(self) -> None:
        self.tensors: dict[str, Any] = {}
        self._storages: set[int] = set()

    def name_for(self, path: tuple[Any, ...]) -> str:
        base = ".".join(str(p) for p in path) or "state"
        name, n = base, 1
        while name in self.tensors:
            n += 1
            name = f"{base}#{n}"
        return name

    def add_tensor(self, path: tuple[Any, ...], value: Any) -> str:
        import torch

        from ckptstore.tree import format_path

        where = format_path(path)
        if not isinstance(value, torch.Tensor):
            import numpy as np

            array = np.asarray(value)
            try:
                value = torch.from_numpy(np.array(array, order="C", copy=True))
            except TypeError as exc:
                raise InteropError(f"{where}: numpy dtype {array.dtype} has no torch equivalent; "
                                   f"safetensors cannot hold it") from exc
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in _SAFETENSORS_DTYPES:
            raise InteropError(f"{where}: dtype {dtype} cannot be stored in safetensors "
                               f"(it holds {', '.join(sorted(_SAFETENSORS_DTYPES))})")
        tensor = value.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory; a view of a larger storage is cloned.
        if tensor.numel():
            storage = tensor.untyped_storage()
            if storage.data_ptr() in self._storages or storage.nbytes() != tensor.nbytes:
                tensor = tensor.clone()
            self._storages.add(tensor.untyped_storage().data_ptr())
        name = self.name_for(path)
        self.tensors[name] = tensor
        return name

    def skeleton(self, value: Any, path: tuple[Any, ...] = ()) -> Any:
        from ckptstore.tensors import is_tensor

        if is_tensor(value):
            return {"$tensor": self.add_tensor(path, value)}
        return _to_json(value, lambda v, p: self.skeleton(v, (*path, *p)))


def _to_json(value: Any, recurse: Callable[[Any, tuple[Any, ...]], Any] | None = None) -> Any:
    """Plain values to tagged JSON (see the module docstring); `recurse(child, subpath)`."""
    rec = recurse or (lambda v, _p: _to_json(v))
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: rec(v, (k,)) for k, v in value.items()}
        return {"$dict": [[k, rec(v, (k,))] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"$tuple": [rec(v, (i,)) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [rec(v, (i,)) for i, v in enumerate(value)]
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, float) and not isinstance(value, bool) and not math.isfinite(value):
        return {"$float": repr(float(value))}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InteropError(f"cannot represent {type(value).__name__} in safetensors metadata")


def _from_json(node: Any, tensors: dict[str, Any] | None = None) -> Any:
    if isinstance(node, list):
        return [_from_json(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        ((tag, inner),) = node.items()
        if tag == "$tensor" and tensors is not None:
            if inner not in tensors:
                raise InteropError(f"{TREE_KEY} names tensor {inner!r}, which the file does not hold")
            return tensors[inner]
        if tag == "$tuple":
            return tuple(_from_json(v, tensors) for v in inner)
        if tag == "$dict":
            return {k: _from_json(v, tensors) for k, v in inner}
        if tag == "$bytes":
            return base64.b64decode(inner)
        if tag == "$float":
            return float(inner)
    return {k: _from_json(v, tensors) for k, v in node.items()}


def _is_dir_target(path: Path, raw: str) -> bool:
    return raw.endswith(("/", os.sep)) or path.is_dir()


def _write_atomic(write: Callable[[Path], object], target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _save_shard(save_file: Callable[..., None], shard: dict[str, Any], path: Path) -> None:
    save_file(shard, path, metadata={"format": "pt"})


def export_safetensors(store: Store, step: int, path: str | os.PathLike[str], *,
                       max_shard_bytes: int | None = None, progress: bool = False) -> list[Path]:
    """Write `step` of `store` as safetensors at `path`; returns the files written (the index
    last). See the module docstring for names, metadata and the sharded layout."""
    from safetensors.torch import save_file

    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise InvalidArgumentError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    raw = os.fspath(path)
    target = Path(raw)
    sharded = max_shard_bytes is not None or _is_dir_target(target, raw)
    state = store.load(step)
    manifest = store.info(step).manifest
    flat = _Flattener()
    skeleton = flat.skeleton(state)
    extra = {TREE_KEY: json.dumps(skeleton, allow_nan=False), STEP_KEY: str(step),
             METADATA_KEY: json.dumps(_to_json(manifest.metadata), allow_nan=False)}
    total = sum(t.nbytes for t in flat.tensors.values())

    if not sharded:
        target.parent.mkdir(parents=True, exist_ok=True)
        with Progress(total, "export", "bytes", enabled=progress) as bar:
            _write_atomic(lambda tmp: save_file(flat.tensors, tmp, metadata={"format": "pt", **extra}), target)
            bar.advance(total)
        return [target]

    limit = max_shard_bytes if max_shard_bytes is not None else total + 1
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, tensor in flat.tensors.items():
        if shards[-1] and size + tensor.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    with Progress(total, "export", "bytes", enabled=progress) as bar:
        for i, shard in enumerate(shards, 1):
            file = target / _shard_name(i, len(shards))
            _write_atomic(functools.partial(_save_shard, save_file, shard), file)
            weight_map.update(dict.fromkeys(shard, file.name))
            written.append(file)
            bar.advance(sum(t.nbytes for t in shard.values()))
    index = {"metadata": {"total_size": total, **extra}, "weight_map": weight_map}
    index_path = target / INDEX_NAME
    _write_atomic(lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"), index_path)
    written.append(index_path)
    return written


# -- export to DCP ------------------------------------------------------------------------------
def _numpy_to_torch(value: Any) -> Any:
    """A loaded state with numpy arrays and scalars as torch tensors (DCP would pickle them)."""
    import numpy as np
    import torch

    if isinstance(value, (np.ndarray, np.generic)):
        return torch.from_numpy(np.array(value, order="C", copy=True))
    if isinstance(value, dict):
        return {k: _numpy_to_torch(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numpy_to_torch(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_numpy_to_torch(v) for v in value)
    return value


def _read_dcp_step(store: Store, step: int, trust_pickle: bool) -> dict[str, Any]:
    """The trainer's state of a StoreWriter step, as full tensors, in this process."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from ckptstore.dcp import StoreReader, unwrap

    state: dict[str, Any] = {}
    reader = StoreReader(store, step, trust_pickle=trust_pickle)
    reader.read_metadata()  # ckptstore errors as themselves, before DCP wraps them
    # _EmptyStateDictLoadPlanner builds the state from the metadata (as DCP's own
    # dcp_to_torch_save does); no_dist: no process group needed or used.
    try:
        _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except BaseException as exc:  # DCP wraps a reader's error in a CheckpointException
        inner = unwrap(exc)
        if inner is None or inner is exc:
            raise
        raise inner from exc
    return state


def _is_dcp_step(store: Store, step: int) -> bool:
    from ckptstore.tree import decode_tree

    tree = decode_tree(store.info(step).manifest.tree)
    return isinstance(tree, dict) and isinstance(tree.get("dcp"), dict) and "metadata" in tree["dcp"]


def export_dcp(store: Store, step: int, path: str | os.PathLike[str], *, trust_pickle: bool = False) -> list[Path]:
    """Write `step` of `store` as a DCP checkpoint directory at `path` (FileSystemWriter layout;
    see the module docstring); returns the files written, ``.metadata`` last. Raises
    InteropError if `path` is a file or a non-empty directory, UnsupportedValueError for a
    pickled value restricted unpickling refuses (DCP steps, unless `trust_pickle`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from ckptstore.dcp import unwrap

    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InteropError(f"{target}: exists and is not an empty directory; export a DCP checkpoint into a new one")
    if _is_dcp_step(store, step):
        state = _read_dcp_step(store, step, trust_pickle)
    else:
        state = _numpy_to_torch(store.load(step))
        if not isinstance(state, dict):
            state = {"state": state}  # DCP saves a dict; a bare value gets the name export_safetensors uses
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            try:
                dcp.save(state, storage_writer=FileSystemWriter(str(tmp)), no_dist=True)
            except BaseException as exc:  # DCP wraps failures in a CheckpointException
                inner = unwrap(exc)
                if inner is None or inner is exc:
                    raise
                raise inner from exc
        os.replace(tmp, target)  # onto a missing path or an empty directory: one rename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p for p in target.iterdir() if p.name != ".metadata")
    return [*files, target / ".metadata"]


# -- import -----------------------------------------------------------------------------------
def detect_format(source: str | os.PathLike[str]) -> str:
    """'safetensors', 'safetensors-index', 'dcp', 'hf-trainer' or 'torch' for a checkpoint at `source`."""
    path = Path(source)
    if path.is_dir():
        if (path / ".metadata").is_file():
            return "dcp"
        if (path / TRAINER_STATE).is_file():
            return "hf-trainer"
        if _index_file(path) is not None:
            return "safetensors-index"
        raise InteropError(f"{path}: a directory without a DCP .metadata file, a *.safetensors.index.json or a "
                           f"Hugging Face Trainer {TRAINER_STATE}; cannot tell what checkpoint it holds")
    if not path.is_file():
        raise InteropError(f"{path}: no such file or directory")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return "safetensors"
    return "torch"


def _index_file(directory: Path) -> Path | None:
    if (directory / INDEX_NAME).is_file():
        return directory / INDEX_NAME
    found = sorted(directory.glob("*.safetensors.index.json"))
    return found[0] if len(found) == 1 else None


def _looks_like_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, Any] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InteropError(f"{path}: not a readable safetensors file: {exc}") from exc
    return tensors, meta


def _state_from_safetensors(tensors: dict[str, Any], meta: dict[str, Any]) -> tuple[Any, Any]:
    """(state, exported metadata or None)."""
    tree = meta.get(TREE_KEY)
    exported = None
    if isinstance(meta.get(METADATA_KEY), str):
        try:
            exported = _from_json(json.loads(meta[METADATA_KEY]))
        except (ValueError, TypeError, AttributeError):
            exported = None
    if not isinstance(tree, str):
        return tensors, exported
    try:
        return _from_json(json.loads(tree), tensors), exported
    except InteropError:
        raise
    except (ValueError, TypeError, AttributeError) as exc:
        raise InteropError(f"corrupt {TREE_KEY} metadata: {exc}") from exc


def _load_safetensors_index(directory: Path) -> tuple[Any, Any]:
    index_path = _index_file(directory)
    assert index_path is not None
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InteropError(f"{index_path}: not a safetensors index: {exc}") from exc
    tensors: dict[str, Any] = {}
    for name in files:
        if not isinstance(name, str) or Path(name).name != name:
            raise InteropError(f"{index_path}: shard {name!r} is not a file name in that directory")
        found, _ = _read_safetensors(directory / name)
        tensors.update(found)
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise InteropError(f"{index_path}: tensors {missing[:5]} are in the weight map but in no shard")
    ordered = {name: tensors[name] for name in weight_map}
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return _state_from_safetensors(ordered, meta)


def _numpy_rng_globals() -> list[Any]:
    """What a pickled numpy RNG state (`np.random.get_state()`, in a Trainer's rng_state.pth)
    names: the array rebuilder, ndarray, dtype and uint32's dtype class. Data types only:
    `_reconstruct` makes an empty array of a given class, which must itself be admitted."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load_torch_file(path: Path) -> Any:
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InteropError(f"{path}: torch.load(weights_only=True) refused it: the file holds objects other than "
                           f"tensors, containers and plain values, which only an unrestricted unpickler (running "
                           f"code from the file) could load. Load it yourself if you trust it, and save the state "
                           f"with store.save. Details: {exc}") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise InteropError(f"{path}: not a torch.save file torch can read: {exc}") from exc


# Globals a DCP .metadata pickle may name (see _MetadataUnpickler).
_PATH_CLASSES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}
_BUILTINS = {"set", "frozenset", "slice", "complex", "bytearray"}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP .metadata file, admitting only data types: DCP's own metadata
    dataclasses and enums, torch dtypes/layouts/memory formats, torch.Size, paths."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        obj: Any = None
        if module == "torch":
            if name in ("Size", "device"):
                obj = getattr(torch, name)
            else:
                candidate = getattr(torch, name, None)
                if isinstance(candidate, (torch.dtype, torch.layout, torch.memory_format)):
                    obj = candidate
        elif module == "torch.serialization" and name == "_get_layout":
            obj = torch.serialization._get_layout
        elif module.startswith("torch.distributed.checkpoint.") or module == "torch.distributed.checkpoint":
            # Only modules torch already imported: naming a module never imports anything.
            candidate = getattr(sys.modules.get(module), name, None)
            if isinstance(candidate, type) and (dataclasses.is_dataclass(candidate)
                                                or issubclass(candidate, enum.Enum)):
                obj = candidate
        elif module == "pathlib" and name in _PATH_CLASSES:
            obj = getattr(pathlib, name)
        elif module == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            obj = OrderedDict
        elif module == "builtins" and name in _BUILTINS:
            obj = getattr(builtins, name)
        if obj is None:
            raise pickle.UnpicklingError(f"DCP metadata names {module}.{name}, which ckptstore does not admit")
        return obj


def _load_dcp(directory: Path) -> Any:
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
            for info in getattr(metadata, "storage_data", {}).values():
                relative = str(getattr(info, "relative_path", ""))
                if not relative or Path(relative).name != relative or relative in (".", ".."):
                    raise InteropError(f"{directory}: DCP metadata points outside the directory: {relative!r}")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    state: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            _load_state_dict(state, storage_reader=SafeReader(str(directory)), planner=SafePlanner(), no_dist=True)
    except InteropError:
        raise
    except pickle.UnpicklingError as exc:
        raise InteropError(f"{directory}: refused to unpickle: {exc}") from exc
    except (Exception, CheckpointException) as exc:  # a BaseException wrapping the per-rank failures
        causes = [pair[0] for pair in exc.failures.values()] if isinstance(exc, CheckpointException) else [exc]
        text = "; ".join(f"{type(c).__name__}: {c}" for c in causes)
        if any(isinstance(c, (pickle.UnpicklingError, InteropError)) for c in causes) or "does not admit" in text:
            raise InteropError(f"{directory}: refused to unpickle part of the DCP checkpoint "
                               f"(only data types are admitted): {text}") from None
        raise InteropError(f"{directory}: cannot read the DCP checkpoint: {text}") from None
    return state


# -- Hugging Face Trainer checkpoint-N/ directories -------------------------------------------
TRAINER_STATE = "trainer_state.json"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# A pickled TrainingArguments object: kept as its bytes, never unpickled (the Trainer does not read it on resume).
_TRAINING_ARGS = "training_args.bin"


def read_trainer_dir(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """A Trainer `checkpoint-N/` directory as a tree keyed by file name: `*.safetensors` as
    {tensor name: tensor}, `*.json` parsed, `*.pt`/`*.pth`/`*.bin` (optimizer, scheduler,
    rng_state, pytorch_model.bin) through `torch.load(weights_only=True)` with the numpy RNG
    globals admitted, any other file (tokenizer files; training_args.bin, a pickled object) as
    bytes. Raises
    InteropError for a subdirectory or a file it cannot read."""
    root = Path(directory)
    files: dict[str, Any] = {}
    for path in sorted(root.iterdir()):
        if path.is_dir():
            raise InteropError(f"{path}: a subdirectory in a Trainer checkpoint is not supported")
        if path.suffix == ".safetensors":
            files[path.name] = _read_safetensors(path)[0]
        elif path.suffix == ".json":
            try:
                files[path.name] = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                raise InteropError(f"{path}: not valid JSON: {exc}") from exc
        elif path.suffix in _TORCH_SUFFIXES and path.name != _TRAINING_ARGS:
            files[path.name] = _load_torch_file(path)
        else:
            files[path.name] = path.read_bytes()
    return files


def write_trainer_dir(files: dict[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write a tree from `read_trainer_dir` back as the directory the Trainer reads on resume
    (under a temporary name, then renamed over `directory`, which may exist)."""
    import torch
    from safetensors.torch import save_file

    target = Path(directory)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, content in files.items():
        if Path(name).name != name or name in (".", ".."):
            raise InteropError(f"{name!r}: a Trainer checkpoint file name must not hold a path")
        path = staging / name
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in content.items()}, str(path), metadata={"format": "pt"})
        elif name.endswith(".json"):
            path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        elif name.endswith(_TORCH_SUFFIXES) and not isinstance(content, bytes):
            torch.save(content, path)
        else:
            path.write_bytes(content)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def read_checkpoint(source: str | os.PathLike[str]) -> tuple[Any, str, Any]:
    """(state, detected format, ckptstore metadata of an exported file or None)."""
    kind = detect_format(source)
    path = Path(source)
    if kind == "safetensors":
        tensors, meta = _read_safetensors(path)
        state, exported = _state_from_safetensors(tensors, meta)
        return state, kind, exported
    if kind == "safetensors-index":
        state, exported = _load_safetensors_index(path)
        return state, kind, exported
    if kind == "dcp":
        return _load_dcp(path), kind, None
    if kind == "hf-trainer":
        return read_trainer_dir(path), kind, None
    return _load_torch_file(path), kind, None


def import_checkpoint(store: Store, step: int, source: str | os.PathLike[str], *, overwrite: bool = False,
                      metadata: Any = None) -> SaveInfo:
    """Save the checkpoint at `source` (safetensors file or sharded directory, torch.save file,
    DCP directory; detected) as `step` of `store`. `metadata` defaults to the metadata a
    ckptstore export carried, else none. Raises InteropError for a source it cannot read,
    StepExistsError if the step exists and not `overwrite`."""
    state, _kind, exported = read_checkpoint(source)
    return store.save(step, state, overwrite=overwrite, metadata=exported if metadata is None else metadata)


__all__ = ["INDEX_NAME", "TRAINER_STATE", "InteropError", "detect_format", "export_dcp", "export_safetensors",
           "import_checkpoint", "read_checkpoint", "read_trainer_dir", "write_trainer_dir"]
