"""Polygons of a mask given region by region equal one polygonize of the whole mask."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from affine import Affine

from rsrefseg.inference.geo import mask_to_polygons, rasterize_polygons
from rsrefseg.inference.raster_polygons import SeamPolygonizer, finish_polygons
from rsrefseg.inference.stitching import FrontierStitcher

UTM_HALF_METRE = Affine(0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0)


def _streamed_polygons(mask: np.ndarray, tile: int, overlap: int, flush: bool = True) -> tuple[list, int]:
    """Polygons of ``mask`` delivered as the final regions of a tiling, in the streaming order,
    flushed whenever the stitcher's delivered part grows; and the most pieces ever waiting."""
    height, width = mask.shape
    stitcher = FrontierStitcher(height, width, tile, overlap, channels=1)
    polygonizer = SeamPolygonizer(height, width)
    found, waiting, frontier = [], 0, None
    for box in stitcher.order():
        zeros = np.zeros((1, box.height, box.width), np.float32)
        for region in stitcher.add(box, zeros, np.ones(zeros.shape[1:], bool)):
            found += polygonizer.add(region.box, mask[region.box.slices])
        waiting = max(waiting, polygonizer.waiting)
        if flush and stitcher.emitted_before() != frontier:
            frontier = stitcher.emitted_before()
            found += polygonizer.flush(*frontier)
    return found + polygonizer.close(), waiting


def _blobs(height: int, width: int, seed: int) -> np.ndarray:
    """Speckle plus large blobs with holes and corner contacts that cross every seam."""
    rng = np.random.default_rng(seed)
    mask = rng.random((height, width)) < 0.4
    yy, xx = np.mgrid[:height, :width]  # two H x W coordinate grids
    for _ in range(6):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(10, 40)
        ring = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & ((yy - cy) ** 2 + (xx - cx) ** 2 >= (r // 3) ** 2)
        mask |= ring
    return mask


@pytest.mark.parametrize(("height", "width", "tile", "overlap", "seed"),
                         [(97, 131, 32, 8, 0), (150, 90, 40, 0, 1), (200, 260, 64, 24, 2)])
def test_streamed_polygons_equal_the_whole_mask_polygons(height, width, tile, overlap, seed):
    mask = _blobs(height, width, seed)
    pieces, waiting = _streamed_polygons(mask, tile, overlap)
    held_to_the_end, waiting_to_the_end = _streamed_polygons(mask, tile, overlap, flush=False)
    assert len(held_to_the_end) == len(pieces) and waiting < waiting_to_the_end  # flushing frees pieces early
    streamed = finish_polygons(pieces, UTM_HALF_METRE)
    whole = mask_to_polygons(mask, UTM_HALF_METRE)
    assert len(streamed) == len(whole) > 50
    assert all(p.is_valid for p in streamed)
    assert sum(p.area for p in streamed) == pytest.approx(sum(p.area for p in whole), rel=1e-12)
    assert sorted(round(p.area, 6) for p in streamed) == sorted(round(p.area, 6) for p in whole)
    np.testing.assert_array_equal(rasterize_polygons(streamed, mask.shape, UTM_HALF_METRE), mask)
    # the same rings: every streamed polygon equals one of the whole-mask polygons
    union = shapely.unary_union(whole)
    assert shapely.symmetric_difference(shapely.unary_union(streamed), union).area == pytest.approx(0.0, abs=1e-9)


def test_min_area_and_simplify_act_like_mask_to_polygons():
    mask = _blobs(120, 120, 5)
    pieces, _ = _streamed_polygons(mask, 50, 10)
    for simplify, min_area in ((0.0, 3.0), (0.5, 0.0), (1.0, 10.0)):
        streamed = finish_polygons(pieces, UTM_HALF_METRE, simplify, min_area)
        whole = mask_to_polygons(mask, UTM_HALF_METRE, simplify_tolerance=simplify, min_area=min_area)
        assert len(streamed) == len(whole)
        # both normalise rings before simplifying, so even simplified polygons agree
        assert sorted(round(p.area, 6) for p in streamed) == sorted(round(p.area, 6) for p in whole)
        assert sum(len(p.exterior.coords) for p in streamed) == sum(len(p.exterior.coords) for p in whole)
    with pytest.raises(ValueError):
        finish_polygons([], UTM_HALF_METRE, -1.0)
