"""The web demo's work, without Gradio: :class:`DemoService` (``rsrefseg.app`` puts a page on it).

- the model is loaded **once** (a :class:`~rsrefseg.inference.predictor.Predictor`) and shared by
  every request; a lock serialises model use, and the encoder runs **once per uploaded image**
  (on upload, or on the first run for that file), every expression is decoded on the cached features;
- uploads above the tile threshold are segmented tile by tile at native resolution: the file stays
  open (read window by window, the preview from a downsampled read), and the encoded windows are
  kept in a :class:`~rsrefseg.inference.scene.TileCache` (up to ``Limits.tile_cache_mb``), so the
  next run with new expressions decodes only;
- uploads are read with :func:`rsrefseg.data.imageio.read_image`, so GeoTIFFs (16-bit, float,
  multiband, nodata) work; their size (MB) and dimensions (pixels) are checked first, from the
  file header (:mod:`rsrefseg.demo_limits`), and a violation raises :class:`~rsrefseg.errors.DataError`
  naming the file and the limit (shown in the page as a one-line ``gr.Error``);
- each run writes, per expression, the same files as ``rsrefseg predict`` (mask PNG, overlay PNG,
  and for georeferenced inputs a GeoTIFF mask and GeoJSON polygons) plus a heatmap PNG and one zip
  of everything, into a new folder in ``out_dir`` (the session's folder in ``rsrefseg serve``, see
  :mod:`rsrefseg.demo_storage`) or the service's own temporary folder; only the last ``keep_runs``
  runs per folder are kept, and a run that fails removes what it wrote;
- expressions are checked before anything else (count, length, total size, valid text), so a pasted
  megabyte is refused at once; error messages name the uploaded file by its name, never by the
  server's path.

Nothing happens at import: torch and the model code are imported inside functions.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time
import weakref
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsrefseg.demo_limits import (
    DEFAULT_MAX_EXPRESSIONS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_TILE_CACHE_MB,
    DEFAULT_TILE_THRESHOLD,
    MAX_BANDS_CHARS,
    PREVIEW_MAX_SIDE,
    UPLOAD_TYPES,
    Limits,
    check_upload,
    max_text_chars,
    name_only,
    parse_expressions,
)
from rsrefseg.demo_report import DemoResult, markdown_table, preview, safe_stem
from rsrefseg.errors import ConfigError, DataError, RSRefSegError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from rsrefseg.inference.geo import GeoReference
    from rsrefseg.inference.predictor import Predictor
    from rsrefseg.inference.scene import SceneSource
    from rsrefseg.inference.tiling import TileCache

__all__ = ["DEFAULT_MAX_EXPRESSIONS", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_UPLOAD_MB", "DEFAULT_TILE_CACHE_MB",
           "DEFAULT_TILE_THRESHOLD", "MAX_BANDS_CHARS", "PREVIEW_MAX_SIDE", "UPLOAD_TYPES", "DemoResult", "DemoService",
           "Limits", "check_upload", "max_text_chars", "parse_expressions"]


@dataclass
class _Loaded:
    """The current upload: its preview, georeferencing, and for a tiled upload the open scene."""

    key: tuple[str, int, int, tuple[int, ...] | None]
    preview: np.ndarray  # h x w x 3 uint8, longest side <= PREVIEW_MAX_SIDE
    georef: GeoReference | None
    height: int
    width: int
    scene: SceneSource | None = None  # a tiled upload, kept open and read window by window
    tiles: TileCache | None = None  # its encoded windows, reused by the next run
    tile: int | None = None  # window side of the scene (None: predict_scene's default; a feature folder's own)
    overlap: int | None = None  # window overlap (None: tile // 8)

    @property
    def tiled(self) -> bool:
        """Whether the upload is segmented tile by tile (features are then in ``tiles``)."""
        return self.scene is not None

    def close(self) -> None:
        """Release the open scene file and the cached windows."""
        if self.scene is not None:
            self.scene.close()
        self.scene = self.tiles = None

    @property
    def bands(self) -> tuple[int, ...] | None:
        """The parsed band choice (part of the cache key)."""
        return self.key[3]


class DemoService:
    """The demo's work, independent of Gradio: one cached predictor, limits, per-run output folders.

    Args:
        predictor: The shared predictor (loaded once).
        limits: Upload / dimension / expression-count limits.
        workdir: Folder for run outputs without an ``out_dir`` (default: a new temporary folder,
            removed with the service).
        keep_runs: Output folders of this many recent runs are kept per output folder (older ones are
            deleted).
        features_root: A folder of feature folders (``rsrefseg encode`` outputs) offered by name
            (:meth:`feature_folders`, :meth:`load_features`, ``run(features=name)``); None: none.
    """

    def __init__(
        self, predictor: Predictor, limits: Limits | None = None, workdir: str | Path | None = None, keep_runs: int = 8,
        features_root: str | Path | None = None,
    ) -> None:
        self.predictor = predictor
        self.features_root = None if features_root is None else Path(features_root)
        self.limits = limits or Limits()
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="rsrefseg-app-")
            weakref.finalize(self, shutil.rmtree, workdir, True)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._runs: dict[Path, deque[Path]] = {}  # output folder -> its run folders, oldest first
        self._keep_runs = max(1, keep_runs)
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self.encodes = 0  # image encodings: one per distinct upload, one per tiled run that encodes windows
        self.encoded_tiles = 0  # windows of tiled uploads encoded so far

    def _load(self, path: Path, bands: str | None = None) -> _Loaded:
        """Check limits and make sure the predictor holds ``path``'s features; call with the lock held.

        ``bands``: 1-based source bands for R, G, B (``"4,3,2"``, or one band); empty = automatic.
        """
        from rsrefseg.data.imageio import parse_bands, read_image
        from rsrefseg.inference.geo import read_georeference
        from rsrefseg.inference.scene import open_scene
        from rsrefseg.inference.tiling import should_tile

        if not path.is_file():
            raise DataError(f"{path.name}: uploaded file not found (upload it again)")
        if bands is not None and len(bands) > MAX_BANDS_CHARS:
            raise ConfigError(f"bands: {len(bands)} characters; expected 1 or 3 band numbers like 4,3,2")
        try:
            chosen = parse_bands(bands)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, chosen)
        loaded = self._loaded
        if loaded is not None and loaded.key == key and (loaded.tiled or self.predictor.is_image_set):
            return loaded
        height, width = check_upload(path, self.limits)
        if should_tile(height, width, self.limits.tile_threshold):
            new = self._use_scene(key, open_scene(path, bands=chosen))  # streams the stretch statistics
        else:
            raster = read_image(path, bands=chosen)
            georef = read_georeference(path) if raster.transform is not None else None
            self.predictor.set_image(raster)
            self.encodes += 1
            new = _Loaded(key, preview(raster.rgb), georef, raster.height, raster.width)
            self._replace(new)
        return new

    def _use_scene(self, key: tuple[Any, ...], scene: SceneSource, tiles: TileCache | None = None,
                   tile: int | None = None, overlap: int | None = None) -> _Loaded:
        """Make an open scene the current image, segmented window by window (call with the lock held).

        The scene is read only for windows missing from ``tiles`` (default: a new cache of
        ``Limits.tile_cache_mb``). This is the seam for scene sources other than an uploaded file: a
        feature folder (``rsrefseg encode``) gives a :class:`SceneSource` plus a cache holding every
        window, so nothing is read or encoded (``tile``/``overlap``: its tiling). ``scene`` is
        closed here if its preview fails.
        """
        from rsrefseg.inference.tiling import TileCache

        try:
            preview, _ = scene.preview(PREVIEW_MAX_SIDE)
        except BaseException:
            scene.close()
            raise
        if tiles is None:
            tiles = TileCache(int(self.limits.tile_cache_mb * 2**20))
        new = _Loaded(key, preview, scene.georef, scene.height, scene.width, scene, tiles, tile, overlap)
        self.predictor.reset_image()
        self._replace(new)
        return new

    def _replace(self, new: _Loaded | None) -> None:
        """Make ``new`` current, releasing the previous upload only now (a failed upload leaves it usable)."""
        if self._loaded is not None and self._loaded is not new:
            self._loaded.close()
        self._loaded = new

    def feature_folders(self) -> list[str]:
        """Names of the encoded scenes under ``features_root`` (empty without one)."""
        from rsrefseg.demo_features import list_feature_folders

        return [] if self.features_root is None else list_feature_folders(self.features_root)

    def _load_features(self, name: str) -> _Loaded:
        """Make the feature folder ``name`` (one of :meth:`feature_folders`) current; call with the lock held."""
        from rsrefseg.demo_features import folder_key, resolve_feature_folder
        from rsrefseg.inference.features import open_features

        if self.features_root is None:
            raise ConfigError("this server offers no encoded scenes (start it with --features-root DIR)")
        folder = resolve_feature_folder(self.features_root, name)
        key = folder_key(folder)
        if self._loaded is not None and self._loaded.key == key:
            return self._loaded
        fs = open_features(folder, self.predictor, max_pixels=self.limits.max_pixels)
        return self._use_scene(key, fs.source, fs.cache, fs.tile, fs.overlap)

    def load_features(self, name: str) -> np.ndarray:
        """Open the encoded scene ``name`` (one of :meth:`feature_folders`) instead of an upload;
        return its preview (``h x w x 3`` uint8). Messages name it by ``name``, never by its path."""
        from rsrefseg.demo_features import without_root

        try:
            with self._lock:
                return self._load_features(name).preview
        except RSRefSegError as exc:
            raise without_root(exc, self.features_root) from None

    def load(self, path: str | os.PathLike[str], bands: str | None = None) -> np.ndarray:
        """Check and encode an uploaded image (``bands`` as in :meth:`run`); return its preview
        (``h x w x 3`` uint8)."""
        source = Path(path)
        try:
            with self._lock:
                return self._load(source, bands).preview
        except RSRefSegError as exc:
            raise name_only(exc, source) from None

    def release(self, path: str | os.PathLike[str]) -> bool:
        """Forget ``path`` if it is the current upload (its file is about to be deleted); True if it was."""
        resolved = str(Path(path).resolve())
        with self._lock:
            if self._loaded is None or self._loaded.key[0] != resolved:
                return False
            self._replace(None)
            self.predictor.reset_image()
            return True

    def _new_run_dir(self, parent: Path) -> Path:
        """A fresh output folder in ``parent``; the oldest of ``parent`` beyond ``keep_runs`` is deleted
        (call with the lock held)."""
        parent.mkdir(parents=True, exist_ok=True)
        run = Path(tempfile.mkdtemp(prefix="run-", dir=parent))
        runs = self._runs.setdefault(parent, deque())
        runs.append(run)
        while len(runs) > self._keep_runs:
            shutil.rmtree(runs.popleft(), ignore_errors=True)
        for other in [p for p in self._runs if p != parent and not p.is_dir()]:
            del self._runs[other]  # a session's folder deleted since: forget it
        return run

    def run(
        self, path: str | os.PathLike[str] | None, text: str | None, threshold: float = 0.5, bands: str | None = None,
        out_dir: str | os.PathLike[str] | None = None, *, features: str | None = None,
    ) -> DemoResult:
        """Segment every expression of ``text`` (one per line) on the image at ``path``, or on the
        encoded scene ``features``.

        Args:
            path: The uploaded image (ignored with ``features``).
            text: Expressions, one per line.
            threshold: Mask probability threshold in (0, 1).
            bands: 1-based source bands for R, G, B, e.g. ``"4,3,2"`` for a multispectral GeoTIFF,
                or one band; empty or ``None`` = automatic (the first three, or the only one).
            out_dir: Where this run's output folder is made (default: the service's ``workdir``).
            features: One of :meth:`feature_folders`: decode from it (``bands`` do not apply: the
                folder fixes them), never reading or encoding the image.

        Raises:
            DataError / ConfigError: a limit is exceeded, the file cannot be read, no expression.
        """
        work = Path(out_dir) if out_dir is not None else self.workdir
        if features is not None:
            from rsrefseg.demo_features import without_root

            try:
                shown = Path(features if features != "." or self.features_root is None
                             else self.features_root.resolve().name)
                return self._run(shown, text, threshold, None, work, features)
            except RSRefSegError as exc:
                raise without_root(exc, self.features_root) from None
        if path is None:
            raise ConfigError("upload an image or choose an encoded scene first")
        source = Path(path)
        try:
            return self._run(source, text, threshold, bands, work)
        except RSRefSegError as exc:
            raise name_only(exc, source) from None

    def _run(self, source: Path, text: str | None, threshold: float, bands: str | None, out_dir: Path,
             features: str | None = None) -> DemoResult:
        from rsrefseg.inference.outputs import expression_names, write_prediction_outputs
        from rsrefseg.inference.scene import predict_scene

        expressions = parse_expressions(text, self.limits.max_expressions)
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"the mask threshold must be in (0, 1), got {threshold}")
        start = time.perf_counter()
        with self._lock:
            loaded = self._load_features(features) if features is not None else self._load(source, bands)
            logit = math.log(threshold / (1 - threshold))
            scene = None
            if loaded.scene is not None:  # tile by tile at native resolution, encoded windows reused
                scene = predict_scene(self.predictor, loaded.scene, expressions, threshold=logit, heatmap=True,
                                      cache=loaded.tiles, tile=loaded.tile, overlap=loaded.overlap)
                predictions = scene.predictions
                self.encodes += scene.encoded_tiles > 0
                self.encoded_tiles += scene.encoded_tiles
            else:
                predictions = self.predictor.predict(expressions, threshold=logit)
            run_dir = self._new_run_dir(out_dir)
        try:
            folder = run_dir / safe_stem(source)
            names = expression_names(expressions)
            records = [
                write_prediction_outputs(folder, name, p, loaded.preview, source.name, loaded.georef)
                for name, p in zip(names, predictions)
            ]
            zip_path = run_dir / f"{folder.name}_masks.zip"
            with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
                for file in sorted(folder.iterdir()):
                    if not file.name.endswith(".heatmap.png"):
                        archive.write(file, f"{folder.name}/{file.name}")
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing half-written stays behind
            raise
        heatmaps = [(str(folder / r["heatmap_png"]), r["expression"]) for r in records if "heatmap_png" in r]
        downloads = [str(zip_path)]
        for key in ("mask_png", "geojson", "mask_tif"):
            downloads += [str(folder / r[key]) for r in records if key in r]
        overlays = [
            (str(folder / r["overlay_png"]), f"{r['expression']} (score {r['score']:.2f})") for r in records
        ]
        summary = markdown_table(source.name, loaded, records, time.perf_counter() - start, scene)
        return DemoResult(overlays, heatmaps, downloads, summary, records)
