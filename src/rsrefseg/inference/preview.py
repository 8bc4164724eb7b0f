"""Downscaled previews of a streamed scene's mask and heatmap, built region by region.

A streamed scene never exists as an ``H x W`` array, so its overlay and heatmap PNGs are drawn from
an ``h' x w'`` preview grid filled as the final regions arrive: scene row ``y`` falls in preview row
``y * h' // H`` (columns alike), so every preview pixel pools a fixed block of scene pixels.

- the mask preview is the logical OR over the block ("any" pooling: thin objects stay visible, as
  in the overlays of images held in memory);
- the heatmap preview is the mean over the block.

Memory: ``h' x w'`` bool (and float32 with heatmaps), whatever the scene size.
"""

from __future__ import annotations

import numpy as np

from rsrefseg.inference.tiling import TileBox

__all__ = ["PreviewPool"]


def _bins(start: int, stop: int, size: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Preview index of each of the scene positions ``start..stop-1`` grouped: (preview indices,
    offsets of the first position of each group within ``start..stop-1``)."""
    index = (np.arange(start, stop, dtype=np.int64) * bins) // size
    first = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    return index[first], first


class PreviewPool:
    """``h' x w'`` pooled previews of an ``H x W`` scene's mask (any) and heat (mean).

    Args:
        height, width: Scene size ``H x W``.
        preview_height, preview_width: Preview size ``h' x w'`` (at most the scene size).
        heat: Also pool a heat map.
    """

    def __init__(self, height: int, width: int, preview_height: int, preview_width: int, heat: bool) -> None:
        if not (0 < preview_height <= height and 0 < preview_width <= width):
            raise ValueError(f"preview {preview_height} x {preview_width} must fit the {height} x {width} scene")
        self.height, self.width = height, width
        self.mask = np.zeros((preview_height, preview_width), dtype=bool)
        self._heat = np.zeros((preview_height, preview_width), dtype=np.float64) if heat else None

    @property
    def nbytes(self) -> int:
        """Bytes held by the preview buffers."""
        return self.mask.nbytes + (0 if self._heat is None else self._heat.nbytes)

    def add(self, box: TileBox, mask: np.ndarray, heat: np.ndarray | None = None) -> None:
        """Pool one region: ``h x w`` bool mask and, with heat pooling, ``h x w`` float heat."""
        rows, row_first = _bins(box.y0, box.y1, self.height, self.mask.shape[0])
        cols, col_first = _bins(box.x0, box.x1, self.width, self.mask.shape[1])
        cells = np.ix_(rows, cols)
        if mask.any():
            # h x w -> rows' x w -> rows' x cols' (OR over each block)
            pooled = np.logical_or.reduceat(np.logical_or.reduceat(mask, row_first, axis=0), col_first, axis=1)
            self.mask[cells] |= pooled
        if self._heat is not None and heat is not None:
            sums = np.add.reduceat(np.add.reduceat(heat.astype(np.float64), row_first, axis=0), col_first, axis=1)
            self._heat[cells] += sums

    def heat(self) -> np.ndarray:
        """``h' x w'`` float32 mean heat per preview pixel (call once every region was added)."""
        if self._heat is None:
            raise RuntimeError("this preview pools no heat")
        h, w = self.mask.shape
        row_counts = np.bincount((np.arange(self.height, dtype=np.int64) * h) // self.height, minlength=h)
        col_counts = np.bincount((np.arange(self.width, dtype=np.int64) * w) // self.width, minlength=w)
        return (self._heat / np.outer(row_counts, col_counts)).astype(np.float32)  # h' x w' block means
