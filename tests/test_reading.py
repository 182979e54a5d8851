"""Reading as users do (issue 14): opening never writes, a read at a URL with no store raises
StoreNotFoundError and creates nothing, and reads work without write access."""

from __future__ import annotations

from pathlib import Path

import pytest

import ckptstore


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

