"""Fixtures of the data tests: shared real data (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsrefseg import paths


def _need(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        pytest.skip(f"{what} not available at {folder} (set ${paths.DATA_ENV} or ${paths.NWPU_ENV})")
    return folder


@pytest.fixture(scope="session")
def data_formats_dir() -> Path:
    """Real RRSIS-D / RefSegRS / RISBench sample records (``<data>/formats``)."""
    return _need(paths.formats_root(), "shared format samples")


@pytest.fixture(scope="session")
def data_geotiff_dir() -> Path:
    """Sample GeoTIFFs (``<data>/geotiff``)."""
    return _need(paths.geotiff_root(), "shared GeoTIFF samples")


@pytest.fixture(scope="session")
def data_nwpu_dir() -> Path:
    """NWPU VHR-10 root (``images/`` and ``annotations/``)."""
    return _need(paths.nwpu_root(), "NWPU VHR-10")
