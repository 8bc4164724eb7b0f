"""The work of ``rsrefseg predict`` on one image: every expression's files, written as soon as decoded.

:func:`process_image` keeps memory independent of the number of expressions:

- images up to ``tile_threshold`` pixels are read whole and encoded once; the expressions are
  decoded batch by batch and each prediction is written and dropped before the next batch;
- larger images are streamed window by window (:func:`~rsrefseg.inference.scene_writer.write_scene_outputs`):
  memory is bounded by the tile and a fixed budget, not by the scene;
- with ``PredictOptions.features`` the inputs are feature folders (``rsrefseg encode``): streamed
  the same way, every window from the folder (:mod:`rsrefseg.inference.predict_features`), the
  image neither read nor encoded.

Before any work on an image: ``--max-pixels`` and the free disk space are checked
(:mod:`rsrefseg.inference.limits`) and the temporary files a killed earlier run left in its folder
are removed (:func:`~rsrefseg.inference.manifest.remove_temporaries`; a folder belongs to one
process). Per georeferenced image, the polygons of every expression also go into one vector file
``<image-dir>/<image-dir>.<ext>`` (GeoPackage, FlatGeobuf, Shapefile or GeoJSON, layer ``rsrefseg``,
the fields of :mod:`rsrefseg.inference.vectors`), the same polygons as the per-expression GeoJSON
files; it is streamed expression by expression (:class:`ImageVectors`), so memory holds one
expression's polygons at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsrefseg.inference.defaults import DEFAULT_TILE_THRESHOLD

__all__ = ["OUTPUT_KEYS", "ImageVectors", "PredictOptions", "process_image"]

#: Keys of an output record that name a file (relative to the output root in summary.json).
OUTPUT_KEYS = ("mask_png", "overlay_png", "heatmap_png", "mask_tif", "geojson")


@dataclass
class PredictOptions:
    """Per-image settings of ``rsrefseg predict`` (the command-line flags of the same names)."""

    bands: tuple[int, ...] | None = None  # 1-based source bands for R, G, B (or one band)
    tile_threshold: int = DEFAULT_TILE_THRESHOLD  # images with more pixels are tiled and streamed
    tile: int | None = None  # window side (default: the model input size)
    overlap: int | None = None  # window overlap (default: tile // 8)
    batch_size: int = 16  # expressions decoded together
    threshold: float = 0.0  # mask logit threshold
    heatmaps: bool = False  # also write heatmap PNGs
    probability: bool = False  # probability band in the mask GeoTIFFs
    simplify: float = 0.0  # polygon simplification tolerance, CRS units
    min_area: float = 0.0  # smallest polygon kept, CRS units squared
    overlay_max_side: int = 2048  # longest side of overlay/heatmap PNGs
    max_pixels: int | None = None  # refuse larger images (None: no limit)
    vector_format: str = "geojson"  # format of the per-image vector file: geojson, gpkg, fgb, shp
    progress: str = "bar"  # progress style of the window loop: bar, json or none
    features: bool = False  # inputs are feature folders (rsrefseg encode): decoded, never read or encoded
    checkpoint: str | None = None  # with features: require folders made from this checkpoint's files (SHA-256)


class ImageVectors:
    """The vector file of one image, written expression by expression (atomic on :meth:`commit`).

    Polygons arrive already cleaned (``--simplify``/``--min-area`` applied, as in the per-expression
    GeoJSON), so they are written as they are, with the measures of
    :func:`rsrefseg.inference.vectors.write_vectors` (``area_m2``, ``perimeter_m``; null where the
    CRS cannot give them).
    """

    def __init__(self, path: Path, fmt: str, crs: Any, source: str) -> None:
        from rsrefseg.inference.vector_io import FIELDS, LayerWriter

        self.path, self.crs, self.source = path, crs, source
        self._writer = LayerWriter(path, fmt, crs, dict(FIELDS), "Polygon")

    def add(self, polygons: list[Any], expr_index: int, expression: str, score: float) -> None:
        """Append one expression's polygons."""
        import math

        from rasterio.errors import CRSError

        from rsrefseg.inference.geo import area_m2
        from rsrefseg.inference.vectors import perimeter_m

        def measure(function: Callable[[Any, Any], float | None], geom: Any) -> float | None:
            try:
                return function(geom, self.crs)
            except CRSError:  # coordinates outside the CRS's domain
                return None

        n = len(polygons)
        self._writer.write(polygons, {
            "expr_index": [expr_index] * n, "expression": [expression] * n,
            "score": [score if math.isfinite(score) else None] * n, "source": [self.source] * n,
            "area_m2": [measure(area_m2, g) for g in polygons], "perimeter_m": [measure(perimeter_m, g) for g in polygons],
        })

    def commit(self) -> list[Path]:
        """Move the finished file into place; returns its files (a Shapefile has several)."""
        from rsrefseg.inference.vectors import vector_files

        self._writer.commit()
        return vector_files(self.path)

    def abort(self) -> None:
        """Drop the unfinished file."""
        self._writer.abort()


