"""Feature folders: encode a scene once, segment new expressions on it later without the image.

Encoding (the SAM ViT and the CLIP/SigLIP vision tower) is > 99 % of the work of a first
expression; decoding a new expression on cached features costs milliseconds per window.
:func:`encode_scene` writes the encoded windows of a scene (the same windows
:func:`~rsrefseg.inference.scene.predict_scene` uses) into a folder; :func:`open_features` gives
back a :class:`~rsrefseg.inference.scene.SceneSource` (size, georeference, preview; no pixels) and
a cache following the :class:`~rsrefseg.inference.tiling.TileCache` protocol, so that::

    fs = open_features("features/scene", predictor)
    scene = predict_scene(predictor, fs.source, ["the river"], tile=fs.tile, overlap=fs.overlap, cache=fs.cache)

(or :func:`predict_from_features`) neither reads nor encodes the image. With ``float32`` features
the masks are exactly those of ``predict_scene`` on the image; ``float16`` halves the folder.

Safety: a folder made with another checkpoint (model fingerprint of the config and trained head;
optionally the checkpoint files' SHA-256), tiling or band choice, an interrupted encode, a changed
scene file, a missing or corrupt window file are refused with a one-line
:class:`~rsrefseg.errors.ConfigError` / :class:`~rsrefseg.errors.DataError`. See
:mod:`rsrefseg.inference.feature_files` for the format and the checks on hostile files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsrefseg.errors import ConfigError, DataError
from rsrefseg.inference import feature_files as ff
from rsrefseg.inference import feature_index as fi
from rsrefseg.inference.feature_reader import (
    DEFAULT_MAX_FEATURE_PIXELS,
    FeatureCache,
    FeatureScene,
    FeatureSource,
    open_features,
)
from rsrefseg.inference.geo import GeoReference
from rsrefseg.inference.predictor import Predictor
from rsrefseg.inference.scene import ScenePrediction, SceneSource, open_scene, predict_scene
from rsrefseg.inference.tiling import TileBox, tile_grid

__all__ = ["DEFAULT_MAX_FEATURE_PIXELS", "DEFAULT_PREVIEW_MAX_SIDE", "EncodeResult", "FeatureCache", "FeatureScene",
           "FeatureSource", "encode_scene", "find_feature_folders", "open_features", "predict_from_features",
           "recast_features"]

#: Longest side of the stored preview (the default overlay size of ``rsrefseg predict``).
DEFAULT_PREVIEW_MAX_SIDE = 2048
Progress = Callable[[Iterator[TileBox], int], Iterator[TileBox]]


# ---------------------------------------------------------------------------------------- index content
def _scene_record(source: SceneSource) -> dict[str, Any]:
    """Path, size and (for a file) its byte size and modification time, to notice a changed scene."""
    path = Path(source.path)
    record: dict[str, Any] = {"path": str(path), "name": path.name, "height": int(source.height),
                              "width": int(source.width), "file_size": None, "file_mtime_ns": None}
    if path.is_file():
        stat = path.stat()
        record.update(path=str(path.resolve()), file_size=stat.st_size, file_mtime_ns=stat.st_mtime_ns)
    return record


def _band_record(source: SceneSource, bands: Sequence[int] | None) -> list[int] | None:
    """The 1-based source bands behind R, G, B: read from a RasterioSource, else ``bands`` as given."""
    unique, channels = getattr(source, "_unique", None), getattr(source, "_channels", None)
    if unique is not None and channels is not None:
        return [int(unique[c]) for c in channels]
    return None if bands is None else [int(b) for b in bands]


def _stretch_record(source: SceneSource, stretch: tuple[float, float] | None) -> dict[str, Any] | None:
    """Scene-wide stretch limits of a RasterioSource (per read band), so that a decode never needs the image."""
    limits = getattr(source, "_limits", None)
    if not limits:
        return None
    return {"percentiles": None if stretch is None else [float(v) for v in stretch],
            "bands": [int(b) for b in getattr(source, "_unique", [])],
            "limits": [None if lim is None else [float(lim[0]), float(lim[1])] for lim in limits]}


def _georef_record(georef: GeoReference | None) -> dict[str, Any] | None:
    if georef is None:
        return None
    t = georef.transform
    return {"crs_wkt": None if georef.crs is None else georef.crs.to_wkt(), "transform": [t.a, t.b, t.c, t.d, t.e, t.f]}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    a, b = fi.key_settings(old), fi.key_settings(new)
    names = {"model": "checkpoint", "scene": "scene file", "tiling": "tiling", "bands": "bands",
             "stretch": "stretch", "dtype": "dtype", "precision": "precision"}
    return ", ".join(names.get(k, k) for k in a if a.get(k) != b.get(k)) or "settings"


@dataclass
class EncodeResult:
    """What :func:`encode_scene` did.

    Attributes:
        folder: The feature folder.
        windows: Windows of the scene; ``encoded`` were encoded now, ``reused`` were already on disk
            (an interrupted run resumed), ``empty`` have no valid pixel (no file).
        bytes: Size of the folder's files (windows, index, preview).
        seconds: Wall time of the call.
    """

    folder: Path
    windows: int
    encoded: int
    reused: int
    empty: int
    bytes: int
    seconds: float


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock of a folder being encoded (one writer at a time); a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(folder / ".encode.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"{folder}: another `rsrefseg encode` is writing this folder") from None
        yield


def _clear_folder(folder: Path) -> None:
    """Remove a feature folder's own files (never anything else); call with the lock held."""
    windows = folder / ff.WINDOWS_DIR
    if windows.is_dir():
        for path in windows.iterdir():
            if path.name.startswith(("w", ".w")) and ".safetensors" in path.name:
                path.unlink()
    for name in (ff.INDEX_NAME, ff.PREVIEW_NAME):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()


