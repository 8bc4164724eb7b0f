"""Tiling of large scenes and max-logit stitching of the per-tile predictions.

A scene larger than the model input is cut into overlapping ``tile x tile`` windows
(:func:`tile_grid`); each window is predicted on its own and its ``h x w`` logits are merged into a
full-scene ``H x W`` buffer with an element-wise **maximum** in the overlaps
(:class:`LogitStitcher`). The maximum never erases a detection made by one tile because a
neighbouring tile saw only part of the object, and it is seam-free: tiles agreeing on a value give
exactly that value.

Memory: the stitcher holds only the full-scene buffer (``H * W * 4`` bytes in float32, e.g. 52 MB
for the 2846 x 4627 Landsat sample) plus the one tile being added.

:class:`TileCache` keeps the encoded windows of one scene for repeated predictions on it.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from rsrefseg.errors import ConfigError
from rsrefseg.inference.defaults import DEFAULT_TILE_CACHE_BYTES

if TYPE_CHECKING:  # pragma: no cover
    from rsrefseg.inference.predictor import EncodedImage, Predictor

__all__ = ["LogitStitcher", "TileBox", "TileCache", "axis_starts", "should_tile", "tile_grid"]


class TileBox(NamedTuple):
    """A window ``[y0, y1) x [x0, x1)`` of an ``H x W`` image, in pixels (end exclusive)."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        """Window height ``h = y1 - y0``."""
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        """Window width ``w = x1 - x0``."""
        return self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices: ``image[box.slices]`` is the ``h x w`` window of an ``H x W``
        array (use ``image[(..., *box.slices)]`` for ``C x H x W``)."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def axis_starts(size: int, tile: int, stride: int) -> list[int]:
    """Window starts along one axis of length ``size``: every ``stride`` pixels, with the last
    window shifted inward so that it ends exactly at ``size`` (no sliver windows)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)  # last window flush with the border (overlaps its neighbour more)
    return starts


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[TileBox]:
    """Overlapping ``tile x tile`` windows covering every pixel of an ``H x W`` image.

    Consecutive windows start ``tile - overlap`` pixels apart; the last row/column of windows is
    shifted inward to stay ``tile``-sized and inside the image. Along an axis shorter than ``tile``
    the single window spans the whole axis (so an image smaller than the tile is one window of the
    image size). Windows are listed row-major (top-left first).

    Raises:
        ConfigError: non-positive sizes, or ``overlap`` not in ``[0, tile)``.
    """
    if height <= 0 or width <= 0:
        raise ConfigError(f"image size must be positive, got {height} x {width}")
    if tile <= 0:
        raise ConfigError(f"tile size must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ConfigError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    stride = tile - overlap
    rows = axis_starts(height, tile, stride)
    cols = axis_starts(width, tile, stride)
    return [TileBox(y0, x0, min(y0 + tile, height), min(x0 + tile, width)) for y0 in rows for x0 in cols]


def should_tile(height: int, width: int, threshold_pixels: int) -> bool:
    """Whether an ``H x W`` image has more than ``threshold_pixels`` pixels and should be tiled.

    Raises:
        ConfigError: ``threshold_pixels`` is not positive.
    """
    if threshold_pixels <= 0:
        raise ConfigError(f"tiling threshold must be a positive pixel count, got {threshold_pixels}")
    return height * width > threshold_pixels


class LogitStitcher:
    """Merge per-tile ``h x w`` logits into one ``H x W`` scene by element-wise maximum.

    The buffer is allocated once (``H x W`` of ``dtype``, initialised to ``-inf``, ``nbytes``
    bytes: ``4 * H * W`` for float32). Tiles are added one at a time and can be freed right after.
    Tile logits of ``-inf`` are clamped to the most negative finite value, so ``-inf`` left in the
    buffer always means "no tile covered this pixel".
    """

    def __init__(
        self,
        height: int,
        width: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if height <= 0 or width <= 0:
            raise ValueError(f"scene size must be positive, got {height} x {width}")
        if not dtype.is_floating_point:
            raise ValueError(f"logit dtype must be floating point, got {dtype}")
        self.height = height
        self.width = width
        self._floor = torch.finfo(dtype).min
        # H x W full-scene logits; -inf marks pixels no tile has covered yet.
        self._buffer = torch.full((height, width), float("-inf"), dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        """Size of the full-scene buffer in bytes (``element_size * H * W``)."""
        return self._buffer.element_size() * self._buffer.numel()

    def add(self, box: TileBox, logits: torch.Tensor) -> None:
        """Max-merge one tile's logits into the scene.

        Args:
            box: The tile's window, inside the ``H x W`` scene.
            logits: ``h x w`` logits of that window, ``(h, w) == (box.height, box.width)``; leading
                singleton axes (``1 x 1 x h x w`` from the model) are accepted.
        """
        if not (0 <= box.y0 < box.y1 <= self.height and 0 <= box.x0 < box.x1 <= self.width):
            raise ValueError(f"tile {tuple(box)} is outside the {self.height} x {self.width} scene")
        tile = logits.detach()
        if tile.dim() > 2 and all(n == 1 for n in tile.shape[:-2]):
            tile = tile.reshape(tile.shape[-2:])  # 1 x ... x 1 x h x w -> h x w (drop singleton axes)
        if tuple(tile.shape) != (box.height, box.width):
            raise ValueError(
                f"tile logits have shape {tuple(logits.shape)}, expected {(box.height, box.width)} (h x w)"
            )
        tile = tile.to(device=self._buffer.device, dtype=self._buffer.dtype).clamp(min=self._floor)
        region = self._buffer[box.slices]  # h x w view into the scene buffer
        torch.maximum(region, tile, out=region)

    def result(self) -> torch.Tensor:
        """The stitched ``H x W`` logits (the internal buffer itself, not a copy).

        Raises:
            RuntimeError: some pixel was never covered by an added tile (cannot happen when every
                box of :func:`tile_grid` was added).
        """
        uncovered = int(torch.isneginf(self._buffer).sum())
        if uncovered:
            raise RuntimeError(f"{uncovered} of {self.height * self.width} pixels were covered by no tile")
        return self._buffer


class TileCache:
    """Encoded windows of **one** scene (one source and band choice) for repeated
    :func:`predict_scene` calls with the same predictor.

    Windows are added while their features fit in ``max_bytes``; later windows are encoded on every
    call. A call with another predictor or another tiling (scene size, tile, overlap) empties it.
    ``None`` entries are windows without a valid pixel (never encoded).
    """

    def __init__(self, max_bytes: int = DEFAULT_TILE_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.tiles: dict[TileBox, EncodedImage | None] = {}
        self.nbytes = 0
        self._layout: tuple[int, int, int, int] | None = None
        self._model: weakref.ref[Any] | None = None  # the model that encoded the windows

    def bind(self, predictor: Predictor, height: int, width: int, tile: int, overlap: int) -> None:
        """Empty the cache unless it already holds windows of this predictor's model and tiling."""
        layout = (height, width, tile, overlap)
        if layout != self._layout or self._model is None or self._model() is not predictor.model:
            self.clear()
            self._layout, self._model = layout, weakref.ref(predictor.model)

    def clear(self) -> None:
        """Drop every window."""
        self.tiles.clear()
        self.nbytes = 0
        self._layout = self._model = None

    def get(self, box: TileBox) -> tuple[bool, EncodedImage | None]:
        """``(found, encoded)``; ``encoded`` is None for a cached empty window."""
        if box in self.tiles:
            return True, self.tiles[box]
        return False, None

    def put(self, box: TileBox, encoded: EncodedImage | None) -> bool:
        """Keep ``encoded`` for ``box`` if it fits the budget; returns whether it was kept."""
        size = 0 if encoded is None else encoded.nbytes
        if self.nbytes + size > self.max_bytes:
            return False
        self.tiles[box] = encoded
        self.nbytes += size
        return True
