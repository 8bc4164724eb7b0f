"""Low-level vector output: the format table and a streaming, atomic one-layer writer.

Used by :mod:`rsrefseg.inference.vectors` (see its docstring for the conventions and the Shapefile
limits). GeoPackage, FlatGeobuf and Shapefile go through ``pyogrio`` (GDAL/OGR; the wheel brings its
own GDAL, which coexists with rasterio's in one process); GeoJSON is written here as streamed text
following :mod:`rsrefseg.inference.geo` (GDAL's GeoJSON driver would drop a CRS without an EPSG
code).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import shapely
from rasterio.crs import CRS
from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry

from rsrefseg.errors import ConfigError, DataError
from rsrefseg.inference.geo import geojson_crs_member

__all__ = [
    "FIELDS",
    "LAYER",
    "SHAPEFILE_FIELD_NAMES",
    "SHAPEFILE_MAX_BYTES",
    "SHAPEFILE_MAX_TEXT_BYTES",
    "VECTOR_FORMATS",
    "LayerWriter",
    "VectorFormat",
    "cast_value",
    "field_kind",
    "shapefile_field_names",
    "union_kind",
    "vector_files",
    "vector_format",
    "vector_path",
]

#: Name of the one layer of every vector output (a Shapefile's layer takes its file's name).
LAYER = "rsrefseg"


@dataclass(frozen=True)
class VectorFormat:
    """One vector output format."""

    driver: str  # GDAL/OGR driver name (GeoJSON is written by this module, not by GDAL)
    suffix: str  # file extension, with the dot


#: The vector formats by key (the ``--vector-format`` choices).
VECTOR_FORMATS: dict[str, VectorFormat] = {
    "geojson": VectorFormat("GeoJSON", ".geojson"),
    "gpkg": VectorFormat("GPKG", ".gpkg"),
    "fgb": VectorFormat("FlatGeobuf", ".fgb"),
    "shp": VectorFormat("ESRI Shapefile", ".shp"),
}

#: Fields of the ``rsrefseg`` layer and their types (``int32``, ``int64``, ``float64`` or ``str``).
FIELDS: dict[str, str] = {
    "expr_index": "int32",
    "expression": "str",
    "score": "float64",
    "area_m2": "float64",
    "perimeter_m": "float64",
    "source": "str",
}

#: Names the :data:`FIELDS` take in a Shapefile, whose ``.dbf`` allows at most 10 characters.
SHAPEFILE_FIELD_NAMES: dict[str, str] = {"perimeter_m": "perim_m"}

#: Largest ``.shp`` / ``.dbf`` a Shapefile may have (the format's 2 GB limit; tests lower it).
SHAPEFILE_MAX_BYTES = 2**31 - 1
#: Longest text value (UTF-8 bytes) a Shapefile ``.dbf`` field can hold.
SHAPEFILE_MAX_TEXT_BYTES = 254
# Sidecars moved before the .shp (so a .shp is only ever seen with its own sidecars).
_SHAPEFILE_ORDER = (".cpg", ".prj", ".dbf", ".shx", ".shp")
# Spatial indexes of a replaced Shapefile that would describe the old geometry.
_STALE_SHAPEFILE_INDEXES = (".qix", ".sbn", ".sbx")
# Upper bound of the .dbf width of a numeric field (GDAL uses 9-11 for int32, 18-21 for int64, 24 for reals).
_DBF_WIDTH = {"int32": 11, "int64": 21, "float64": 24}


def vector_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The format key (``geojson``, ``gpkg``, ``fgb`` or ``shp``) of an output ``path``.

    Raises:
        ConfigError: ``fmt`` is not a known format, ``path`` has no known extension, or its
            extension disagrees with ``fmt`` (the messages list the choices).
    """
    choices = ", ".join(sorted(VECTOR_FORMATS))
    suffix = Path(path).suffix.lower()
    if fmt is not None:
        key = fmt.lower().lstrip(".")
        if key not in VECTOR_FORMATS:
            raise ConfigError(f"unknown vector format {fmt!r}; choices: {choices}")
        expected = VECTOR_FORMATS[key].suffix
        if suffix != expected:
            raise ConfigError(f"{path}: the extension {suffix or '(none)'!r} does not match the vector"
                              f" format {key!r} (expected {expected})")
        return key
    by_suffix = {f.suffix: key for key, f in VECTOR_FORMATS.items()}
    if suffix not in by_suffix:
        raise ConfigError(f"{path}: cannot tell the vector format from the extension {suffix or '(none)'!r};"
                          f" use one of {', '.join(f.suffix for f in VECTOR_FORMATS.values())}")
    return by_suffix[suffix]


