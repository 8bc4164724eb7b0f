"""Tests for rsrefseg.inference.stitching: streaming max-merge equals the full-scene stitcher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsrefseg.inference.stitching import FrontierStitcher
from rsrefseg.inference.tiling import LogitStitcher, TileBox, tile_grid

# (H, W, tile, overlap): shifted last windows, overlap >= stride (a pixel in 3-4 windows), one window.
COMBOS = [
    (97, 131, 16, 12),
    (1000, 777, 256, 32),
    (300, 520, 128, 96),
    (200, 100, 512, 64),
    (1, 1, 8, 0),
    (129, 70, 64, 0),
    (65, 300, 64, 8),
]


@pytest.mark.parametrize(("height", "width", "tile", "overlap"), COMBOS)
def test_regions_tile_the_scene_once_with_the_maxima_of_the_full_stitcher(height, width, tile, overlap):
    rng = np.random.default_rng(height * width + tile)
    channels = 3
    boxes = tile_grid(height, width, tile, overlap)
    full = [LogitStitcher(height, width) for _ in range(channels)]
    full_valid = np.zeros((height, width), dtype=bool)
    stitcher = FrontierStitcher(height, width, tile, overlap, channels)
    assert stitcher.boxes == len(boxes)
    out = np.full((channels, height, width), np.nan, dtype=np.float32)
    out_valid = np.zeros((height, width), dtype=bool)
    covered = np.zeros((height, width), dtype=np.int32)
    order = stitcher.order()
    assert sorted(order) == sorted(boxes)
    peak = 0
    for box in order:
        values = rng.standard_normal((channels, box.height, box.width)).astype(np.float32)
        valid = rng.random((box.height, box.width)) < 0.8
        for k in range(channels):
            full[k].add(box, torch.from_numpy(values[k].copy()))
        full_valid[box.slices] |= valid
        for region in stitcher.add(box, values, valid):
            out[(slice(None), *region.box.slices)] = region.values
            out_valid[region.box.slices] = region.valid
            covered[region.box.slices] += 1
        peak = max(peak, stitcher.pending_bytes)
        axis, before = stitcher.emitted_before()  # everything before `before` along `axis` was emitted
        assert (covered[:, :before] if axis == 1 else covered[:before]).all()
        assert axis == (1 if width >= height else 0)
    assert peak <= FrontierStitcher.frontier_bytes(height, width, tile, overlap, channels)
    assert stitcher.done and stitcher.emitted_pixels == height * width
    assert (covered == 1).all()  # every pixel emitted exactly once
    for k in range(channels):
        np.testing.assert_array_equal(out[k], full[k].result().numpy())  # bit for bit
    np.testing.assert_array_equal(out_valid, full_valid)


@pytest.mark.parametrize(("height", "width"), [(5000, 3000), (3000, 5000), (264, 20000)])
def test_frontier_is_a_strip_across_the_shorter_side(height, width):
    tile, overlap, channels = 256, 32, 2
    stitcher = FrontierStitcher(height, width, tile, overlap, channels)
    peak, regions = 0, 0
    zeros = np.zeros((channels, min(tile, height), min(tile, width)), np.float32)
    for box in stitcher.order():
        regions += len(stitcher.add(box, zeros, np.ones(zeros.shape[1:], bool)))
        peak = max(peak, stitcher.pending_bytes)
    assert stitcher.done and stitcher.emitted_pixels == height * width
    short = min(height, width)
    # the overlap strip across the shorter side (the shifted last band stays local), not H x W
    assert peak <= (4 * channels + 1) * (2 * overlap * short + 4 * tile * tile)
    assert peak <= FrontierStitcher.frontier_bytes(height, width, tile, overlap, channels)
    assert regions <= 2 * stitcher.boxes  # mostly one region per window


def test_windows_out_of_order_or_of_the_wrong_shape_are_refused():
    stitcher = FrontierStitcher(100, 100, 64, 0, channels=1)
    with pytest.raises(ValueError, match="not a window"):
        stitcher.add(TileBox(0, 30, 64, 94), np.zeros((1, 64, 64), np.float32), np.ones((64, 64), bool))
    stitcher.add(TileBox(0, 36, 64, 100), np.zeros((1, 64, 64), np.float32), np.ones((64, 64), bool))
    with pytest.raises(ValueError, match="not a window"):  # twice
        stitcher.add(TileBox(0, 36, 64, 100), np.zeros((1, 64, 64), np.float32), np.ones((64, 64), bool))
    with pytest.raises(ValueError, match="float32"):
        stitcher.add(TileBox(0, 0, 64, 64), np.zeros((2, 64, 64), np.float32), np.ones((64, 64), bool))
    with pytest.raises(ValueError, match="channels"):
        FrontierStitcher(10, 10, 8, 0, channels=0)
