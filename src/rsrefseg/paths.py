"""Where the shared (read-only) data lives; every location can be overridden by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable naming the shared data root (default: ``../shared/data`` next to the repo).
DATA_ENV = "RSREFSEG_DATA"
#: Environment variable naming the NWPU VHR-10 root (default: ``<data root>/nwpu-vhr10``).
NWPU_ENV = "RSREFSEG_NWPU"


def repo_root() -> Path:
    """The source checkout this package was imported from (``src/rsrefseg`` -> repo)."""
    return Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """Root of the shared data: ``$RSREFSEG_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return repo_root().parent / "shared" / "data"


def nwpu_root() -> Path:
    """NWPU VHR-10 root (``images/`` and ``annotations/instances_{train,val}.json``): ``$RSREFSEG_NWPU``,
    else ``<data root>/nwpu-vhr10``, else (when only that exists) :func:`nwpu_download_root`."""
    env = os.environ.get(NWPU_ENV)
    if env:
        return Path(env)
    shared = data_root() / "nwpu-vhr10"
    if not shared.is_dir() and not os.environ.get(DATA_ENV) and nwpu_download_root().is_dir():
        return nwpu_download_root()
    return shared


def nwpu_download_root() -> Path:
    """Where ``rsrefseg data download nwpu-vhr10`` writes by default: ``<repo>/.cache/nwpu-vhr10`` in a
    source checkout (git-ignored), else ``$XDG_CACHE_HOME/rsrefseg/nwpu-vhr10`` (``~/.cache/...``)."""
    root = repo_root()
    if (root / "pyproject.toml").is_file():
        return root / ".cache" / "nwpu-vhr10"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "rsrefseg" / "nwpu-vhr10"


def geotiff_root() -> Path:
    """Folder of the sample GeoTIFFs."""
    return data_root() / "geotiff"


def formats_root() -> Path:
    """Folder of the real annotation-format samples (RRSIS-D, RefSegRS, RISBench)."""
    return data_root() / "formats"