def vector_path(folder: str | os.PathLike[str], stem: str, fmt: str) -> Path:
    """``folder/<stem>.<ext>`` for format ``fmt`` (the main file; a Shapefile has sidecars).

    Raises:
        ConfigError: unknown format.
    """
    key = fmt.lower()
    if key not in VECTOR_FORMATS:
        raise ConfigError(f"unknown vector format {fmt!r}; choices: {', '.join(sorted(VECTOR_FORMATS))}")
    return Path(folder) / f"{stem}{VECTOR_FORMATS[key].suffix}"


def vector_files(path: str | os.PathLike[str]) -> list[Path]:
    """The existing files that make up the vector output ``path`` (a ``.shp`` and its sidecars)."""
    main = Path(path)
    if main.suffix.lower() != ".shp":
        return [main] if main.is_file() else []
    return [p for p in (main.with_suffix(s) for s in _SHAPEFILE_ORDER[::-1]) if p.is_file()]


def field_kind(dtype: str) -> str:
    """The layer field type (``int64``, ``float64`` or ``str``) for a numpy dtype name from pyogrio."""
    if dtype == "bool" or dtype.startswith(("int", "uint")):
        return "int64"
    if dtype.startswith("float"):
        return "float64"
    return "str"


def union_kind(a: str, b: str) -> str:
    """The field type holding values of types ``a`` and ``b`` (int + float -> float, else str)."""
    if a == b:
        return a
    if {a, b} <= {"int32", "int64", "float64"}:
        return "float64" if "float64" in (a, b) else "int64"
    return "str"


def cast_value(value: Any, kind: str) -> Any:
    """One field value converted to the merged layer's field type (``None`` for null)."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return None
    if kind == "str":
        return value if isinstance(value, str) else str(value)
    return float(value) if kind == "float64" else int(value)


def _cut_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, at a character boundary."""
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")


