"""``index.json`` of a feature folder: reading (size-capped), schema checks, the settings key.

The index is untrusted input when a folder is opened: every field reading relies on is checked for
type and range (:func:`check_index`), the window list must be exactly the windows of the recorded
tiling (so its length is bounded by the scene size), and the scene size is capped.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from rsrefseg.errors import DataError
from rsrefseg.inference.feature_files import (
    FEATURE_DTYPES,
    FORMAT,
    INDEX_NAME,
    MAX_INDEX_BYTES,
    MAX_PATH_CHARS,
    MAX_PREVIEW_SIDE,
    MAX_TILE,
    MAX_WINDOWS,
    count_windows,
    settings_key,
)
from rsrefseg.utils import atomic_write_json

__all__ = ["check_index", "field", "int_list", "key_settings", "read_index_json", "settings_key", "write_index"]


def key_settings(index: dict[str, Any]) -> dict[str, Any]:
    """What the windows' content depends on (hashed by :func:`settings_key` into the folder key):
    model, precision, scene file, tiling, bands, stretch and dtype."""
    scene = index["scene"]
    return {"format": FORMAT, "model": index["model"]["fingerprint"], "precision": index["model"]["precision"],
            "scene": [scene["path"], scene["height"], scene["width"], scene["file_size"], scene["file_mtime_ns"]],
            "tiling": [index["tiling"]["tile"], index["tiling"]["overlap"]], "bands": index["band_indices"],
            "stretch": index["stretch"], "dtype": index["dtype"]}


def write_index(folder: Path, index: dict[str, Any]) -> None:
    """Write ``index.json`` atomically."""
    try:
        atomic_write_json(folder / INDEX_NAME, index)
    except OSError as exc:
        raise DataError(f"{folder / INDEX_NAME}: cannot write the index ({exc.strerror or exc})") from None


def read_index_json(folder: Path) -> dict[str, Any]:
    """The parsed ``index.json`` of a feature folder (size-capped; schema checked by the caller).

    Raises:
        DataError: not a feature folder, unreadable, too large, or not a JSON object of this format.
    """
    path = folder / INDEX_NAME
    if not folder.is_dir():
        raise DataError(f"{folder}: feature folder not found")
    try:
        # O_NONBLOCK: a FIFO named index.json must not block the open; only a regular file is read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise DataError(f"{path}: not a regular file")
            raw = handle.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        raise DataError(f"{folder}: not a feature folder (no {INDEX_NAME}; make one with `rsrefseg encode`)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_INDEX_BYTES:
        raise DataError(f"{path}: index larger than {MAX_INDEX_BYTES // 2**20} MB")
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise DataError(f"{path}: corrupt index (not valid JSON)") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else None
        raise DataError(f"{path}: not a {FORMAT} index (format {found!r})")
    return index


def field(index: dict[str, Any], dotted: str, kind: type | tuple[type, ...], where: Path,
          optional: bool = False) -> Any:
    """``index["a"]["b"]`` for ``dotted="a.b"``, checked to be of ``kind`` (None allowed when
    ``optional``); a one-line DataError naming ``where`` otherwise (bool is not an int here)."""
    value: Any = index
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None and optional:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise DataError(f"{where}: corrupt index (field {dotted!r} is missing or not {'/'.join(k.__name__ for k in kinds)})")
    return value


def int_list(value: Any, length: int | None, where: Path, name: str, low: int = 0) -> list[int]:
    """``value`` as a list of ints >= ``low`` (of ``length`` items when given), else a DataError."""
    if (not isinstance(value, list) or (length is not None and len(value) != length)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)):
        raise DataError(f"{where}: corrupt index (field {name!r} must be a list of integers)")
    return value


def check_index(folder: Path, index: dict[str, Any], max_pixels: int | None) -> tuple[dict[str, Any], Any]:
    """Check every field of a parsed index that reading relies on; returns ``(index, georef)``.

    The window list must be exactly the tiling's windows (so it is bounded by the scene size),
    the scene at most ``max_pixels`` pixels, and every number in range.

    Raises:
        DataError: an incomplete folder, or a missing / mistyped / out-of-range field.
    """
    from rsrefseg.inference.tiling import tile_grid

    where = folder / INDEX_NAME
    if index.get("complete") is not True:
        raise DataError(f"{folder}: incomplete feature folder (encoding was interrupted); rerun `rsrefseg encode` "
                        "with the same arguments to finish it")
    field(index, "key", str, where)
    height, width = field(index, "scene.height", int, where), field(index, "scene.width", int, where)
    if not 0 < len(field(index, "scene.path", str, where)) <= MAX_PATH_CHARS or "\0" in index["scene"]["path"]:
        raise DataError(f"{where}: corrupt index (scene.path empty, longer than {MAX_PATH_CHARS} characters or with NUL)")
    field(index, "scene.file_size", int, where, optional=True)
    field(index, "scene.file_mtime_ns", int, where, optional=True)
    if height < 1 or width < 1:
        raise DataError(f"{where}: corrupt index (scene size {width} x {height})")
    if max_pixels is not None and height * width > max_pixels:
        raise DataError(f"{folder}: scene of {width} x {height} pixels is above the limit of {max_pixels} pixels")
    tile, overlap = field(index, "tiling.tile", int, where), field(index, "tiling.overlap", int, where)
    if not (16 <= tile <= MAX_TILE and 0 <= overlap < tile):
        raise DataError(f"{where}: corrupt index (tile {tile}, overlap {overlap})")
    count = count_windows(height, width, tile, overlap)
    windows = field(index, "windows", list, where)
    if count > MAX_WINDOWS or len(windows) != count:
        raise DataError(f"{where}: corrupt index ({len(windows)} windows listed, the tiling has {count})")
    for window, box in zip(windows, tile_grid(height, width, tile, overlap)):
        int_list(window, 5, where, "windows")
        if window[:4] != list(box) or window[4] not in (0, 1):
            raise DataError(f"{where}: corrupt index (window {window} is not window {list(box)} of the tiling)")
    if field(index, "dtype", str, where) not in FEATURE_DTYPES:
        raise DataError(f"{where}: corrupt index (unknown feature dtype {index['dtype']!r})")
    field(index, "model.fingerprint", str, where)
    field(index, "model.precision", str, where)
    if field(index, "checkpoint", dict, where, optional=True) is not None:
        field(index, "checkpoint.path", str, where)
        field(index, "checkpoint.sha256", str, where)
    for name in ("bands", "band_indices"):
        if index.get(name) is not None:
            int_list(index[name], None, where, name, low=1)
    field(index, "stretch", dict, where, optional=True)
    for name in ("preview.height", "preview.width"):
        if not 1 <= field(index, name, int, where) <= MAX_PREVIEW_SIDE:
            raise DataError(f"{where}: corrupt index ({name} out of range)")
    return index, _georef(where, index)


def _georef(where: Path, index: dict[str, Any]) -> Any:
    """The :class:`~rsrefseg.inference.geo.GeoReference` recorded in an index (or None)."""
    if field(index, "georef", dict, where, optional=True) is None:
        return None
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    from rsrefseg.inference.geo import GeoReference

    values = index["georef"].get("transform")
    if (not isinstance(values, list) or len(values) != 6
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        raise DataError(f"{where}: corrupt index (georef.transform must be 6 finite numbers)")
    wkt = field(index, "georef.crs_wkt", str, where, optional=True)
    crs = None
    if wkt is not None:
        if len(wkt) > 100_000:
            raise DataError(f"{where}: corrupt index (georef.crs_wkt longer than 100000 characters)")
        try:
            crs = CRS.from_wkt(wkt)
        except CRSError as exc:
            raise DataError(f"{where}: corrupt index (georef.crs_wkt is not a CRS: {str(exc).splitlines()[0]})") from None
    return GeoReference(crs, Affine(*values), index["scene"]["width"], index["scene"]["height"])
