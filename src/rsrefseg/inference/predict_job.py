"""The work of ``rsrefseg predict`` on one image: every expression's files, written as soon as decoded.

:func:`process_image` keeps memory independent of the number of expressions:

- images up to ``tile_threshold`` pixels are read whole and encoded once; the expressions are
  decoded batch by batch and each prediction is written and dropped before the next batch;
- larger images are streamed window by window (:func:`~rsrefseg.inference.scene_writer.write_scene_outputs`):
  memory is bounded by the tile and a fixed budget, not by the scene.

Before any work on an image: ``--max-pixels`` and the free disk space are checked
(:mod:`rsrefseg.inference.limits`) and the temporary files a killed earlier run left in its folder
are removed (:func:`~rsrefseg.inference.manifest.remove_temporaries`; a folder belongs to one
process). Per georeferenced image, the polygons of every expression also go into one vector file
``<image-dir>/<image-dir>.<ext>`` (:func:`~rsrefseg.inference.vectors.write_vectors`: GeoPackage,
FlatGeobuf, Shapefile or GeoJSON, layer ``rsrefseg``), the same polygons as the per-expression
GeoJSON files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsrefseg.inference.defaults import DEFAULT_TILE_THRESHOLD

__all__ = ["OUTPUT_KEYS", "PredictOptions", "process_image"]

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
    from rsrefseg.inference.vectors import features_from_polygons, vector_files, vector_path, write_vectors

    start = time.perf_counter()
    height, width = image_size(path)
    check_max_pixels(path, height, width, options.max_pixels)
    georef = read_georeference(path)
    tiled = should_tile(height, width, options.tile_threshold)
    remove_temporaries(folder)
    needed = scene_output_bytes(height, width, len(expressions), options.probability)
    check_free_space(folder, needed, path)
    record.update(source=str(path), dir=folder.name, height=height, width=width, georeferenced=georef is not None,
                  tiled=tiled, crs=None if georef is None or georef.crs is None else georef.crs.to_string())
    summary.begin_image(record)
    features: list[Any] = []
    files: list[Path] = []

    def written(output: dict[str, Any], polygons: list[Any]) -> None:
        for key in OUTPUT_KEYS:
            if key in output:
                files.append(folder / output[key])
                output[key] = f"{folder.name}/{output[key]}"  # relative to the output root
        features.extend(features_from_polygons(polygons, output["index"], output["expression"], output["score"],
                                               str(path)))
        summary.output_written(output)

    if tiled:
        run = _stream_scene(predictor, path, folder, expressions, names, options, written)
        record.update(tile=run.tile, overlap=run.overlap, tiles=run.tiles, skipped_tiles=run.skipped_tiles)
    else:
        _decode_whole_image(predictor, path, folder, georef, expressions, names, options, written)
    if georef is not None:
        target = vector_path(folder, folder.name, options.vector_format)
        write_vectors(target, features, georef.crs, options.vector_format)
        files += vector_files(target)
        record.update(vector=f"{folder.name}/{target.name}", vector_format=options.vector_format)
    summary.end_image(seconds=round(time.perf_counter() - start, 3))
    return files


def _stream_scene(predictor: Any, path: Path, folder: Path, expressions: list[str], names: list[str],
                  options: PredictOptions, written: Callable[[dict[str, Any], list[Any]], None]) -> Any:
    """Tiled image: window by window (:func:`write_scene_outputs`); returns its ``SceneRun``."""
    from rsrefseg.cli.progress import progress
    from rsrefseg.inference.scene import open_scene
    from rsrefseg.inference.scene_writer import SceneOutputOptions, write_scene_outputs

    scene_options = SceneOutputOptions(
        threshold=options.threshold, heatmap=options.heatmaps, probability=options.probability,
        simplify=options.simplify, min_area=options.min_area, overlay_max_side=options.overlay_max_side,
        batch_size=options.batch_size)
    with open_scene(path, bands=options.bands) as source:
        _, run = write_scene_outputs(
            predictor, source, expressions, names, folder, scene_options, options.tile, options.overlap,
            progress=lambda it, n: progress(it, options.progress, total=n, desc="tiles", leave=False),
            on_record=lambda _k, output, polygons: written(output, polygons))
    return run


def _decode_whole_image(predictor: Any, path: Path, folder: Path, georef: Any, expressions: list[str],
                        names: list[str], options: PredictOptions,
                        written: Callable[[dict[str, Any], list[Any]], None]) -> None:
    """Untiled image: encode once, decode batch by batch, write each prediction as soon as it exists."""
    import numpy as np
    import torch

    from rsrefseg.inference.outputs import write_prediction_outputs
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
                polygons: list[Any] = []
                output = write_prediction_outputs(
                    folder, names[k], prediction, preview, str(path), georef, simplify=options.simplify,
                    min_area=options.min_area, probability=options.probability, valid=image.valid,
                    collect=polygons)
                written({"index": k + 1, "name": names[k], **output}, polygons)
                del prediction
            del batch
    finally:
        predictor.reset_image()
