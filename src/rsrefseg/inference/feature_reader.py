"""Opening a feature folder: :func:`open_features`, its scene (:class:`FeatureSource`) and windows
(:class:`FeatureCache`); see :mod:`rsrefseg.inference.features` for the overview."""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rsrefseg.errors import ConfigError, DataError
from rsrefseg.inference import feature_files as ff
from rsrefseg.inference import feature_index as fi
from rsrefseg.inference.geo import GeoReference
from rsrefseg.inference.predictor import EncodedImage, Predictor
from rsrefseg.inference.scene import SceneSource
from rsrefseg.inference.tiling import TileBox

__all__ = ["DEFAULT_MAX_FEATURE_PIXELS", "FeatureCache", "FeatureScene", "FeatureSource", "open_features"]

#: Largest scene (``H * W``) opened from a feature folder unless ``max_pixels`` says otherwise
#: (decoding holds ``4 * H * W`` bytes of logits per expression).
DEFAULT_MAX_FEATURE_PIXELS = 2**30


class FeatureSource(SceneSource):
    """The scene of a feature folder: size, path, georeference and preview, but no pixels
    (:meth:`read` raises: every window must come from the folder's :class:`FeatureCache`)."""

    def __init__(self, folder: Path, index: dict[str, Any], georef: GeoReference | None) -> None:
        self.folder = folder
        self.height, self.width = index["scene"]["height"], index["scene"]["width"]
        self.path = Path(index["scene"]["path"])
        self.georef = georef
        self._tiling = index["tiling"]
        self._preview_shape = (index["preview"]["height"], index["preview"]["width"])
        self._preview: tuple[np.ndarray, np.ndarray] | None = None

    def read(self, box: TileBox) -> tuple[np.ndarray, np.ndarray]:
        raise DataError(f"{self.folder}: a feature folder holds no pixels; window {tuple(box)} is not one of its "
                        f"windows (tile {self._tiling['tile']}, overlap {self._tiling['overlap']}): pass "
                        "tile=fs.tile, overlap=fs.overlap, cache=fs.cache")

    def _load_preview(self) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        path = self.folder / ff.PREVIEW_NAME
        try:
            with Image.open(path) as image:
                if image.format != "PNG" or image.size != self._preview_shape[::-1]:
                    raise DataError(f"{path}: preview is not a {self._preview_shape[1]} x "
                                    f"{self._preview_shape[0]} PNG as the index says")
                rgba = np.asarray(image.convert("RGBA"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: cannot read the preview ({str(exc).splitlines()[0] if str(exc) else exc})") from None
        return np.ascontiguousarray(rgba[:, :, :3]), rgba[:, :, 3] > 0

    def preview(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored preview (``h x w x 3`` uint8, ``h x w`` bool), nearest-downscaled to ``max_side``."""
        if self._preview is None:
            self._preview = self._load_preview()
        rgb, valid = self._preview
        h, w = valid.shape
        if max(h, w) <= max_side:
            return rgb, valid
        scale = max_side / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        rows = ((np.arange(nh) + 0.5) * h / nh).astype(int)  # nearest source row of each preview row
        cols = ((np.arange(nw) + 0.5) * w / nw).astype(int)
        return rgb[rows][:, cols], valid[rows][:, cols]


class FeatureCache:
    """Windows of a feature folder for ``predict_scene`` (the :class:`TileCache` protocol, read-only).

    :meth:`get` loads a window file when asked (validated against the model, cast to the model's
    head dtype and device); nothing stays in memory. :meth:`put` keeps nothing.
    """

    def __init__(self, folder: Path, index: dict[str, Any], predictor: Predictor) -> None:
        self.folder = folder
        self.key, self.dtype = index["key"], index["dtype"]
        self.fingerprint = index["model"]["fingerprint"]
        tiling = index["tiling"]
        self.layout = (index["scene"]["height"], index["scene"]["width"], tiling["tile"], tiling["overlap"])
        self.windows = {TileBox(*w[:4]): (i, w[4]) for i, w in enumerate(index["windows"])}
        self.loaded = 0  # window files read so far
        self._model: weakref.ref[Any] = weakref.ref(predictor.model)
        self._shapes = ff.model_shapes(predictor.model)

    def bind(self, predictor: Predictor, height: int, width: int, tile: int, overlap: int) -> None:
        """Check that the scene layout and the predictor's model are those of the folder."""
        if (height, width, tile, overlap) != self.layout:
            raise ConfigError(f"{self.folder}: features were encoded with tile {self.layout[2]} and overlap "
                              f"{self.layout[3]}, not tile {tile} and overlap {overlap}")
        if self._model() is not predictor.model:
            _check_model(self.folder, self.fingerprint, predictor)
            self._model, self._shapes = weakref.ref(predictor.model), ff.model_shapes(predictor.model)

    def get(self, box: TileBox) -> tuple[bool, EncodedImage | None]:
        """``(True, encoded)`` for a window of the folder (``encoded`` None when it has no valid
        pixel), ``(False, None)`` for any other box."""
        from rsrefseg.data.transforms import make_meta
        from rsrefseg.modeling.rsrefseg import ImageFeatures

        box = TileBox(*box)
        entry = self.windows.get(box)
        if entry is None:
            return False, None
        number, state = entry
        if not state:
            return True, None
        model = self._model()
        if model is None:  # pragma: no cover - the predictor is gone
            raise RuntimeError("the predictor bound to this feature cache no longer exists")
        path = self.folder / ff.WINDOWS_DIR / ff.window_name(number)
        sam, clip, valid = ff.read_window(path, ff.expected_window(self._shapes, self.dtype, tuple(box)), self.key,
                                          tuple(box))
        self.loaded += 1
        dtype, device = model.head_dtype, model.device
        features = ImageFeatures(sam=sam.to(device, dtype), clip=clip.to(device, dtype))
        meta = make_meta(box.height, box.width, int(model.config.sam_image_size), model.config.resize_mode)
        return True, EncodedImage(features, meta, valid)

    def put(self, box: TileBox, encoded: EncodedImage | None) -> bool:
        """Nothing is added to a feature folder while predicting; returns False."""
        return False


def _check_model(folder: Path, fingerprint: str, predictor: Predictor) -> None:
    mine = ff.model_fingerprint(predictor.model)
    if mine != fingerprint:
        raise ConfigError(f"{folder}: features were made with another checkpoint (model {fingerprint[:12]}) than "
                          f"the loaded one (preset {predictor.model.config.preset!r}, model {mine[:12]}); "
                          "encode the scene again with this checkpoint")


@dataclass
class FeatureScene:
    """An opened feature folder (see :func:`open_features`).

    Attributes:
        folder: The folder. ``index``: its parsed ``index.json``.
        source: The scene (:class:`FeatureSource`: size, georeference, preview; no pixels).
        cache: Its windows (:class:`FeatureCache`, TileCache protocol) for ``predict_scene``.
        tile, overlap: The tiling to pass to ``predict_scene``.
        bands: 1-based source bands behind R, G, B (None when unknown, e.g. an in-memory scene).
        dtype: Feature dtype on disk; ``precision``: the encoders' precision when encoding.
    """

    folder: Path
    index: dict[str, Any] = field(repr=False)
    source: FeatureSource
    cache: FeatureCache
    tile: int
    overlap: int
    bands: tuple[int, ...] | None
    dtype: str
    precision: str


def open_features(
    folder: str | os.PathLike[str],
    predictor: Predictor,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    bands: Sequence[int] | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_FEATURE_PIXELS,
    check_scene: bool = True,
) -> FeatureScene:
    """Open a feature folder written by :func:`encode_scene` for ``predictor``.

    Args:
        folder: The feature folder (with ``index.json``).
        predictor: The predictor that will decode; its model must be the one that encoded.
        checkpoint: Also require the checkpoint files to be those recorded (SHA-256), when the
            folder recorded them (``encode_scene(checkpoint=...)``, always by ``rsrefseg encode``).
        bands, tile, overlap: When given, require these settings (``None``: take the folder's).
        max_pixels: Refuse scenes with more pixels (``None``: no limit).
        check_scene: Refuse the folder when the scene file still exists but changed (size or mtime).

    Raises:
        DataError: not a feature folder, incomplete (interrupted encode, missing window file),
            corrupt index, changed scene, scene too large.
        ConfigError: made with another checkpoint, tiling or band choice.
    """
    path = Path(folder)
    index = fi.read_index_json(path)
    index, georef = fi.check_index(path, index, max_pixels)
    if index["key"] != ff.settings_key(fi.key_settings(index)):
        raise DataError(f"{path / ff.INDEX_NAME}: corrupt index (its key does not match its settings)")
    _check_model(path, index["model"]["fingerprint"], predictor)
    recorded = index["checkpoint"]
    if checkpoint is not None and recorded is not None and recorded["sha256"] != ff.checkpoint_fingerprint(checkpoint):
        raise ConfigError(f"{path}: features were made with checkpoint {recorded['path']}, not {checkpoint} "
                          "(SHA-256 of config.json + model.safetensors differs); encode the scene again")
    layout = (index["tiling"]["tile"], index["tiling"]["overlap"])
    if (tile is not None and tile != layout[0]) or (overlap is not None and overlap != layout[1]):
        raise ConfigError(f"{path}: features were encoded with tile {layout[0]} and overlap {layout[1]}, not "
                          f"tile {tile if tile is not None else layout[0]} and overlap "
                          f"{overlap if overlap is not None else layout[1]}; drop --tile/--overlap or encode again")
    recorded_bands = index["band_indices"] if index["band_indices"] is not None else index["bands"]
    if bands is not None and [int(b) for b in bands] != recorded_bands and not (
            len(bands) == 1 and recorded_bands == [int(bands[0])] * 3):
        raise ConfigError(f"{path}: features were encoded with bands {recorded_bands or 'unknown'}, not "
                          f"{list(bands)}; encode again with --bands {','.join(map(str, bands))}")
    scene = index["scene"]
    scene_path = Path(scene["path"])
    try:
        stat = scene_path.stat() if check_scene and scene["file_size"] is not None else None
    except OSError:  # the scene is not there (or not reachable): the features do not need it
        stat = None
    if stat is not None and scene_path.is_file():
        if (stat.st_size, stat.st_mtime_ns) != (scene["file_size"], scene["file_mtime_ns"]):
            raise DataError(f"{scene_path}: the scene changed since {path} was encoded (size or modification "
                            "time differ); encode it again")
    for number, window in enumerate(index["windows"]):
        file = path / ff.WINDOWS_DIR / ff.window_name(number)
        if window[4] and not file.is_file():
            raise DataError(f"{file}: window file is missing (incomplete feature folder; rerun `rsrefseg encode` "
                            "with the same arguments to restore it)")
    if not (path / ff.PREVIEW_NAME).is_file():
        raise DataError(f"{path / ff.PREVIEW_NAME}: preview is missing (incomplete feature folder)")
    source = FeatureSource(path, index, georef)
    cache = FeatureCache(path, index, predictor)
    return FeatureScene(path, index, source, cache, layout[0], layout[1],
                        None if recorded_bands is None else tuple(recorded_bands), index["dtype"],
                        index["model"]["precision"])
