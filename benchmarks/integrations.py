"""`python -m benchmarks --integrations [--runs N] [--json PATH] [--tmp DIR] [--which a,b]`.

For each trainer integration whose packages are installed, the first save and the resume of a
tiny model, through the trainer's own checkpointing and through ckptstore (a local store), in
the same process (after an untimed warm-up of both; own first, then ckptstore; each run on a
fresh model and directory); the
table gives medians and the ratio ckptstore / own.
A trainer that is not installed gets a "skipped" row naming the missing package.

Adding an integration: a function `measure(tmp: Path) -> dict[str, float]` returning the
seconds of the four ops in OPS, registered with `@integration("name", requires=("pkg",))`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: What each measurement times: the trainer's own first save and resume, and ckptstore's.
OPS = ("own_save", "store_save", "own_resume", "store_resume")
Measure = Callable[[Path], dict[str, float]]


@dataclass(frozen=True)
class Integration:
    name: str
    requires: tuple[str, ...]
    measure: Measure
    what: str  # what "save" and "resume" are for this trainer


REGISTRY: dict[str, Integration] = {}


def integration(name: str, *, requires: tuple[str, ...], what: str) -> Callable[[Measure], Measure]:
    """Register `measure` as the benchmark of integration `name` (needs the modules `requires`)."""

    def register(measure: Measure) -> Measure:
        REGISTRY[name] = Integration(name, requires, measure, what)
        return measure

    return register


@contextmanager
def timed(out: dict[str, float], op: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    out[op] = time.perf_counter() - start


def missing(requires: tuple[str, ...]) -> str | None:
    for module in requires:
        if importlib.util.find_spec(module) is None:
            return module
    return None


# -- Lightning -----------------------------------------------------------------------------
@integration("lightning", requires=("lightning",),
             what="save: Trainer.save_checkpoint (TorchCheckpointIO file vs StoreCheckpointIO step); "
                  "resume: the CheckpointIO's load_checkpoint that fit(ckpt_path=...) calls")
def measure_lightning(tmp: Path) -> dict[str, float]:
    import lightning as L
    import torch
    from lightning.fabric.plugins.io import TorchCheckpointIO

    from ckptstore.integrations.lightning import StoreCheckpointIO

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 512)), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Model(), data)  # one step: Adam moments exist, as in a first real checkpoint
    out: dict[str, float] = {}
    # Untimed warm-up of both paths (imports, first allocations); the timed saves are each the
    # first into their own file / store.
    for io, path in ((TorchCheckpointIO(), tmp / "warm.ckpt"), (StoreCheckpointIO(tmp / "warm-store"), tmp / "w")):
        trainer.strategy.checkpoint_io = io
        trainer.save_checkpoint(path)
    own, store = TorchCheckpointIO(), StoreCheckpointIO(tmp / "store")
    with timed(out, "own_save"):
        trainer.strategy.checkpoint_io = own
        trainer.save_checkpoint(tmp / "own.ckpt")
    with timed(out, "store_save"):
        trainer.strategy.checkpoint_io = store
        trainer.save_checkpoint(tmp / "store.ckpt")
    with timed(out, "own_resume"):
        own.load_checkpoint(tmp / "own.ckpt", weights_only=False)
    with timed(out, "store_resume"):
        StoreCheckpointIO(tmp / "store").load_checkpoint("ckptstore:latest")
    return out


# -- Hugging Face Trainer -----------------------------------------------------------------
@integration("transformers", requires=("transformers", "accelerate"),
             what="save: the Trainer's checkpoint-N/ vs that plus StoreCallback's commit; resume: the "
                  "Trainer loading checkpoint-N/ vs restore_checkpoint from the store plus that load")
def measure_transformers(tmp: Path) -> dict[str, float]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from ckptstore.integrations.transformers import StoreCallback, restore_checkpoint

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.arange(16) % 256
            return {"input_ids": ids, "labels": ids}

    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=16, n_embd=128, n_layer=2, n_head=2))
    args = TrainingArguments(output_dir=str(tmp / "out"), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Data())
    trainer.train()
    callback = StoreCallback(tmp / "store")
    out: dict[str, float] = {}
    directory = tmp / "out" / f"checkpoint-{trainer.state.global_step}"

    def own_save() -> None:
        trainer._save_checkpoint(trainer.model, trial=None)  # what the Trainer runs at each save_steps

    def own_load(path: Path) -> None:
        trainer._load_from_checkpoint(str(path))
        trainer._load_optimizer_and_scheduler(str(path))
        trainer._load_rng_state(str(path))

    own_save()  # untimed warm-up (imports, first allocations); then the Trainer overwrites checkpoint-N/
    StoreCallback(tmp / "warm-store").on_save(trainer.args, trainer.state, trainer.control)
    with timed(out, "own_save"):
        own_save()
    with timed(out, "store_save"):
        own_save()
        callback.on_save(trainer.args, trainer.state, trainer.control)
    with timed(out, "own_resume"):
        own_load(directory)
    shutil.rmtree(directory)
    with timed(out, "store_resume"):
        own_load(Path(restore_checkpoint(tmp / "store", tmp / "out") or ""))
    return out


# -- harness --------------------------------------------------------------------------------
def run(names: list[str], runs: int, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        entry = REGISTRY[name]
        absent = missing(entry.requires)
        if absent is not None:
            rows.append({"integration": name, "status": "skipped", "note": f"{absent} is not installed",
                         "what": entry.what})
            continue
        samples: dict[str, list[float]] = {op: [] for op in OPS}
        for i in range(runs):
            scratch = Path(tempfile.mkdtemp(prefix=f"{name}-{i}-", dir=tmp))
            try:
                for op, seconds in entry.measure(scratch).items():
                    samples[op].append(seconds)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        medians = {op: statistics.median(values) for op, values in samples.items()}
        rows.append({"integration": name, "status": "ok", "what": entry.what, "runs": samples, "seconds": medians,
                     "save_ratio": medians["store_save"] / medians["own_save"],
                     "resume_ratio": medians["store_resume"] / medians["own_resume"]})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| integration | own save (s) | ckptstore save (s) | ratio | own resume (s) | ckptstore resume (s) "
             "| ratio |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['integration']} | {row['status']}: {row['note']} | | | | | |")
            continue
        s = row["seconds"]
        lines.append(f"| {row['integration']} | {s['own_save']:.3f} | {s['store_save']:.3f} | "
                     f"{row['save_ratio']:.2f}x | {s['own_resume']:.3f} | {s['store_resume']:.3f} | "
                     f"{row['resume_ratio']:.2f}x |")
    notes = [f"- {row['integration']}: {row['what']}" for row in rows]
    return "\n".join([*lines, "", *notes])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks --integrations", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="measurements per integration (median reported)")
    p.add_argument("--which", default=",".join(REGISTRY), help=f"comma list of {', '.join(REGISTRY)}")
    p.add_argument("--json", type=Path, help="write every run and the medians here")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="parent of the scratch directory")
    args = p.parse_args(argv)
    names = [n for n in args.which.split(",") if n]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        p.error(f"unknown integration(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    args.tmp.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ckptstore-bench-integrations-", dir=args.tmp))
    try:
        rows = run(names, args.runs, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("# ckptstore trainer integrations: first save and resume, own checkpointing vs ckptstore\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