def shapefile_field_names(names: Sequence[str]) -> list[str]:
    """Field names as written to a Shapefile: :data:`SHAPEFILE_FIELD_NAMES`, then any other name
    longer than 10 characters cut to 10 (``name[:8]_<n>`` where that would repeat a name; DBF
    names are case-insensitive)."""
    out: list[str] = []
    taken: set[str] = set()
    for name in names:
        short = SHAPEFILE_FIELD_NAMES.get(name, name)
        if len(short) > 10 or short.lower() in taken:
            short = short[:10]
            number = 1
            while short.lower() in taken:
                suffix = f"_{number}"
                short = name[: 10 - len(suffix)] + suffix
                number += 1
        taken.add(short.lower())
        out.append(short)
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class LayerWriter:
    """Stream batches of polygons + fields into one layer of a new vector file, then commit atomically.

    Everything is written into a temporary folder next to ``path``; :meth:`commit` moves the
    file(s) into place (Shapefile: sidecars first, ``.shp`` last), :meth:`abort` removes the folder.
    Memory is bounded by one batch.

    Args:
        path: The output file (its extension must be the format's).
        fmt: Format key (see :data:`VECTOR_FORMATS`).
        crs: Layer CRS (``None``: none is written), passed to GDAL as WKT.
        fields: Field name -> type (``int32``, ``int64``, ``float64``, ``str``), in order.
        geometry_type: ``Polygon`` or ``MultiPolygon`` (Polygons are promoted for the latter).

    Raises:
        ConfigError: unknown format or mismatching extension.
        DataError: the temporary folder cannot be created.
    """

    def __init__(self, path: Path, fmt: str, crs: CRS | None, fields: Mapping[str, str],
                 geometry_type: str) -> None:
        self.key = vector_format(path, fmt)
        self.path = Path(path)
        self.crs = crs
        self.fields = dict(fields)
        self.geometry_type = geometry_type
        self.count = 0  # features written so far
        self._created = False
        self._shp_bytes = 100  # .shp header
        self._text_widths = {name: 1 for name, kind in self.fields.items() if kind == "str"}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                                 dir=self.path.parent))
        except OSError as exc:
            raise DataError(f"{self.path}: cannot write {self._label} ({_one_line(exc)})") from exc
        self._tmpfile = self._tmpdir / self.path.name
        self._json: IO[str] | None = None
        if self.key == "geojson":
            head: dict[str, Any] = {"type": "FeatureCollection", "name": LAYER}
            member = geojson_crs_member(crs)
            if member is not None and crs is not None:
                head.update(crs=member, crs_wkt=crs.to_wkt())
            try:
                self._json = open(self._tmpfile, "w", encoding="utf-8")  # closed in commit/abort
                self._json.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "features": [\n')
            except OSError as exc:
                self.abort()
                raise DataError(f"{self.path}: cannot write GeoJSON ({_one_line(exc)})") from exc

    @property
    def _label(self) -> str:
        return VECTOR_FORMATS[self.key].driver

    def write(self, geoms: Sequence[BaseGeometry], columns: Mapping[str, Sequence[Any]]) -> None:
        """Append one batch: ``geoms[i]`` with ``columns[name][i]`` (``None`` = null; missing
        columns are null).

        Raises:
            DataError: the file cannot be written, or a Shapefile would exceed its 2 GB limit.
        """
        n = len(geoms)
        if n == 0:
            return
        values = {name: list(columns.get(name, [None] * n)) for name in self.fields}
        if self.key == "shp":
            for name in self._text_widths:
                values[name] = [None if v is None else _cut_utf8(str(v), SHAPEFILE_MAX_TEXT_BYTES)
                                for v in values[name]]
            self._check_shapefile_size(geoms, values)
        try:
            if self._json is not None:
                self._write_geojson(geoms, values)
            else:
                self._write_gdal(geoms, values)
        except OSError as exc:
            raise DataError(f"{self.path}: cannot write {self._label} ({_one_line(exc)})") from exc
        self.count += n

    def _check_shapefile_size(self, geoms: Sequence[BaseGeometry], values: Mapping[str, list[Any]]) -> None:
        """Refuse a batch that would take the ``.shp`` or ``.dbf`` past :data:`SHAPEFILE_MAX_BYTES`."""
        parts = shapely.get_parts(np.asarray(geoms, dtype=object))
        rings = int(parts.size + shapely.get_num_interior_rings(parts).sum())
        points = int(shapely.get_num_coordinates(np.asarray(geoms, dtype=object)).sum())
        self._shp_bytes += 52 * len(geoms) + 4 * rings + 16 * points  # record header + parts + XY
        for name in self._text_widths:
            longest = max((len(v.encode("utf-8")) for v in values[name] if v is not None), default=1)
            self._text_widths[name] = max(self._text_widths[name], longest)
        record = 1 + sum(_DBF_WIDTH.get(kind, 0) for kind in self.fields.values()) + sum(self._text_widths.values())
        dbf_bytes = 33 + 32 * len(self.fields) + (self.count + len(geoms)) * record
        if max(self._shp_bytes, dbf_bytes) > SHAPEFILE_MAX_BYTES:
            raise DataError(f"{self.path}: the layer is too large for a Shapefile (its .shp/.dbf would exceed"
                            f" {SHAPEFILE_MAX_BYTES} bytes); write GeoPackage (.gpkg) or FlatGeobuf (.fgb)")

    def _write_geojson(self, geoms: Sequence[BaseGeometry], values: Mapping[str, list[Any]]) -> None:
        assert self._json is not None
        lines = []
        for i, geom in enumerate(geoms):
            props = {name: _json_value(values[name][i]) for name in self.fields}
            feature = {"type": "Feature", "id": self.count + i, "properties": props, "geometry": mapping(geom)}
            lines.append(json.dumps(feature, ensure_ascii=False, allow_nan=False))
        self._json.write((",\n" if self.count else "") + ",\n".join(lines))

    def _write_gdal(self, geoms: Sequence[BaseGeometry], values: Mapping[str, list[Any]]) -> None:
        import pyogrio.errors
        import pyogrio.raw

        arrays, masks = [], []
        for name, kind in self.fields.items():
            column = values[name]
            missing = np.array([_is_null(v) for v in column], dtype=bool)
            if kind == "str":
                arrays.append(np.array([None if m else str(v) for v, m in zip(column, missing)], dtype=object))
                masks.append(None)
            elif kind == "float64":
                arrays.append(np.array([math.nan if m else float(v) for v, m in zip(column, missing)]))
                masks.append(None)  # NaN is written as null
            else:
                arrays.append(np.array([0 if m else int(v) for v, m in zip(column, missing)], dtype=kind))
                masks.append(missing if missing.any() else None)
        wkb = shapely.to_wkb(np.asarray(geoms, dtype=object))
        layer = self.path.stem if self.key == "shp" else LAYER
        names = shapefile_field_names(list(self.fields)) if self.key == "shp" else list(self.fields)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning)  # crs=None is intended
                pyogrio.raw.write(
                    str(self._tmpfile), wkb, field_data=arrays, fields=names,
                    field_mask=masks if any(m is not None for m in masks) else None, layer=layer,
                    driver=VECTOR_FORMATS[self.key].driver, geometry_type=self.geometry_type,
                    crs=None if self.crs is None else self.crs.to_wkt(), encoding="UTF-8" if self.key == "shp" else None,
                    promote_to_multi=self.geometry_type == "MultiPolygon", append=self._created,
                    layer_options={"2GB_LIMIT": "YES"} if self.key == "shp" else None,
                )
        except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, pyogrio.errors.FieldError,
                pyogrio.errors.GeometryError) as exc:
            raise DataError(f"{self.path}: cannot write {self._label} ({_one_line(exc)})") from exc
        self._created = True

    def commit(self) -> None:
        """Finish the file and move it (and its sidecars) onto ``path``.

        Raises:
            DataError: the file cannot be finished or moved.
        """
        try:
            if self._json is not None:
                self._json.write("\n]}\n")
                self._json.close()
                self._json = None
            elif not self._created:  # an empty layer still gets its fields and CRS
                self._write_gdal([], {name: [] for name in self.fields})
            names = sorted(os.listdir(self._tmpdir), key=_move_order)
            for name in names:
                os.replace(self._tmpdir / name, self.path.parent / name)
            if self.key == "shp":
                for suffix in _STALE_SHAPEFILE_INDEXES:
                    stale = self.path.with_suffix(suffix)
                    if stale.name not in names:
                        stale.unlink(missing_ok=True)
            os.rmdir(self._tmpdir)
        except OSError as exc:
            self.abort()
            raise DataError(f"{self.path}: cannot write {self._label} ({_one_line(exc)})") from exc

    def abort(self) -> None:
        """Drop everything written so far (the target is left as it was)."""
        if self._json is not None:
            self._json.close()
            self._json = None
        shutil.rmtree(self._tmpdir, ignore_errors=True)


def _move_order(name: str) -> tuple[int, str]:
    """Sort key moving Shapefile sidecars before the ``.shp`` (other files keep name order)."""
    suffix = Path(name).suffix.lower()
    return (_SHAPEFILE_ORDER.index(suffix) if suffix in _SHAPEFILE_ORDER else 0, name)


def _is_null(value: Any) -> bool:
    """``None`` or a float NaN."""
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _json_value(value: Any) -> Any:
    """A plain JSON value: numpy scalars unwrapped, non-finite floats -> ``None``."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
