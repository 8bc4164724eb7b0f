"""Georeferenced outputs: mask -> GeoTIFF, mask -> polygons -> GeoJSON, polygons -> mask.

Conventions (shared by every function here):

- A mask is a 2-D ``H x W`` array (``bool`` or integer; any non-zero value is foreground) on the
  pixel grid of the source image, row 0 at the top.
- ``transform`` is the source image's affine pixel -> CRS transform (``rasterio``/``affine``), so
  polygons are produced in the **source CRS units** and are never reprojected.
- Every file is written atomically (temporary file in the same folder, then ``os.replace``), so a
  crash never leaves a half-written output and never clobbers an existing one.

Design choices (documented here once):

- GeoTIFF masks are single-band ``uint8`` with foreground **255** and background 0 (visible in any
  image viewer, and ``> 0`` / ``== 255`` both work in GIS tools); no nodata value is set, because
  background is a real answer ("not the referred object"), not missing data.
- Polygons come from ``rasterio.features.shapes`` (GDAL polygonize) with **4-connectivity** by
  default: pixels touching only at a corner become separate polygons, which keeps every polygon
  valid. With 8-connectivity GDAL joins such pixels into one self-touching (invalid) ring, which
  ``shapely.make_valid`` splits again at the touching corner, so the output is nearly the same but
  slower. Holes are kept as interior rings. Edges follow pixel boundaries, so rasterising the
  unsimplified polygons (pixel-centre rule) gives back the mask exactly.
- GeoJSON keeps coordinates in the source CRS (RFC 7946 asks for WGS84 lon/lat, but reprojecting
  would lose the exact pixel geometry and the analysis units). The CRS is announced with the legacy
  GeoJSON-2008 ``crs`` member, which GDAL/QGIS/geopandas still read: a named CRS
  ``urn:ogc:def:crs:EPSG::<code>`` when the CRS has an EPSG code
  (``urn:ogc:def:crs:OGC:1.3:CRS84`` for EPSG:4326, since coordinates are lon/lat), otherwise the
  CRS WKT as the name (GDAL parses it with ``SetFromUserInput``). The WKT is also always written to
  the top-level foreign member ``crs_wkt``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from shapely.geometry import Polygon, mapping, shape
from shapely.geometry.base import BaseGeometry

from rsrefseg.errors import DataError
from rsrefseg.utils import atomic_path, atomic_write_text

__all__ = [
    "MASK_FOREGROUND",
    "GeoReference",
    "area_m2",
    "geojson_crs_member",
    "mask_to_polygons",
    "polygons_to_feature_collection",
    "rasterize_polygons",
    "read_georeference",
    "write_geojson",
    "write_mask_geotiff",
]

#: Pixel value of the foreground in written GeoTIFF masks (background is 0, no nodata).
MASK_FOREGROUND = 255

# Longest polygon edge (in degrees) kept before projecting a geographic polygon for its area; at
# 0.01 deg (~1 km) the chord-vs-parallel error is far below 1e-6 relative.
_GEODESIC_SEGMENT_DEG = 0.01


@dataclass(frozen=True)
class GeoReference:
    """Where an ``H x W`` image lies on the Earth.

    Attributes:
        crs: The coordinate reference system, or ``None`` when only a transform is known (e.g. a
            world file without a ``.prj``).
        transform: Affine pixel (col, row) -> CRS (x, y) transform of the pixel corners.
        width: Image width ``W`` in pixels.
        height: Image height ``H`` in pixels.
    """

    crs: CRS | None
    transform: Affine
    width: int
    height: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``, the shape a mask on this grid must have."""
        return (self.height, self.width)


