"""No step is committed that readers would refuse (issue 13).

Every writer encodes its manifest and ref through ckptstore.manifest, which checks them
against the limits decode_manifest / decode_ref enforce, before anything is stored. The
limits are shrunk here (the module constants) so small states cross them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch

import ckptstore
from ckptstore import keys, manifest, manifestv2
from ckptstore.backends.memory import drop_memory_space
from ckptstore.errors import ObjectTooLargeError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture
def store() -> Iterator[ckptstore.Store]:
    name = f"limits-{uuid.uuid4().hex}"
    with ckptstore.open(f"memory://{name}") as opened:
        yield opened
    drop_memory_space(name)


def _state(seed: int) -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.full((4,), float(seed + i)) for i in range(3)}


def _manifest_size(store: ckptstore.Store, step: int) -> int:
    return store.backend.head(keys.manifest_key(store.ref(step).manifest)).size


def _manifest_count(store: ckptstore.Store) -> int:
    return sum(1 for _ in store.backend.list(keys.MANIFESTS))


def test_manifest_at_the_limit_commits_and_one_byte_over_commits_nothing(
        store: ckptstore.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.save(1, _state(1))
    size = _manifest_size(store, 1)  # steps 1-3 encode to the same size: same shapes, 1-byte step

    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", size)
    store.save(2, _state(2))  # exactly at the limit: committed, and readable under it
    assert _manifest_size(store, 2) == size
    assert torch.equal(store.load(2)["w0"], _state(2)["w0"])

    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", size - 1)
    manifests = _manifest_count(store)
    with pytest.raises(ObjectTooLargeError) as caught:
        store.save(3, _state(3))
    assert f"{size} bytes" in str(caught.value) and str(size - 1) in str(caught.value)
    assert "nothing was committed" in str(caught.value)
    assert isinstance(caught.value, ckptstore.CkptStoreError)
    # Neither the ref nor the manifest was stored; step 2 is still the newest and loads.
    assert not store.backend.exists(keys.step_ref_key(3))
    assert _manifest_count(store) == manifests
    assert store.latest() == 2
    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", size)
    assert torch.equal(store.load()["w1"], _state(2)["w1"])


def test_too_many_tensors_commit_nothing(store: ckptstore.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "MAX_TENSORS", 3)
    store.save(1, _state(1))  # 3 tensors: at the limit
    with pytest.raises(ObjectTooLargeError, match="4 tensors, over the readers' limit of 3"):
        store.save(2, {**_state(2), "w3": torch.ones(2)})
    assert store.steps() == [1]


def test_metadata_over_the_item_budget_commits_nothing(store: ckptstore.Store,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "MAX_FREEFORM_ITEMS", 12)
    store.save(1, _state(1), metadata={"lr": [0.1] * 9})  # the map 1 + 1, the list 1 + 9: at the limit
    assert torch.equal(store.load(1)["w0"], _state(1)["w0"])
    with pytest.raises(ObjectTooLargeError, match="metadata holds 13 values"):
        store.save(2, _state(2), metadata={"lr": [0.1] * 10})
    assert store.steps() == [1]


def test_dcp_manifest_over_the_limit_commits_nothing(store: ckptstore.Store,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptstore import dcp

    dcp.save({"model": _state(1)}, store, 1)
    size = _manifest_size(store, 1)  # a DCP step is a version 2 root (plus its parts)
    monkeypatch.setattr(manifestv2, "MAX_ROOT_BYTES", size - 1)
    with pytest.raises(ObjectTooLargeError, match=f"the manifest root of step 2 holds {size} bytes"):
        dcp.save({"model": _state(2)}, store, 2)
    assert not store.backend.exists(keys.step_ref_key(2))
    assert store.latest() == 1
    monkeypatch.setattr(manifestv2, "MAX_ROOT_BYTES", size)
    loaded = {"model": {k: torch.zeros(4) for k in _state(0)}}
    dcp.load(loaded, store, 1)
    assert torch.equal(loaded["model"]["w2"], _state(1)["w2"])


def test_ref_over_the_limit_is_refused_before_the_put(store: ckptstore.Store,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store.save(1, _state(1))
    size = len(manifest.encode_ref(store.ref(1)))
    monkeypatch.setattr(manifest, "MAX_REF_BYTES", size - 1)
    with pytest.raises(ObjectTooLargeError, match="the ref of step 2"):
        store.save(2, _state(2))
    assert not store.backend.exists(keys.step_ref_key(2))
