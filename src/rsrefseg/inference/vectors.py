"""Polygons -> GIS vector files (GeoPackage, FlatGeobuf, Shapefile, GeoJSON), and merging them.

Every file holds **one layer** named ``rsrefseg`` (a Shapefile's layer is named after its file:
that is how the format works) with the fields of :data:`FIELDS`: ``expr_index`` (int, 1-based),
``expression`` (str), ``score`` (float), ``area_m2`` and ``perimeter_m`` (float, null when the CRS
has no known linear unit; see :func:`perimeter_m` and :func:`rsrefseg.inference.geo.area_m2`) and
``source`` (str, the source image).

Conventions (shared with :mod:`rsrefseg.inference.geo`):

- Coordinates stay in the source CRS (never reprojected, except by :func:`merge_vectors`). The
  CRS is handed to GDAL as WKT, so a CRS without an EPSG code (the custom Albers of the shared
  sample) round-trips exactly: GeoPackage/FlatGeobuf store the WKT, a Shapefile its ESRI ``.prj``.
- GeoJSON is written by :mod:`rsrefseg.inference.vector_io`, not by GDAL (GDAL's GeoJSON driver
  drops a CRS without an EPSG code), following :mod:`rsrefseg.inference.geo`: a legacy ``crs``
  member (EPSG URN, or the WKT as its name) plus the ``crs_wkt`` foreign member; GDAL/QGIS read it
  back exactly. A GeoJSON without CRS (pixel coordinates) means WGS84 to GDAL, and GeoJSON has no
  schema, so GDAL sees no fields in an empty file and all-null fields as text.
- The polygon options are in CRS units and applied the same way for every format
  (:func:`clean_polygon`): parts whose exact area is below ``min_area`` (CRS units²) are dropped
  first, then the rest is simplified with ``simplify`` (CRS units, topology-preserving: polygons
  stay valid and keep their holes). Null or empty geometries are never written (no format gets
  null geometry, which many Shapefile readers reject).
- Features keep their order, except in FlatGeobuf, whose spatial index (kept: it is what makes
  the format fast to query) stores them in spatial (Hilbert) order.
- Writes are atomic: everything is written into a temporary folder next to the target and moved
  into place only when complete. A Shapefile is several files; its sidecars (``.cpg .prj .dbf
  .shx``) are moved first and the ``.shp`` last, so a ``.shp`` is only ever seen with its own
  sidecars; stale spatial indexes (``.qix .sbn .sbx``) of a replaced Shapefile are removed.

Shapefile limits (see :mod:`rsrefseg.inference.vector_io`): field names have at most 10
characters, so ``perimeter_m`` is written as ``perim_m`` (:data:`SHAPEFILE_FIELD_NAMES`; merging
maps it back) and longer names of merged inputs are cut (``name[:10]``, ``name[:8]_1`` on a
clash); text values hold at most 254 UTF-8 bytes (longer ones are cut at a character boundary;
the ``.cpg`` says UTF-8); the ``.shp`` and ``.dbf`` hold at most 2 GB each: a write that would
exceed :data:`SHAPEFILE_MAX_BYTES` is refused with a :class:`DataError` and leaves nothing behind
(write GeoPackage or FlatGeobuf for larger layers). A Shapefile does not tell a one-part
MultiPolygon from a Polygon.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio.warp
import shapely
from rasterio.crs import CRS
from rasterio.errors import CRSError
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from rsrefseg.errors import ConfigError, DataError
from rsrefseg.inference.geo import area_m2
from rsrefseg.inference.vector_io import (
    FIELDS,
    LAYER,
    SHAPEFILE_FIELD_NAMES,
    SHAPEFILE_MAX_BYTES,
    VECTOR_FORMATS,
    LayerWriter,
    cast_value,
    field_kind,
    union_kind,
    vector_files,
    vector_format,
    vector_path,
)

__all__ = [
    "FIELDS",
    "LAYER",
    "SHAPEFILE_FIELD_NAMES",
    "SHAPEFILE_MAX_BYTES",
    "VECTOR_FORMATS",
    "VectorFeature",
    "clean_polygon",
    "features_from_polygons",
    "merge_vectors",
    "perimeter_m",
    "vector_files",
    "vector_format",
    "vector_path",
    "write_vectors",
]

# WGS84 ellipsoid (the one rsrefseg.inference.geo.area_m2 uses for geographic CRSs).
_WGS84_A = 6378137.0
_WGS84_E2 = 6.69437999014e-3
# Longest edge (degrees) before a geographic ring is measured: ~1 km, error far below 1e-6.
_SEGMENT_DEG = 0.01
# Features written per batch (bounds the memory of the arrays handed to GDAL).
_BATCH = 20000


@dataclass(frozen=True)
class VectorFeature:
    """One polygon (or multipolygon) with the properties of one prediction.

    Attributes:
        geometry: ``Polygon`` or ``MultiPolygon`` in the layer's CRS units.
        expr_index: 1-based index of the expression in the run.
        expression: The referring expression.
        score: The prediction's score.
        source: The source image (path or name).
    """

    geometry: BaseGeometry
    expr_index: int
    expression: str
    score: float
    source: str


def features_from_polygons(
    polygons: Iterable[BaseGeometry], expr_index: int, expression: str, score: float, source: str
) -> list[VectorFeature]:
    """The polygons of one prediction (e.g. from ``mask_to_polygons``) as :class:`VectorFeature`."""
    return [VectorFeature(p, int(expr_index), str(expression), float(score), str(source)) for p in polygons]


def _polygon_parts(geom: BaseGeometry) -> list[Polygon]:
    """The non-empty polygons of a Polygon / MultiPolygon; ``ValueError`` for other geometry."""
    if isinstance(geom, Polygon):
        return [] if geom.is_empty else [geom]
    if isinstance(geom, MultiPolygon):
        return [p for p in geom.geoms if not p.is_empty]
    raise ValueError(f"only Polygon and MultiPolygon geometries can be written, got {geom.geom_type}")


def clean_polygon(geom: BaseGeometry | None, simplify: float = 0.0, min_area: float = 0.0) -> BaseGeometry | None:
    """Apply the polygon options (CRS units) to one geometry; ``None`` when nothing is left.

    Parts whose exact area is below ``min_area`` (CRS units²) are dropped (as in
    ``mask_to_polygons``), then the rest is simplified with tolerance ``simplify`` (CRS units,
    topology-preserving). A Polygon stays a Polygon, a MultiPolygon stays a MultiPolygon.

    Raises:
        ValueError: negative options, or a geometry that is neither Polygon nor MultiPolygon.
    """
    if not (simplify >= 0 and min_area >= 0):
        raise ValueError(f"simplify and min_area must be >= 0, got {simplify} and {min_area}")
    if geom is None:
        return None
    parts = [p for p in _polygon_parts(geom) if p.area >= min_area]
    if not parts:
        return None
    out: BaseGeometry = parts[0] if isinstance(geom, Polygon) else MultiPolygon(parts)
    if simplify > 0:
        out = out.simplify(simplify, preserve_topology=True)
    return None if out.is_empty else out


def _geographic_length(geom: BaseGeometry, crs: CRS) -> float:
    """Boundary length in metres of a geometry in a geographic CRS, on the WGS84 ellipsoid.

    Rings are densified to ~1 km edges that follow parallels/meridians (as pixel edges do) and
    each edge is measured with the meridional (M) and prime-vertical (N) radii at its mid latitude:
    ``ds = sqrt((M dphi)^2 + (N cos(phi) dlambda)^2)``.
    """
    dense = shapely.segmentize(geom, _SEGMENT_DEG)
    rings = shapely.get_rings(shapely.get_parts(dense))  # every exterior and interior ring
    total = 0.0
    wgs84 = CRS.from_epsg(4326)
    for ring in rings:
        xy = shapely.get_coordinates(ring)  # N x 2 (lon, lat), or the CRS's own units
        if crs != wgs84:
            lon, lat = rasterio.warp.transform(crs, wgs84, xy[:, 0].tolist(), xy[:, 1].tolist())
            xy = np.column_stack([lon, lat])  # N x 2 (lon, lat) in degrees
        rad = np.radians(xy)
        mid = 0.5 * (rad[1:, 1] + rad[:-1, 1])  # (N-1,) mid latitude of each edge
        sin2 = np.sin(mid) ** 2
        m_radius = _WGS84_A * (1 - _WGS84_E2) / (1 - _WGS84_E2 * sin2) ** 1.5
        n_radius = _WGS84_A / np.sqrt(1 - _WGS84_E2 * sin2)
        dphi = np.diff(rad[:, 1])
        dlam = np.diff(rad[:, 0])
        total += float(np.hypot(m_radius * dphi, n_radius * np.cos(mid) * dlam).sum())
    return total


def perimeter_m(geom: BaseGeometry, crs: CRS | None) -> float | None:
    """Boundary length of ``geom`` in metres (holes included), or ``None`` when unknown.

    Same rules as :func:`rsrefseg.inference.geo.area_m2`: projected CRS -> planar length times the
    unit factor (map-plane length); geographic CRS -> ellipsoidal length on WGS84 with edges
    following parallels/meridians (see :func:`_geographic_length`); no CRS or no linear unit ->
    ``None``.
    """
    if crs is None:
        return None
    if geom.is_empty:
        return 0.0
    if crs.is_projected:
        try:
            _unit, factor = crs.linear_units_factor
        except CRSError:
            return None
        return float(geom.length) * factor
    if crs.is_geographic:
        return _geographic_length(geom, crs)
    return None


def _measure(geom: BaseGeometry, crs: CRS | None) -> tuple[float | None, float | None]:
    """``(area_m2, perimeter_m)``; ``None`` where the CRS cannot give them (e.g. coordinates out
    of the CRS's domain, which PROJ refuses)."""
    try:
        area = area_m2(geom, crs)
    except CRSError:
        area = None
    try:
        length = perimeter_m(geom, crs)
    except CRSError:
        length = None
    return area, length


def write_vectors(
    path: str | os.PathLike[str],
    features: Iterable[VectorFeature],
    crs: CRS | None,
    fmt: str | None = None,
    *,
    simplify: float = 0.0,
    min_area: float = 0.0,
) -> int:
    """Write features as one ``rsrefseg`` layer of a vector file, atomically.

    Args:
        path: Output file; its extension must match ``fmt`` (``.geojson .gpkg .fgb .shp``).
        features: The polygons with their properties, in ``crs`` coordinates.
        crs: The layer's CRS (``None``: no CRS, e.g. pixel coordinates).
        fmt: ``geojson``, ``gpkg``, ``fgb`` or ``shp``; ``None`` infers it from the extension.
        simplify: Topology-preserving simplification tolerance in CRS units (0 = exact).
        min_area: Polygon parts with a smaller exact area (CRS units²) are dropped.

    Returns:
        The number of features written (features whose geometry became empty are skipped).

    Raises:
        ConfigError: unknown format, or an extension that disagrees with ``fmt``.
        DataError: the file cannot be written, or a Shapefile would exceed 2 GB.
        ValueError: a geometry is not a Polygon/MultiPolygon, or negative options.
    """
    key = vector_format(path, fmt)
    prepared: list[tuple[BaseGeometry, VectorFeature]] = []
    for feature in features:
        geom = clean_polygon(feature.geometry, simplify, min_area)
        if geom is not None:
            prepared.append((geom, feature))
    multi = any(isinstance(g, MultiPolygon) for g, _f in prepared)
    writer = LayerWriter(Path(path), key, crs, dict(FIELDS), "MultiPolygon" if multi else "Polygon")
    try:
        for start in range(0, len(prepared), _BATCH):
            chunk = prepared[start : start + _BATCH]
            measures = [_measure(g, crs) for g, _f in chunk]
            columns: dict[str, list[Any]] = {
                "expr_index": [f.expr_index for _g, f in chunk],
                "expression": [f.expression for _g, f in chunk],
                "score": [f.score if math.isfinite(f.score) else None for _g, f in chunk],
                "area_m2": [m[0] for m in measures],
                "perimeter_m": [m[1] for m in measures],
                "source": [f.source for _g, f in chunk],
            }
            writer.write([g for g, _f in chunk], columns)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return len(prepared)



def _canonical_names(names: Sequence[str], driver: str) -> list[str]:
    """Field names of an input layer with Shapefile short names (``perim_m``) mapped back to
    :data:`FIELDS` names."""
    if driver != "ESRI Shapefile":
        return [str(n) for n in names]
    back = {short: name for name, short in SHAPEFILE_FIELD_NAMES.items() if name not in names}
    return [back.get(str(n), str(n)) for n in names]


def _parse_crs(crs: CRS | str | None) -> CRS | None:
    """``crs`` as a rasterio CRS (``EPSG:3857``, WKT, PROJ string...); ``ConfigError`` when invalid."""
    if crs is None or isinstance(crs, CRS):
        return crs
    try:
        return CRS.from_user_input(crs)
    except CRSError as exc:
        raise ConfigError(f"{crs!r} is not a coordinate reference system ({str(exc).splitlines()[0]})") from exc


def _reproject(geoms: np.ndarray, src: CRS, dst: CRS, label: str) -> np.ndarray:
    """Geometries (1-D object array) reprojected vertex by vertex from ``src`` to ``dst``."""

    def transform(xy: np.ndarray) -> np.ndarray:  # N x 2 coordinates -> N x 2
        xs, ys = rasterio.warp.transform(src, dst, xy[:, 0], xy[:, 1])
        return np.column_stack([np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)])

    out = shapely.transform(geoms, transform)
    if out.size and not np.isfinite(shapely.get_coordinates(out)).all():
        raise DataError(f"{label}: some coordinates cannot be reprojected to the merge CRS")
    return out