def process_image(predictor: Any, path: Path, folder: Path, expressions: list[str], names: list[str],
                  options: PredictOptions, summary: Any, record: dict[str, Any]) -> list[Path]:
    """Predict every expression on one image and write its files (see the module docstring).

    Args:
        predictor: The :class:`~rsrefseg.inference.predictor.Predictor`.
        path: The image.
        folder: Its output folder (``OUT/<image-dir>``).
        expressions, names: Checked expressions and their ``<nn>_<slug>`` file stems.
        options: The settings.
        summary: The :class:`~rsrefseg.inference.predict_batch.SummaryFile`; ``record`` (the image's
            summary entry, filled here) is listed in it from the first output on.
        record: The image's summary entry (``input_index``, ``source``, ... are added here).

    Returns:
        Every file written for the image.
    """
    from rsrefseg.data.imageio import image_size
    from rsrefseg.inference.geo import read_georeference
    from rsrefseg.inference.limits import check_free_space, check_max_pixels, scene_output_bytes
    from rsrefseg.inference.manifest import remove_temporaries
    from rsrefseg.inference.tiling import should_tile
    from rsrefseg.inference.vectors import vector_path

    start = time.perf_counter()
    features, source = None, path
    if options.features:  # a feature folder: its scene is decoded window by window, never read
        from rsrefseg.inference.predict_features import open_for_predict

        features = open_for_predict(predictor, path, options)
        height, width, georef, tiled = features.source.height, features.source.width, features.source.georef, True
        source = features.source.path  # the scene the folder was encoded from
        record["features"] = str(path)
    else:
        height, width = image_size(path)
        check_max_pixels(path, height, width, options.max_pixels)
        georef = read_georeference(path)
        tiled = should_tile(height, width, options.tile_threshold)
    remove_temporaries(folder)
    needed = scene_output_bytes(height, width, len(expressions), options.probability)
    check_free_space(folder, needed, path)
    record.update(source=str(source), dir=folder.name, height=height, width=width, georeferenced=georef is not None,
                  tiled=tiled, crs=None if georef is None or georef.crs is None else georef.crs.to_string())
    summary.begin_image(record)
    files: list[Path] = []
    vectors = None
    if georef is not None:
        vectors = ImageVectors(vector_path(folder, folder.name, options.vector_format), options.vector_format,
                               georef.crs, str(source))

    def polygons(index: int, expression: str, score: float, batch: list[Any]) -> None:
        if vectors is not None:  # expression `index` (0-based): a batch of its polygons
            vectors.add(batch, index + 1, expression, score)

    def written(output: dict[str, Any]) -> None:
        for key in OUTPUT_KEYS:
            if key in output:
                files.append(folder / output[key])
                output[key] = f"{folder.name}/{output[key]}"  # relative to the output root
        summary.output_written(output)

    try:
        if tiled:
            run = _stream_scene(predictor, path, folder, expressions, names, options, written, polygons, features)
            record.update(tile=run.tile, overlap=run.overlap, tiles=run.tiles, skipped_tiles=run.skipped_tiles)
        else:
            _decode_whole_image(predictor, path, folder, georef, expressions, names, options, written, polygons)
        if vectors is not None:
            files += vectors.commit()
            record.update(vector=f"{folder.name}/{vectors.path.name}", vector_format=options.vector_format)
    except BaseException:
        if vectors is not None:
            vectors.abort()
        remove_temporaries(folder)  # whatever an interrupt left half-made (this process owns the folder)
        raise
    summary.end_image(seconds=round(time.perf_counter() - start, 3))
    return files


