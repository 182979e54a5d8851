"""safetensors export (single file and Hugging Face shards) and import from safetensors,
torch.save files and DCP directories, without running code from the files."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckptstore
from ckptstore.interop import INDEX_NAME, InteropError, detect_format, export_safetensors, import_checkpoint


def model_state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "model": {"layer.weight": torch.randn(64, 32), "layer.bias": torch.randn(32).to(torch.bfloat16),
                  "emb": torch.arange(1000, dtype=torch.int64)},
        "optim": {"state": {0: {"exp_avg": torch.randn(64, 32), "step": torch.tensor(7.0)}},
                  "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]},
        "np": np.arange(6, dtype=np.float32).reshape(2, 3),
        "step": 100,
        "extra": {"blob": b"\x00\xff", "nan": float("nan"), "$odd": None, "empty": [], "t": ()},
    }


EXPECTED_NAMES = {"model.layer.weight", "model.layer.bias", "model.emb", "optim.state.0.exp_avg",
                  "optim.state.0.step", "np"}


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, np.ndarray):  # numpy values are exported as torch tensors
        a = torch.from_numpy(a)
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (a, b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert a == b and type(a) is type(b)


@pytest.fixture
def store(tmp_path: Path) -> ckptstore.Store:
    s = ckptstore.open(str(tmp_path / "store"))
    s.save(100, model_state(), metadata={"run": "exp1", "tokens": 12345})
    return s


def test_export_single_file_loads_with_safetensors(store: ckptstore.Store, tmp_path: Path) -> None:
    out = tmp_path / "ckpt.safetensors"
    assert export_safetensors(store, 100, out) == [out]
    tensors = load_file(out)
    assert set(tensors) == EXPECTED_NAMES
    stored = store.load(100)
    assert_same(stored["model"]["layer.weight"], tensors["model.layer.weight"])
    assert_same(stored["model"]["layer.bias"], tensors["model.layer.bias"])
    assert_same(stored["optim"]["state"][0]["exp_avg"], tensors["optim.state.0.exp_avg"])
    assert_same(stored["np"], tensors["np"])
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["ckptstore.step"] == "100"
    assert json.loads(meta["ckptstore.metadata"]) == {"run": "exp1", "tokens": 12345}
    tree = json.loads(meta["ckptstore.tree"])
    assert tree["step"] == 100 and tree["model"]["emb"] == {"$tensor": "model.emb"}
    assert not list(tmp_path.glob(".*tmp*")), "no temporary files left behind"


def test_export_sharded_directory_with_index(store: ckptstore.Store, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    files = export_safetensors(store, 100, out, max_shard_bytes=10_000)
    index_path = out / INDEX_NAME
    assert files[-1] == index_path and len(files) >= 4
    shards = files[:-1]
    assert [f.name for f in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    index = json.loads(index_path.read_text())
    assert set(index["weight_map"]) == EXPECTED_NAMES
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(shard)
        assert all(index["weight_map"][name] == shard.name for name in part)
        # Only a tensor over the limit may push a shard past it.
        assert len(part) == 1 or sum(t.nbytes for t in part.values()) <= 10_000
        loaded.update(part)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in loaded.values())
    assert_same(store.load(100)["optim"]["state"][0]["exp_avg"], loaded["optim.state.0.exp_avg"])

    # A path ending in "/" is a directory too, with one shard by default.
    one = export_safetensors(store, 100, str(tmp_path / "one") + "/")
    assert [f.name for f in one] == ["model-00001-of-00001.safetensors", INDEX_NAME]


def test_export_import_round_trip_keeps_the_tree(store: ckptstore.Store, tmp_path: Path) -> None:
    original = model_state()
    export_safetensors(store, 100, tmp_path / "x.safetensors")
    export_safetensors(store, 100, tmp_path / "dir", max_shard_bytes=4096)
    for step, source in ((1, tmp_path / "x.safetensors"), (2, tmp_path / "dir")):
        info = import_checkpoint(store, step, source)
        assert info.step == step and info.new_chunks == 0  # the same tensors: every chunk deduplicated
        back = store.load(step)
        assert_same(original, back)  # tuples, int keys, bytes, nan and "$" keys survive
        assert store.info(step).manifest.metadata == {"run": "exp1", "tokens": 12345}


def test_import_foreign_safetensors_is_a_flat_dict(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.randn(3, 3), "b": torch.arange(4, dtype=torch.int32)}
    save_file(tensors, tmp_path / "m.safetensors")
    store = ckptstore.open(str(tmp_path / "s"))
    import_checkpoint(store, 5, tmp_path / "m.safetensors", metadata={"from": "hub"})
    back = store.load(5)
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert_same(tensor, back[name])
    assert store.info(5).manifest.metadata == {"from": "hub"}


def test_import_torch_save_file(tmp_path: Path) -> None:
    state = {"model": {"w": torch.randn(5, 5)}, "epoch": 3, "opt": {"state": {0: {"m": torch.ones(5)}}},
             "shape": (5, 5)}
    torch.save(state, tmp_path / "ckpt.pt")
    assert detect_format(tmp_path / "ckpt.pt") == "torch"
    store = ckptstore.open(str(tmp_path / "s"))
    import_checkpoint(store, 10, tmp_path / "ckpt.pt")
    assert_same(state, store.load(10))
    with pytest.raises(ckptstore.StepExistsError):
        import_checkpoint(store, 10, tmp_path / "ckpt.pt")
    assert import_checkpoint(store, 10, tmp_path / "ckpt.pt", overwrite=True).seq == 2


class Sneaky:
    """Unpickling this runs code (it writes a file); a restricted unpickler must refuse it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> Any:
        return (Path.write_text, (Path(self.path), "pwned"))


