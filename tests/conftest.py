"""Shared fixtures. Tiny configs keep every test fast on a 2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _deterministic_threads() -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared read-only data root; tests needing it skip when it is absent."""
    from rsrefseg.paths import data_root

    root = data_root()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set RSREFSEG_DATA)")
    return root


@pytest.fixture()
def tiny_model():
    """A fresh ``tiny`` RSRefSeg (seeded random base, LoRA injected), eval mode."""
    from rsrefseg import RSRefSeg

    return RSRefSeg.from_preset("tiny")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hugging Face directories (clip/, sam/) of the tiny preset written by ``init-base``."""
    from rsrefseg.build import write_base

    return write_base("tiny", tmp_path_factory.mktemp("tiny-base"))


def tiny_images(batch: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    """``batch x 3 x size x size`` random RGB images in [0, 255]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 255.0
