"""The polygons of one expression on a streamed scene, from mask regions to its GeoJSON file.

Polygons of a large scene can be many (hundreds of thousands for a 50000 x 50000 scene), and the
properties written with them (the expression's score) are known only once the last window was
decoded. :class:`StreamedPolygons` therefore:

1. traces the regions as they come (:class:`~rsrefseg.inference.raster_polygons.SeamPolygonizer`,
   which holds only the pieces waiting on open seams);
2. maps every final polygon to the CRS, applies ``min_area`` / ``simplify``
   (:func:`~rsrefseg.inference.raster_polygons.finish_polygons`) and appends it as WKB to a
   temporary spill file next to the outputs (hidden ``.<name>.polygons.<random>.tmp``, removed on
   success, failure and interrupt, and by the next run's clean-up after a SIGKILL);
3. at the end streams the spill, in batches, into ``<name>.geojson`` (the same properties as
   :func:`~rsrefseg.inference.geo.polygons_to_feature_collection`: ``expression``, ``score``,
   ``source``, ``area_crs_units``, ``area_m2``; legacy ``crs`` and ``crs_wkt`` members) and to a
   caller's callback (the image's vector file).

Memory: one batch of polygons and the waiting pieces, whatever the number of polygons. Features
are in the order the scene was swept (not sorted by area as for images held in memory).
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import shapely
from rasterio.errors import CRSError
from shapely.geometry import Polygon

from rsrefseg.errors import DataError
from rsrefseg.inference.geo import GeoReference, area_m2
from rsrefseg.inference.raster_polygons import SeamPolygonizer, finish_polygons
from rsrefseg.inference.tiling import TileBox

__all__ = ["GEOJSON_FIELDS", "StreamedPolygons"]

#: Properties of the per-expression GeoJSON files (as ``polygons_to_feature_collection`` writes them).
GEOJSON_FIELDS = {"expression": "str", "score": "float64", "source": "str", "area_crs_units": "float64",
                  "area_m2": "float64"}
#: Polygons per batch when the spill is read back.
_BATCH = 5000


class StreamedPolygons:
    """Trace, spill and finally write the polygons of one expression (see the module docstring).

    Args:
        folder: Output folder (the spill file goes there).
        name: The expression's file stem.
        height, width: Scene size ``H x W``.
        georef: The scene's georeference (pixel -> CRS transform and CRS).
        simplify, min_area: Polygon options in CRS units / CRS units squared.
    """

    def __init__(self, folder: Path, name: str, height: int, width: int, georef: GeoReference,
                 simplify: float = 0.0, min_area: float = 0.0) -> None:
        self.georef, self.simplify, self.min_area = georef, simplify, min_area
        self.polygonizer = SeamPolygonizer(height, width)
        self.count = 0
        try:
            fd, spill = tempfile.mkstemp(prefix=f".{name}.polygons.", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise DataError(f"{folder}: cannot write the polygons of {name} ({exc.strerror or exc})") from None
        self._path = Path(spill)
        self._file: IO[bytes] | None = os.fdopen(fd, "w+b")

    def _spill(self, pixel_polygons: list[Polygon]) -> None:
        if not pixel_polygons:
            return
        assert self._file is not None
        polygons = finish_polygons(pixel_polygons, self.georef.transform, self.simplify, self.min_area)
        blobs = shapely.to_wkb(np.asarray(polygons, dtype=object))
        try:
            self._file.write(b"".join(struct.pack("<I", len(b)) + b for b in blobs))
        except OSError as exc:
            raise DataError(f"{self._path}: cannot write ({exc.strerror or exc})") from None
        self.count += len(polygons)

    def add(self, box: TileBox, mask: np.ndarray) -> None:
        """One final region's ``h x w`` bool mask."""
        self._spill(self.polygonizer.add(box, mask))

    def flush(self, axis: int, before: int) -> None:
        """Everything before ``before`` along ``axis`` was delivered: finish what can no longer grow."""
        self._spill(self.polygonizer.flush(axis, before))

    def _batches(self) -> Iterator[list[Polygon]]:
        assert self._file is not None
        self._file.flush()
        self._file.seek(0)
        batch: list[bytes] = []
        while header := self._file.read(4):
            batch.append(self._file.read(struct.unpack("<I", header)[0]))
            if len(batch) == _BATCH:
                yield list(shapely.from_wkb(batch))
                batch = []
        if batch:
            yield list(shapely.from_wkb(batch))

    def write(self, path: Path, expression: str, score: float, source: str,
              on_batch: Callable[[list[Polygon]], None] | None = None) -> tuple[int, float | None]:
        """Finish tracing and write ``path`` (GeoJSON); ``on_batch`` gets every batch of CRS polygons.

        Returns:
            The polygon count and their total area in m² (``None`` when the CRS has no linear unit).
        """
        from rsrefseg.inference.vector_io import LayerWriter

        self._spill(self.polygonizer.close())
        crs = self.georef.crs
        writer = LayerWriter(path, "geojson", crs, GEOJSON_FIELDS, "Polygon")
        total: float | None = 0.0
        try:
            for polygons in self._batches():
                areas = [_area_m2(p, crs) for p in polygons]
                n = len(polygons)
                writer.write(polygons, {"expression": [expression] * n, "score": [score] * n, "source": [source] * n,
                                        "area_crs_units": [p.area for p in polygons], "area_m2": areas})
                total = None if total is None or any(a is None for a in areas) else total + sum(areas)  # type: ignore[arg-type]
                if on_batch is not None:
                    on_batch(polygons)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        finally:
            self.abort()
        return self.count, total

    def abort(self) -> None:
        """Close and remove the spill file."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        self._path.unlink(missing_ok=True)


def _area_m2(polygon: Polygon, crs: Any) -> float | None:
    try:
        return area_m2(polygon, crs)
    except CRSError:  # coordinates outside the CRS's domain
        return None
