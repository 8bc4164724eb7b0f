"""RSRefSeg QGIS plugin: referring segmentation ("the storage tank closest to the river") of raster
layers with the ``rsrefseg`` command of a separate Python environment (nothing of rsrefseg, torch
or transformers is imported into QGIS's Python)."""

from __future__ import annotations

from typing import Any


def classFactory(iface: Any) -> Any:
    """QGIS entry point."""
    from .plugin import RSRefSegPlugin

    return RSRefSegPlugin(iface)
