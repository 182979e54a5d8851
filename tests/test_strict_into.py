"""load(into=...) is strict like torch's load_state_dict, load("2") means step 2, and the demo
resumes its optimizer (issue 14, "Reading checkpoints as users do").

- Paths on either side only raise StateMismatchError with `.missing` (in `into`, not in the
  step) and `.unexpected` (in the step, not in `into`); kind, dtype and shape mismatches are
  named in `.mismatched`. Nothing is read before the check passes.
- `strict=False` fills what matches and returns LoadResult(state, missing, unexpected).
- A target that is not a state tree (a module, an int, a tensor for a dict) is an
  InvalidArgumentError that says what to pass.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.demo import _make_model, _state, resume, run_demo
from ckptstore.kernel import LoadResult
from ckptstore.testing.wrappers import CountingBackend


@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ckptstore.Store]:
    """A store whose chunk reads are counted (`store.backend.log`), on memory:// or local disk."""
    url = f"memory://{uuid.uuid4().hex}" if request.param == "memory" else str(tmp_path / "store")
    with ckptstore.Store(CountingBackend(ckptstore.open(url).backend)) as opened:
        yield opened


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def _saved(store: ckptstore.Store, step: int = 1) -> dict[str, Any]:
    model, optimizer = _trained()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}
    store.save(step, state)
    return state


def _chunk_reads(store: ckptstore.Store) -> list[str]:
    return [key for op, key in store.backend.log if op == "get" and key.startswith("chunks/")]


def _fresh_model_state() -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in _trained()[0].state_dict().items()}


# -- strict by default ----------------------------------------------------------------------------
def test_a_typo_in_into_raises_with_missing_and_unexpected_and_reads_nothing(store: ckptstore.Store) -> None:
    saved = _saved(store)
    target = _fresh_model_state()
    target["0.wieght"] = target.pop("0.weight")  # a typo'd key
    before = {k: v.clone() for k, v in target.items()}
    with pytest.raises(ckptstore.StateMismatchError) as caught:
        store.load(1, select=["model"], into={"model": target})
    error = caught.value
    assert error.missing == ["model.0.wieght"]
    assert error.unexpected == ["model.0.weight"]
    assert error.mismatched == []
    assert "model.0.wieght" in str(error) and "model.0.weight" in str(error) and "strict=False" in str(error)
    assert _chunk_reads(store) == []  # checked before a single chunk is read
    assert all(torch.equal(target[k], before[k]) for k in target)  # nothing filled
    assert saved["step"] == 1


def test_the_whole_step_into_only_the_model_is_refused_listing_the_optimizer(store: ckptstore.Store) -> None:
    """Before: into={"model": sd} filled the model and silently allocated the rest."""
    _saved(store)
    with pytest.raises(ckptstore.StateMismatchError) as caught:
        store.load(1, into={"model": _fresh_model_state()})
    assert caught.value.missing == []
    assert sorted(caught.value.unexpected) == sorted(
        f"optim.state.{i}.{name}" for i in range(4) for name in ("step", "exp_avg", "exp_avg_sq"))
    assert _chunk_reads(store) == []


def test_shape_and_dtype_mismatches_are_named_with_the_path_lists(store: ckptstore.Store) -> None:
    _saved(store)
    target = _fresh_model_state()
    target["0.weight"] = torch.zeros(8, 6)  # transposed shape
    target["2.bias"] = torch.zeros(2, dtype=torch.float64)
    target["extra"] = torch.zeros(1)
    with pytest.raises(ckptstore.StateMismatchError) as caught:
        store.load(1, select=["model"], into={"model": target})
    error = caught.value
    assert dict(error.mismatched) == {
        "model.0.weight": "stored float32[6, 8], target float32[8, 6]",
        "model.2.bias": "stored float32[2], target float64[2]",
    }
    assert error.missing == ["model.extra"] and error.unexpected == []
    assert "stored float32[6, 8], target float32[8, 6]" in str(error)
    assert _chunk_reads(store) == []


