"""`Store.diff` and `ckptstore diff` (issue 14): tensors added, removed, changed and unchanged,
decided from the manifests' chunk digests with no tensor data read; `values=True` reads only
the changed tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore import errors, keys
from ckptstore.cli import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, main
from ckptstore.display import DIFF_LIST_LIMIT
from ckptstore.testing.wrappers import CountingBackend
from ckptstore.url import open_backend

BIG = 300_000  # float32 elements: 1.2 MB, over the 1 MiB small-tensor limit, so a chunk of its own


def _states() -> tuple[dict, dict]:
    frozen = torch.arange(BIG, dtype=torch.float32)
    a = {
        "model": {"frozen": frozen, "head": torch.ones(BIG), "bias": torch.ones(4), "norm": torch.full((3,), 2.0),
                  "gone": torch.zeros(5), "cast": torch.ones(6), "grow": torch.ones(2, 2)},
        "cfg": {"lr": 0.1},
    }
    b = {
        "model": {"frozen": frozen.clone(), "head": torch.ones(BIG) * 1.5, "bias": torch.tensor([1.0, 1, 1, 5]),
                  "norm": torch.full((3,), 2.0), "cast": torch.ones(6, dtype=torch.float16),
                  "grow": torch.ones(3, 2), "new": torch.zeros(7, dtype=torch.int64)},
        "cfg": {"lr": 0.2},
    }
    return a, b


def _counting_store(url: str) -> tuple[ckptstore.Store, CountingBackend]:
    counting = CountingBackend(open_backend(url))
    return ckptstore.Store(counting, create=False), counting


@pytest.fixture
def two_steps(tmp_path: Path) -> str:
    url = str(tmp_path / "s")
    a, b = _states()
    with ckptstore.open(url) as store:
        store.save(10, a)
        store.save(20, b)
        store.tag("base", 10)
    return url


def _names(items: list) -> list[str]:
    return [t.name for t in items]


def test_diff_sorts_tensors_from_the_manifests_and_reads_no_chunk(two_steps: str) -> None:
    store, counting = _counting_store(two_steps)
    result = store.diff(10, 20)
    assert _names(result.unchanged) == ["model.frozen"]  # re-saved from a clone: same bytes, same digests
    assert _names(result.changed) == ["model.head", "model.bias", "model.norm", "model.cast", "model.grow"]
    assert _names(result.removed) == ["model.gone"] and _names(result.added) == ["model.new"]
    changed = {t.name: t for t in result.changed}
    assert changed["model.cast"].old_dtype == "float32" and changed["model.cast"].dtype == "float16"
    assert changed["model.cast"].old_shape is None
    assert changed["model.grow"].old_shape == [2, 2] and changed["model.grow"].shape == [3, 2]
    # norm did not change, but it shares a pack chunk with bias, which did: the digests cannot tell.
    assert changed["model.norm"].packed and changed["model.bias"].packed and not changed["model.head"].packed
    assert result.bytes_of("unchanged") == BIG * 4 and result.bytes_of("removed") == 20
    assert result.bytes_of("added") == 56 and result.bytes_of("changed") == BIG * 4 + 16 + 12 + 12 + 24
    assert changed["model.head"].max_abs_diff is None  # not read
    assert not [key for op, key in counting.log if op == "get" and key.startswith(keys.CHUNKS)], counting.log
    as_json = json.loads(json.dumps(result.as_dict()))
    assert as_json["counts"] == {"added": 1, "removed": 1, "changed": 5, "unchanged": 1}
    assert as_json["a"] == 10 and as_json["b"] == 20 and as_json["values"] is False
    store.close()


def test_values_reads_only_the_changed_tensors_and_settles_packed_ones(two_steps: str) -> None:
    store, counting = _counting_store(two_steps)
    frozen_chunks = {c.digest for c in store.info(10).manifest.chunks if c.raw_size == BIG * 4
                     and c.digest in {d.digest for d in store.info(20).manifest.chunks}}
    assert len(frozen_chunks) == 1
    counting.log.clear()
    result = store.diff("base", "latest", values=True)
    read = [key for op, key in counting.log if op == "get" and key.startswith(keys.CHUNKS)]
    assert read and not {keys.chunk_key(d) for d in frozen_chunks} & set(read), read
    # head and the pack of each step; the packs (uncompressed) by byte range: a header, then the
    # packed tensors the diff reads (select=)
    assert len(set(read)) == 4
    changed = {t.name: t for t in result.changed}
    assert list(changed) == ["model.head", "model.bias", "model.cast", "model.grow"]
    assert _names(result.unchanged) == ["model.frozen", "model.norm"]  # in tree order
    assert changed["model.head"].max_abs_diff == 0.5 and changed["model.head"].rel_l2 == pytest.approx(0.5)
    assert changed["model.bias"].max_abs_diff == 4.0
    assert changed["model.bias"].rel_l2 == pytest.approx(float(torch.linalg.norm(torch.tensor([0, 0, 0, 4.0])) / 2))
    for name in ("model.cast", "model.grow"):  # dtype or shape changed: no element-wise comparison
        assert changed[name].max_abs_diff is None and changed[name].rel_l2 is None
    assert not any(t.packed for t in result.changed)
    store.close()


def test_values_of_other_dtypes_and_special_cases(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    with ckptstore.open(url) as store:
        store.save(1, {"bf": torch.ones(3, dtype=torch.bfloat16), "np": np.arange(4, dtype=np.int32),
                       "zero": torch.zeros(2), "nan": torch.tensor([1.0, 2.0]),
                       "cplx": torch.ones(2, dtype=torch.cfloat),
                       "empty": torch.ones(0), "flag": torch.tensor([True, False])})
        store.save(2, {"bf": torch.full((3,), 3.0, dtype=torch.bfloat16), "np": np.arange(4, dtype=np.int32) * 3,
                       "zero": torch.ones(2), "nan": torch.tensor([1.0, math.nan]), "cplx": torch.ones(2) * 1j,
                       "empty": torch.ones(0), "flag": torch.tensor([True, True])})
        result = store.diff(1, 2, values=True)
    changed = {t.name: t for t in result.changed}
    assert changed["bf"].max_abs_diff == 2.0 and changed["bf"].rel_l2 == pytest.approx(2.0)
    assert changed["np"].dtype == "numpy:<i4" and changed["np"].max_abs_diff == 6.0
    assert changed["np"].rel_l2 == pytest.approx(2.0)
    assert changed["zero"].max_abs_diff == 1.0 and changed["zero"].rel_l2 == math.inf  # from all zeros
    assert math.isnan(changed["nan"].max_abs_diff)
    assert changed["cplx"].max_abs_diff == pytest.approx(math.sqrt(2))
    assert changed["flag"].max_abs_diff == 1.0
    assert _names(result.unchanged) == ["empty"]
    as_json = json.loads(json.dumps(result.as_dict(), allow_nan=False))  # strict JSON: no inf, no nan
    by_name = {t["name"]: t for t in as_json["changed"]}
    assert by_name["zero"]["rel_l2"] == "inf" and by_name["nan"]["max_abs_diff"] == "nan"


def test_steps_are_resolved_like_the_cli_and_missing_ones_raise(two_steps: str) -> None:
    with ckptstore.open(two_steps, create=False) as store:
        assert store.diff("base", "latest").as_dict() == store.diff(10, 20).as_dict()
        assert store.diff("10", "20").as_dict() == store.diff(10, 20).as_dict()  # digits: a step, as load reads it
        with pytest.raises(errors.InvalidStepError):
            store.diff(-1, 20)
        same = store.diff(20, "latest")
        assert same.identical and not same.changed and len(same.unchanged) == 7
        with pytest.raises(errors.StepNotFoundError):
            store.diff(10, 30)
        with pytest.raises(errors.TagNotFoundError):
            store.diff("nope", 20)


def test_names_are_dotted_paths_and_colliding_ones_stay_apart(tmp_path: Path) -> None:
    with ckptstore.open(str(tmp_path / "s")) as store:
        layers = [torch.ones(1), {"w": torch.ones(1)}]
        store.save(1, {"a.b": torch.ones(1), "a": {"b": torch.ones(2)}, "layers": layers})
        store.save(2, {"a.b": torch.ones(1), "a": {"b": torch.zeros(2)}, "layers": layers})
        result = store.diff(1, 2, values=True)
    assert _names(result.changed) == ["state['a']['b']"]
    assert _names(result.unchanged) == ["state['a.b']", "layers.0", "layers.1.w"]


# -- the command ---------------------------------------------------------------------------------
def test_cli_diff_text_and_json(two_steps: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", two_steps, "base", "latest"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "step 10 -> step 20" in out
    assert "changed         5 tensors" in out and "unchanged       1 tensors" in out
    assert "model.head" in out and "model.gone" in out and "model.new" in out
    assert "float32 -> float16" in out and "[2, 2] -> [3, 2]" in out and "packed" in out
    assert "model.frozen" not in out  # unchanged names only with --all
    assert main(["diff", two_steps, "10", "20", "--all"]) == EXIT_OK
    assert "model.frozen" in capsys.readouterr().out
    assert main(["diff", two_steps, "10", "20", "--values"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "MAX ABS DIFF" in out and "REL L2" in out and "n/a" in out and "packed" not in out
    assert main(["diff", two_steps, "10", "20", "--json", "--values"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["counts"] == {"added": 1, "removed": 1, "changed": 4, "unchanged": 2}
    assert data["changed"][0] == {"name": "model.head", "dtype": "float32", "shape": [BIG], "bytes": BIG * 4,
                                  "max_abs_diff": 0.5, "rel_l2": pytest.approx(0.5)}


def test_cli_diff_truncates_long_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = str(tmp_path / "s")
    count = DIFF_LIST_LIMIT + 5
    with ckptstore.open(url) as store:
        store.save(1, {f"t{i}": torch.ones(1) for i in range(count)})
        store.save(2, {f"t{i}": torch.zeros(1) for i in range(count)})
    assert main(["diff", url, "1", "2"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"t{DIFF_LIST_LIMIT - 1}" in out and f"t{DIFF_LIST_LIMIT}" not in out and "... and 5 more" in out
    assert main(["diff", url, "1", "2", "--all"]) == EXIT_OK
    assert f"t{count - 1}" in capsys.readouterr().out


def test_cli_diff_errors(two_steps: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", two_steps, "10", "30"]) == EXIT_NOT_FOUND
    assert "step 30 not found" in capsys.readouterr().err
    assert main(["diff", two_steps, "nope", "10", "--json"]) == EXIT_NOT_FOUND
    assert json.loads(capsys.readouterr().out)["error"] == "TagNotFoundError"
    assert main(["diff", two_steps, "-1", "10"]) == EXIT_USAGE
    assert main(["diff", two_steps, "10"]) == EXIT_USAGE
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "typo"), "1", "2"]) == EXIT_NOT_FOUND
    assert not (tmp_path / "typo").exists()
