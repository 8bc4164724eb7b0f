"""Fixtures of the training tests (helpers live in ``train_helpers.py``, shared with tests/test_evaluation.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import make_synthetic


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A session-wide synthetic dataset (24 train / 10 val images, 2 expressions each)."""
    return make_synthetic(tmp_path_factory.mktemp("synthetic"))