def test_numpy_and_torch_targets_must_be_of_the_stored_kind(store: ckptstore.Store) -> None:
    store.save(1, {"t": torch.arange(4.0), "a": np.arange(3, dtype="<i8")})
    with pytest.raises(ckptstore.StateMismatchError) as caught:
        store.load(1, into={"t": np.zeros(4, dtype="<f4"), "a": torch.zeros(3, dtype=torch.int64)})
    assert dict(caught.value.mismatched) == {
        "t": "stored float32[4], target is a ndarray, not a torch tensor",
        "a": "stored numpy <i8[3], target torch tensor int64[3]",
    }
    read_only = np.zeros(3, dtype="<i8")
    read_only.flags.writeable = False
    with pytest.raises(ckptstore.StateMismatchError, match="read-only"):
        store.load(1, select=["a"], into={"a": read_only})


def test_strict_into_fills_in_place_when_everything_matches(store: ckptstore.Store) -> None:
    saved = _saved(store)
    model, optimizer = _make_like(saved)
    target = {"model": model, "optim": optimizer, "step": -1}
    loaded = store.load(1, into=target)
    for name, tensor in model.items():
        assert loaded["model"][name] is tensor and torch.equal(tensor, saved["model"][name])
    for index, moments in optimizer["state"].items():
        for name, tensor in moments.items():
            assert loaded["optim"]["state"][index][name] is tensor
            assert torch.equal(tensor, saved["optim"]["state"][index][name])
    assert loaded["step"] == 1 and target["step"] == -1  # plain values come from the step, into's are left


