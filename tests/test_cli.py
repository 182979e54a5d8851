"""The ckptstore command line: output, --json, exit codes, and a torch-free start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import ckptstore
from ckptstore.cli import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, main


@pytest.fixture
def store_path(tmp_path) -> str:
    path = str(tmp_path / "store")
    store = ckptstore.open(path)
    big = torch.arange(2 << 20, dtype=torch.float32)  # 8 MiB: its own chunk, shared by both steps
    store.save(100, {"w": big, "b": torch.zeros(3, dtype=torch.bfloat16), "lr": 0.1}, metadata={"run": "a"})
    store.save(200, {"w": big, "b": torch.ones(3, dtype=torch.bfloat16), "lr": 0.05})
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptstore.cli", *args], capture_output=True, text=True, timeout=120)


def test_ls_table_and_json_report_dedup(store_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", store_path]) == EXIT_OK
    out = capsys.readouterr().out
    assert "STEP" in out and "100" in out and "200" in out and "dedup" in out
    assert main(["ls", store_path, "--json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [100, 200]
    assert rows[0]["logical_bytes"] == 8 * 2**20 + 6 + 8 or rows[0]["logical_bytes"] == (2 << 20) * 4 + 6
    # The second step shares the 8 MiB tensor: it adds only its small-tensor pack.
    assert rows[1]["new_bytes"] < 1024 < rows[0]["new_bytes"]
    assert rows[1]["stored_bytes"] > 8 * 2**20


def test_show_lists_tensors_and_metadata(store_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", store_path, "100"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "state['w']" in out and "float32" in out and "[2097152]" in out and "bfloat16" in out
    assert "'run': 'a'" in out
    assert main(["show", store_path, "100", "--json"]) == EXIT_OK
    details = json.loads(capsys.readouterr().out)
    assert details["step"] == 100 and details["metadata"] == {"run": "a"}
    assert {t["path"]: t["shape"] for t in details["tensors"]} == {"state['w']": [2097152], "state['b']": [3]}


def test_rm_needs_yes_without_a_terminal_and_accepts_ranges(store_path: str) -> None:
    refused = run_cli("rm", store_path, "100")
    assert refused.returncode == EXIT_USAGE and "--yes" in refused.stderr
    assert ckptstore.open(store_path).steps() == [100, 200]
    done = run_cli("rm", store_path, "50-150", "--yes", "--json")
    assert done.returncode == EXIT_OK, done.stderr
    assert json.loads(done.stdout) == {"deleted": [100]}
    assert ckptstore.open(store_path).steps() == [200]


def test_not_found_exit_codes(store_path: str, tmp_path) -> None:
    assert run_cli("rm", store_path, "7", "--yes").returncode == EXIT_NOT_FOUND
    missing = run_cli("show", store_path, "7")
    assert missing.returncode == EXIT_NOT_FOUND and "step 7 not found" in missing.stderr
    no_store = run_cli("ls", str(tmp_path / "typo"))
    assert no_store.returncode == EXIT_NOT_FOUND and "no ckptstore store" in no_store.stderr
    assert not (tmp_path / "typo").exists(), "listing must not create a store"
    assert run_cli("rm", store_path, "x-y", "--yes").returncode == EXIT_NOT_FOUND  # a tag name, no such tag
    assert run_cli("rm", store_path, "x/y", "--yes").returncode == EXIT_USAGE


def test_import_and_ls_do_not_import_torch_numpy_or_cloud_sdks(store_path: str) -> None:
    probe = (
        "import sys, io, contextlib\n"
        "import ckptstore\n"
        "from ckptstore.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['ls', {store_path!r}]) == 0\n"
        f"    assert main(['show', {store_path!r}, '100']) == 0\n"
        f"    assert main(['show', {store_path!r}, '100', '--tree']) == 0\n"
        f"    assert main(['diff', {store_path!r}, '100', '200']) == 0\n"
        f"    assert main(['du', {store_path!r}, '--history']) == 0\n"
        "heavy = [m for m in ('torch', 'numpy', 'boto3', 'botocore', 'google.cloud') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr


def test_demo_runs_end_to_end(tmp_path) -> None:
    result = run_cli("demo", str(tmp_path / "demo"), "--steps", "3")
    assert result.returncode == 0, result.stderr
    assert "StepExistsError" in result.stdout and "weights identical = True" in result.stdout
    assert ckptstore.open(str(tmp_path / "demo")).steps() == [0, 1, 2]
    again = run_cli("demo", str(tmp_path / "demo"), "--steps", "2")
    assert again.returncode == 0 and "resuming from step 2" in again.stdout


def test_public_api_is_exactly_all() -> None:
    import types

    public = {name for name, value in vars(ckptstore).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public == set(ckptstore.__all__) - {"__version__"}
    for name in ("open", "Store", "CkptStoreError", "StepExistsError", "StepNotFoundError", "CommitConflictError",
                 "IntegrityError", "UnsupportedFormatError", "ObjectNotFoundError", "AlreadyExistsError",
                 "PreconditionFailedError", "TransientError", "PermissionDeniedError", "BackendError"):
        assert name in ckptstore.__all__
        assert name in ("open", "Store") or issubclass(getattr(ckptstore, name), ckptstore.CkptStoreError)


def test_show_tree_prints_the_non_tensor_values(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    url = str(tmp_path / "tree")
    state = {"model": {"w": torch.zeros(4, 4), "b": np.zeros(2, dtype=np.float32)},
             "optim": {"state": {0: {"step": 12, "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.001,
                                                                                             "betas": (0.9, 0.999)}]},
             "config": {"name": "run-a", "seed": None, "blob": b"\x00\x01", "ratio": float("nan"), "tags": []},
             "epoch": 3}
    ckptstore.open(url).save(5, state)
    assert main(["show", url, "5", "--tree"]) == EXIT_OK
    out = capsys.readouterr().out
    lines = out.splitlines()
    tree = lines[lines.index("tree") + 1:lines.index("tensors     3") + 1]
    assert tree == [
        "  model:",
        "    w: <tensor float32 [4, 4]>",
        "    b: <ndarray <f4 [2]>",
        "  optim:",
        "    state:",
        "      0:",
        "        step: 12",
        "        exp_avg: <tensor float32 [3]>",
        "    param_groups:",
        "      [0]:",
        "        lr: 0.001",
        "        betas: (0.9, 0.999)",
        "  config:",
        "    name: 'run-a'",
        "    seed: None",
        "    blob: b'\\x00\\x01'",
        "    ratio: nan",
        "    tags: []",
        "  epoch: 3",
        "tensors     3",
    ]
    assert "state['optim']['state'][0]['exp_avg']  float32" in out  # then the tensor table
    assert main(["show", url, "latest", "--tree", "--json"]) == EXIT_OK
    raw = capsys.readouterr().out
    assert "NaN" not in raw  # strict JSON
    data = json.loads(raw)
    assert data["tree"] == {
        "model": {"w": "<tensor float32 [4, 4]>", "b": "<ndarray <f4 [2]>"},
        "optim": {"state": {"0": {"step": 12, "exp_avg": "<tensor float32 [3]>"}},
                  "param_groups": [{"lr": 0.001, "betas": [0.9, 0.999]}]},
        "config": {"name": "run-a", "seed": None, "blob": "0001", "ratio": "nan", "tags": []},
        "epoch": 3,
    }
    assert len(data["tensors"]) == 3
    assert main(["show", url, "5", "--json"]) == EXIT_OK
    assert "tree" not in json.loads(capsys.readouterr().out)  # only with --tree


def test_du_history_per_step_table_and_json(store_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["du", store_path, "--history", "--json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [100, 200]
    first, second = rows
    assert first["new_bytes"] == first["stored_bytes"] > 8 * 2**20  # everything is new in the first step
    assert second["new_bytes"] < 1024  # the 8 MiB tensor is shared: only the small pack is new
    assert second["stored_bytes"] == first["stored_bytes"] + second["new_bytes"]
    assert second["dedup_ratio"] == pytest.approx(
        (first["logical_bytes"] + second["logical_bytes"]) / second["stored_bytes"])
    assert 1.9 < second["dedup_ratio"] < 2.0
    assert main(["du", store_path, "--history"]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["STEP", "LOGICAL", "NEW", "STORED", "DEDUP"]
    assert out[1].split()[0] == "100" and out[2].split()[0] == "200"
    assert out[2].split()[-1] == f"{second['dedup_ratio']:.2f}x"


def test_du_plot_writes_a_png_and_matplotlib_is_imported_only_for_it(store_path: str, tmp_path) -> None:
    png = tmp_path / "growth.png"
    probe = (
        "import sys, io, contextlib\n"
        "from ckptstore.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    for argv in (['ls', {store_path!r}], ['du', {store_path!r}], ['du', {store_path!r}, '--history'],\n"
        f"                 ['show', {store_path!r}, '100', '--tree'], ['diff', {store_path!r}, '100', '200']):\n"
        "        assert main(argv) == 0, argv\n"
        "assert 'matplotlib' not in sys.modules, 'imported without --plot'\n"
        f"assert main(['du', {store_path!r}, '--plot', {str(png)!r}]) == 0\n"
        "assert 'matplotlib' in sys.modules\n"
        "print('lazy')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "lazy" in result.stdout, result.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "plot written to" in result.stdout


def test_du_plot_without_matplotlib_says_how_to_install_it(store_path: str, tmp_path) -> None:
    probe = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # what an environment without the plot extra imports\n"
        "from ckptstore.cli import main\n"
        f"sys.exit(main(['du', {store_path!r}, '--history', '--plot', {str(tmp_path / 'p.png')!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "pip install 'ckptstore[plot]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p.png").exists()
    bad = run_cli("du", store_path, "--plot", "")
    assert bad.returncode == EXIT_USAGE and "--plot" in bad.stderr


def test_cp_copies_tags_unless_no_tags(store_path: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    ckptstore.open(store_path).tag("best", 100)
    assert main(["cp", store_path, str(tmp_path / "with")]) == EXIT_OK
    assert "tagged 1: best" in capsys.readouterr().out
    assert ckptstore.open(str(tmp_path / "with")).tags() == {"best": 100}
    assert main(["cp", store_path, str(tmp_path / "without"), "--no-tags", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["tags"] == []
    without = ckptstore.open(str(tmp_path / "without"))
    assert without.steps() == [100, 200] and without.tags() == {}
