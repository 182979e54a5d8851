"""`import ckptstore.integrations` imports no trainer: a user of one trainer never pays for,
or needs installed, another's package."""

from __future__ import annotations

import subprocess
import sys

TRAINERS = ("lightning", "pytorch_lightning", "transformers", "olmo_core", "torchtitan")


def test_importing_the_package_imports_no_trainer() -> None:
    code = ("import sys, ckptstore.integrations; "
            f"print(sorted(m for m in {TRAINERS!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
