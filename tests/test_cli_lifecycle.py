"""The operator commands through `ckptstore.cli.main`: verify, du, cp, export, import, gc,
tag, locks. Output is parsed from --json; exit codes are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckptstore
from ckptstore import keys
from ckptstore.backends.base import CREATE, OVERWRITE
from ckptstore.chunking import ChunkingPolicy
from ckptstore.cli import EXIT_ERROR, EXIT_EXISTS, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, main, parse_size

SMALL = ChunkingPolicy(chunk_size=4096, small_tensor_limit=1024, pack_size=4096)


@pytest.fixture
def store_path(tmp_path: Path) -> str:
    path = str(tmp_path / "store")
    store = ckptstore.open(path, chunking=SMALL)
    shared = torch.arange(4096, dtype=torch.float32)  # 4 chunks, shared by every step
    for i, step in enumerate((100, 200, 300)):
        store.save(step, {"w": shared, "m": torch.full((600,), float(i)), "lr": 0.1})
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    """Exit code and the parsed --json output."""
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else None)


def test_verify_exit_codes_and_problems(store_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run(capsys, "verify", store_path, "--deep")
    assert code == EXIT_OK and report["ok"] and report["steps"] == [100, 200, 300] and report["problems"] == []

    store = ckptstore.open(store_path)
    own = [c for c in store.info(200).manifest.chunks
           if c.digest not in {d.digest for s in (100, 300) for d in store.info(s).manifest.chunks}]
    key = keys.chunk_key(own[0].digest)
    blob = bytearray(store.backend.get(key).data)
    blob[-1] ^= 0xFF
    store.backend.put(key, bytes(blob), mode=OVERWRITE)

    code, report = run(capsys, "verify", store_path)
    assert code == EXIT_OK, "same size: only --deep sees it"
    code, report = run(capsys, "verify", store_path, "--deep")
    assert code == EXIT_ERROR and not report["ok"]
    assert [(p["step"], p["kind"], p["key"]) for p in report["problems"]] == [(200, "corrupt-chunk", key)]
    code, report = run(capsys, "verify", store_path, "100", "250-400", "--deep")
    assert code == EXIT_OK and report["steps"] == [100, 300]

    assert main(["verify", store_path, "--deep"]) == EXIT_ERROR
    out = capsys.readouterr().out
    assert f"step 200  corrupt-chunk  {key}" in out and "FAILED" in out
    assert main(["verify", store_path, "7"]) == EXIT_NOT_FOUND
    assert main(["verify", store_path, "x"]) == EXIT_NOT_FOUND  # a tag name, and no such tag
    assert main(["verify", store_path, "x/y"]) == EXIT_USAGE


def test_du_reports_dedup_and_garbage(store_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, du = run(capsys, "du", store_path)
    assert code == EXIT_OK
    store = ckptstore.open(store_path)
    manifests = {s: store.info(s).manifest for s in (100, 200, 300)}
    # Known from the fixture, not from the report: each step holds float32 "w" (4096, the same
    # tensor in every step) and "m" (600), i.e. 4 chunks of "w" shared by all and one of "m" each.
    logical = 3 * (4096 + 600) * 4
    chunk_files = [p.stat().st_size for p in Path(store_path, "chunks").rglob("*") if p.is_file()]
    assert len(chunk_files) == 4 + 3
    assert du["steps"] == 3 and du["logical_bytes"] == logical
    distinct = {c.digest: c.stored_size for m in manifests.values() for c in m.chunks}
    assert du["referenced_chunks"] == len(distinct) == 7 and du["referenced_chunk_bytes"] == sum(chunk_files)
    assert du["dedup_ratio"] == pytest.approx(logical / sum(chunk_files))
    assert du["garbage_objects"] == 0 and du["garbage_bytes"] == 0 and du["missing_objects"] == 0
    assert du["stored_chunk_bytes"] == sum(distinct.values())

    # Deleting step 200 leaves its own chunk and its manifest unreferenced: garbage.
    others = {c.digest for s in (100, 300) for c in manifests[s].chunks}
    own = [c for c in manifests[200].chunks if c.digest not in others]
    manifest_size = store.backend.head(keys.manifest_key(store.ref(200).manifest)).size
    store.delete(200)
    code, du = run(capsys, "du", store_path)
    assert du["garbage_objects"] == len(own) + 1
    assert du["garbage_bytes"] == sum(c.stored_size for c in own) + manifest_size
    assert main(["du", store_path]) == EXIT_OK and "garbage" in capsys.readouterr().out


def test_cp_between_local_and_s3(store_path: str, s3_bucket: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    dst = f"s3://{s3_bucket}/mirror"
    code, report = run(capsys, "cp", store_path, dst, "--steps", "100", "200-250")
    assert code == EXIT_OK and report["steps"] == [100, 200] and report["bytes_copied"] > 0
    assert ckptstore.open(dst, create=False).steps() == [100, 200]

    code, report = run(capsys, "cp", store_path, dst, "--steps", "200")  # a rerun: already there
    assert code == EXIT_OK and report["already_there"] == [200] and report["bytes_copied"] == 0
    ckptstore.open(dst).save(200, {"other": torch.zeros(3)}, overwrite=True)  # DST's step 200 differs
    code, _ = run(capsys, "cp", store_path, dst, "--steps", "200")
    assert code == EXIT_EXISTS
    code, report = run(capsys, "cp", store_path, dst, "--steps", "200", "--overwrite")
    assert code == EXIT_OK and report["bytes_copied"] == 0 and report["chunks_copied"] == 0
    code, report = run(capsys, "cp", store_path, dst, "--skip-existing")
    assert code == EXIT_OK and report["steps"] == [300]

    back = str(tmp_path / "back")
    code, report = run(capsys, "cp", dst, back)
    assert code == EXIT_OK and report["steps"] == [100, 200, 300]
    assert torch.equal(ckptstore.open(back).load(300)["m"], ckptstore.open(store_path).load(300)["m"])
    assert main(["cp", store_path, back, "--steps", "999"]) == EXIT_NOT_FOUND
    assert main(["cp", str(tmp_path / "nothing"), back]) == EXIT_NOT_FOUND
    assert main(["cp", store_path, back, "--steps", "1-x"]) == EXIT_NOT_FOUND  # a tag name, and no such tag
    assert main(["cp", store_path, back, "--steps", "1-x/"]) == EXIT_USAGE


def test_cp_creates_the_destination_with_the_source_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = ckptstore.open(str(tmp_path / "sha"), hash_algorithm="sha256")
    src.save(1, {"x": torch.ones(3)})
    assert main(["cp", str(tmp_path / "sha"), str(tmp_path / "new")]) == EXIT_OK
    assert "copied 1 steps" in capsys.readouterr().out
    assert ckptstore.open(str(tmp_path / "new")).marker.hash_algorithm == "sha256"
    ckptstore.open(str(tmp_path / "b3")).save(9, {"y": torch.zeros(2)})  # a store with the default hash
    assert main(["cp", str(tmp_path / "sha"), str(tmp_path / "b3")]) == EXIT_ERROR
    assert "IncompatibleStoresError" in capsys.readouterr().err


def test_export_and_import(store_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w.safetensors"
    code, report = run(capsys, "export", store_path, "latest", str(out))
    assert code == EXIT_OK and report == {"step": 300, "format": "safetensors", "files": [str(out)]}
    assert torch.equal(load_file(out)["m"], torch.full((600,), 2.0))

    shards = tmp_path / "shards"
    code, report = run(capsys, "export", store_path, "100", str(shards), "--max-shard-size", "8KiB")
    assert code == EXIT_OK and len(report["files"]) == 3  # 16 KiB + 2.3 KiB in 8 KiB shards, and the index
    assert report["files"][-1].endswith("model.safetensors.index.json")

    code, info = run(capsys, "import", store_path, "400", str(out))
    assert code == EXIT_OK and info["format"] == "safetensors" and info["step"] == 400 and info["tensors"] == 2
    assert ckptstore.open(store_path).load(400)["lr"] == 0.1
    code, _ = run(capsys, "import", store_path, "400", str(shards))
    assert code == EXIT_EXISTS
    code, info = run(capsys, "import", store_path, "400", str(shards), "--overwrite")
    assert code == EXIT_OK and info["format"] == "safetensors-index" and info["seq"] == 2
    assert torch.equal(ckptstore.open(store_path).load(400)["m"], torch.zeros(600))

    torch.save({"a": torch.ones(2)}, tmp_path / "t.pt")
    new_store = str(tmp_path / "fresh")
    assert main(["import", new_store, "1", str(tmp_path / "t.pt")]) == EXIT_OK  # creates the store
    assert "imported" in capsys.readouterr().out
    assert main(["import", new_store, "2", str(tmp_path / "missing.pt")]) == EXIT_ERROR
    assert main(["export", store_path, "999", str(tmp_path / "x.safetensors")]) == EXIT_NOT_FOUND


def test_parse_size() -> None:
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("5GB") == 5 * 10**9
    assert parse_size("512k") == 512_000 and parse_size("1.5MiB") == 3 * 2**19 and parse_size("4096") == 4096
    for bad in ("lots", "-1", "0", "2XB"):
        with pytest.raises(Exception, match="size"):
            parse_size(bad)
    assert main(["export", "x", "1", "y", "--max-shard-size", "lots"]) == EXIT_USAGE


def test_operator_commands_import_no_torch(store_path: str) -> None:
    probe = (
        "import sys, io, contextlib\n"
        "from ckptstore.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['verify', {store_path!r}, '--deep']) == 0\n"
        f"    assert main(['du', {store_path!r}]) == 0\n"
        f"    assert main(['ls', {store_path!r}]) == 0\n"
        f"    assert main(['tag', {store_path!r}]) == 0\n"
        "heavy = [m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr


# -- commands over the lifecycle API (gc, tags, locks) -------------------------------------------
def test_tags_and_ls_tags_column(store_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = run(capsys, "tag", store_path, "best", "200")
    assert code == EXIT_OK and result == {"tag": "best", "step": 200}
    assert run(capsys, "tag", store_path, "release-1", "latest")[0] == EXIT_OK
    assert run(capsys, "tag", store_path)[1] == {"best": 200, "release-1": 300}
    assert run(capsys, "tag", store_path, "best")[1] == {"best": 200}
    assert run(capsys, "tag", store_path, "best", "100")[0] == EXIT_EXISTS
    assert run(capsys, "tag", store_path, "best", "100", "--force")[0] == EXIT_OK
    rows = run(capsys, "ls", store_path)[1]
    assert {r["step"]: r["tags"] for r in rows} == {100: ["best"], 200: [], 300: ["release-1"]}
    assert main(["ls", store_path]) == EXIT_OK
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[-1] == "TAGS" and table[1].split()[-1] == "best" and table[3].endswith("release-1")
    assert all(line == line.rstrip() for line in table)

    assert run(capsys, "tag", store_path, "best", "--delete")[1] == {"deleted": "best"}
    assert run(capsys, "tag", store_path, "best", "--delete")[0] == EXIT_NOT_FOUND
    assert run(capsys, "tag", store_path, "nope")[0] == EXIT_NOT_FOUND
    assert run(capsys, "tag", store_path, "x", "999")[0] == EXIT_NOT_FOUND
    assert run(capsys, "tag", store_path, "best", "1", "--delete")[0] == EXIT_USAGE
    assert run(capsys, "tag", store_path)[1] == {"release-1": 300}


def test_gc_dry_run_then_sweep(store_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = ckptstore.open(store_path)
    store.delete(200)
    garbage = run(capsys, "du", store_path)[1]["garbage_objects"]
    assert garbage >= 2
    code, report = run(capsys, "gc", store_path, "--dry-run", "--min-age", "0")
    assert code == EXIT_OK and report["dry_run"] and report["deleted_chunks"] + report["deleted_manifests"] == garbage
    assert run(capsys, "du", store_path)[1]["garbage_objects"] == garbage  # a dry run deletes nothing
    code, report = run(capsys, "gc", store_path)  # default --min-age 3600: everything is too young
    assert code == EXIT_OK and report["deleted_chunks"] == 0 and report["kept_young"] >= garbage
    code, report = run(capsys, "gc", store_path, "--min-age", "0")
    assert code == EXIT_OK and report["ran"] and report["deleted_chunks"] + report["deleted_manifests"] == garbage
    assert run(capsys, "du", store_path)[1]["garbage_objects"] == 0
    assert run(capsys, "verify", store_path, "--deep")[0] == EXIT_OK
    assert main(["gc", store_path, "--dry-run"]) == EXIT_OK
    assert "dry run" in capsys.readouterr().out


def test_gc_text_says_would_delete_and_why_young_garbage_stays(store_path: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    ckptstore.open(store_path).delete(200)
    assert main(["du", store_path]) == EXIT_OK
    assert "gc frees them once older than --min-age" in capsys.readouterr().out
    assert main(["gc", store_path, "--dry-run", "--min-age", "0"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "would delete" in out and "deleted" not in out.replace("nothing was deleted", "")
    assert main(["gc", store_path]) == EXIT_OK  # default --min-age 3600: the garbage is too young
    out = capsys.readouterr().out
    young = run(capsys, "gc", store_path, "--dry-run")[1]["kept_young"]
    assert young >= 2 and f"kept {young} unreferenced objects younger than --min-age 3600s" in out
    assert "--min-age 0' frees them now" in out
    assert main(["gc", store_path, "--min-age", "0"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "freeing" in out and "younger than --min-age" not in out


def test_locks_lists_and_clears_stale(store_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = ckptstore.open(store_path)
    key = keys.lock_key("save-deadbeef00000000")
    import msgpack

    store.backend.put(key, msgpack.packb({"v": 1, "owner": "ghost@host:1", "refreshed": 0.0}), mode=CREATE)
    old = time.time() - 7200
    os.utime(Path(store_path) / key, (old, old))  # not refreshed for two hours: its holder died
    code, result = run(capsys, "locks", store_path)
    assert code == EXIT_OK and result["cleared"] == []
    (lock,) = [lk for lk in result["locks"] if lk["name"] == key]
    assert lock["kind"] == "save" and lock["owner"] == "ghost@host:1" and lock["stale"] and lock["age_seconds"] > 7000
    code, result = run(capsys, "locks", store_path, "--clear-stale")
    assert code == EXIT_OK and [lk["name"] for lk in result["cleared"]] == [key]
    assert key not in [lk["name"] for lk in result["locks"]] and not store.backend.exists(key)
    assert main(["locks", store_path]) == EXIT_OK


def test_every_command_takes_a_number_latest_or_a_tag_as_a_step(store_path: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "tag", store_path, "best", "200")[0] == EXIT_OK
    for spec, step in (("200", 200), ("latest", 300), ("best", 200)):
        assert run(capsys, "show", store_path, spec)[1]["step"] == step
        code, result = run(capsys, "export", store_path, spec, str(tmp_path / f"{spec}.safetensors"))
        assert code == EXIT_OK and result["step"] == step
        assert run(capsys, "verify", store_path, spec)[1]["steps_checked"] == 1
        assert run(capsys, "tag", store_path, f"t-{spec}", spec)[1] == {"tag": f"t-{spec}", "step": step}
        dst = str(tmp_path / f"copy-{spec}")
        assert run(capsys, "cp", store_path, dst, "--steps", spec)[0] == EXIT_OK
        assert ckptstore.open(dst).steps() == [step]
    assert run(capsys, "show", store_path, "nope")[0] == EXIT_NOT_FOUND
    assert run(capsys, "verify", store_path, "nope", "100-200")[0] == EXIT_NOT_FOUND
    assert run(capsys, "verify", store_path, "best", "100-200")[1]["steps_checked"] == 2
    assert run(capsys, "rm", store_path, "best", "--yes")[1]["deleted"] == [200]
    assert run(capsys, "rm", store_path, "latest", "--yes")[1]["deleted"] == [300]
    assert ckptstore.open(store_path).steps() == [100]


@pytest.mark.parametrize("argv, code", [
    (["show", "{store}", "999"], EXIT_NOT_FOUND),
    (["show", "{store}", "nope"], EXIT_NOT_FOUND),
    (["show", "{store}", "x/y"], EXIT_USAGE),
    (["show", "{store}"], EXIT_USAGE),
    (["ls", "{store}/typo"], EXIT_NOT_FOUND),
    (["rm", "{store}", "100"], EXIT_USAGE),  # no --yes, and stdin is not a terminal
    (["rm", "{store}", "900-999", "--yes"], EXIT_NOT_FOUND),
    (["tag", "{store}", "t", "1", "--delete"], EXIT_USAGE),
    (["tag", "{store}", "old", "200"], EXIT_EXISTS),
    (["export", "{store}", "100", "{store}/x", "--format", "dcp", "--max-shard-size", "1GiB"], EXIT_USAGE),
    (["gc", "{store}", "--min-age", "soon"], EXIT_USAGE),
])
def test_json_errors_are_json_with_the_same_exit_codes(store_path: str, argv: list[str], code: int,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # noqa: SIM115 (closed with the test's stdin)
    ckptstore.open(store_path).tag("old", 100)
    argv = [a.format(store=store_path) for a in argv]
    assert main(argv) == code
    text = capsys.readouterr()
    assert text.out == "" and text.err.strip(), "text mode: the error goes to stderr"
    assert main([*argv, "--json"]) == code
    text = capsys.readouterr()
    error = json.loads(text.out)
    assert set(error) == {"error", "message"} and error["message"] and text.err == ""
    assert error["error"] == ("UsageError" if code == EXIT_USAGE else error["error"])


def test_rm_of_a_tagged_step_warns_that_the_tag_keeps_its_data(store_path: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    ckptstore.open(store_path).tag("best", 200)
    code, result = run(capsys, "rm", store_path, "100-200", "--yes")
    assert code == EXIT_OK and result == {"deleted": [100, 200], "kept_by_tags": {"best": 200}}
    assert main(["rm", store_path, "300", "--yes"]) == EXIT_OK
    assert "warning" not in capsys.readouterr().err, "an untagged step: no warning"
    store = ckptstore.open(store_path)
    store.save(400, {"x": torch.ones(3)})
    store.tag("keep", 400)
    assert main(["rm", store_path, "keep", "--yes"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "step 400 is tagged 'keep'" in err and "keeps its data alive" in err and "keep --delete" in err
