"""The work of ``rsrefseg predict`` on one image, and ``summary.json`` kept in step with the disk.

:func:`process_image` writes the files of every expression on one image **as soon as each is
decoded**, so memory does not grow with the number of expressions:

- images up to ``tile_threshold`` pixels are read whole and encoded once; the expressions are
  decoded batch by batch and each prediction is written and dropped before the next batch;
- larger images are streamed window by window (:func:`~rsrefseg.inference.scene_writer.write_scene_outputs`).

Before any work on an image: ``--max-pixels`` and the free disk space are checked
(:mod:`rsrefseg.inference.limits`) and temporary files left in its folder by a killed earlier run
are removed (:func:`remove_stale_temp_files`).

:class:`SummaryFile` rewrites ``summary.json`` (atomically) whenever an image ends, after an
expression's files were written (at most every ``interval`` seconds, so a run of thousands of
outputs does not rewrite a large summary thousands of times), and on an interrupt: what it lists is
what is on disk (an image being written is listed with ``"complete": false``). After a SIGKILL it
may lag by up to ``interval`` seconds of outputs; ``--resume`` then redoes incomplete images.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsrefseg.errors import DataError
from rsrefseg.inference.defaults import DEFAULT_TILE_THRESHOLD

__all__ = ["PredictOptions", "SummaryFile", "prepare_output_folder", "process_image", "remove_stale_temp_files"]

#: Temporary files of ``rsrefseg.utils.atomic_path``: ``.<target name>.<8 random chars>.tmp``.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


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
    probability: bool = False  # probability band in the mask GeoTIFFs of tiled scenes
    simplify: float = 0.0  # polygon simplification tolerance, CRS units
    min_area: float = 0.0  # smallest polygon kept, CRS units squared
    overlay_max_side: int = 2048  # longest side of overlay/heatmap PNGs
    max_pixels: int | None = None  # refuse larger images (None: no limit)
    progress: str = "bar"  # progress style of the window loop: bar, json or none


def prepare_output_folder(out: str | os.PathLike[str]) -> Path:
    """Create ``out`` and check that files can be created in it (before the model is loaded).

    Raises:
        DataError: ``out`` is an existing file, cannot be created, or is not writable.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: --out exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    try:  # a real write: os.access is wrong for root, read-only mounts and some network file systems
        fd, probe = tempfile.mkstemp(prefix=".rsrefseg-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DataError(f"{folder}: the output folder is not writable ({exc.strerror or exc})") from None
    return folder


def remove_stale_temp_files(folder: str | os.PathLike[str], targets: Callable[[str], bool] | None = None) -> list[Path]:
    """Remove the temporary files of our own naming (``.<name>.<random>.tmp``) in ``folder``, left
    by a process killed while writing; ``targets(name)`` limits it to some target file names (e.g.
    those of this process when several share the folder). Returns the removed paths."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match and entry.is_file(follow_symlinks=False) and (targets is None or targets(match["target"])):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:
                pass
    return removed


class SummaryFile:
    """``summary.json`` of a run, rewritten so that it lists what is on disk (module docstring)."""

    def __init__(self, path: str | os.PathLike[str], summary: dict[str, Any], interval: float = 2.0) -> None:
        self.path, self.summary, self.interval = Path(path), summary, interval
        self._last = 0.0
        self._current: dict[str, Any] | None = None

    def write(self) -> None:
        """Write it now (outputs counted, peak memory updated)."""
        from rsrefseg.inference.outputs import peak_rss_mb, write_summary

        images = self.summary["images"]
        self.summary["outputs"] = sum(len(r["outputs"]) for r in images)
        self.summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
        write_summary(self.path, self.summary)
        self._last = time.monotonic()

    def begin_image(self, record: dict[str, Any]) -> None:
        """An image starts: listed (incomplete) from its first output on."""
        record.update(complete=False, outputs=[])
        self._current = record
        self.summary["images"].append(record)

    def output_written(self, output: dict[str, Any]) -> None:
        """One expression's files exist: list them (rewrite at most every ``interval`` seconds)."""
        assert self._current is not None
        self._current["outputs"].append(output)
        if time.monotonic() - self._last >= self.interval:
            self.write()

    def end_image(self, **fields: Any) -> None:
        """The current image is complete."""
        assert self._current is not None
        self._current.update(fields, complete=True)
        self._current = None
        self.write()

    def fail_image(self, failure: dict[str, Any]) -> None:
        """The current image failed: its record moves to ``failures`` with the outputs it has."""
        if self._current is not None:
            self.summary["images"].remove(self._current)
            if self._current["outputs"]:
                failure["outputs"] = self._current["outputs"]
            self._current = None
        self.summary["failures"].append(failure)
        self.write()

    def interrupted(self) -> None:
        """Called on an interrupt: record it and write what is on disk."""
        self.summary["interrupted"] = True
        self.write()


def process_image(predictor: Any, path: Path, folder: Path, expressions: list[str], names: list[str],
                  options: PredictOptions, summary: SummaryFile, input_index: int) -> None:
    """Predict every expression on one image and write its files (see the module docstring)."""
    from rsrefseg.cli.progress import progress
    from rsrefseg.data.imageio import image_size
    from rsrefseg.inference.geo import read_georeference
    from rsrefseg.inference.limits import check_free_space, check_max_pixels, scene_output_bytes
    from rsrefseg.inference.tiling import should_tile

    start = time.perf_counter()
    height, width = image_size(path)
    check_max_pixels(path, height, width, options.max_pixels)
    georef = read_georeference(path)
    tiled = should_tile(height, width, options.tile_threshold)
    remove_stale_temp_files(folder)
    needed = scene_output_bytes(height, width, len(expressions), options.probability and tiled)
    check_free_space(folder, needed, folder / f"{names[0]}.mask.tif")
    record: dict[str, Any] = {"input_index": input_index, "source": str(path), "dir": folder.name, "height": height,
                              "width": width, "georeferenced": georef is not None, "tiled": tiled,
                              "crs": None if georef is None or georef.crs is None else georef.crs.to_string()}
    summary.begin_image(record)

    def written(output: dict[str, Any]) -> None:
        for key in ("mask_png", "overlay_png", "heatmap_png", "mask_tif", "geojson"):
            if key in output:
                output[key] = f"{folder.name}/{output[key]}"  # relative to the output root
        summary.output_written(output)

    if tiled:
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
                on_record=lambda _k, output: written(output))
        summary.end_image(tile=run.tile, overlap=run.overlap, tiles=run.tiles, skipped_tiles=run.skipped_tiles,
                          seconds=round(time.perf_counter() - start, 3))
        return
    _decode_whole_image(predictor, path, folder, georef, expressions, names, options, written)
    summary.end_image(seconds=round(time.perf_counter() - start, 3))


def _decode_whole_image(predictor: Any, path: Path, folder: Path, georef: Any, expressions: list[str],
                        names: list[str], options: PredictOptions, written: Callable[[dict[str, Any]], None]) -> None:
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
                output = write_prediction_outputs(folder, names[k], prediction, preview, str(path), georef,
                                                  simplify=options.simplify, min_area=options.min_area)
                written({"index": k + 1, "name": names[k], **output})
                del prediction
            del batch
    finally:
        predictor.reset_image()
