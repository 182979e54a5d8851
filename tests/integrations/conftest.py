"""Fixtures of the trainer integration tests (tests/conftest.py's servers apply here too)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(params=["local", "s3"])
def trainer_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store for a trainer's checkpoints: a local directory, then a SeaweedFS bucket."""
    if request.param == "local":
        yield str(tmp_path / "store")
    else:
        yield f"s3://{request.getfixturevalue('s3_bucket')}/run"
