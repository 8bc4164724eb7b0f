"""Large scenes: overlapping tiles, cached features per tile, max-logit stitching.

An image with more than ``tile_threshold`` pixels (default :data:`DEFAULT_TILE_THRESHOLD`,
2048 x 2048) is not squeezed into the ``S x S`` model input as a whole (objects would shrink to a
few pixels). Instead it is cut into ``tile x tile`` windows at native resolution (default
``tile = S``, overlap ``S // 8``: 1024 / 128 for the full presets), and for each window:

1. the window is read (from the file with a ``rasterio`` window when the source is a raster file),
2. the image encoders run once on it (:meth:`Predictor.encode`; the predictor's own current image
   is left alone),
3. every expression is decoded on the cached features (text features are encoded once per scene),
4. its logits are max-merged with the overlapping windows (seam-free; the tile loop and the
   streaming stitcher are in :mod:`rsrefseg.inference.scene_stream` and
   :mod:`rsrefseg.inference.stitching`).

Windows without a single valid pixel are skipped (their logits are :data:`EMPTY_TILE_LOGIT`).
:func:`predict_scene` returns ``H x W`` arrays per expression (what the web demo and the Python API
need for scenes that fit in memory); ``rsrefseg predict`` writes the same values window by window
into its output files instead (:mod:`rsrefseg.inference.scene_writer`), so its memory does not
depend on the scene size.

Interactive use (new expressions on the same scene, as in the web demo) passes a :class:`TileCache`:
encoded windows are kept (about 7.5 MB each for the full presets, fp32 features) up to its byte
budget, so a later call decodes the new expressions on the cached windows without reading or
encoding them again; windows beyond the budget are encoded on every call.
Memory of :func:`predict_scene`: one ``H x W`` float32 buffer per expression (``4 * H * W``
bytes, 53 MB for the 2846 x 4627 Landsat sample; twice with heatmaps), the scene's ``H x W``
validity, one tile and the stitching frontier. The stretch of non-8-bit data uses per-band
percentiles over the whole scene's valid pixels, computed by streaming the file in row blocks (of
at most :data:`_STAT_PIXELS` pixels) with exactly the sampling of
:func:`rsrefseg.data.imageio.read_image`, so tiles look identical to the corresponding part of a
full read. JPEG/PNG/BMP scenes are read whole with PIL (whose decompression-bomb limit, about 179
million pixels, refuses larger ones): use GeoTIFF for larger scenes.

**Relative words in tiled mode.** Every tile is segmented on its own, so spatial and comparative
words ("on the left", "the largest", "the second ship from the top") are interpreted **per tile**:
each tile may select its own "left-most building", and the stitched mask is the union over tiles,
which can contain several objects. For such expressions, either run without tiling (raise
``tile_threshold``) on a crop showing the context, or use descriptive expressions ("red-roofed
buildings", "the river") whose meaning does not depend on the frame.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from rsrefseg.data.imageio import PIL_SUFFIXES, RasterImage, apply_stretch, percentile_limits, select_bands
from rsrefseg.errors import DataError
from rsrefseg.inference.defaults import DEFAULT_TILE_THRESHOLD
from rsrefseg.inference.geo import GeoReference
from rsrefseg.inference.predictor import ImageInput, Prediction, Predictor, as_raster_image, check_expressions
from rsrefseg.inference.scene_stream import EMPTY_TILE_LOGIT, SceneRun, iter_scene_regions
from rsrefseg.inference.tiling import TileBox, TileCache, tile_grid

__all__ = [
    "DEFAULT_TILE_THRESHOLD",
    "EMPTY_TILE_LOGIT",
    "ArraySource",
    "RasterioSource",
    "ScenePrediction",
    "SceneSource",
    "open_scene",
    "predict_scene",
    "preview_shape",
    "scene_tiling",
]

#: Valid pixels sampled for the percentile stretch (as in rsrefseg.data.imageio).
_PERCENTILE_SAMPLES = 2_000_000
#: GDAL block cache while reading windows of a scene (bytes).
_GDAL_CACHE_BYTES = 64 * 1024**2
#: Pixels read at once (whole rows, at least one) while streaming the stretch statistics.
_STAT_PIXELS = 1 << 22


class SceneSource:
    """A scene that can be read window by window: ``H x W`` size, georeferencing and tiles."""

    height: int
    width: int
    path: Path
    georef: GeoReference | None

    def read(self, box: TileBox) -> tuple[np.ndarray, np.ndarray]:
        """The window's ``h x w x 3`` uint8 RGB and ``h x w`` bool validity."""
        raise NotImplementedError

    def preview(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole scene downscaled so that its longest side is at most ``max_side`` pixels:
        (``h' x w' x 3`` uint8 RGB, ``h' x w'`` bool validity)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the underlying file (no-op for in-memory sources)."""

    def __enter__(self) -> SceneSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _gdal_reason(exc: BaseException) -> str:
    """GDAL's own message behind a rasterio error ("Read failed. See previous exception" wraps it)."""
    cause = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    return " ".join(str(cause).split()) or " ".join(str(exc).split()) or type(exc).__name__


def preview_shape(height: int, width: int, max_side: int) -> tuple[int, int]:
    """``(h', w')`` of the preview of an ``H x W`` scene whose longest side is at most ``max_side``."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class ArraySource(SceneSource):
    """A scene already in memory (a :class:`RasterImage`, e.g. a JPEG/PNG or an array)."""

    def __init__(self, image: RasterImage) -> None:
        self.image = image
        self.height, self.width = image.height, image.width
        self.path = Path(image.path)
        self.georef = None
        if image.transform is not None:
            self.georef = GeoReference(image.crs, image.transform, self.width, self.height)

    def read(self, box: TileBox) -> tuple[np.ndarray, np.ndarray]:
        return self.image.rgb[box.slices], self.image.valid[box.slices]

    def preview(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        h, w = preview_shape(self.height, self.width, max_side)
        # Nearest sampling of the pixel centres of the h x w preview grid.
        rows = ((np.arange(h) + 0.5) * self.height / h).astype(int)
        cols = ((np.arange(w) + 0.5) * self.width / w).astype(int)
        return self.image.rgb[rows][:, cols], self.image.valid[rows][:, cols]


class RasterioSource(SceneSource):
    """A raster file read window by window with ``rasterio`` (RGB conventions of ``read_image``).

    Raises:
        DataError: the file cannot be opened or read, or the band choice does not fit it.
    """

    def __init__(self, path: str | os.PathLike[str], bands: tuple[int, ...] | None = None,
                 stretch: tuple[float, float] = (2.0, 98.0)) -> None:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioError

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: image not found")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._ds = rasterio.open(self.path)
        except RasterioError as exc:
            raise DataError(f"{self.path}: cannot read image ({' '.join(str(exc).split())})") from None
        try:
            self.height, self.width = int(self._ds.height), int(self._ds.width)
            chosen = select_bands(int(self._ds.count), bands, self.path)
            self._unique = sorted(set(chosen))
            # Index into the read (unique) bands of each output channel R, G, B.
            self._channels = [self._unique.index(b) for b in chosen]
            dtype = np.result_type(*[self._ds.dtypes[b - 1] for b in self._unique])
            self._floating = bool(np.issubdtype(dtype, np.floating))
            self._needs_stretch = dtype != np.uint8
            crs, transform = self._ds.crs, self._ds.transform
            self.georef = None
            if crs is not None or not transform.is_identity:
                self.georef = GeoReference(crs, transform, self.width, self.height)
            self._limits = self._stretch_limits(stretch) if self._needs_stretch else []
        except BaseException:
            self._ds.close()
            raise

    def close(self) -> None:
        self._ds.close()

    def _read(self, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """``K x h x w`` bands and ``h x w`` validity of the chosen bands (kwargs: window/out_shape)."""
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.errors import RasterioError

        try:
            # GDAL keeps the decoded blocks it reads in a cache of 5 % of the machine's memory by
            # default; a scene larger than that would fill it: cap it while reading.
            with rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_BYTES):
                data = self._ds.read(self._unique, resampling=Resampling.nearest, **kwargs)
                masks = self._ds.read_masks(self._unique, resampling=Resampling.nearest, **kwargs)
        except RasterioError as exc:
            raise DataError(f"{self.path}: cannot read image ({_gdal_reason(exc)})") from None
        valid = (masks > 0).all(axis=0)
        if self._floating:
            valid &= np.isfinite(data).all(axis=0)
        return data, valid

    def _stretch_limits(self, stretch: tuple[float, float]) -> list[tuple[float, float] | None]:
        """Per read band (low, high) percentiles over the valid pixels, streamed in row blocks.

        Same sample as ``read_image``: every ``step``-th valid pixel in row-major order, with
        ``step = max(1, n_valid // 2e6)``; ``None`` marks a band with no valid pixel.
        """
        from rasterio.windows import Window

        rows = max(1, _STAT_PIXELS // self.width)
        blocks = [Window(0, r, self.width, min(rows, self.height - r)) for r in range(0, self.height, rows)]
        n_valid = sum(int(self._read(window=w)[1].sum()) for w in blocks)  # first pass: count
        step = max(1, n_valid // _PERCENTILE_SAMPLES)
        samples: list[list[np.ndarray]] = [[] for _ in self._unique]
        seen = 0
        for window in blocks:  # second pass: every step-th valid pixel (global row-major index)
            data, valid = self._read(window=window)
            count = int(valid.sum())
            first = (-seen) % step  # local index of the first sampled pixel in this block
            for k in range(len(self._unique)):
                samples[k].append(data[k][valid][first::step])
            seen += count
        return [percentile_limits(np.concatenate(parts) if parts else np.empty(0), stretch) for parts in samples]

    def _to_rgb(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """``K x h x w`` native bands -> ``h x w x 3`` uint8 with the scene-wide stretch."""
        if not self._needs_stretch:
            bands = list(data)
        else:
            bands = [apply_stretch(band, valid, limit) for band, limit in zip(data, self._limits, strict=True)]
        rgb = np.stack([bands[c] for c in self._channels], axis=-1)  # 3 x (h x w) -> h x w x 3
        rgb[~valid] = 0
        return rgb

    def read(self, box: TileBox) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.windows import Window

        data, valid = self._read(window=Window(box.x0, box.y0, box.width, box.height))
        return self._to_rgb(data, valid), valid

    def preview(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        h, w = preview_shape(self.height, self.width, max_side)
        data, valid = self._read(out_shape=(len(self._unique), h, w))
        return self._to_rgb(data, valid), valid


def open_scene(image: ImageInput, bands: tuple[int, ...] | None = None,
               stretch: tuple[float, float] = (2.0, 98.0)) -> SceneSource:
    """A :class:`SceneSource` for a path (windowed :class:`RasterioSource`; JPEG/PNG/BMP are read
    whole), a :class:`RasterImage` or an ``H x W x 3`` uint8 array. Use it as a context manager."""
    if isinstance(image, (str, os.PathLike)) and Path(image).suffix.lower() not in PIL_SUFFIXES:
        return RasterioSource(image, bands=bands, stretch=stretch)
    if isinstance(image, (str, os.PathLike)):
        from rsrefseg.data.imageio import read_image

        return ArraySource(read_image(image, bands=bands, stretch=stretch))
    return ArraySource(as_raster_image(image, bands, None))


@dataclass
class ScenePrediction:
    """Stitched results of a tiled scene.

    Attributes:
        predictions: One :class:`Prediction` per expression at the scene's ``H x W``
            (``predicted_iou`` is the mask-area-weighted mean of the tiles' predicted IoU).
        valid: ``H x W`` bool validity of the scene.
        tiles: Number of windows; ``skipped_tiles`` of them had no valid pixel.
        tile, overlap: Window side and overlap in pixels.
        encoded_tiles: Windows encoded by this call; ``cached_tiles``: windows whose features came
            from the :class:`TileCache` (neither read nor encoded). Empty windows count in neither.
    """

    predictions: list[Prediction]
    valid: np.ndarray
    tiles: int
    skipped_tiles: int
    tile: int
    overlap: int
    encoded_tiles: int = 0
    cached_tiles: int = 0


def predict_scene(
    predictor: Predictor,
    source: SceneSource,
    expressions: Sequence[str],
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 16,
    threshold: float = 0.0,
    heatmap: bool = False,
    progress: Callable[[Iterator[TileBox], int], Iterator[TileBox]] | None = None,
    cache: TileCache | None = None,
) -> ScenePrediction:
    """Segment ``expressions`` on a large scene tile by tile and stitch with max logits, in memory.

    The results hold ``H x W`` arrays per expression; for scenes too large for that, write the
    outputs window by window with :func:`rsrefseg.inference.scene_writer.write_scene_outputs`
    (same tile loop, same values).

    Args:
        predictor: The predictor (its own current image, if any, is left as it was).
        source: The scene (:func:`open_scene`).
        expressions: Referring expressions; see the module docstring about relative words.
        tile: Window side at native resolution (default: the model input ``S``).
        overlap: Overlap of neighbouring windows (default ``tile // 8``).
        batch_size: Expressions decoded together on a tile.
        threshold: Logit threshold of the masks.
        heatmap: Also stitch the global-activation heatmap (one more ``H x W`` buffer per expression).
        progress: Optional wrapper of the tile iterator, e.g. ``lambda it, n: tqdm(it, total=n)``.
        cache: Encoded windows of this scene from earlier calls, filled by this one (see
            :class:`TileCache`; one cache per scene and band choice).
    """
    texts = check_expressions(expressions)
    tile, overlap = scene_tiling(predictor, tile, overlap)
    tile_grid(source.height, source.width, tile, overlap)  # validates the tiling
    n = len(texts)
    run = SceneRun(tile, overlap)
    # n (+ n heat) x H x W full-scene values, and the H x W validity.
    values = np.empty((n * (2 if heatmap else 1), source.height, source.width), dtype=np.float32)
    valid = np.zeros((source.height, source.width), dtype=bool)
    for region in iter_scene_regions(predictor, source, texts, run, batch_size, threshold, heatmap, progress, cache):
        values[(slice(None), *region.box.slices)] = region.values
        valid[region.box.slices] = region.valid
    valid_t = torch.from_numpy(valid)
    predictions = []
    for k, text in enumerate(texts):
        heat = torch.from_numpy(values[n + k]) if heatmap else None
        predictions.append(
            Predictor.make_prediction(text, torch.from_numpy(values[k]), valid_t, threshold, run.predicted_iou(k), heat)
        )
    return ScenePrediction(predictions, valid, run.tiles, run.skipped_tiles, tile, overlap, run.encoded_tiles,
                           run.cached_tiles)


def scene_tiling(predictor: Predictor, tile: int | None, overlap: int | None) -> tuple[int, int]:
    """``(tile, overlap)`` with the defaults: the model input ``S`` and ``tile // 8``."""
    tile = int(tile or predictor.size)
    return tile, int(tile // 8 if overlap is None else overlap)
