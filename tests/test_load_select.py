"""load(select=[...]) loads only the named subtrees and reads only their bytes (issue 14).

The proof: a step of a model (8.4 MB) and its AdamW state (16.8 MB), and a load of
select=["model"], measured where the bytes come from. On local disk: /proc/self/io of a fresh
process after the store's files were dropped from the page cache (read_bytes: what the disk
delivered; rchar: what read calls returned). On S3 (SeaweedFS): the Content-Length of every
GetObject the load sent. A full load of the same step is the control that the counters count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptstore
from ckptstore import keys
from ckptstore.testing.wrappers import CountingBackend

REPO = Path(__file__).resolve().parent.parent
SMALL = ckptstore.ChunkingPolicy(chunk_size=64, small_tensor_limit=16, pack_size=128)
# What a load reads besides the selected tensors' chunks: the marker, the ref, the manifest and
# the pack of small tensors (biases, Adam's step counts) the model's bias shares (~30 KB here).
OVERHEAD = 256 << 10


def _training_state() -> dict[str, Any]:
    """A model of 8.4 MB and its AdamW state of 16.8 MB: each large tensor has its own chunk."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 2048)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": 1}


def _nbytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(v) for v in tree)
    return 0


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# -- what select keeps ----------------------------------------------------------------------------
@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = f"memory://{uuid.uuid4().hex}" if request.param == "memory" else str(tmp_path / "store")
    with ckptstore.Store(CountingBackend(ckptstore.open(url).backend), chunking=SMALL) as opened:
        yield opened


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "model": {"0.weight": torch.randn(4, 8, generator=g), "0.bias": torch.randn(4, generator=g)},
        "optim": {"state": {0: {"exp_avg": torch.randn(4, 8, generator=g), "step": torch.tensor(3.0)},
                            1: {"exp_avg": torch.randn(4, generator=g), "step": torch.tensor(3.0)}},
                  "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0, 1]}]},
        "layers": [torch.randn(3, generator=g), {"w": torch.randn(2, generator=g)}, (torch.randn(5, generator=g), 7)],
        "a.b": torch.randn(2, generator=g),
        "a": {"b": torch.randn(3, generator=g)},
        "step": 9,
    }


def _chunks_of(store: ckptstore.Store, step: int, paths: list[tuple[Any, ...]]) -> set[str]:
    """The chunk keys holding the tensors at `paths` (read off the manifest)."""
    from ckptstore.tree import TensorRef, decode_tree, map_tensors

    manifest = store.info(step).manifest
    wanted: set[str] = set()

    def visit(path: tuple[Any, ...], ref: TensorRef) -> TensorRef:
        if any(path[:len(p)] == p for p in paths):
            wanted.update(keys.chunk_key(manifest.chunks[c].digest) for c, _, _ in manifest.tensors[ref.index].segments)
        return ref

    map_tensors(decode_tree(manifest.tree), visit)
    return wanted


def _chunk_reads(store: ckptstore.Store) -> set[str]:
    return {key for op, key in store.backend.log if op == "get" and key.startswith("chunks/")}


def test_select_keeps_the_named_subtrees_in_their_nesting(store: ckptstore.Store) -> None:
    state = _state()
    store.save(1, state)
    store.backend.log.clear()
    loaded = store.load(1, select=["model", "optim.state.0"])
    assert _equal(loaded, {"model": state["model"], "optim": {"state": {0: state["optim"]["state"][0]}}})
    assert _chunk_reads(store) == _chunks_of(store, 1, [("model",), ("optim", "state", 0)])
    # A dict key with dots in it is matched whole; an int key by its decimal text.
    assert _equal(store.load(1, select=["model.0.weight"]), {"model": {"0.weight": state["model"]["0.weight"]}})
    # Plain values can be selected too, and every tensor-free subtree comes back as saved.
    assert store.load(1, select=["step", "optim.param_groups"]) == {
        "step": 9, "optim": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0, 1]}]}}


def test_select_in_lists_and_tuples_keeps_indices(store: ckptstore.Store) -> None:
    state = _state()
    store.save(1, state)
    # Some items of a list: a dict of them by index, so that index 2 still means item 2.
    loaded = store.load(1, select=["layers.2.0", "layers.1"])
    assert list(loaded["layers"]) == [1, 2]
    assert _equal(loaded["layers"][1], state["layers"][1])
    assert _equal(loaded["layers"][2], {0: state["layers"][2][0]})
    # Every item of a list: the list itself.
    assert _equal(store.load(1, select=["layers.0", "layers.1", "layers.2"]), {"layers": state["layers"]})


def test_a_name_two_paths_join_to_selects_both(store: ckptstore.Store) -> None:
    state = _state()
    store.save(1, state)
    loaded = store.load(1, select=["a.b"])
    assert _equal(loaded, {"a.b": state["a.b"], "a": {"b": state["a"]["b"]}})


def test_a_name_that_names_nothing_raises_before_any_chunk_is_read(store: ckptstore.Store) -> None:
    store.save(1, _state())
    store.backend.log.clear()
    with pytest.raises(ckptstore.errors.PathNotFoundError) as caught:
        store.load(1, select=["model", "modle", "optim.state.5", "step.x"])
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, ckptstore.CkptStoreError)
    assert caught.value.paths == ["modle", "optim.state.5", "step.x"]
    message = str(caught.value)
    assert "'modle' (there: model, optim, layers, a.b, a, step)" in message
    assert "'optim.state.5' (there: optim.state.0, optim.state.1)" in message
    assert "'step.x' (there: nothing)" in message
    assert _chunk_reads(store) == set()


