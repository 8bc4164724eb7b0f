"""``rsrefseg predict --features``: decode from feature folders instead of reading and encoding images.

A feature folder written by ``rsrefseg encode`` (:mod:`rsrefseg.inference.features`) plugs into the
streaming writer of ``rsrefseg predict`` as a :class:`~rsrefseg.inference.scene.SceneSource`
(size, georeference, preview; no pixels) plus a :class:`~rsrefseg.inference.tiling.TileCache`
holding every window, so the outputs (mask GeoTIFFs, PNGs, GeoJSON, vector file, summary,
manifest) come from the same code as for a tiled image
(:func:`~rsrefseg.inference.predict_job.process_image`): with ``float32`` features they are those
of ``rsrefseg predict SCENE --tile-threshold 1`` with the folder's tiling.

- :func:`feature_inputs`: ``--features DIR`` values -> one
  :class:`~rsrefseg.inference.jobs.SceneInput` per feature folder (``DIR`` itself, or its
  sub-folders as ``rsrefseg encode SCENE... --out DIR`` writes them), named after the folder; its
  manifest key includes the folder's settings key, so ``--resume`` never takes the outputs of
  features encoded with other settings;
- :func:`open_for_predict`: open one folder with the requirements of the command line (the
  checkpoint's SHA-256, ``--bands``, ``--tile``/``--overlap``, ``--max-pixels``);
- :func:`check_feature_inputs`: open every folder before any output is written, so a folder made
  with another checkpoint, tiling or band choice stops the command with one ``error:`` line naming
  it (exit status 2); data problems (an incomplete or corrupt folder) are left to the per-scene
  failure handling of the batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rsrefseg.errors import DataError
from rsrefseg.inference.jobs import SceneInput

__all__ = ["check_feature_inputs", "feature_inputs", "open_for_predict"]


def feature_inputs(roots: Sequence[str | os.PathLike[str]]) -> list[SceneInput]:
    """Feature folders of ``--features`` values, in order, each once.

    Raises:
        DataError: a value does not exist, or neither it nor a sub-folder is a feature folder.
    """
    from rsrefseg.inference import feature_index as fi
    from rsrefseg.inference.features import find_feature_folders
    from rsrefseg.inference.jobs import _safe_name

    scenes: list[SceneInput] = []
    seen: set[Path] = set()
    for root in roots:
        path = Path(root)
        if not path.exists():
            raise DataError(f"{path}: --features folder not found")
        if not path.is_dir():
            raise DataError(f"{path}: --features expects a feature folder written by `rsrefseg encode`, not a file")
        for folder in find_feature_folders(path):
            resolved = folder.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            try:
                key = fi.read_index_json(folder).get("key")
            except DataError:
                key = None  # reported by open_features when the scene is processed
            scenes.append(SceneInput(f"features:{resolved}#{key if isinstance(key, str) else ''}", folder,
                                     _safe_name(folder.name)))
    return scenes


def open_for_predict(predictor: Any, folder: str | os.PathLike[str], options: Any) -> Any:
    """Open a feature folder with the requirements of ``options`` (a
    :class:`~rsrefseg.inference.predict_job.PredictOptions`); returns its
    :class:`~rsrefseg.inference.features.FeatureScene`.

    Raises:
        ConfigError: the folder was made with another checkpoint, tiling or band choice.
        DataError: not a feature folder, incomplete or corrupt, changed scene, above ``max_pixels``.
    """
    from rsrefseg.inference.features import DEFAULT_MAX_FEATURE_PIXELS, open_features
    from rsrefseg.inference.limits import check_max_pixels

    fs = open_features(folder, predictor, checkpoint=options.checkpoint, bands=options.bands, tile=options.tile,
                       overlap=options.overlap, max_pixels=DEFAULT_MAX_FEATURE_PIXELS)
    check_max_pixels(folder, fs.source.height, fs.source.width, options.max_pixels)
    return fs


def check_feature_inputs(predictor: Any, scenes: Sequence[SceneInput], options: Any) -> None:
    """Refuse, before any work, a feature folder made with another checkpoint, tiling or bands.

    Raises:
        ConfigError: naming the folder (the command stops with exit status 2).
    """
    # ConfigError propagates: a settings mismatch is an argument problem, not one scene's failure.
    for scene in scenes:
        try:
            open_for_predict(predictor, scene.path, options)
        except DataError:
            continue  # a data problem of this folder: it fails alone when processed, the others go on
