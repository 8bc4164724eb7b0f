"""Tests for rsrefseg.inference.tiling: tile grid coverage and max-logit stitching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rsrefseg.errors import ConfigError
from rsrefseg.inference.tiling import LogitStitcher, TileBox, should_tile, tile_grid

# (H, W, tile, overlap): multiples, non-multiples, smaller than the tile on one or both axes.
COMBOS = [
    (1024, 1024, 512, 64),
    (1000, 777, 256, 32),
    (513, 1025, 512, 0),
    (300, 2000, 512, 128),
    (200, 100, 512, 64),
    (97, 131, 16, 15),
    (1, 1, 8, 0),
    (4627, 2846, 1024, 128),
]


def _coverage(height: int, width: int, boxes: list[TileBox]) -> np.ndarray:
    """H x W count of the windows covering each pixel."""
    count = np.zeros((height, width), dtype=np.int32)
    for box in boxes:
        count[box.slices] += 1
    return count


@pytest.mark.parametrize(("height", "width", "tile", "overlap"), COMBOS)
def test_tile_grid_covers_every_pixel_with_tile_sized_boxes(height: int, width: int, tile: int, overlap: int):
    boxes = tile_grid(height, width, tile, overlap)
    assert len(set(boxes)) == len(boxes)
    for box in boxes:
        assert 0 <= box.y0 < box.y1 <= height and 0 <= box.x0 < box.x1 <= width
        assert box.height == min(tile, height)
        assert box.width == min(tile, width)
    assert (_coverage(height, width, boxes) >= 1).all()
    # neighbouring windows share at least `overlap` pixels (the last ones share more)
    for starts, size in ((sorted({b.y0 for b in boxes}), height), (sorted({b.x0 for b in boxes}), width)):
        for a, b in itertools.pairwise(starts):
            assert min(tile, size) - (b - a) >= overlap


def test_tile_grid_small_image_is_one_tile_of_image_size():
    assert tile_grid(200, 100, 512, 64) == [TileBox(0, 0, 200, 100)]


def test_tile_grid_last_tiles_shift_inward():
    boxes = tile_grid(1000, 600, 512, 64)
    assert sorted({b.y0 for b in boxes}) == [0, 448, 488]
    assert sorted({b.x0 for b in boxes}) == [0, 88]
    assert boxes[0] == TileBox(0, 0, 512, 512)  # row-major order


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [(10, 10, 8, 8), (10, 10, 8, 9), (10, 10, 8, -1), (10, 10, 0, 0), (0, 10, 8, 0)],
)
def test_tile_grid_rejects_bad_arguments(height: int, width: int, tile: int, overlap: int):
    with pytest.raises(ConfigError):
        tile_grid(height, width, tile, overlap)


def test_should_tile():
    assert should_tile(2000, 2000, 1024 * 1024)
    assert not should_tile(1024, 1024, 1024 * 1024)
    with pytest.raises(ConfigError):
        should_tile(10, 10, 0)


@pytest.mark.parametrize(("height", "width", "tile", "overlap"), COMBOS)
def test_constant_tiles_stitch_without_seams(height: int, width: int, tile: int, overlap: int):
    stitcher = LogitStitcher(height, width)
    for box in tile_grid(height, width, tile, overlap):
        stitcher.add(box, torch.full((box.height, box.width), -2.5))
    result = stitcher.result()
    assert result.shape == (height, width)
    assert torch.equal(result, torch.full((height, width), -2.5))


@pytest.mark.parametrize(("height", "width", "tile", "overlap"), COMBOS[:6])
def test_position_consistent_tiles_reassemble_the_scene(height: int, width: int, tile: int, overlap: int):
    """Tiles cut from one scene-wide logit map stitch back to exactly that map (placement check)."""
    ys = torch.arange(height, dtype=torch.float32)[:, None]  # H x 1
    xs = torch.arange(width, dtype=torch.float32)[None, :]  # 1 x W
    scene = torch.sin(ys * 0.1) + torch.cos(xs * 0.07)  # H x W by broadcasting
    stitcher = LogitStitcher(height, width)
    for box in tile_grid(height, width, tile, overlap):
        stitcher.add(box, scene[box.slices].clone())
    assert torch.equal(stitcher.result(), scene)


def test_overlaps_take_the_maximum_in_any_order():
    a, b = TileBox(0, 0, 4, 6), TileBox(0, 3, 4, 9)
    for order in ((a, 1.0), (b, 3.0)), ((b, 3.0), (a, 1.0)):
        stitcher = LogitStitcher(4, 9)
        for box, value in order:
            stitcher.add(box, torch.full((4, box.width), value))
        result = stitcher.result()
        assert (result[:, :3] == 1.0).all()
        assert (result[:, 3:] == 3.0).all()
    # element-wise, not tile-wise: each pixel keeps its own larger value
    stitcher = LogitStitcher(2, 2)
    stitcher.add(TileBox(0, 0, 2, 2), torch.tensor([[5.0, -1.0], [0.0, 2.0]]))
    stitcher.add(TileBox(0, 0, 2, 2), torch.tensor([[1.0, 4.0], [-3.0, 7.0]]))
    assert torch.equal(stitcher.result(), torch.tensor([[5.0, 4.0], [0.0, 7.0]]))


def test_add_accepts_model_shaped_logits_and_other_dtypes():
    stitcher = LogitStitcher(8, 8)
    stitcher.add(TileBox(0, 0, 8, 8), torch.ones(1, 1, 8, 8, dtype=torch.float16))
    assert stitcher.result().dtype == torch.float32
    assert (stitcher.result() == 1.0).all()


def test_add_rejects_wrong_shapes_and_boxes():
    stitcher = LogitStitcher(8, 8)
    with pytest.raises(ValueError, match="expected"):
        stitcher.add(TileBox(0, 0, 4, 4), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="expected"):
        stitcher.add(TileBox(0, 0, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="outside"):
        stitcher.add(TileBox(4, 4, 12, 12), torch.zeros(8, 8))


def test_uncovered_pixels_are_reported_and_neg_inf_logits_count_as_covered():
    stitcher = LogitStitcher(4, 4)
    stitcher.add(TileBox(0, 0, 4, 2), torch.full((4, 2), float("-inf")))
    with pytest.raises(RuntimeError, match="8 of 16"):
        stitcher.result()
    stitcher.add(TileBox(0, 2, 4, 4), torch.zeros(4, 2))
    result = stitcher.result()
    assert torch.isfinite(result).all()
    assert (torch.sigmoid(result[:, :2]) == 0).all()


def test_memory_is_one_scene_buffer():
    stitcher = LogitStitcher(300, 500)
    assert stitcher.nbytes == 4 * 300 * 500
    assert LogitStitcher(10, 10, dtype=torch.float16).nbytes == 2 * 100
    with pytest.raises(ValueError):
        LogitStitcher(10, 10, dtype=torch.int32)