def merge_vectors(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    crs: CRS | str | None = None,
    fmt: str | None = None,
) -> int:
    """Collect every layer of several polygon vector files into one layer of ``out``, in one CRS.

    Inputs are read one layer at a time and appended to the output, so memory stays bounded by
    the largest single layer. Fields are the union of the inputs' fields in first-seen order
    (:data:`FIELDS` keep their types; another field's type is the common type of its inputs: int +
    float -> float, anything else -> text); a feature lacking a field gets null. Values, including
    ``area_m2``/``perimeter_m``, are copied as they are. Null and empty geometries are skipped, Z
    coordinates dropped.

    Args:
        inputs: Vector files GDAL can read (e.g. the outputs of :func:`write_vectors`).
        out: The merged file (``.geojson .gpkg .fgb .shp``), written atomically.
        crs: Target CRS (a CRS, or any string ``CRS.from_user_input`` takes); ``None`` = the CRS
            of the first input. Geometries in another CRS are reprojected vertex by vertex.
        fmt: Output format key; ``None`` infers it from ``out``'s extension.

    Returns:
        The number of features written.

    Raises:
        ConfigError: unknown format, extension mismatch, invalid ``crs``, no inputs.
        DataError: an input is missing or unreadable, has non-polygon geometry, has no CRS while
            another CRS is needed, or cannot be reprojected; the output cannot be written.
    """
    import pyogrio
    import pyogrio.errors
    import pyogrio.raw

    key = vector_format(out, fmt)
    target = _parse_crs(crs)
    if not inputs:
        raise ConfigError("merge: no input vector file given")
    plan: list[tuple[Path, str, CRS | None, list[str]]] = []
    fields: dict[str, str] = {}
    multi = False
    for item in inputs:
        path = Path(item)
        if not path.is_file():
            raise DataError(f"{path}: vector file not found")
        try:
            layers = [str(row[0]) for row in pyogrio.list_layers(path)]
            infos = [pyogrio.read_info(path, layer=layer) for layer in layers]
        except pyogrio.errors.DataSourceError as exc:
            raise DataError(f"{path}: cannot be read as a vector file ({str(exc).splitlines()[0]})") from exc
        for layer, info in zip(layers, infos):
            gtype = str(info.get("geometry_type") or "")
            if not gtype or not any(t in gtype for t in ("Polygon", "Unknown")):
                raise DataError(f"{path}: layer {layer!r} has {gtype or 'no'} geometry; only polygons can be merged")
            multi = multi or gtype != "Polygon"
            layer_crs = CRS.from_user_input(info["crs"]) if info.get("crs") else None
            names = _canonical_names(list(info["fields"]), str(info.get("driver")))
            plan.append((path, layer, layer_crs, names))
            for name, dtype in zip(names, info["dtypes"]):
                kind = FIELDS.get(name) or field_kind(str(dtype))
                fields[name] = kind if name not in fields or name in FIELDS else union_kind(fields[name], kind)
    if not plan:
        raise DataError(f"{Path(inputs[0])}: no vector layer to merge")
    if target is None:
        target = plan[0][2]
    writer = LayerWriter(Path(out), key, target, fields, "MultiPolygon" if multi else "Polygon")
    try:
        for path, layer, layer_crs, names in plan:
            label = f"{path} (layer {layer!r})"
            try:
                _meta, _fids, wkb, data = pyogrio.raw.read(path, layer=layer)
            except pyogrio.errors.DataSourceError as exc:
                raise DataError(f"{label}: cannot be read ({str(exc).splitlines()[0]})") from exc
            geoms = shapely.from_wkb(wkb) if wkb is not None else np.empty(0, dtype=object)
            keep = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
            geoms = shapely.force_2d(geoms[keep])
            kinds = shapely.get_type_id(geoms)
            if not np.isin(kinds, (3, 6)).all():  # 3 = Polygon, 6 = MultiPolygon
                raise DataError(f"{label}: has non-polygon geometry; only polygons can be merged")
            if target is not None and layer_crs != target:
                if layer_crs is None:
                    raise DataError(f"{label}: has no CRS, so it cannot be reprojected to the merge CRS")
                geoms = _reproject(geoms, layer_crs, target, label)
            columns = {
                name: [cast_value(v, fields[name]) for v in np.asarray(values, dtype=object)[keep]]
                for name, values in zip(names, data)
            }
            writer.write(list(geoms), columns)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return writer.count
