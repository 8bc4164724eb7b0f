"""Fixtures of the inference tests: one tiny checkpoint per session, small synthetic rasters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

#: Factor applied to the tiny model's mask hypernetwork output layers (see tiny_checkpoint).
SHARPEN = 1000.0


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory of the ``tiny`` preset (seeded random weights), written once.

    The random SAM decoder gives logits of about 1e-4, which would make any logit tolerance
    meaningless; the last layer of the mask hypernetworks (a trained part, so it is saved) is
    scaled by 1000 so that logits have a standard deviation of about 0.1 and masks are non-trivial.
    """
    import torch

    from rsrefseg import RSRefSeg
    from rsrefseg.checkpoint import save_checkpoint

    model = RSRefSeg.from_preset("tiny")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "output_hypernetworks_mlps" in name and ".proj_out." in name:
                param.mul_(SHARPEN)
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny-ckpt") / "ckpt")


@pytest.fixture(scope="session")
def tiny_session_model(tiny_checkpoint: Path):
    """The tiny model loaded from :func:`tiny_checkpoint` (shared: tests must not change it for good)."""
    from rsrefseg.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture()
def predictor(tiny_session_model):
    """A fresh :class:`Predictor` on the shared tiny model."""
    from rsrefseg.inference.predictor import Predictor

    return Predictor(tiny_session_model)


def write_test_geotiff(
    path: Path,
    height: int = 96,
    width: int = 160,
    bands: int = 1,
    nodata_cols: int = 40,
    seed: int = 0,
) -> Path:
    """An int16 UTM GeoTIFF (EPSG:32616, 2 m pixels) whose left ``nodata_cols`` columns are nodata."""
    rng = np.random.default_rng(seed)
    data = rng.integers(100, 3000, size=(bands, height, width)).astype(np.int16)
    data[:, :, :nodata_cols] = -9999
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": bands, "dtype": "int16",
        "crs": CRS.from_epsg(32616), "transform": Affine(2.0, 0.0, 500000.0, 0.0, -2.0, 4000000.0),
        "nodata": -9999,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture()
def make_geotiff() -> Callable[..., Path]:
    """:func:`write_test_geotiff` as a fixture (test modules cannot import this conftest)."""
    return write_test_geotiff


@pytest.fixture()
def nodata_tif(tmp_path: Path) -> Path:
    """A 96 x 160 single-band int16 GeoTIFF with nodata in its 40 left columns."""
    return write_test_geotiff(tmp_path / "nodata_scene.tif")