def test_torch_save_file_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "evil": Sneaky(str(marker))}, tmp_path / "evil.pt")
    store = ckptstore.open(str(tmp_path / "s"))
    with pytest.raises(InteropError, match="weights_only"):
        import_checkpoint(store, 1, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(ckptstore.StoreNotFoundError):  # a refused import creates nothing
        store.steps()


def test_import_dcp_directory(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.randn(8, 4), "b": torch.zeros(4, dtype=torch.float16)},
             "optim": {"state": {0: {"exp_avg": torch.ones(8)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
             "step": 42, "note": "hello"}
    with pytest.warns(UserWarning):  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))  # no process group needed
    assert detect_format(tmp_path / "dcp") == "dcp"
    store = ckptstore.open(str(tmp_path / "s"))
    import_checkpoint(store, 7, tmp_path / "dcp")
    back = store.load(7)
    # DCP flattens dict keys to strings: the optimizer's int key 0 comes back as "0".
    expected = {**state, "optim": {"state": {"0": {"exp_avg": state["optim"]["state"][0]["exp_avg"]}},
                                   "param_groups": state["optim"]["param_groups"]}}
    assert_same(dict(sorted(expected.items())), dict(sorted(back.items())))


def test_dcp_metadata_with_code_is_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning):
        dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path / "dcp"))
    marker = tmp_path / "pwned"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Sneaky(str(marker))))
    store = ckptstore.open(str(tmp_path / "s"))
    with pytest.raises(InteropError, match="does not admit"):
        import_checkpoint(store, 1, tmp_path / "dcp")
    assert not marker.exists()
    with pytest.raises(ckptstore.StoreNotFoundError):  # a refused import creates nothing
        store.steps()


def test_dcp_bytes_item_with_code_is_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    with pytest.warns(UserWarning):  # DCP stores non-tensor values as torch.save'd bytes
        dcp.save({"w": torch.ones(3), "evil": Sneaky(str(marker))}, checkpoint_id=str(tmp_path / "dcp"))
    store = ckptstore.open(str(tmp_path / "s"))
    with pytest.raises(InteropError):
        import_checkpoint(store, 1, tmp_path / "dcp")
    assert not marker.exists()
    with pytest.raises(ckptstore.StoreNotFoundError):  # a refused import creates nothing
        store.steps()


