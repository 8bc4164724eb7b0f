"""Polygons of a mask that arrives piece by piece (a streamed scene), equal to one polygonize of the whole.

:func:`rsrefseg.inference.geo.mask_to_polygons` needs the ``H x W`` mask in memory.
:class:`SeamPolygonizer` takes the mask as regions that tile the scene without overlap (the final
regions of :mod:`rsrefseg.inference.stitching`, or windows read back from a GeoTIFF):

1. each region is polygonized on its own (GDAL polygonize, 4-connectivity, pixel coordinates, so
   every vertex is an integer and every comparison below is exact);
2. a polygon that does not reach an inner edge of its region (an edge shared with another region)
   is final at once;
3. the others wait and are merged, one ``unary_union`` per group of touching pieces, whenever the
   caller knows that everything before some row/column was delivered (and at the end): pieces
   sharing an edge segment on a seam become one polygon, pieces touching only at a corner stay
   apart (4-connectivity, like a polygonize of the whole mask), and collinear vertices left on
   former seams are removed; merged polygons lying entirely in the delivered part are final.

The result has the same polygons as a polygonize of the whole mask (same count, same areas, same
pixel-exact rings); :func:`finish_polygons` then maps them to the CRS and applies ``min_area`` and
``simplify`` like :func:`~rsrefseg.inference.geo.mask_to_polygons`. Memory: the pieces waiting
on the seams of the not-yet-delivered part and one region's mask, not the scene nor the output.
"""

from __future__ import annotations

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from shapely.geometry import Polygon, shape
from shapely.geometry.base import BaseGeometry

from rsrefseg.inference.tiling import TileBox

__all__ = ["SeamPolygonizer", "clean_polygons", "finish_polygons"]


def _polygons_of(geom: BaseGeometry) -> list[Polygon]:
    """The non-empty polygons inside ``geom`` (Polygon, MultiPolygon or GeometryCollection)."""
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    if hasattr(geom, "geoms"):
        return [p for part in geom.geoms for p in _polygons_of(part)]
    return []


class SeamPolygonizer:
    """Polygons of an ``H x W`` mask given region by region (see the module docstring), handed out
    as soon as they are final.

    :meth:`add` returns the region's polygons that touch no seam; :meth:`flush` merges the pieces
    waiting on seams and returns those lying entirely before a coordinate up to which the whole
    scene was delivered (:meth:`FrontierStitcher.emitted_before`); :meth:`close` returns the rest.
    Only pieces on the not-yet-delivered side of a seam are held.

    Args:
        height, width: The scene size ``H x W``.
    """

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self._open: list[Polygon] = []

    @property
    def waiting(self) -> int:
        """Pieces held because they touch a seam whose other side may still come."""
        return len(self._open)

    def add(self, box: TileBox, mask: np.ndarray) -> list[Polygon]:
        """Polygonize one region's ``h x w`` bool mask (regions must not overlap); returns its final
        polygons (pixel coordinates)."""
        if not mask.any():
            return []
        inner = (box.x0 > 0, box.x1 < self.width, box.y0 > 0, box.y1 < self.height)  # left, right, top, bottom
        shapes = rasterio.features.shapes(mask.astype(np.uint8), mask=mask, connectivity=4,
                                          transform=Affine.translation(box.x0, box.y0))
        final: list[Polygon] = []
        for geojson, _value in shapes:
            geom = shape(geojson)
            for polygon in _polygons_of(geom if geom.is_valid else shapely.make_valid(geom)):
                x0, y0, x1, y1 = polygon.bounds
                on_seam = ((inner[0] and x0 == box.x0) or (inner[1] and x1 == box.x1)
                           or (inner[2] and y0 == box.y0) or (inner[3] and y1 == box.y1))
                (self._open if on_seam else final).append(polygon)
        return final

    def flush(self, axis: int, before: int) -> list[Polygon]:
        """Merge the waiting pieces; return the polygons that end before ``before`` along ``axis``
        (0: rows, 1: columns), every pixel there having been delivered."""
        merged: list[Polygon] = []
        for group in _touching_groups(self._open):
            if len(group) == 1:
                merged.append(group[0])
                continue
            # unary_union keeps the vertices of former seams on straight edges; a zero tolerance drops them
            union = shapely.simplify(shapely.unary_union(group), 0.0, preserve_topology=True)
            merged.extend(_polygons_of(union))
        end = 2 if axis == 1 else 3  # index of maxx / maxy in bounds
        final = [p for p in merged if p.bounds[end] < before]  # touching the line `before` could still grow
        self._open = [p for p in merged if p.bounds[end] >= before]
        return final

    def close(self) -> list[Polygon]:
        """Every polygon still waiting, merged (call once the whole scene was delivered)."""
        return self.flush(1, self.width + 1)


def _touching_groups(polygons: list[Polygon]) -> list[list[Polygon]]:
    """``polygons`` grouped into sets connected by contact (an edge or a corner): only such pieces
    can merge, so each group is unioned on its own (much faster than one union of everything)."""
    if not polygons:
        return []
    parent = list(range(len(polygons)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    left, right = shapely.STRtree(polygons).query(polygons, predicate="intersects")  # 2 x k index pairs
    for a, b in zip(left.tolist(), right.tolist(), strict=True):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[ra] = rb
    groups: dict[int, list[Polygon]] = {}
    for i, polygon in enumerate(polygons):
        groups.setdefault(root(i), []).append(polygon)
    return list(groups.values())


def finish_polygons(polygons: list[Polygon], transform: Affine, simplify_tolerance: float = 0.0,
                    min_area: float = 0.0) -> list[Polygon]:
    """Pixel-coordinate polygons -> CRS polygons with the options of
    :func:`~rsrefseg.inference.geo.mask_to_polygons` (:func:`clean_polygons`)."""
    matrix = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]
    return clean_polygons([shapely.affinity.affine_transform(p, matrix) for p in polygons], simplify_tolerance,
                          min_area)


def clean_polygons(polygons: list[Polygon], simplify_tolerance: float = 0.0, min_area: float = 0.0) -> list[Polygon]:
    """The polygon options, shared by every polygon output: ``min_area`` (CRS units squared) on the
    exact polygon, then Douglas-Peucker simplification with ``simplify_tolerance`` (CRS units,
    topology preserved); largest area first (a stable sort).

    Rings are first brought to a canonical start and orientation (``shapely.normalize``), so that
    the simplification does not depend on where a ring happened to start: polygons traced from a
    whole mask and from a streamed one simplify identically.
    """
    if simplify_tolerance < 0 or min_area < 0:
        raise ValueError("simplify_tolerance and min_area must be >= 0")
    out: list[Polygon] = []
    for polygon in polygons:
        polygon = shapely.normalize(polygon)
        if polygon.area < min_area:
            continue
        if simplify_tolerance > 0:
            out.extend(_polygons_of(polygon.simplify(simplify_tolerance, preserve_topology=True)))
        else:
            out.append(polygon)
    out.sort(key=lambda p: p.area, reverse=True)
    return out
