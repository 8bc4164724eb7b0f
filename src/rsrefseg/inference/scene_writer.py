"""Outputs of a tiled scene written window by window: memory bounded by the tile, not by the scene.

:func:`write_scene_outputs` runs the tile loop of :mod:`rsrefseg.inference.scene_stream` and
sends every final region straight to per-expression sinks:

- ``<name>.mask.tif``: uint8 0/255 Cloud Optimized GeoTIFF
  (:class:`~rsrefseg.inference.cog.COGMaskWriter`: tiled, DEFLATE, overviews, BigTIFF when needed;
  regions without any mask pixel are not written at all), band 2 ``probability`` =
  ``round(255 * sigmoid(logit))`` (0 on nodata) with ``probability=True``; it replaces the target
  only once complete. Plain (non-georeferenced) scenes get a plain TIFF: it is THE mask output of
  a large scene.
- ``<name>.geojson`` (georeferenced scenes): polygons merged across region seams
  (:class:`~rsrefseg.inference.raster_polygons.SeamPolygonizer`), equal to a polygonize of the
  whole mask; ``simplify`` / ``min_area`` in CRS units / CRS units squared.
- ``<name>.overlay.png`` / ``<name>.heatmap.png``: drawn on a downscaled preview
  (:class:`~rsrefseg.inference.preview.PreviewPool`, longest side ``overlay_max_side``).
- ``<name>.mask.png`` only for scenes up to :data:`~rsrefseg.inference.defaults.MASK_PNG_MAX_PIXELS`
  pixels (read back from the GeoTIFF); larger scenes have only the GeoTIFF.

Scores are exact (sums over the final pixels), equal to the in-memory
:func:`~rsrefseg.inference.scene.predict_scene`. Expressions beyond the memory budget go in
further passes over the scene (:func:`~rsrefseg.inference.limits.expressions_per_pass`); encoded
windows are then reused through a :class:`~rsrefseg.inference.tiling.TileCache` as far as it holds.
Each expression's files are written as soon as its pass ends (``on_record`` is called), and a
failure or an interrupt removes every temporary file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from affine import Affine

from rsrefseg.inference.cog import COGMaskWriter, probability_uint8
from rsrefseg.inference.defaults import MASK_PNG_MAX_PIXELS, STREAM_MEMORY_BUDGET
from rsrefseg.inference.geo import GeoReference
from rsrefseg.inference.limits import expressions_per_pass
from rsrefseg.inference.outputs import (
    remove_prediction_files,
    write_heatmap_png,
    write_mask_png,
    write_overlay_png,
)
from rsrefseg.inference.polygon_stream import StreamedPolygons
from rsrefseg.inference.predictor import Predictor, check_expressions
from rsrefseg.inference.preview import PreviewPool
from rsrefseg.inference.scene import SceneSource, preview_shape, scene_tiling
from rsrefseg.inference.scene_stream import SceneRun, iter_scene_regions
from rsrefseg.inference.tiling import TileBox, TileCache, tile_grid

__all__ = ["SceneOutputOptions", "write_scene_outputs"]

@dataclass
class SceneOutputOptions:
    """What :func:`write_scene_outputs` writes and how."""

    threshold: float = 0.0  # mask logit threshold (0 = probability 0.5)
    heatmap: bool = False  # also write <name>.heatmap.png (stitched global activation, on the preview)
    probability: bool = False  # second GeoTIFF band: round(255 * sigmoid(logit))
    simplify: float = 0.0  # polygon simplification tolerance, CRS units
    min_area: float = 0.0  # polygons smaller than this (CRS units squared) are dropped
    overlay_max_side: int = 2048  # longest side of the overlay/heatmap previews
    batch_size: int = 16  # expressions decoded together on a window
    memory_budget: int = STREAM_MEMORY_BUDGET  # bytes for frontier + previews of one pass


class _TaggedCOG(COGMaskWriter):
    """A :class:`COGMaskWriter` whose metadata can still change before :meth:`close` (the score of a
    streamed mask is known only once its last window was written)."""

    def update_tags(self, **tags: str) -> None:
        """Set GDAL metadata of the file being written."""
        with self._gdal():
            self._dst.update_tags(**tags)


class _ExpressionSink:
    """The files of one expression on a streamed scene, filled region by region."""

    def __init__(self, folder: Path, name: str, expression: str, source: str, height: int, width: int,
                 georef: GeoReference | None, options: SceneOutputOptions, preview_shape: tuple[int, int]) -> None:
        self.folder, self.name, self.expression, self.source = folder, name, expression, source
        self.height, self.width, self.georef, self.options = height, width, georef, options
        self.target = folder / f"{name}.mask.tif"
        self.pixels, self.probability_sum = 0, 0.0
        self.pool = PreviewPool(height, width, *preview_shape, heat=options.heatmap)
        self.cog = _TaggedCOG(self.target, height, width, None if georef is None else georef.crs,
                              Affine.identity() if georef is None else georef.transform,
                              probability=options.probability, tags={"expression": expression, "source": source})
        self.polygons = None
        if georef is not None:
            try:
                self.polygons = StreamedPolygons(folder, name, height, width, georef, options.simplify,
                                                 options.min_area)
            except BaseException:
                self.cog.abort()
                raise

    def add(self, box: TileBox, logits: np.ndarray, heat: np.ndarray | None, valid: np.ndarray) -> None:
        """One final region: ``h x w`` logits, optional heat logits, validity."""
        logits_t = torch.from_numpy(np.ascontiguousarray(logits))  # h x w float32
        mask = (logits_t > self.options.threshold).numpy() & valid
        count = int(mask.sum())
        probability = None
        if self.options.probability:
            probability = probability_uint8(logits)
            probability[~valid] = 0
        if count or (probability is not None and probability.any()):  # empty regions stay unwritten (read as 0)
            self.cog.write(box.y0, box.x0, mask, probability)
        if count:
            inside = torch.sigmoid(logits_t[torch.from_numpy(mask)])  # count float32 values
            self.probability_sum += float(inside.sum(dtype=torch.float64))
            self.pixels += count
        if self.polygons is not None:
            self.polygons.add(box, mask)
        heat_probability = None if heat is None else torch.sigmoid(torch.from_numpy(np.ascontiguousarray(heat))).numpy()
        self.pool.add(box, mask, heat_probability)

    @property
    def score(self) -> float:
        """Mean probability over the mask pixels (0.0 for an empty mask), as ``Prediction.score``."""
        return self.probability_sum / self.pixels if self.pixels else 0.0

    def finish(self, preview: np.ndarray, predicted_iou: float,
               on_polygons: Callable[[list[Any]], None] | None = None) -> dict[str, Any]:
        """Close and publish the GeoTIFF, then write the PNG and GeoJSON files; return the record.
        ``on_polygons`` gets the polygons (CRS units, options applied) batch by batch."""
        score, base = self.score, self.folder / self.name
        self.cog.update_tags(score=f"{score:.6f}")
        self.cog.close()  # overviews, COG layout, moved onto the target
        record: dict[str, Any] = {"expression": self.expression, "score": score, "predicted_iou": predicted_iou,
                                  "mask_pixels": self.pixels}
        if self.height * self.width <= MASK_PNG_MAX_PIXELS:
            with rasterio.open(self.target) as ds:
                write_mask_png(f"{base}.mask.png", ds.read(1) > 0)
            record["mask_png"] = f"{self.name}.mask.png"
        title = f'{self.name.split("_", 1)[0]}. "{self.expression}"  score {score:.2f}'
        write_overlay_png(f"{base}.overlay.png", preview, self.pool.mask, title)
        record["overlay_png"] = f"{self.name}.overlay.png"
        if self.options.heatmap:
            write_heatmap_png(f"{base}.heatmap.png", preview, self.pool.heat())
            record["heatmap_png"] = f"{self.name}.heatmap.png"
        record["mask_tif"] = self.target.name
        if self.polygons is not None:
            count, area = self.polygons.write(Path(f"{base}.geojson"), self.expression, score, self.source,
                                              on_polygons)
            record.update(geojson=f"{self.name}.geojson", polygons=count, area_m2=area)
        return record

    def abort(self) -> None:
        """Remove the temporary files (after a failure or an interrupt)."""
        self.cog.abort()
        if self.polygons is not None:
            self.polygons.abort()


def _flush_polygons(sinks: list[_ExpressionSink], frontier: tuple[int, int]) -> None:
    """Everything before the stitcher's frontier was delivered: polygons there are final."""
    for sink in sinks:
        if sink.polygons is not None:
            sink.polygons.flush(*frontier)