def _write_preview(folder: Path, source: SceneSource, max_side: int) -> dict[str, Any]:
    from PIL import Image

    from rsrefseg.utils import atomic_save

    rgb, valid = source.preview(max_side)  # h x w x 3 uint8, h x w bool
    rgba = np.dstack([rgb, np.where(valid, 255, 0).astype(np.uint8)])  # h x w x 4
    image = Image.fromarray(rgba, mode="RGBA")
    atomic_save(folder / ff.PREVIEW_NAME, lambda tmp: image.save(tmp, format="PNG"))
    return {"file": ff.PREVIEW_NAME, "height": int(rgb.shape[0]), "width": int(rgb.shape[1])}


def encode_scene(
    predictor: Predictor,
    source: SceneSource | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tile: int | None = None,
    overlap: int | None = None,
    dtype: str = "float32",
    progress: Progress | None = None,
    *,
    bands: Sequence[int] | None = None,
    stretch: tuple[float, float] = (2.0, 98.0),
    checkpoint: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    preview_max_side: int = DEFAULT_PREVIEW_MAX_SIDE,
) -> EncodeResult:
    """Encode every window of a scene into the feature folder ``out_dir`` (resuming an interrupted run).

    Args:
        predictor: The predictor whose encoders are used.
        source: A :class:`SceneSource` (e.g. :func:`~rsrefseg.inference.scene.open_scene`) or a path
            (opened here with ``bands`` and ``stretch``).
        out_dir: The feature folder (created).
        tile, overlap: Windows as in ``predict_scene`` (default: the model input ``S``, ``tile // 8``).
        dtype: ``"float32"`` (decoding gives exactly the masks of the image) or ``"float16"`` (half the size).
        progress: Optional wrapper of the window iterator, e.g. ``lambda it, n: tqdm(it, total=n)``.
        bands: 1-based source bands (recorded; used to open a path).
        stretch: Percentiles of the stretch when ``source`` is a path.
        checkpoint: The checkpoint folder of ``predictor`` (its SHA-256 is recorded and can be checked
            by :func:`open_features`).
        overwrite: Replace a folder made with other settings instead of refusing it.
        preview_max_side: Longest side of ``preview.png``.

    Windows already on disk with the same settings are kept (each file is written atomically), so
    rerunning an interrupted call finishes it. Windows without a valid pixel get no file.

    Raises:
        ConfigError: bad tiling/dtype, ``out_dir`` holds features made with other settings (and not
            ``overwrite``), or another process is encoding into it.
        DataError: the scene cannot be read.
    """
    if dtype not in ff.FEATURE_DTYPES:
        raise ConfigError(f"unknown feature dtype {dtype!r}; choose one of {', '.join(ff.FEATURE_DTYPES)}")
    if isinstance(source, (str, os.PathLike)):
        with open_scene(source, bands=None if bands is None else tuple(bands), stretch=stretch) as opened:
            return encode_scene(predictor, opened, out_dir, tile, overlap, dtype, progress, bands=bands,
                                stretch=stretch, checkpoint=checkpoint, overwrite=overwrite,
                                preview_max_side=preview_max_side)
    start = time.perf_counter()
    tile = int(tile or predictor.size)
    overlap = int(tile // 8 if overlap is None else overlap)
    if not 16 <= tile <= ff.MAX_TILE:
        raise ConfigError(f"tile must be in [16, {ff.MAX_TILE}] pixels, got {tile}")
    if not 16 <= preview_max_side <= ff.MAX_PREVIEW_SIDE:
        raise ConfigError(f"preview side must be in [16, {ff.MAX_PREVIEW_SIDE}] pixels, got {preview_max_side}")
    boxes = tile_grid(source.height, source.width, tile, overlap)
    model = predictor.model
    from rsrefseg import __version__

    index: dict[str, Any] = {
        "format": ff.FORMAT, "complete": False, "key": "", "library_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "scene": _scene_record(source), "georef": _georef_record(source.georef),
        "bands": None if bands is None else [int(b) for b in bands], "band_indices": _band_record(source, bands),
        "stretch": _stretch_record(source, stretch),
        "tiling": {"tile": tile, "overlap": overlap, "windows": len(boxes)},
        "model": {"fingerprint": ff.model_fingerprint(model), "preset": model.config.preset,
                  "precision": ff.model_precision(model), "sam_image_size": predictor.size,
                  "resize_mode": predictor.resize_mode,
                  **{f"{k}_shape": list(v) for k, v in ff.model_shapes(model).items()}},
        "checkpoint": None if checkpoint is None else {"path": str(Path(checkpoint).resolve()),
                                                       "sha256": ff.checkpoint_fingerprint(checkpoint)},
        "dtype": dtype, "preview": None, "windows": None, "stats": None,
    }
    key = index["key"] = ff.settings_key(fi.key_settings(index))
    folder = Path(out_dir)
    try:
        (folder / ff.WINDOWS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{folder}: cannot create the feature folder ({exc.strerror or exc})") from None
    with _folder_lock(folder):
        if (folder / ff.INDEX_NAME).exists():
            try:
                old = fi.read_index_json(folder)
                same = old.get("key") == key
                reason = "" if same else _differences(old, index)
            except (DataError, KeyError, TypeError):
                same, reason = False, "an unreadable index"
            if not same and not overwrite:
                raise ConfigError(f"{folder}: holds features made with other settings ({reason} differ); "
                                  "use another output folder or --overwrite")
            if not same:
                _clear_folder(folder)
            index["preview"] = old.get("preview") if same and (folder / ff.PREVIEW_NAME).is_file() else None
        for stale in (*folder.glob(".*.tmp"), *(folder / ff.WINDOWS_DIR).glob(".*.tmp")):
            stale.unlink()  # temporary files of a killed run (we hold the lock: nobody else writes)
        fi.write_index(folder, index)
        if index["preview"] is None:
            index["preview"] = _write_preview(folder, source, preview_max_side)
            fi.write_index(folder, index)
        shapes = ff.model_shapes(model)
        numbers = {box: i for i, box in enumerate(boxes)}
        states: list[int | None] = [None] * len(boxes)
        encoded = reused = 0
        iterator: Iterator[TileBox] = iter(boxes)
        if progress is not None:
            iterator = progress(iterator, len(boxes))
        for box in iterator:
            i = numbers[box]
            path = folder / ff.WINDOWS_DIR / ff.window_name(i)
            expected = ff.expected_window(shapes, dtype, tuple(box))
            if path.exists():
                try:
                    ff.read_window_bytes(path, expected, key, tuple(box), header_only=True)
                    states[i], reused = 1, reused + 1
                    continue
                except DataError:
                    path.unlink()  # not from this run's settings, or damaged: encode again
            rgb, valid = source.read(box)
            if not valid.any():
                states[i] = 0
                continue
            enc = predictor.encode(rgb, valid=valid)
            for name, tensor in (("sam", enc.features.sam), ("clip", enc.features.clip)):
                if tuple(tensor.shape) != shapes[name]:  # pragma: no cover - a model bug, not user input
                    raise RuntimeError(f"{name} features {tuple(tensor.shape)}, expected {shapes[name]}")
            ff.write_window(path, enc.features.sam, enc.features.clip, enc.valid, dtype, key, tuple(box))
            states[i], encoded = 1, encoded + 1
        if any(s is None for s in states):
            raise RuntimeError("the progress wrapper did not yield every window")
        files = [folder / ff.WINDOWS_DIR / ff.window_name(i) for i, s in enumerate(states) if s]
        total = sum(p.stat().st_size for p in files) + (folder / ff.PREVIEW_NAME).stat().st_size
        index["windows"] = [[*box, states[i]] for i, box in enumerate(boxes)]
        index["stats"] = {"window_files": len(files), "empty_windows": states.count(0), "bytes": total,
                          "megapixels": source.height * source.width / 1e6}
        index["complete"] = True
        fi.write_index(folder, index)
    total += (folder / ff.INDEX_NAME).stat().st_size
    return EncodeResult(folder, len(boxes), encoded, reused, states.count(0), total, time.perf_counter() - start)


def predict_from_features(
    predictor: Predictor,
    features: FeatureScene | str | os.PathLike[str],
    expressions: Sequence[str],
    batch_size: int = 16,
    threshold: float = 0.0,
    heatmap: bool = False,
    progress: Progress | None = None,
    **checks: Any,
) -> ScenePrediction:
    """``predict_scene`` on a feature folder (opened with ``open_features(features, predictor,
    **checks)`` unless already open): every window decoded from its file, the image never read."""
    fs = features if isinstance(features, FeatureScene) else open_features(features, predictor, **checks)
    return predict_scene(predictor, fs.source, expressions, tile=fs.tile, overlap=fs.overlap, batch_size=batch_size,
                         threshold=threshold, heatmap=heatmap, progress=progress, cache=fs.cache)


def recast_features(predictor: Predictor, folder: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    dtype: str) -> Path:
    """Copy a feature folder with its features cast to ``dtype`` (e.g. ``float16``, half the size);
    the result equals encoding the scene again with that dtype."""
    if dtype not in ff.FEATURE_DTYPES:
        raise ConfigError(f"unknown feature dtype {dtype!r}; choose one of {', '.join(ff.FEATURE_DTYPES)}")
    fs = open_features(folder, predictor, check_scene=False)
    out = Path(out_dir)
    if out.resolve() == fs.folder.resolve():
        raise ConfigError(f"{out}: recast into another folder than the source")
    index = {**fs.index, "dtype": dtype, "complete": False}
    index["key"] = ff.settings_key(fi.key_settings(index))
    (out / ff.WINDOWS_DIR).mkdir(parents=True, exist_ok=True)
    with _folder_lock(out):
        _clear_folder(out)
        shapes = ff.model_shapes(predictor.model)
        size = 0
        for number, window in enumerate(fs.index["windows"]):
            if window[4]:
                box = tuple(window[:4])
                sam, clip, valid = ff.read_window(fs.folder / ff.WINDOWS_DIR / ff.window_name(number),
                                                  ff.expected_window(shapes, fs.dtype, box), fs.cache.key, box)
                size += ff.write_window(out / ff.WINDOWS_DIR / ff.window_name(number), sam, clip, valid, dtype,
                                        index["key"], box)
        shutil.copyfile(fs.folder / ff.PREVIEW_NAME, out / ff.PREVIEW_NAME)
        index["stats"] = {**(fs.index.get("stats") or {}), "bytes": size + (out / ff.PREVIEW_NAME).stat().st_size}
        index["complete"] = True
        fi.write_index(out, index)
    return out


def find_feature_folders(root: str | os.PathLike[str]) -> list[Path]:
    """``root`` itself when it is a feature folder, else its sub-folders that are (sorted), as
    ``rsrefseg encode`` writes them (``DIR/<scene>/``).

    Raises:
        DataError: neither ``root`` nor any sub-folder has an ``index.json``.
    """
    path = Path(root)
    if (path / ff.INDEX_NAME).is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / ff.INDEX_NAME).is_file()) if path.is_dir() else []
    if not found:
        raise DataError(f"{path}: no feature folder here (no {ff.INDEX_NAME} in it or its sub-folders)")
    return found


def folder_bytes(folder: str | os.PathLike[str]) -> int:
    """Total size of the files of a feature folder (index, preview, windows)."""
    path = Path(folder)
    files = [path / ff.INDEX_NAME, path / ff.PREVIEW_NAME, *(path / ff.WINDOWS_DIR).glob("w*.safetensors")]
    return sum(f.stat().st_size for f in files if f.is_file())
