"""Archive jobs: expanding inputs (files, folders, globs, path lists, local STAC) into scenes.

Each command-line item given to :func:`expand_inputs` is

- an image file, or a folder (its images, sorted, not recursive; suffixes :data:`IMAGE_SUFFIXES`),
- a glob pattern (``*``, ``?``, ``[...]``, ``**``),
- ``@LIST``: a text file of such items, one per line (UTF-8, ``#`` comments and blank lines
  skipped, relative paths resolved against the list file's folder; no nested ``@`` lists),
- a local STAC Item or ItemCollection JSON file (``*.json``): ``stac_asset`` names the raster
  asset (without it the one asset that looks like a raster is taken); relative hrefs are resolved
  against the JSON file, ``file://`` hrefs are accepted, remote hrefs (``http(s)://``, ``s3://``...)
  and GDAL virtual paths (``/vsicurl/``...) are refused: only local files are read. Catalogs and
  Collections are refused (their links are not followed).

Each input becomes a :class:`SceneInput` with a stable ``key`` (the STAC item id, else the
resolved absolute path) and a file-system-safe ``name`` for its output folder (an item id such as
``../x`` never becomes a path). The resume manifest lives in :mod:`rsrefseg.inference.manifest`
(re-exported here).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from rsrefseg.errors import DataError
from rsrefseg.inference.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestEntry,
    content_hash,
    remove_temporaries,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_NAME",
    "Manifest",
    "ManifestEntry",
    "SceneInput",
    "content_hash",
    "expand_inputs",
    "read_path_list",
    "read_stac",
    "remove_temporaries",
]

#: Suffixes taken from a folder given as input.
IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".jpg", ".jpeg", ".png", ".bmp", ".jp2", ".img", ".vrt"})
#: Largest path list or STAC JSON read (bytes); larger files are refused.
MAX_LIST_BYTES = 256 * 1024 * 1024
# Media types of raster assets (STAC best practices), for choosing an asset without a key.
_RASTER_TYPES = ("image/tiff", "image/jp2", "image/png", "image/jpeg", "application/x-hdf")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SceneInput:
    """One scene of an archive job."""

    key: str  # stable scene key for the manifest: the STAC item id, else the resolved absolute path
    path: Path  # the local raster file to read
    name: str  # file-system-safe output folder name: the (sanitised) item id, else the file stem
    item: str | None = None  # STAC item id, when the scene came from a STAC file
    asset: str | None = None  # STAC asset key used


def _safe_name(text: str) -> str:
    """``text`` reduced to ``[A-Za-z0-9._-]`` without leading dots (never ``..`` or a path)."""
    return _UNSAFE_NAME.sub("_", text).lstrip(".") or "item"


def _read_small_text(path: Path, what: str) -> str:
    """The UTF-8 text of a regular file of at most :data:`MAX_LIST_BYTES`, or ``DataError``."""
    if not path.is_file():
        raise DataError(f"{path}: {what} not found (or not a regular file)")
    try:
        if path.stat().st_size > MAX_LIST_BYTES:
            raise DataError(f"{path}: {what} is larger than {MAX_LIST_BYTES} bytes")
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the {what} ({type(exc).__name__})") from None


def read_path_list(path: str | os.PathLike[str]) -> list[str]:
    """The items of a path list file: one per line, ``#`` comments and blank lines skipped,
    surrounding spaces stripped, relative items joined to the list file's folder.

    Raises:
        DataError: the file is missing, not UTF-8 or too large.
    """
    source = Path(path)
    base = source.parent
    items = []
    for line in _read_small_text(source, "path list").splitlines():
        item = line.strip()
        if item and not item.startswith("#"):
            items.append(item if os.path.isabs(item) else str(base / item))
    return items


def _resolve_href(json_path: Path, item_id: str, key: str, href: Any) -> Path:
    """The local file an asset href points at (see the module docstring for what is refused)."""
    where = f"{json_path}: STAC item {item_id!r} asset {key!r}"
    if not isinstance(href, str) or not href.strip():
        raise DataError(f"{where} has no href")
    parts = urlsplit(href)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DataError(f"{where}: file href on another host refused ({href!r})")
        candidates = [Path(url2pathname(parts.path))]
    elif parts.scheme and len(parts.scheme) > 1:  # http, https, s3, gs, ... (not a drive letter)
        raise DataError(f"{where}: remote href {href!r} refused; only local files are read (download it first)")
    elif href.startswith("/vsi"):
        raise DataError(f"{where}: GDAL virtual file system path {href!r} refused; only local files are read")
    else:
        literal = Path(href)
        base = json_path.parent
        candidates = [literal if literal.is_absolute() else base / literal]
        decoded = Path(unquote(href))  # hrefs are URIs: "a%20b.tif" is "a b.tif"
        candidates.append(decoded if decoded.is_absolute() else base / decoded)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"{where}: file {href!r} not found (looked for {candidates[0]})")


def _choose_asset(json_path: Path, item_id: str, assets: Mapping[str, Any], key: str | None) -> str:
    """The asset key to read: ``key``, or the only asset that looks like a raster."""
    available = ", ".join(sorted(assets)) or "none"
    if key is not None:
        if key not in assets:
            raise DataError(f"{json_path}: STAC item {item_id!r} has no asset {key!r} (available: {available})")
        return key
    rasters = [
        k for k, a in assets.items() if isinstance(a, Mapping) and (
            str(a.get("type", "")).lower().startswith(_RASTER_TYPES)
            or Path(urlsplit(str(a.get("href", ""))).path).suffix.lower() in IMAGE_SUFFIXES)
    ]
    if len(rasters) != 1:
        raise DataError(f"{json_path}: STAC item {item_id!r}: choose the raster asset with --stac-asset"
                        f" (available: {available})")
    return rasters[0]


def read_stac(path: str | os.PathLike[str], asset: str | None = None) -> list[SceneInput]:
    """The scenes of a local STAC Item or ItemCollection JSON file, one per item.

    Raises:
        DataError: unreadable/invalid JSON, not an Item/ItemCollection (a Catalog or Collection is
            refused: its links are not followed), an item without ``id``/``assets``, a missing
            asset key (the message names the item and lists its assets), a remote or missing href.
    """
    source = Path(path)
    try:
        doc = json.loads(_read_small_text(source, "STAC file"))
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{source}: not valid JSON ({type(exc).__name__})") from None
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind == "Feature":
        items = [doc]
    elif kind == "FeatureCollection" and isinstance(doc.get("features"), list):
        items = doc["features"]
    elif kind in ("Catalog", "Collection"):
        raise DataError(f"{source}: a STAC {kind} is not supported (its links are not followed);"
                        " give an Item or ItemCollection JSON")
    else:
        raise DataError(f"{source}: not a STAC Item or ItemCollection (no \"type\": \"Feature\" or"
                        " \"FeatureCollection\")")
    scenes = []
    for number, item in enumerate(items, start=1):
        item_id = item.get("id") if isinstance(item, dict) else None
        if not isinstance(item_id, str) or not item_id.strip():
            raise DataError(f"{source}: STAC item #{number} has no id")
        assets = item.get("assets")
        if not isinstance(assets, dict):
            raise DataError(f"{source}: STAC item {item_id!r} has no assets")
        key = _choose_asset(source, item_id, assets, asset)
        href = assets[key].get("href") if isinstance(assets[key], dict) else None
        scenes.append(SceneInput(item_id, _resolve_href(source, item_id, key, href), _safe_name(item_id),
                                 item_id, key))
    return scenes


def _file_scene(path: Path, stac_asset: str | None) -> list[SceneInput]:
    if path.suffix.lower() == ".json":
        return read_stac(path, stac_asset)
    return [SceneInput(str(path.resolve()), path, _safe_name(path.stem))]


def _expand_one(item: str, stac_asset: str | None, lists: bool) -> list[SceneInput]:
    path = Path(item)
    if lists and item.startswith("@") and not path.exists():
        found = []
        for entry in read_path_list(item[1:]):
            try:
                found += _expand_one(entry, stac_asset, lists=False)
            except DataError as exc:
                raise DataError(f"{item[1:]}: {exc}") from None
        if not found:
            raise DataError(f"{item[1:]}: the path list names no input")
        return found
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{item}: folder contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return [s for p in files for s in _file_scene(p, stac_asset)]
    if path.is_file():
        return _file_scene(path, stac_asset)
    if glob.has_magic(item):
        files = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{item}: no file matches this pattern")
        return [s for p in files for s in _file_scene(p, stac_asset)]
    raise DataError(f"{item}: no such image file or folder")


def expand_inputs(items: Sequence[str], stac_asset: str | None = None) -> list[SceneInput]:
    """Command-line items -> unique scenes in order (see the module docstring).

    A file reached twice (same resolved path) is kept once, at its first place.

    Raises:
        DataError: an item matches nothing, a list or STAC file is invalid, or two different
            files claim the same scene key (e.g. two STAC items with one id).
    """
    by_key: dict[str, SceneInput] = {}
    seen_paths: set[Path] = set()
    for item in items:
        for scene in _expand_one(item, stac_asset, lists=True):
            resolved = scene.path.resolve()
            previous = by_key.get(scene.key)
            if previous is not None and previous.path.resolve() != resolved:
                raise DataError(f"{item}: scene key {scene.key!r} names two files ({previous.path}, {scene.path})")
            if previous is None and resolved not in seen_paths:
                by_key[scene.key] = scene
                seen_paths.add(resolved)
    return list(by_key.values())
