"""Fixtures of the trainer integration tests (tests/conftest.py's servers apply here too)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_determinism() -> Iterator[None]:
    """Trainers set process-wide torch flags (Lightning's deterministic=True calls
    torch.use_deterministic_algorithms(True), under which torch.empty of a sub-byte dtype
    raises): put them back so later tests in this process see torch's defaults."""
    algorithms = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


@pytest.fixture(params=["local", "s3"])
def trainer_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store for a trainer's checkpoints: a local directory, then a SeaweedFS bucket."""
    if request.param == "local":
        yield str(tmp_path / "store")
    else:
        yield f"s3://{request.getfixturevalue('s3_bucket')}/run"
