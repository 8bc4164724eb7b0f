"""Clip a raster to an extent with QGIS's own GDAL (a small VRT), so the CLI reads only that window."""

from __future__ import annotations

from pathlib import Path

from osgeo import gdal


class ClipError(Exception):
    """The extent does not overlap the raster, or the raster cannot be clipped."""


def raster_bounds(path: str) -> tuple[float, float, float, float]:
    """``(xmin, ymin, xmax, ymax)`` of a north-up raster, in its CRS."""
    try:
        dataset = gdal.Open(path)
    except RuntimeError:  # exceptions are on when another plugin called gdal.UseExceptions()
        dataset = None
    if dataset is None:
        raise ClipError(f"{path}: GDAL cannot open this raster")
    x0, dx, rx, y0, ry, dy = dataset.GetGeoTransform()
    if rx or ry:
        raise ClipError(f"{path}: rotated rasters cannot be clipped by extent")
    xs = (x0, x0 + dx * dataset.RasterXSize)
    ys = (y0, y0 + dy * dataset.RasterYSize)
    return min(xs), min(ys), max(xs), max(ys)


def clip_to_extent(path: str, extent: tuple[float, float, float, float], out_vrt: str | Path) -> Path:
    """Write ``out_vrt``: the window of ``path`` covering ``extent`` (``xmin, ymin, xmax, ymax`` in the
    raster's CRS), intersected with the raster, on the raster's pixel grid.

    Raises:
        ClipError: no overlap, or GDAL failed.
    """
    bx0, by0, bx1, by1 = raster_bounds(path)
    x0, y0 = max(extent[0], bx0), max(extent[1], by0)
    x1, y1 = min(extent[2], bx1), min(extent[3], by1)
    if not (x0 < x1 and y0 < y1):
        raise ClipError(f"{path}: the extent ({extent[0]:g}, {extent[1]:g}, {extent[2]:g}, {extent[3]:g}) does "
                        f"not overlap the raster ({bx0:g}, {by0:g}, {bx1:g}, {by1:g})")
    out = Path(out_vrt)
    try:
        result = gdal.Translate(str(out), path, format="VRT", projWin=[x0, y1, x1, y0])
    except RuntimeError as exc:
        raise ClipError(f"{path}: cannot clip the raster ({exc})") from None
    if result is None:
        raise ClipError(f"{path}: cannot clip the raster ({gdal.GetLastErrorMsg()})")
    result = None  # closes and flushes the VRT
    return out