def _one_line(exc: BaseException) -> str:
    """The first line of an exception message (GDAL messages can span several lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_georeference(path: str | os.PathLike[str]) -> GeoReference | None:
    """Read the CRS and transform of a raster image without reading its pixels.

    Returns ``None`` for images that carry no georeferencing at all (plain PNG/JPEG: no CRS and the
    identity transform). Images georeferenced only by GCPs or RPCs are also returned as ``None``:
    outputs for them are plain (non-geographic) masks.

    Raises:
        DataError: the file is missing or is not a raster GDAL can open.
    """
    src = Path(path)
    if not src.is_file():
        raise DataError(f"{src}: image file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(src) as ds:
                crs, transform, width, height = ds.crs, ds.transform, ds.width, ds.height
    except RasterioError as exc:
        raise DataError(f"{src}: cannot be read as a raster image ({_one_line(exc)})") from exc
    if crs is None and transform == Affine.identity():
        return None
    return GeoReference(crs=crs, transform=transform, width=int(width), height=int(height))


def _check_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """Validate an ``H x W`` bool/integer mask and return it as a bool ``H x W`` array."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H x W), got shape {arr.shape}")
    if not (arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be bool or integer (threshold logits first), got {arr.dtype}")
    return arr != 0


def write_mask_geotiff(
    path: str | os.PathLike[str],
    mask: np.ndarray,
    georef: GeoReference | None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Write an ``H x W`` mask as a single-band ``uint8`` GeoTIFF (0 / 255), atomically.

    The file is deflate-compressed and tiled (256 x 256) and carries exactly ``georef.crs`` (custom
    WKT CRSs without an EPSG code included) and ``georef.transform``. GDAL's ``.aux.xml`` sidecar is
    disabled so that only the one file is produced; if GDAL could not store the CRS exactly inside
    the TIFF a ``UserWarning`` says so. ``georef=None`` writes a plain TIFF (no CRS, identity
    transform). ``tags`` are stored as GDAL metadata (e.g. the referring expression).

    Raises:
        ValueError: ``mask`` is not ``H x W`` with ``(H, W) == georef.shape``.
        DataError: the output cannot be written (bad folder, permissions, full disk).
    """
    fg = _check_mask(mask)
    target = Path(path)
    if georef is not None and fg.shape != georef.shape:
        raise ValueError(f"mask shape {fg.shape} does not match the image grid {georef.shape} (H, W)")
    height, width = fg.shape
    crs = georef.crs if georef is not None else None
    transform = georef.transform if georef is not None else Affine.identity()
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 1,
        "dtype": "uint8",
        "crs": crs,
        "transform": transform,
        "nodata": None,
        "compress": "deflate",
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "photometric": "MINISBLACK",
    }
    # H x W bool -> 1 x H x W uint8 (band axis first, as rasterio writes bands).
    data = (fg.astype(np.uint8) * MASK_FOREGROUND)[np.newaxis, :, :]
    stored_crs: CRS | None = None
    try:
        with atomic_path(target) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.Env(GDAL_PAM_ENABLED="NO"):
                with rasterio.open(tmp, "w", **profile) as dst:
                    dst.write(data)
                    dst.set_band_description(1, "mask")
                    metadata = {str(k): str(v) for k, v in (tags or {}).items()}
                    dst.update_tags(**{**metadata, "mask_foreground": str(MASK_FOREGROUND)})
                with rasterio.open(tmp) as check:
                    stored_crs = check.crs
    except OSError as exc:  # rasterio's RasterioIOError is an OSError too
        raise DataError(f"{target}: cannot write GeoTIFF ({_one_line(exc)})") from exc
    if crs is not None and stored_crs != crs:
        warnings.warn(f"{target}: GeoTIFF could not store the source CRS exactly", stacklevel=2)


def _explode_polygons(geom: BaseGeometry) -> list[Polygon]:
    """The non-empty polygons inside ``geom`` (Polygon, MultiPolygon or GeometryCollection)."""
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    if hasattr(geom, "geoms"):  # MultiPolygon or GeometryCollection
        return [p for part in geom.geoms for p in _explode_polygons(part)]
    return []  # points / lines produced by make_valid carry no area


def mask_to_polygons(
    mask: np.ndarray,
    transform: Affine,
    simplify_tolerance: float = 0.0,
    min_area: float = 0.0,
    connectivity: int = 4,
) -> list[Polygon]:
    """Vectorise the foreground of an ``H x W`` mask into polygons in the source CRS.

    Args:
        mask: ``H x W`` bool/integer mask (non-zero = foreground).
        transform: Pixel -> CRS affine transform of the mask grid (``Affine.identity()`` gives
            pixel coordinates).
        simplify_tolerance: Douglas-Peucker tolerance in CRS units (``0`` = exact pixel edges);
            topology is preserved, so polygons stay valid and keep their holes.
        min_area: Polygons whose exact (pre-simplification) area in CRS units squared is below
            this are dropped (m² for metre-based projected CRSs, degrees² for EPSG:4326).
        connectivity: 4 (default; corner-touching pixels are separate polygons) or 8 (see the
            module docstring: corner contacts are split again to keep polygons valid).

    Returns:
        Valid polygons with holes as interior rings, largest area first.
    """
    fg = _check_mask(mask)
    if simplify_tolerance < 0 or min_area < 0:
        raise ValueError("simplify_tolerance and min_area must be >= 0")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if not fg.any():
        return []
    from rsrefseg.inference.raster_polygons import clean_polygons

    polygons: list[Polygon] = []
    shapes = rasterio.features.shapes(fg.astype(np.uint8), mask=fg, connectivity=connectivity, transform=transform)
    for geojson, _value in shapes:
        geom = shape(geojson)
        polygons.extend(_explode_polygons(geom if geom.is_valid else shapely.make_valid(geom)))
    return clean_polygons(polygons, simplify_tolerance, min_area)  # largest first; ties keep raster-scan order


def area_m2(geom: BaseGeometry, crs: CRS | None) -> float | None:
    """Area of ``geom`` (given in ``crs`` coordinates) in square metres, or ``None`` if unknown.

    - Projected CRS: planar area times the squared unit factor (metre = 1, US survey foot, ...).
      This is the map-plane area: exact for equal-area projections (e.g. Albers), and within the
      projection's scale distortion otherwise (UTM: < 0.1 %).
    - Geographic CRS (EPSG:4326, ...): ellipsoidal area on WGS84. ``pyproj`` is not a dependency,
      so the polygon is densified (edges follow parallels/meridians, like pixel edges) and
      projected through GDAL/PROJ to a Lambert azimuthal *equal-area* projection centred on it.
      Polygons crossing the antimeridian or containing a pole are not supported.
    - No CRS, or a CRS without known linear units: ``None``.
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
        return float(geom.area) * factor * factor
    if crs.is_geographic:
        centre = geom.centroid
        laea = CRS.from_proj4(
            f"+proj=laea +lat_0={centre.y:.10f} +lon_0={centre.x:.10f} +ellps=WGS84 +units=m +no_defs"
        )
        dense = shapely.segmentize(geom, _GEODESIC_SEGMENT_DEG)
        projected = shape(rasterio.warp.transform_geom(crs, laea, mapping(dense)))
        return float(projected.area)
    return None


def geojson_crs_member(crs: CRS | None) -> dict[str, Any] | None:
    """The legacy GeoJSON-2008 ``crs`` member for ``crs`` (see the module docstring), or ``None``."""
    if crs is None:
        return None
    epsg = crs.to_epsg(confidence_threshold=100)
    if epsg == 4326:
        name = "urn:ogc:def:crs:OGC:1.3:CRS84"  # lon/lat order, as written
    elif epsg is not None:
        name = f"urn:ogc:def:crs:EPSG::{epsg}"
    else:
        name = crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, paths and non-finite floats to plain JSON values."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    """``json.dumps`` fallback for numpy values inside geometries (anything else: ``TypeError``)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def polygons_to_feature_collection(
    polygons: Sequence[BaseGeometry],
    crs: CRS | None,
    properties: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a GeoJSON FeatureCollection (coordinates in the source CRS, not reprojected).

    Args:
        polygons: Polygons in ``crs`` coordinates (e.g. from :func:`mask_to_polygons`).
        crs: Source CRS (``None``: pixel coordinates, no ``crs`` member).
        properties: Copied into every feature, e.g. ``{"expression": ..., "score": ...,
            "source": "scene.tif"}``.

    Every feature also gets ``area_crs_units`` (planar area in CRS units squared) and ``area_m2``
    (:func:`area_m2`, ``null`` when unknown). The collection carries the ``crs`` member and the
    ``crs_wkt`` foreign member described in the module docstring.
    """
    base = _jsonable(dict(properties or {}))
    features = []
    for index, geom in enumerate(polygons):
        props = dict(base)
        props["area_crs_units"] = float(geom.area)
        props["area_m2"] = area_m2(geom, crs)
        features.append(
            # mapping() gives tuples of Python floats, which json writes as they are
            {"type": "Feature", "id": index, "geometry": mapping(geom), "properties": props}
        )
    collection: dict[str, Any] = {"type": "FeatureCollection"}
    member = geojson_crs_member(crs)
    if member is not None and crs is not None:
        collection["crs"] = member
        collection["crs_wkt"] = crs.to_wkt()
    collection["features"] = features
    return collection


def write_geojson(path: str | os.PathLike[str], feature_collection: Mapping[str, Any]) -> None:
    """Write a GeoJSON FeatureCollection atomically (UTF-8, full float precision).

    Raises:
        ValueError: ``feature_collection`` is not a FeatureCollection.
        DataError: the output cannot be written.
    """
    if feature_collection.get("type") != "FeatureCollection":
        raise ValueError("feature_collection must be a GeoJSON FeatureCollection")
    target = Path(path)
    # Members and properties are made JSON-safe (numpy scalars, paths, NaN -> null); geometries are
    # left to json.dumps (numpy values through `default`), which is linear in the coordinates.
    collection = {k: _jsonable(v) for k, v in feature_collection.items() if k != "features"}
    collection["features"] = [{**{k: _jsonable(v) for k, v in f.items() if k != "geometry"},
                               "geometry": f.get("geometry")} for f in feature_collection.get("features", [])]
    text = json.dumps(collection, allow_nan=False, default=_json_default) + "\n"
    try:
        atomic_write_text(target, text)
    except OSError as exc:
        raise DataError(f"{target}: cannot write GeoJSON ({_one_line(exc)})") from exc


def rasterize_polygons(
    geoms: Iterable[BaseGeometry | Mapping[str, Any]],
    out_shape: tuple[int, int],
    transform: Affine,
    all_touched: bool = False,
) -> np.ndarray:
    """Burn polygons (shapely or GeoJSON-like, in the grid's CRS) into a bool ``H x W`` mask.

    A pixel is foreground when its centre lies inside a polygon (``all_touched=False``), so the
    exact polygons of :func:`mask_to_polygons` rasterise back to the original mask. Holes stay empty.
    """
    height, width = int(out_shape[0]), int(out_shape[1])
    shapes = [(g, 1) for g in geoms if not (isinstance(g, BaseGeometry) and g.is_empty)]
    if not shapes:
        return np.zeros((height, width), dtype=bool)
    burned = rasterio.features.rasterize(
        shapes,
        out_shape=(height, width),
        transform=transform,
        fill=0,
        dtype="uint8",
        all_touched=all_touched,
    )
    return burned.astype(bool)
