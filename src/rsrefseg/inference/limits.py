"""Limits checked before any work on an image: pixel count, free disk space, memory of a streamed pass.

- ``--max-pixels N``: an image with more than ``N`` pixels (``H * W`` read from the header) is
  refused (:func:`check_max_pixels`). Off by default for files on disk: large scenes are streamed.
- Free disk space: the outputs of an image must fit on the output disk (:func:`check_free_space`
  against :func:`scene_output_bytes`). The bound is the **uncompressed** size of the mask GeoTIFFs
  (``H * W`` bytes per band, plus a third for overviews) of every expression, plus one temporary
  copy during the Cloud Optimized GeoTIFF conversion: DEFLATE gives no useful upper bound below
  the raw size for arbitrary masks (incompressible data even grows slightly), and a mask is only
  known once the model has run. Real masks compress 10-1000x, so the check refuses only scenes
  whose worst case cannot be written, e.g. a 200000 x 200000 scene (40 GB per mask band) on a disk
  with 50 GB free; it names the file and the bytes needed.
- Streaming memory: :func:`expressions_per_pass` splits the expressions of a tiled scene into
  groups whose stitching frontier and previews fit :data:`~rsrefseg.inference.defaults.STREAM_MEMORY_BUDGET`,
  so memory does not grow with the number of expressions (a scene is then read once per group).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rsrefseg.errors import DataError
from rsrefseg.inference.stitching import FrontierStitcher

__all__ = ["check_free_space", "check_max_pixels", "expressions_per_pass", "format_bytes", "scene_output_bytes"]


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_max_pixels(path: str | os.PathLike[str], height: int, width: int, max_pixels: int | None) -> None:
    """Refuse an ``H x W`` image with more than ``max_pixels`` pixels (``None``: no limit).

    Raises:
        DataError: naming the file, its size and the limit.
    """
    if max_pixels is not None and height * width > max_pixels:
        raise DataError(f"{path}: {width} x {height} = {height * width:,} pixels exceeds --max-pixels "
                        f"{max_pixels:,}")


def scene_output_bytes(height: int, width: int, expressions: int, probability: bool = False) -> int:
    """Upper bound of the bytes the outputs of one image take on disk (see the module docstring)."""
    band = height * width * (2 if probability else 1)  # uint8 mask (+ probability) band(s)
    per_expression = band + band // 3 + 64 * 1024  # overviews, and PNGs/GeoJSON/headers of small images
    return expressions * per_expression + band  # + one temporary copy during the COG conversion


def check_free_space(folder: str | os.PathLike[str], needed: int, source: str | os.PathLike[str]) -> None:
    """Refuse when the disk of ``folder`` (or of its nearest existing parent) has less than ``needed``
    bytes free for the outputs of ``source``.

    Raises:
        DataError: naming the source image, the output folder, the bytes needed and free.
    """
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DataError(f"{source}: not enough free disk space for its outputs in {folder}: they need up to "
                        f"{format_bytes(needed)} ({needed:,} bytes, uncompressed bound), {format_bytes(free)} free")


def expressions_per_pass(height: int, width: int, tile: int, overlap: int, heatmap: bool, preview_pixels: int,
                         budget: int) -> int:
    """How many expressions one streamed pass over a tiled scene may carry within ``budget`` bytes:
    per expression, its share of the stitching frontier (:meth:`FrontierStitcher.frontier_bytes`),
    of the window buffers (values, merged regions and decoder output: three float32 windows) and
    its previews (bool mask, float64 heat sums). At least 1."""
    channels = 2 if heatmap else 1
    window = min(tile, height) * min(tile, width)
    per_expression = (FrontierStitcher.frontier_bytes(height, width, tile, overlap, channels)
                      + 3 * 4 * channels * window + preview_pixels * (9 if heatmap else 1))
    return max(1, budget // per_expression)
