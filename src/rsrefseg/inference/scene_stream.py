"""The tile loop of large scenes: encode each window once, decode every expression, stream final regions.

:func:`iter_scene_regions` is shared by the in-memory :func:`rsrefseg.inference.scene.predict_scene`
(which copies the regions into ``H x W`` arrays) and by the streaming writer of
:mod:`rsrefseg.inference.scene_writer` (which writes them into GeoTIFF windows and forgets them).
For each window of the tiling, in :meth:`FrontierStitcher.order`:

1. its features come from the :class:`~rsrefseg.inference.tiling.TileCache` (when given and
   filled), or the window is read from the :class:`~rsrefseg.inference.scene.SceneSource` and
   encoded (windows without any valid pixel are neither encoded nor decoded: their logits are
   :data:`EMPTY_TILE_LOGIT`);
2. the text features (encoded once for the scene) are decoded on it in batches;
3. the ``C x h x w`` logits (``C`` = expressions, then as many heat maps with ``heatmap=True``) go
   through a :class:`~rsrefseg.inference.stitching.FrontierStitcher`, which yields the parts of
   the scene that became final.

Memory: one window's features and logits, and the stitcher's frontier, whatever the scene size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from rsrefseg.inference.stitching import FinalRegion, FrontierStitcher
from rsrefseg.inference.tiling import TileBox, TileCache

if TYPE_CHECKING:  # pragma: no cover
    from rsrefseg.inference.predictor import Predictor
    from rsrefseg.inference.scene import SceneSource
    from rsrefseg.modeling.rsrefseg import TextFeatures

__all__ = ["EMPTY_TILE_LOGIT", "SceneRun", "iter_scene_regions"]

#: Logit given to windows without any valid pixel (they are not run through the model).
EMPTY_TILE_LOGIT = -1.0e4


@dataclass
class SceneRun:
    """Counters of one pass over a scene's windows (filled while :func:`iter_scene_regions` runs).

    Attributes:
        tile, overlap: Window side and overlap in pixels.
        tiles: Number of windows; ``skipped_tiles`` of them had no valid pixel.
        encoded_tiles: Windows encoded by this pass; ``cached_tiles``: windows whose features came
            from the cache (neither read nor encoded). Empty windows count in neither.
        iou_sum, iou_weight: Per expression, the sum of the windows' predicted IoU weighted by
            their mask pixels, and the sum of the weights (see :meth:`predicted_iou`).
    """

    tile: int
    overlap: int
    tiles: int = 0
    skipped_tiles: int = 0
    encoded_tiles: int = 0
    cached_tiles: int = 0
    iou_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    iou_weight: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def predicted_iou(self, k: int) -> float:
        """Mask-area-weighted mean of the windows' predicted IoU for expression ``k`` (0.0 without mask)."""
        return float(self.iou_sum[k] / self.iou_weight[k]) if self.iou_weight[k] > 0 else 0.0


def _window_values(predictor: Predictor, text_batches: Sequence[TextFeatures], encoded: object, n: int,
                   box: TileBox, heatmap: bool, threshold: float, run: SceneRun) -> np.ndarray:
    """``C x h x w`` float32 logits (then heat logits) of every expression on one encoded window."""
    values = np.empty((n * (2 if heatmap else 1), box.height, box.width), dtype=np.float32)
    valid_t = torch.from_numpy(np.ascontiguousarray(encoded.valid))  # type: ignore[attr-defined]  # h x w
    for batch in predictor.iter_logits(text_batches, heatmap=heatmap, encoded=encoded):  # type: ignore[arg-type]
        t = batch.logits.shape[0]
        values[batch.start:batch.start + t] = batch.logits.numpy()  # t x h x w
        if batch.heat_logits is not None:
            values[n + batch.start:n + batch.start + t] = batch.heat_logits.numpy()
        areas = torch.count_nonzero((batch.logits > threshold) & valid_t, dim=(1, 2)).double().numpy()  # t mask pixels
        run.iou_sum[batch.start:batch.start + t] += batch.iou.double().numpy() * areas
        run.iou_weight[batch.start:batch.start + t] += areas
    return values


@torch.inference_mode()
def iter_scene_regions(
    predictor: Predictor,
    source: SceneSource,
    texts: Sequence[str],
    run: SceneRun,
    batch_size: int = 16,
    threshold: float = 0.0,
    heatmap: bool = False,
    progress: Callable[[Iterator[TileBox], int], Iterator[TileBox]] | None = None,
    cache: TileCache | None = None,
    on_window: Callable[[tuple[int, int]], None] | None = None,
) -> Iterator[FinalRegion]:
    """Yield the final regions of a tiled scene (see the module docstring).

    Args:
        predictor: The predictor (its own current image is left alone).
        source: The scene.
        texts: Checked expressions (:func:`~rsrefseg.inference.predictor.check_expressions`).
        run: Tiling (``run.tile``, ``run.overlap``) and the counters this pass fills.
        batch_size: Expressions decoded together on a window.
        threshold: Logit threshold (for the predicted-IoU weights).
        heatmap: Also stitch the global-activation heat logits (channels ``n..2n-1``).
        progress: Optional wrapper of the window iterator, e.g. ``lambda it, n: tqdm(it, total=n)``.
        cache: Encoded windows of this scene (the :class:`TileCache` protocol: ``bind``, ``get``,
            ``put``).
        on_window: Called after each window's regions were consumed with
            :meth:`FrontierStitcher.emitted_before` (``(axis, c)``: everything before ``c`` along
            ``axis`` was yielded), e.g. to finish polygons that can no longer grow.

    Yields:
        :class:`FinalRegion` with ``C x h x w`` values: the ``n`` expressions' logits, then with
        ``heatmap`` their ``n`` heat logits; every scene pixel is in exactly one region.
    """
    n = len(texts)
    stitcher = FrontierStitcher(source.height, source.width, run.tile, run.overlap, n * (2 if heatmap else 1))
    boxes = stitcher.order()
    run.tiles = len(boxes)
    run.iou_sum, run.iou_weight = np.zeros(n), np.zeros(n)
    text_batches = predictor.encode_expressions(texts, batch_size)  # once for every window
    if cache is not None:
        cache.bind(predictor, source.height, source.width, run.tile, run.overlap)
    iterator: Iterator[TileBox] = iter(boxes)
    if progress is not None:
        iterator = progress(iterator, len(boxes))
    for box in iterator:
        found, encoded = cache.get(box) if cache is not None else (False, None)
        if found:
            run.cached_tiles += encoded is not None
        else:
            rgb, tile_valid = source.read(box)
            if tile_valid.any():
                encoded = predictor.encode(rgb, valid=tile_valid)
                run.encoded_tiles += 1
            if cache is not None:
                cache.put(box, encoded)
        if encoded is None:  # no valid pixel: not decoded
            run.skipped_tiles += 1
            values = np.full((stitcher.channels, box.height, box.width), EMPTY_TILE_LOGIT, dtype=np.float32)
            valid = np.zeros((box.height, box.width), dtype=bool)
        else:
            values = _window_values(predictor, text_batches, encoded, n, box, heatmap, threshold, run)
            valid = encoded.valid
        yield from stitcher.add(box, values, valid)
        if on_window is not None:
            on_window(stitcher.emitted_before())
    if not stitcher.done or stitcher.emitted_pixels != source.height * source.width:
        raise RuntimeError("the tile loop ended before every pixel of the scene was final")
