"""Defaults of tiled inference shared by the library, the CLIs and the web demo.

A module of its own, importing nothing heavy, so that ``rsrefseg --help`` and the web demo's
argument parsing read them without importing torch or the model code.
"""

from __future__ import annotations

__all__ = ["DEFAULT_TILE_CACHE_BYTES", "DEFAULT_TILE_THRESHOLD"]

#: Images with more pixels than this are segmented tile by tile (2048 x 2048).
DEFAULT_TILE_THRESHOLD = 2048 * 2048
#: Default byte budget of a :class:`rsrefseg.inference.tiling.TileCache` (about 270 windows of the
#: full presets, ~7.5 MB of features each).
DEFAULT_TILE_CACHE_BYTES = 2 * 1024**3
