"""Reading as users do (issue 14): opening never writes, a read at a URL with no store raises
StoreNotFoundError and creates nothing, and reads work without write access."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore import keys
from ckptstore.url import open_backend


# -- every error derives from CkptStoreError (README), bad arguments too --------------------
@pytest.mark.parametrize("step", [-1, 10**21, 1.5, "x", True])
def test_an_invalid_step_is_a_ckptstore_error_and_a_value_error(tmp_path: Path, step: object) -> None:
    store = ckptstore.open(str(tmp_path / "s"))
    for call in (lambda: store.save(step, {"a": 1}), lambda: store.delete(step)):  # type: ignore[arg-type]
        with pytest.raises(ckptstore.InvalidStepError) as caught:
            call()
        assert isinstance(caught.value, ckptstore.CkptStoreError) and isinstance(caught.value, ValueError)


def test_bad_arguments_are_ckptstore_errors(tmp_path: Path) -> None:
    store = ckptstore.open(str(tmp_path / "s"))
    for name in ("keep_last", "keep_every"):
        with pytest.raises(ckptstore.InvalidArgumentError, match=name):
            store.save(1, {"a": 1}, **{name: 0})
    with pytest.raises(ckptstore.InvalidArgumentError, match="retries"):
        ckptstore.open(str(tmp_path / "s"), retries=-1)
    from ckptstore.async_save import AsyncSaver

    with pytest.raises(ckptstore.InvalidArgumentError, match="max_in_flight"):
        AsyncSaver(store, max_in_flight=0)
    assert issubclass(ckptstore.InvalidArgumentError, ValueError)


# -- a save of a committed step fails before it writes anything -----------------------------
def test_save_of_a_committed_step_writes_no_chunk(tmp_path: Path) -> None:
    from ckptstore.testing.wrappers import CountingBackend

    url = str(tmp_path / "s")
    ckptstore.open(url).save(4, {"w": torch.arange(1000.0)})
    counting = CountingBackend(open_backend(url))
    store = ckptstore.Store(counting)
    with pytest.raises(ckptstore.StepExistsError):
        store.save(4, {"w": torch.arange(2000.0)})
    puts = [key for op, key in counting.log if op == "put"]
    assert not [k for k in puts if k.startswith((keys.CHUNKS, keys.MANIFESTS))], puts
    with pytest.raises(ckptstore.StepExistsError):
        store.save_async(4, {"w": torch.arange(3000.0)})  # at submit, not in the Future
    assert not [k for op, k in counting.log if op == "put" and k.startswith((keys.CHUNKS, keys.MANIFESTS))]
    store.save(4, {"w": torch.arange(2000.0)}, overwrite=True)
    assert torch.equal(store.load(4)["w"], torch.arange(2000.0))
    store.close()