def _make_like(saved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model = {k: torch.zeros_like(v) for k, v in saved["model"].items()}
    moments = saved["optim"]["state"]
    optimizer = {"state": {i: {k: torch.zeros_like(v) for k, v in s.items()} for i, s in moments.items()},
                 "param_groups": saved["optim"]["param_groups"]}
    return model, optimizer


def test_strict_false_fills_what_matches_and_returns_the_lists(store: ckptstore.Store) -> None:
    saved = _saved(store)
    target = _fresh_model_state()
    target["0.wieght"] = target.pop("0.weight")
    result = store.load(1, into={"model": target}, strict=False)
    assert isinstance(result, LoadResult)
    assert result.missing == ["model.0.wieght"]
    assert "model.0.weight" in result.unexpected and "optim.state.0.exp_avg" in result.unexpected
    assert result.state["model"]["0.bias"] is target["0.bias"]  # matched: filled in place
    assert torch.equal(target["0.bias"], saved["model"]["0.bias"])
    assert torch.equal(result.state["model"]["0.weight"], saved["model"]["0.weight"])  # the rest: new memory
    assert not target["0.wieght"].any()  # missing from the step: left untouched
    state, missing, unexpected = store.load(1, strict=False)  # without into: a LoadResult all the same
    assert (missing, unexpected) == ([], []) and torch.equal(state["optim"]["state"][3]["exp_avg"],
                                                             saved["optim"]["state"][3]["exp_avg"])


def test_strict_false_still_refuses_a_shape_mismatch(store: ckptstore.Store) -> None:
    _saved(store)
    with pytest.raises(ckptstore.StateMismatchError) as caught:
        store.load(1, into={"model": {"0.weight": torch.zeros(3)}}, strict=False)
    assert caught.value.mismatched == [("model.0.weight", "stored float32[6, 8], target float32[3]")]
    assert caught.value.unexpected == []  # not strict: only the mismatch is the error


def test_into_with_select_is_compared_within_the_selection_only(store: ckptstore.Store) -> None:
    saved = _saved(store)
    model, optimizer = _make_like(saved)
    # The whole training state as target, only the model selected: the optimizer's tensors
    # outside the selection are neither compared nor touched.
    loaded = store.load(1, select=["model"], into={"model": model, "optim": optimizer})
    assert set(loaded) == {"model"} and loaded["model"]["2.weight"] is model["2.weight"]
    assert not optimizer["state"][0]["exp_avg"].any()
    with pytest.raises(ckptstore.StateMismatchError) as caught:
        store.load(1, select=["optim.state.1"], into={"optim": {"state": {1: {"exp_avg": torch.zeros(6)}}}})
    assert caught.value.unexpected == ["optim.state.1.step", "optim.state.1.exp_avg_sq"]


def test_huge_path_lists_are_truncated_in_the_message(store: ckptstore.Store) -> None:
    store.save(1, {f"w{i}": torch.zeros(1) for i in range(50)})
    with pytest.raises(ckptstore.StateMismatchError) as caught:
        store.load(1, into={f"v{i}": torch.zeros(1) for i in range(300)})
    message = str(caught.value)
    assert len(caught.value.missing) == 300 and len(caught.value.unexpected) == 50
    assert "(290 more)" in message and "(40 more)" in message and "v299" not in message
    assert len(message) < 1000


# -- targets that are not state trees -------------------------------------------------------------
@pytest.mark.parametrize(("into", "says"), [
    (torch.nn.Linear(8, 6), r"not torch\.nn\.modules\.linear\.Linear; pass its \.state_dict\(\)"),
    (42, "not int 42"),
    ("model", "not str 'model'"),
    ({"model": torch.nn.Linear(8, 6)}, r"holds torch\.nn\.modules\.linear\.Linear at model: .*\.state_dict\(\)"),
    ({"optim": torch.optim.SGD([torch.zeros(1, requires_grad=True)])}, r"at optim: .*\.state_dict\(\)"),
    (torch.zeros(6, 8), "into is a tensor, but step 1 holds a dict"),
], ids=["module", "int", "str", "nested-module", "nested-optimizer", "tensor-for-a-dict"])
def test_a_target_that_is_not_a_state_tree_is_a_typed_error(store: ckptstore.Store, into: Any, says: str) -> None:
    _saved(store)
    with pytest.raises(ckptstore.InvalidArgumentError, match=says):
        store.load(1, into=into)
    assert _chunk_reads(store) == []


def test_a_tensor_into_a_tensor_root_is_filled(store: ckptstore.Store) -> None:
    store.save(1, torch.arange(5.0))
    target = torch.zeros(5)
    assert store.load(1, into=target) is target and torch.equal(target, torch.arange(5.0))


# -- load(step) reads a step as the CLI does -------------------------------------------------------
def test_a_str_of_digits_is_a_step_number_latest_the_newest_other_strs_tags(store: ckptstore.Store) -> None:
    for step in (2, 10):
        store.save(step, {"step": step})
    store.tag("best", 2)
    assert store.load("2") == {"step": 2}  # before: TagNotFoundError: tag '2' not found
    assert store.load("0010") == {"step": 10}
    assert store.load("latest") == {"step": 10} == store.load()
    assert store.load("best") == {"step": 2}
    with pytest.raises(ckptstore.StepNotFoundError, match="step 3 not found"):
        store.load("3")
    with pytest.raises(ckptstore.InvalidStepError):
        store.load("1" * 21)  # beyond the largest step
    with pytest.raises(ckptstore.InvalidKeyError, match="tag name"):
        store.load("\uff12")  # a non-ASCII digit is no step number, and no tag name either


def test_tag_refuses_names_that_a_step_argument_reads_as_a_step(store: ckptstore.Store) -> None:
    store.save(1, {"step": 1})
    for name, meaning in (("7", "step 7"), ("007", "step 7"), ("latest", "the newest step")):
        with pytest.raises(ckptstore.InvalidKeyError, match=f"reads it as {meaning}"):
            store.tag(name, 1)
    assert store.tags() == {}
    store.tag("v7", 1)  # a letter makes it a tag name
    assert store.tags() == {"v7": 1}


def test_a_tag_named_like_a_number_is_loaded_by_its_step(store: ckptstore.Store) -> None:
    """A store written before tag() refused such names may hold the tags "7" and "latest"
    (keys.py allows them): the step reading wins, as in the CLI."""
    store.save(1, {"step": 1})
    store.save(2, {"step": 2})
    store.tag("old", 1)
    ref_bytes = store.backend.get("refs/tags/old").data
    for name in ("7", "latest"):  # as an older ckptstore wrote them
        store.backend.put(f"refs/tags/{name}", ref_bytes)
    with pytest.raises(ckptstore.StepNotFoundError, match="step 7 not found"):
        store.load("7")
    assert store.load("latest") == {"step": 2}
    assert store.load(store.ref("7").step) == {"step": 1}


def test_latest_of_an_empty_store_is_step_not_found(tmp_path: Path) -> None:
    store = ckptstore.open(tmp_path / "store")
    store.save(1, {"a": 1})
    store.delete(1)
    with pytest.raises(ckptstore.StepNotFoundError, match="latest"):
        store.load("latest")


def test_select_must_be_a_list_of_dotted_paths(store: ckptstore.Store) -> None:
    _saved(store)
    for bad in ("model", ["model", ""], [0], []):
        with pytest.raises(ckptstore.InvalidArgumentError, match="select"):
            store.load(1, select=bad)


# -- S3 --------------------------------------------------------------------------------------------
def test_strict_into_on_s3_reads_nothing_before_refusing(s3_bucket: str) -> None:
    with ckptstore.Store(CountingBackend(ckptstore.open(f"s3://{s3_bucket}/strict").backend)) as store:
        saved = _saved(store)
        with pytest.raises(ckptstore.StateMismatchError) as caught:
            store.load(1, into={"model": _fresh_model_state()})
        assert len(caught.value.unexpected) == 12 and _chunk_reads(store) == []
        model, optimizer = _make_like(saved)
        loaded = store.load(1, into={"model": model, "optim": optimizer})
        assert loaded["model"]["0.weight"] is model["0.weight"]
        assert torch.equal(model["0.weight"], saved["model"]["0.weight"])


# -- the demo resumes its optimizer ---------------------------------------------------------------
def test_demo_resume_restores_the_optimizer_exactly(tmp_path: Path) -> None:
    directory = str(tmp_path / "demo")
    run_demo(directory, steps=3)
    store = ckptstore.open(directory)
    saved = store.load(2)
    model, optimizer, step = resume(store)
    assert step == 2
    resumed = optimizer.state_dict()
    assert resumed["state"].keys() == saved["optim"]["state"].keys() and resumed["state"]
    for index, moments in saved["optim"]["state"].items():
        assert set(moments) == {"step", "exp_avg", "exp_avg_sq"}
        for name, tensor in moments.items():
            assert torch.equal(resumed["state"][index][name], tensor), (index, name)
    assert resumed["param_groups"] == saved["optim"]["param_groups"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved["model"][name])


def test_demo_resumed_training_matches_uninterrupted_training(tmp_path: Path) -> None:
    """2 + 2 steps with a resume in between save the same step 3 as 4 steps in one go: with
    Adam's moments reset on resume (the bug) the weights differ."""
    run_demo(str(tmp_path / "once"), steps=4)
    run_demo(str(tmp_path / "twice"), steps=2)
    run_demo(str(tmp_path / "twice"), steps=2)
    once = ckptstore.open(str(tmp_path / "once")).load(3)
    twice = ckptstore.open(str(tmp_path / "twice")).load(3)
    model, _ = _make_model()
    assert once.keys() == twice.keys() == _state(model, torch.optim.SGD(model.parameters()), 0).keys()
    for name, tensor in once["model"].items():
        assert torch.equal(tensor, twice["model"][name]), name
    for index, moments in once["optim"]["state"].items():
        for name, tensor in moments.items():
            assert torch.equal(tensor, twice["optim"]["state"][index][name]), (index, name)
