"""Streaming max-logit stitching: finished parts of a tiled scene leave memory as soon as they are final.

:class:`~rsrefseg.inference.tiling.LogitStitcher` keeps one ``H x W`` buffer per channel, which
does not scale to scenes of 50000 x 50000 pixels and more. :class:`FrontierStitcher` merges the
same windows (:func:`~rsrefseg.inference.tiling.tile_grid`) with the same element-wise maximum,
but returns after each window the parts of the scene that no later window covers
(:class:`FinalRegion`); the caller writes them out (GeoTIFF windows, polygons, statistics) and
forgets them.

How: the window edges cut the scene into *cells* (rectangles covered by the same set of windows).
A cell covered by one window is final at once; a cell covered by ``n`` windows is kept (float32,
max-merged) until its ``n``-th window was added. The windows are added in
:meth:`FrontierStitcher.order`: bands of windows across the scene's shorter side (columns of
windows when the scene is wider than tall), one band after the other, except that the last two
bands are interleaved window by window (the last band of :func:`tile_grid` is shifted inward and
can share up to ``tile - 1`` pixels with the one before; interleaving keeps that overlap local).
So what is held between windows is the *frontier*: the overlap strip of the previous band
(``overlap`` x the shorter side) and a few window-sized pieces
(:meth:`FrontierStitcher.frontier_bytes`), instead of ``4 * C * H * W`` bytes. Values equal those of the ``H x W`` :class:`LogitStitcher` bit for bit
(the maximum is order independent) and every pixel is emitted exactly once.

Validity (``h x w`` bool per window, False on nodata) is merged alongside by logical OR.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from typing import NamedTuple

import numpy as np

from rsrefseg.inference.tiling import TileBox, axis_starts

__all__ = ["FinalRegion", "FrontierStitcher"]


class FinalRegion(NamedTuple):
    """A part of the scene that no later window covers.

    Attributes:
        box: The region ``[y0, y1) x [x0, x1)`` in scene pixels.
        values: ``C x h x w`` float32 merged values (may be a view of the window's values: use it
            before the next :meth:`FrontierStitcher.add` or copy it).
        valid: ``h x w`` bool validity of the region.
    """

    box: TileBox
    values: np.ndarray
    valid: np.ndarray


def _cells(starts: list[int], length: int, size: int) -> tuple[list[int], list[int]]:
    """Cut positions along one axis (every window edge) and, per cell, how many windows cover it."""
    cuts = sorted({0, size, *starts, *(min(size, s + length) for s in starts)})
    # windows covering [a, b): starts s with b - length <= s <= a (starts are sorted)
    counts = [bisect.bisect_right(starts, a) - bisect.bisect_left(starts, b - length)
              for a, b in itertools.pairwise(cuts)]
    return cuts, counts


class _MinCounter:
    """A multiset of ints with ``min`` in O(log n) (a heap with lazy deletion)."""

    def __init__(self) -> None:
        self._count: dict[int, int] = {}
        self._heap: list[int] = []

    def add(self, value: int, count: int) -> None:
        """Add ``count`` (negative: remove) copies of ``value``."""
        before = self._count.get(value, 0)
        self._count[value] = before + count
        if before <= 0 < before + count:
            heapq.heappush(self._heap, value)

    def min(self, default: int) -> int:
        """The smallest value present, or ``default``."""
        while self._heap and self._count.get(self._heap[0], 0) <= 0:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else default


class FrontierStitcher:
    """Max-merge ``C``-channel windows of a tiling, emitting the parts that became final.

    Args:
        height, width: Scene size ``H x W``.
        tile, overlap: The tiling (as :func:`~rsrefseg.inference.tiling.tile_grid`).
        channels: ``C``, the number of float32 channels of every window (e.g. one logit map per
            expression, then one heat map per expression).
    """

    def __init__(self, height: int, width: int, tile: int, overlap: int, channels: int) -> None:
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.height, self.width, self.channels = height, width, channels
        self.tile, self.overlap = tile, overlap
        self.rows = axis_starts(height, tile, tile - overlap)
        self.cols = axis_starts(width, tile, tile - overlap)
        self.tile_h, self.tile_w = min(tile, height), min(tile, width)
        self._row_cuts, self._row_counts = _cells(self.rows, self.tile_h, height)
        self._col_cuts, self._col_counts = _cells(self.cols, self.tile_w, width)
        # (cell row, cell col) -> [C x h x w max so far, h x w validity, windows still to come]
        self._pending: dict[tuple[int, int], list] = {}
        self._added: set[TileBox] = set()
        # Starts (along the swept axis) of the windows still to add and of the pending cells.
        self._axis = 1 if width >= height else 0
        self._open_starts = _MinCounter()
        for start in self.cols if self._axis == 1 else self.rows:
            self._open_starts.add(start, len(self.rows) if self._axis == 1 else len(self.cols))
        self.emitted_pixels = 0

    @property
    def boxes(self) -> int:
        """Number of windows of the grid."""
        return len(self.rows) * len(self.cols)

    @property
    def done(self) -> bool:
        """Whether every window was added (then every pixel was emitted exactly once)."""
        return len(self._added) == self.boxes

    @property
    def pending_bytes(self) -> int:
        """Bytes held right now for cells waiting for more windows."""
        return sum(v.nbytes + m.nbytes for v, m, _ in self._pending.values())

    def order(self) -> list[TileBox]:
        """The windows of :func:`tile_grid` in the order that keeps the frontier small (see the
        module docstring): bands of windows across the scene's shorter side, swept along its longer
        side, the last two bands interleaved."""
        th, tw = self.tile_h, self.tile_w
        by_cols = self.width >= self.height  # bands are columns of windows, swept left to right
        major, minor = (self.cols, self.rows) if by_cols else (self.rows, self.cols)

        def box(m: int, n: int) -> TileBox:
            y0, x0 = (minor[n], major[m]) if by_cols else (major[m], minor[n])
            return TileBox(y0, x0, y0 + th, x0 + tw)

        paired = max(0, len(major) - 2)
        boxes = [box(m, n) for m in range(paired) for n in range(len(minor))]
        boxes += [box(m, n) for n in range(len(minor)) for m in range(paired, len(major))]
        return boxes

    @staticmethod
    def frontier_bytes(height: int, width: int, tile: int, overlap: int, channels: int = 1) -> int:
        """Estimated peak bytes held between windows for ``channels`` float32 channels and their
        validity in :meth:`order`: the overlap strip across the shorter side (twice: the strip
        being consumed and the next one) plus a few window-sized pieces."""
        long_side, short_side = max(height, width), min(height, width)
        starts = axis_starts(long_side, tile, tile - overlap)
        span = min(tile, long_side)
        strip = max((starts[r] + span - starts[r + 1] for r in range(len(starts) - 2)), default=0)
        window = min(tile, height) * min(tile, width)
        return (4 * channels + 1) * (2 * strip * short_side + 4 * window)

    def emitted_before(self) -> tuple[int, int]:
        """``(axis, c)``: every pixel whose coordinate along ``axis`` (0: rows, 1: columns; the axis
        :meth:`order` sweeps along) is below ``c`` was emitted. No cell straddles ``c``: it is the
        start of a pending cell or of a window still to add (or the scene size). O(log n)."""
        return self._axis, self._open_starts.min(self.width if self._axis == 1 else self.height)

    def _cell_start(self, i: int, j: int) -> int:
        return self._col_cuts[j] if self._axis == 1 else self._row_cuts[i]

    def _cell_range(self, cuts: list[int], start: int, stop: int) -> range:
        return range(bisect.bisect_left(cuts, start), bisect.bisect_left(cuts, stop))

    def add(self, box: TileBox, values: np.ndarray, valid: np.ndarray) -> list[FinalRegion]:
        """Merge one window; return the regions it finished (possibly none).

        Args:
            box: A window of the grid, not added before (any order; :meth:`order` is best).
            values: ``C x h x w`` float32 window values (not modified).
            valid: ``h x w`` bool validity of the window.

        Raises:
            ValueError: a window not of the grid, added twice, or with the wrong shape.
        """
        th, tw = self.tile_h, self.tile_w
        if (box.y0 not in self.rows or box.x0 not in self.cols or box.height != th or box.width != tw
                or box in self._added):
            raise ValueError(f"window {tuple(box)} is not a window of the grid still to add")
        if values.shape != (self.channels, th, tw) or values.dtype != np.float32:
            raise ValueError(f"values must be float32 {(self.channels, th, tw)} (C x h x w), "
                             f"got {values.dtype} {values.shape}")
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != (th, tw):
            raise ValueError(f"valid must be {(th, tw)} (h x w), got {valid.shape}")
        self._added.add(box)
        self._open_starts.add(box.x0 if self._axis == 1 else box.y0, -1)
        finished: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for i in self._cell_range(self._row_cuts, box.y0, box.y1):
            rows = slice(self._row_cuts[i] - box.y0, self._row_cuts[i + 1] - box.y0)
            for j in self._cell_range(self._col_cuts, box.x0, box.x1):
                cols = slice(self._col_cuts[j] - box.x0, self._col_cuts[j + 1] - box.x0)
                part, part_valid = values[:, rows, cols], valid[rows, cols]
                total = self._row_counts[i] * self._col_counts[j]
                if total == 1:
                    finished[i, j] = (part, part_valid)
                    continue
                cell = self._pending.get((i, j))
                if cell is None:
                    self._pending[i, j] = [part.copy(), part_valid.copy(), total - 1]
                    self._open_starts.add(self._cell_start(i, j), 1)
                    continue
                np.maximum(cell[0], part, out=cell[0])
                cell[1] |= part_valid
                cell[2] -= 1
                if cell[2] == 0:
                    del self._pending[i, j]
                    self._open_starts.add(self._cell_start(i, j), -1)
                    finished[i, j] = (cell[0], cell[1])
        return self._regions(finished)

    def _regions(self, finished: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]) -> list[FinalRegion]:
        """Finished cells as regions: one rectangle when they form one, else one per run of cells."""
        if not finished:
            return []
        rows = sorted({i for i, _ in finished})
        cols = sorted({j for _, j in finished})
        is_rectangle = (rows[-1] - rows[0] + 1 == len(rows) and cols[-1] - cols[0] + 1 == len(cols)
                        and len(finished) == len(rows) * len(cols))
        runs = [(rows, cols)] if is_rectangle else []
        if not is_rectangle:
            for i in rows:
                row_cols = sorted(j for r, j in finished if r == i)
                start = 0
                for k in range(1, len(row_cols) + 1):
                    if k == len(row_cols) or row_cols[k] != row_cols[k - 1] + 1:
                        runs.append(([i], row_cols[start:k]))
                        start = k
        regions = []
        for run_rows, run_cols in runs:
            # Cells laid out as blocks: each row of cells joined along x, the rows along y (C x h x w).
            values = np.concatenate([np.concatenate([finished[i, j][0] for j in run_cols], axis=2)
                                     for i in run_rows], axis=1)
            valid = np.concatenate([np.concatenate([finished[i, j][1] for j in run_cols], axis=1)
                                    for i in run_rows], axis=0)
            box = TileBox(self._row_cuts[run_rows[0]], self._col_cuts[run_cols[0]],
                          self._row_cuts[run_rows[-1] + 1], self._col_cuts[run_cols[-1] + 1])
            self.emitted_pixels += box.height * box.width
            regions.append(FinalRegion(box, values, valid))
        return regions