def test_unexportable_and_unrecognised_inputs_are_clear_errors(tmp_path: Path) -> None:
    store = ckptstore.open(str(tmp_path / "s"))
    store.save(1, {"z": torch.ones(2, dtype=torch.complex128)})
    with pytest.raises(InteropError, match=r"state\['z'\].*complex128"):
        export_safetensors(store, 1, tmp_path / "z.safetensors")
    store.save(2, {"s": np.array(["a", "bc"])})
    with pytest.raises(InteropError, match="numpy dtype"):
        export_safetensors(store, 2, tmp_path / "s.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InteropError, match="cannot tell"):
        import_checkpoint(store, 3, tmp_path / "empty")
    with pytest.raises(InteropError, match="no such file"):
        import_checkpoint(store, 3, tmp_path / "missing.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(InteropError, match="safetensors"):
        import_checkpoint(store, 3, tmp_path / "junk.safetensors")
    assert store.steps() == [1, 2]


def test_colliding_names_get_a_suffix(tmp_path: Path) -> None:
    store = ckptstore.open(str(tmp_path / "s"))
    state = {"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}, "l": [torch.ones(1), (torch.full((1,), 2.0),)]}
    store.save(1, state)
    export_safetensors(store, 1, tmp_path / "c.safetensors")
    assert set(load_file(tmp_path / "c.safetensors")) == {"a.b", "a.b#2", "l.0", "l.1.0"}
    import_checkpoint(store, 2, tmp_path / "c.safetensors")
    assert_same(state, store.load(2))


# -- export to a DCP directory ----------------------------------------------------------------
def _dcp_load(template: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Load with torch's stock FileSystemReader, in one process."""
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning):  # "assuming the intent is to load in a single process"
        dcp.load(template, checkpoint_id=str(directory))
    return template


def _zeros_like(value: Any) -> Any:
    """A load template of the same structure with every tensor zeroed and plain values changed."""
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, np.ndarray):
        return torch.zeros(value.shape, dtype=torch.from_numpy(value).dtype)
    if isinstance(value, dict):
        return {k: _zeros_like(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_zeros_like(v) for v in value]
    return None


def test_export_dcp_of_a_plain_step_loads_with_torchs_reader(store: ckptstore.Store, tmp_path: Path) -> None:
    from ckptstore.interop import export_dcp

    out = tmp_path / "dcp-out"
    files = export_dcp(store, 100, out)
    assert files[-1] == out / ".metadata" and all(f.is_file() for f in files)
    assert not list(tmp_path.glob(".dcp-out.tmp-*"))  # the temporary directory was renamed away
    stored = store.load(100)
    back = _dcp_load(_zeros_like(stored), out)
    assert_same(stored["model"], back["model"])
    assert_same(stored["optim"]["state"][0], back["optim"]["state"][0])
    assert back["optim"]["param_groups"] == [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]
    assert_same(stored["np"], back["np"])  # numpy arrays become torch tensors
    assert back["step"] == 100 and back["extra"]["blob"] == b"\x00\xff"

    with pytest.raises(InteropError, match="not an empty directory"):
        export_dcp(store, 100, out)  # never writes into an existing checkpoint


def test_dcp_directory_round_trip_through_the_store(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from ckptstore.interop import export_dcp

    torch.manual_seed(1)
    state = {"model": {"w": torch.randn(16, 8), "b": torch.randn(8).to(torch.bfloat16),
                       "ids": torch.arange(5, dtype=torch.int32)},
             "optim": {"state": {"0": {"exp_avg": torch.randn(16, 8)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
             "step": 42, "note": "hello"}
    with pytest.warns(UserWarning):
        dcp.save(state, checkpoint_id=str(tmp_path / "a"))
    store = ckptstore.open(str(tmp_path / "s"))
    import_checkpoint(store, 7, tmp_path / "a")
    export_dcp(store, 7, tmp_path / "b")
    from_a = _dcp_load(_zeros_like(state), tmp_path / "a")
    from_b = _dcp_load(_zeros_like(state), tmp_path / "b")
    assert_same(from_a, from_b)
    assert_same(state, from_b)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_export_dcp_of_a_storewriter_step(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from ckptstore.dcp import StoreWriter
    from ckptstore.errors import UnsupportedValueError
    from ckptstore.interop import export_dcp

    store = ckptstore.open(str(tmp_path / "s"))
    state = {"model": {"w": torch.randn(6, 4), "h": torch.ones(3, dtype=torch.float16)}, "step": 9,
             "sched": {"lr": [0.1, 0.01]}}
    dcp.save(state, storage_writer=StoreWriter(store, 3))
    export_dcp(store, 3, tmp_path / "out")
    back = _dcp_load({"model": {"w": torch.zeros(6, 4), "h": torch.zeros(3, dtype=torch.float16)}, "step": 0,
                      "sched": {"lr": None}}, tmp_path / "out")
    assert_same(state, back)

    dcp.save({"w": torch.ones(2), "obj": Sneaky(str(tmp_path / "pwned"))}, storage_writer=StoreWriter(store, 4))
    with pytest.raises(UnsupportedValueError, match="trust_pickle"):
        export_dcp(store, 4, tmp_path / "evil")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "evil").exists()


def test_cli_export_format_dcp(store: ckptstore.Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptstore.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main

    out = tmp_path / "cli-dcp"
    assert main(["export", "--format", "dcp", "--json", store.url, "latest", str(out)]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report == {"step": 100, "format": "dcp", "files": [str(out / "__0_0.distcp"), str(out / ".metadata")]}
    back = _dcp_load({"model": {"emb": torch.zeros(1000, dtype=torch.int64)}}, out)
    assert torch.equal(back["model"]["emb"], torch.arange(1000))
    assert main(["export", "--format", "dcp", store.url, "100", str(out)]) == EXIT_ERROR  # exists
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["export", "--format", "dcp", "--max-shard-size", "1MB", store.url, "100",
                 str(tmp_path / "x")]) == EXIT_USAGE


# 2 gloo ranks save a Shard(0) DTensor with DCP's own FileSystemWriter; the directory goes
# through the store (import, export) and is loaded back at 2 ranks with the stock reader.
ROWS, COLS = 7, 3  # uneven shards over 2 ranks: 4 and 3 rows


def _gloo_worker(rank: int, world: int, tmp: str, phase: str) -> None:
    import os

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv-{phase}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS)
        if phase == "save":
            state = {"w": distribute_tensor(full, mesh, [Shard(0)]), "b": torch.full((2,), 3.0), "step": 11}
            dcp.save(state, checkpoint_id=f"{tmp}/orig")
        else:
            target = {"w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)]), "b": torch.zeros(2),
                      "step": -1}
            dcp.load(target, checkpoint_id=f"{tmp}/exported")
            Path(tmp, f"load-{rank}.json").write_text(json.dumps({
                "local": target["w"].to_local().tolist(), "full": target["w"].full_tensor().tolist(),
                "b": target["b"].tolist(), "step": target["step"]}))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip gloo's C++ teardown at exit (see tests/test_dcp.py, _exit_cleanly)


@pytest.mark.slow
def test_sharded_dcp_checkpoint_of_two_ranks_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.multiprocessing as mp

    from ckptstore.interop import export_dcp

    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    tmp = str(tmp_path)
    mp.spawn(_gloo_worker, args=(2, tmp, "save"), nprocs=2, join=True)
    store = ckptstore.open(str(tmp_path / "s"))
    import_checkpoint(store, 1, tmp_path / "orig")
    full = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS)
    assert torch.equal(store.load(1)["w"], full)
    export_dcp(store, 1, tmp_path / "exported")
    mp.spawn(_gloo_worker, args=(2, tmp, "load"), nprocs=2, join=True)
    for rank in range(2):
        report = json.loads(Path(tmp, f"load-{rank}.json").read_text())
        assert report["full"] == full.tolist() and report["local"] == full[rank * 4:rank * 4 + 4].tolist()
        assert report["b"] == [3.0, 3.0] and report["step"] == 11


def _trainer_checkpoint(directory: Path) -> dict[str, Any]:
    """A Hugging Face Trainer checkpoint-N/ directory as the Trainer 5.x writes it (the files a
    resume reads), made without transformers: the RNG file holds numpy's RNG state."""
    import random

    directory.mkdir()
    model = {"wte.weight": torch.randn(8, 4), "ln_f.bias": torch.zeros(4)}
    save_file(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    optimizer = {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.randn(8, 4)}},
                 "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0, 1]}]}
    torch.save(optimizer, directory / "optimizer.pt")
    torch.save({"base_lrs": [0.01], "last_epoch": 4}, directory / "scheduler.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    torch.save(rng, directory / "rng_state.pth")
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": [{"loss": 3.5}]}))
    (directory / "training_args.bin").write_bytes(pickle.dumps({"output_dir": "x"}))
    return {"model": model, "optimizer": optimizer, "rng": rng}


def test_import_a_trainer_checkpoint_directory_admits_numpy_rng_state(tmp_path: Path) -> None:
    """rng_state.pth was refused by weights_only (numpy globals); exactly those are admitted."""
    made = _trainer_checkpoint(tmp_path / "checkpoint-4")
    assert detect_format(tmp_path / "checkpoint-4") == "hf-trainer"
    store = ckptstore.open(tmp_path / "store")
    import_checkpoint(store, 4, tmp_path / "checkpoint-4")
    state = store.load(4)
    assert sorted(state) == ["model.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt",
                             "trainer_state.json", "training_args.bin"]
    assert all(torch.equal(state["model.safetensors"][k], v) for k, v in made["model"].items())
    assert torch.equal(state["optimizer.pt"]["state"][0]["exp_avg"], made["optimizer"]["state"][0]["exp_avg"])
    assert state["rng_state.pth"]["python"] == made["rng"]["python"]
    kind, keys, pos, has_gauss, gauss = state["rng_state.pth"]["numpy"]
    assert (kind, pos, has_gauss, gauss) == (made["rng"]["numpy"][0], *made["rng"]["numpy"][2:])
    assert np.array_equal(keys, made["rng"]["numpy"][1])
    assert state["trainer_state.json"]["global_step"] == 4
    assert state["training_args.bin"] == pickle.dumps({"output_dir": "x"})  # kept as bytes, never unpickled


def test_numpy_globals_beyond_the_rng_state_stay_refused(tmp_path: Path) -> None:
    """Only what numpy's RNG state names is admitted: a numpy Generator (a BitGenerator
    constructor) and an object array (arbitrary objects inside) are still refused."""
    for name, value in [("generator.pt", np.random.default_rng(0)), ("objects.pt", np.array([Path("x")]))]:
        torch.save(value, tmp_path / name)
        with pytest.raises(InteropError, match="weights_only=True"):
            import_checkpoint(ckptstore.open(tmp_path / "store"), 1, tmp_path / name)


def test_cli_import_of_a_trainer_checkpoint_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptstore.cli import EXIT_OK, main

    _trainer_checkpoint(tmp_path / "checkpoint-4")
    assert main(["import", "--json", str(tmp_path / "store"), "4", str(tmp_path / "checkpoint-4")]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "hf-trainer" and report["step"] == 4
    assert ckptstore.open(tmp_path / "store").load(4)["trainer_state.json"]["global_step"] == 4