def test_select_on_a_tag_and_with_into(store: ckptstore.Store) -> None:
    state = _state()
    store.save(1, state)
    store.tag("best", 1)
    target = {"0.weight": torch.zeros(4, 8), "0.bias": torch.zeros(4)}
    loaded = store.load("best", select=["model"], into={"model": target})
    assert loaded["model"]["0.weight"] is target["0.weight"] and _equal(target, state["model"])


# -- the proof: only the selected bytes are read ------------------------------------------------
_MEASURE = """
import json, sys
import torch, numpy, ckptstore, ckptstore.tensors, ckptstore.sysmem
def io():
    return {k: int(v) for k, v in (line.split(":") for line in open("/proc/self/io"))}
ckptstore.open(sys.argv[2]).load()  # warm the code paths on a store whose pages stay cached
store = ckptstore.open(sys.argv[1], create=False)
select = json.loads(sys.argv[3])
before = io()
state = store.load(1, select=select)
after = io()
print(json.dumps({k: after[k] - before[k] for k in ("read_bytes", "rchar")}))
"""


def _drop_page_cache(directory: Path) -> None:
    """Write back and drop every file of the store from the page cache (no root needed)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _measured_load(root: Path, warm: Path, select: list[str] | None) -> dict[str, int]:
    _drop_page_cache(root)
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(root), str(warm), json.dumps(select)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_select_reads_only_the_models_bytes_from_local_disk(tmp_path: Path) -> None:
    state = _training_state()
    model_bytes, step_bytes = _nbytes(state["model"]), _nbytes(state)
    assert model_bytes > 8_000_000 and step_bytes > 25_000_000  # the 8.4 MB model, 25.2 MB step
    root, warm = tmp_path / "store", tmp_path / "warm"
    ckptstore.open(root).save(1, state)
    ckptstore.open(warm).save(1, {"w": torch.zeros(4)})

    selected = _measured_load(root, warm, ["model"])
    full = _measured_load(root, warm, None)
    # The control: with the cache dropped, the counters see the whole step come off the disk.
    assert full["read_bytes"] >= step_bytes and full["rchar"] >= step_bytes, full
    # select=["model"] reads the model's chunks and little else, a third of the step.
    assert model_bytes <= selected["read_bytes"] <= model_bytes + OVERHEAD, (selected, model_bytes)
    assert model_bytes <= selected["rchar"] <= model_bytes + OVERHEAD, (selected, model_bytes)
    assert selected["read_bytes"] < full["read_bytes"] / 2.5


def _s3_backend(store: ckptstore.Store) -> Any:
    backend = store.backend
    while not hasattr(backend, "_data_client"):
        backend = backend.inner  # the retrying wrapper around the S3 backend
    return backend


def test_select_sends_ranged_gets_for_only_the_models_bytes_on_s3(s3_bucket: str) -> None:
    state = _training_state()
    model_bytes, step_bytes = _nbytes(state["model"]), _nbytes(state)
    url = f"s3://{s3_bucket}/select"
    ckptstore.open(url).save(1, state)
    store = ckptstore.open(url, create=False)
    received: list[int] = []

    def count(parsed: dict[str, Any], **_: Any) -> None:
        received.append(int(parsed.get("ContentLength", 0)))

    backend = _s3_backend(store)
    clients = {id(c): c for c in (backend._client, backend._data_client)}.values()
    for client in clients:
        client.meta.events.register("after-call.s3.GetObject", count)

    loaded = store.load(1, select=["model"])
    selected = sum(received)
    received.clear()
    full = store.load(1)
    assert _equal(loaded, {"model": state["model"]}) and _equal(full, state)
    assert sum(received) >= step_bytes  # the control: a full load fetches the whole step
    assert model_bytes <= selected <= model_bytes + OVERHEAD, (selected, model_bytes)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_select_of_a_small_tensor_reads_only_its_bytes_of_a_shared_pack(codec: str) -> None:
    """Four 1 KiB tensors share one uncompressed 4 KiB pack: select=["b"] fetches the pack's
    header and b's 1 KiB (a full load reads the pack whole); compressed, the whole pack."""
    from ckptstore.chunkblob import Compression

    store = ckptstore.open(f"memory://select-pack-{uuid.uuid4().hex}", compression=Compression(codec))
    state = {name: torch.arange(256, dtype=torch.float32) + i for i, name in enumerate("abcd")}
    store.save(1, state)
    [pack] = store.info(1).manifest.chunks
    counting = CountingBackend(store.backend)
    store.backend = counting
    got = store.load(1, select=["b"])
    assert torch.equal(got["b"], state["b"]) and set(got) == {"b"}
    if codec == "none":
        assert counting.read_bytes["chunks"] == 24 + 1024  # header, then b's bytes (with read(): 24 + 4096)
    else:
        assert counting.read_bytes["chunks"] == pack.stored_size  # one zstd frame: read whole, checked