def _stream_scene(predictor: Any, path: Path, folder: Path, expressions: list[str], names: list[str],
                  options: PredictOptions, written: Callable[[dict[str, Any]], None],
                  polygons: Callable[[int, str, float, list[Any]], None], features: Any = None) -> Any:
    """Tiled image: window by window (:func:`write_scene_outputs`); returns its ``SceneRun``.

    ``features``: an opened feature folder (:class:`~rsrefseg.inference.features.FeatureScene`):
    its source and window cache replace the image, with its tiling."""
    from rsrefseg.cli.progress import progress
    from rsrefseg.inference.scene import open_scene
    from rsrefseg.inference.scene_writer import SceneOutputOptions, write_scene_outputs

    scene_options = SceneOutputOptions(
        threshold=options.threshold, heatmap=options.heatmaps, probability=options.probability,
        simplify=options.simplify, min_area=options.min_area, overlay_max_side=options.overlay_max_side,
        batch_size=options.batch_size)
    tile, overlap, cache = options.tile, options.overlap, None
    if features is not None:
        tile, overlap, cache = features.tile, features.overlap, features.cache
    with features.source if features is not None else open_scene(path, bands=options.bands) as source:
        _, run = write_scene_outputs(
            predictor, source, expressions, names, folder, scene_options, tile, overlap,
            progress=lambda it, n: progress(it, options.progress, total=n, desc="tiles", leave=False),
            cache=cache, on_record=lambda _k, output: written(output), on_polygons=polygons)
    return run


def _decode_whole_image(predictor: Any, path: Path, folder: Path, georef: Any, expressions: list[str],
                        names: list[str], options: PredictOptions, written: Callable[[dict[str, Any]], None],
                        polygons: Callable[[int, str, float, list[Any]], None]) -> None:
    """Untiled image: encode once, decode batch by batch, write each prediction as soon as it exists."""
    import numpy as np
    import torch

    from rsrefseg.inference.outputs import remove_prediction_files, write_prediction_outputs
    from rsrefseg.inference.predictor import check_expressions
    from rsrefseg.inference.scene import ArraySource

    predictor.set_image(path, bands=options.bands)
    try:
        image = predictor.image
        preview = image.rgb
        if max(image.height, image.width) > options.overlay_max_side:
            preview, _ = ArraySource(image).preview(options.overlay_max_side)
        texts = check_expressions(expressions)
        valid = torch.from_numpy(np.ascontiguousarray(image.valid))  # H x W bool
        batches = predictor.encode_expressions(texts, options.batch_size)
        for batch in predictor.iter_logits(batches, heatmap=options.heatmaps):
            for j in range(batch.logits.shape[0]):
                k = batch.start + j
                heat = None if batch.heat_logits is None else batch.heat_logits[j]
                prediction = predictor.make_prediction(texts[k], batch.logits[j], valid, options.threshold,
                                                       float(batch.iou[j]), heat)
                found: list[Any] = []
                try:
                    output = write_prediction_outputs(
                        folder, names[k], prediction, preview, str(path), georef, simplify=options.simplify,
                        min_area=options.min_area, probability=options.probability, valid=image.valid,
                        collect=found)
                except BaseException:  # interrupted half-way: no file the summary does not list
                    remove_prediction_files(folder, names[k])
                    raise
                polygons(k, texts[k], prediction.score, found)
                written({"index": k + 1, "name": names[k], **output})
                del prediction
            del batch
    finally:
        predictor.reset_image()