def _chunks(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def write_scene_outputs(
    predictor: Predictor,
    source: SceneSource,
    expressions: Sequence[str],
    names: Sequence[str],
    folder: str | Path,
    options: SceneOutputOptions | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    progress: Callable[[Iterator[TileBox], int], Iterator[TileBox]] | None = None,
    cache: TileCache | None = None,
    on_record: Callable[[int, dict[str, Any]], None] | None = None,
    on_polygons: Callable[[int, str, float, list[Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], SceneRun]:
    """Segment ``expressions`` on a tiled scene and write their files into ``folder`` window by window.

    Args:
        predictor: The predictor.
        source: The scene (:func:`~rsrefseg.inference.scene.open_scene`; a feature folder's source
            with its ``cache`` works too).
        expressions, names: Referring expressions and their ``<nn>_<slug>`` file stems.
        folder: Output folder of the scene (created).
        options: See :class:`SceneOutputOptions`.
        tile, overlap: Tiling (default: model input ``S`` and ``tile // 8``).
        progress: Optional wrapper of each pass's window iterator.
        cache: Encoded windows of this scene (reused across passes and calls).
        on_record: Called with ``(expression index, record)`` as soon as an expression's files exist.
        on_polygons: Called with ``(expression index, expression, score, polygons)`` for every
            batch of an expression's polygons (CRS units, options applied) while its GeoJSON is
            written (georeferenced scenes only), e.g. to fill a vector file of every expression.

    Returns:
        One record per expression (file names relative to ``folder``, score, pixels, polygons) and
        the counters of the last pass.
    """
    options = options or SceneOutputOptions()
    texts = check_expressions(expressions)
    if len(names) != len(texts):
        raise ValueError(f"{len(names)} names for {len(texts)} expressions")
    tile, overlap = scene_tiling(predictor, tile, overlap)
    tile_grid(source.height, source.width, tile, overlap)  # validates the tiling
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    preview, _ = source.preview(options.overlay_max_side)
    shape = preview_shape(source.height, source.width, options.overlay_max_side)
    group = expressions_per_pass(source.height, source.width, tile, overlap, options.heatmap,
                                 shape[0] * shape[1], options.memory_budget)
    if cache is None and group < len(texts):
        cache = TileCache(options.memory_budget // 2)  # encoded windows shared by the passes, as far as they fit
    source_name = str(source.path)
    records: list[dict[str, Any]] = []
    run = SceneRun(tile, overlap)
    for start, chunk in _chunks(texts, group):
        run = SceneRun(tile, overlap)
        sinks: list[_ExpressionSink] = []
        try:
            for k, text in enumerate(chunk):
                sinks.append(_ExpressionSink(out, names[start + k], text, source_name, source.height,
                                             source.width, source.georef, options, shape))
            n = len(chunk)
            for region in iter_scene_regions(predictor, source, chunk, run, options.batch_size, options.threshold,
                                             options.heatmap, progress, cache,
                                             on_window=functools.partial(_flush_polygons, sinks)):
                for k, sink in enumerate(sinks):
                    heat = region.values[n + k] if options.heatmap else None
                    sink.add(region.box, region.values[k], heat, region.valid)
            for k, sink in enumerate(sinks):
                index = start + k
                batch = None if on_polygons is None else functools.partial(on_polygons, index, chunk[k], sink.score)
                try:
                    record = sink.finish(preview, run.predicted_iou(k), batch)
                except BaseException:  # interrupted half-way: no file the caller does not know of
                    remove_prediction_files(out, names[index])
                    raise
                records.append({"index": index + 1, "name": names[index], **record})
                if on_record is not None:
                    on_record(index, records[-1])
        except BaseException:
            for sink in sinks:
                sink.abort()
            raise
    return records, run
