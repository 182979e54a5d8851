"""Store-level round trips and deduplication, once per backend (local, memory, S3, GCS)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore import keys

SMALL_CHUNKS = ckptstore.ChunkingPolicy(chunk_size=64 << 10, small_tensor_limit=4 << 10, pack_size=16 << 10)


def _rich_state() -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "model": {
            "embed.weight": torch.randn(300, 257, generator=g),  # several 64 KiB chunks, ragged end
            "norm.weight": torch.ones(257, dtype=torch.bfloat16),
            "head.weight": torch.randn(257, 64, generator=g).t(),  # non-contiguous
            "scale": torch.tensor(0.5, dtype=torch.float64),  # 0-d
            "empty": torch.empty(0, 3),
            "fp8": torch.randn(33, generator=g).to(torch.float8_e4m3fn),
        },
        "optim": {"state": {0: {"step": torch.tensor(12.0), "exp_avg": torch.zeros(300, 257)}},
                  "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]},
        "rng": np.random.default_rng(1).integers(0, 2**32, size=624, dtype=np.uint32),
        "epoch": 3, "name": "run-\u00e9t\u00e9", "blob": b"\x00\xff", "none": None,
    }


def _equal(a: object, b: object) -> bool:
    if isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point and a.element_size() == 1 else a,
                                b.contiguous().view(torch.uint8) if b.dtype.is_floating_point and b.element_size() == 1
                                else b))
    if isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(b, dict):
        return isinstance(a, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("compression", [ckptstore.Compression("none"), ckptstore.Compression("zstd", level=1)],
                         ids=["raw", "zstd"])
def test_rich_state_round_trips_exactly(store_url: str, compression: ckptstore.Compression) -> None:
    state = _rich_state()
    ckptstore.open(store_url, chunking=SMALL_CHUNKS, compression=compression).save(10, state)
    loaded = ckptstore.open(store_url, create=False).load(10)  # a second handle, default settings
    assert _equal(loaded, state)


def test_load_into_existing_tensors_in_place(store_url: str) -> None:
    state = _rich_state()
    store = ckptstore.open(store_url, chunking=SMALL_CHUNKS)
    store.save(1, state)
    target = {"model": {"embed.weight": torch.zeros(300, 257), "head.weight": torch.zeros(257, 64).t()}}
    embed, head = target["model"]["embed.weight"], target["model"]["head.weight"]
    pointer = embed.data_ptr()
    loaded = store.load(1, into=target, strict=False).state  # two of the step's tensors: the rest is allocated
    assert loaded["model"]["embed.weight"] is embed and embed.data_ptr() == pointer
    assert loaded["model"]["head.weight"] is head  # non-contiguous: filled through a staging copy
    assert torch.equal(embed, state["model"]["embed.weight"]) and torch.equal(head, state["model"]["head.weight"])
    with pytest.raises(ckptstore.StateMismatchError, match=r"embed\.weight"):
        store.load(1, into={"model": {"embed.weight": torch.zeros(3)}})


def test_resave_writes_only_what_changed(store_url: str) -> None:
    store = ckptstore.open(store_url, chunking=SMALL_CHUNKS)
    g = torch.Generator().manual_seed(3)
    state = {f"layer{i}": torch.randn(64 << 10, generator=g) for i in range(10)}  # 10 x 256 KiB
    first = store.save(1, state)
    assert first.new_bytes >= 10 * (256 << 10)
    again = store.save(2, state)
    assert (again.new_chunks, again.new_bytes) == (0, 0), "an identical state must add no chunk bytes"
    original = state["layer4"]
    state["layer4"] = original + 1
    third = store.save(3, state)
    changed = 256 << 10
    assert changed <= third.new_bytes <= changed * 1.01, third
    stored = sum(o.size for o in store.backend.list(keys.CHUNKS))
    assert stored <= 11 * changed * 1.01
    assert _equal(store.load(3), state) and torch.equal(store.load(1)["layer4"], original)


def test_steps_latest_delete(store_url: str) -> None:
    store = ckptstore.open(store_url)
    for step in (5, 100, 20):
        store.save(step, {"step": step, "w": torch.full((3,), float(step))})
    assert store.steps() == [5, 20, 100] and store.latest() == 100
    store.delete(100)
    assert store.latest() == 20 and store.load()["step"] == 20
    with pytest.raises(ckptstore.StepNotFoundError):
        store.load(100)
