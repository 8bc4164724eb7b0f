"""Tests of rsrefseg.inference.scene: windowed reading, tiled prediction, seam-free stitching."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from rsrefseg.data.imageio import read_image
from rsrefseg.inference.predictor import as_raster_image
from rsrefseg.inference.scene import (
    EMPTY_TILE_LOGIT,
    ArraySource,
    RasterioSource,
    open_scene,
    predict_scene,
)
from rsrefseg.inference.tiling import TileBox, TileCache, tile_grid
from rsrefseg.modeling.rsrefseg import ImageFeatures, RSRefSegOutput

LANDSAT = "landsat_large_nodata_wgs84.tif"
SAMPLES = [
    ("spacenet_pan_uint16.tif", None),
    ("multispectral_4band_float64.tif", (4, 3, 2)),
    ("albers_3band_int16.tif", None),
    (LANDSAT, None),
]


@pytest.fixture(scope="module")
def geotiff_dir() -> Path:
    from rsrefseg import paths

    folder = paths.geotiff_root()
    if not folder.is_dir():
        pytest.skip(f"shared GeoTIFF samples not available at {folder} (set $RSREFSEG_DATA)")
    return folder


@pytest.mark.parametrize(("name", "bands"), SAMPLES)
def test_windowed_reads_match_read_image(geotiff_dir, name, bands):
    """Windows use the scene-wide stretch: they equal the same part of a full read_image."""
    path = geotiff_dir / name
    full = read_image(path, bands=bands)
    with RasterioSource(path, bands=bands) as source:
        assert (source.height, source.width) == full.valid.shape
        h, w = full.valid.shape
        whole = TileBox(0, 0, h, w)
        box = TileBox(h // 3, w // 4, h // 3 + 100, w // 4 + 77)
        for window in (whole, box):
            rgb, valid = source.read(window)
            np.testing.assert_array_equal(rgb, full.rgb[window.slices])
            np.testing.assert_array_equal(valid, full.valid[window.slices])
        preview, preview_valid = source.preview(64)
        assert max(preview.shape[:2]) == 64 and preview_valid.shape == preview.shape[:2]
        assert source.georef is not None and source.georef.crs == full.crs


def _constant_model(monkeypatch: pytest.MonkeyPatch, model, value: float) -> list[int]:
    """Replace the encoders and decoder by cheap fakes: every pixel of every tile gets ``value``."""
    calls = [0]
    size = model.config.sam_image_size

    def encode_image(pixel_values: torch.Tensor) -> ImageFeatures:
        calls[0] += 1
        b = pixel_values.shape[0]
        return ImageFeatures(sam=torch.zeros(b, 64, 16, 16), clip=torch.zeros(b, 64, 8, 8))

    def decode(image, text, image_index=None) -> RSRefSegOutput:
        t = text.tokens.shape[0]
        return RSRefSegOutput(
            mask_logits=torch.full((t, 1, size, size), value),
            low_res_logits=torch.full((t, 1, 64, 64), value),
            iou_scores=torch.full((t, 1), 0.25),
            global_activation=torch.zeros(t, 1, 8, 8),
            local_activation=torch.zeros(t, 1, 8, 8),
        )

    monkeypatch.setattr(model, "encode_image", encode_image)
    monkeypatch.setattr(model, "decode", decode)
    return calls


def test_constant_logits_stitch_without_seams_on_landsat(geotiff_dir, predictor, monkeypatch):
    calls = _constant_model(monkeypatch, predictor.model, 2.5)
    with open_scene(geotiff_dir / LANDSAT) as source:
        result = predict_scene(predictor, source, ["the lake"], tile=1024, overlap=128, heatmap=True)
    assert isinstance(source, RasterioSource)
    assert result.tiles == len(tile_grid(4627, 2846, 1024, 128)) and 0 < result.skipped_tiles < result.tiles
    assert calls[0] == result.tiles - result.skipped_tiles  # one encode per non-empty tile
    with rasterio.open(geotiff_dir / LANDSAT) as ds:
        valid = ds.read_masks(1) > 0
    np.testing.assert_array_equal(result.valid, valid)
    for p in result.predictions:
        assert p.logits.shape == (4627, 2846)
        assert np.all(p.logits[valid] == np.float32(2.5))  # exactly constant: no seams
        assert set(np.unique(p.logits[~valid])) <= {np.float32(2.5), np.float32(EMPTY_TILE_LOGIT)}
        np.testing.assert_array_equal(p.mask, valid)  # nodata never in the mask
        assert p.score == pytest.approx(1 / (1 + np.exp(-2.5)))
        assert p.predicted_iou == pytest.approx(0.25)
        assert p.heatmap is not None and np.all(p.heatmap[valid] == np.float32(0.5))


@pytest.mark.parametrize("mode", ["stretch", "longest_side"])
def test_constant_logits_in_memory_scene(predictor, monkeypatch, mode):
    monkeypatch.setattr(predictor.model.config, "resize_mode", mode)
    predictor.resize_mode = mode
    _constant_model(monkeypatch, predictor.model, -1.25)
    rgb = np.random.default_rng(0).integers(0, 256, size=(300, 200, 3), dtype=np.uint8)
    valid = np.ones((300, 200), dtype=bool)
    valid[100:, 20:180] = False
    source = ArraySource(as_raster_image(rgb, None, valid))
    result = predict_scene(predictor, source, ["x"], tile=64, overlap=16, threshold=-2.0)
    assert isinstance(source, ArraySource) and result.skipped_tiles > 0
    logits = result.predictions[0].logits
    assert np.all(logits[valid] == np.float32(-1.25))
    np.testing.assert_array_equal(result.predictions[0].mask, valid)


def _count_calls(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> list[int]:
    """Wrap ``obj.name`` so that calls are counted in the returned one-element list."""
    calls, original = [0], getattr(obj, name)

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, counting)
    return calls


def test_single_tile_scene_equals_untiled_prediction(predictor, monkeypatch):
    rgb = np.random.default_rng(3).integers(0, 256, size=(150, 220, 3), dtype=np.uint8)
    predictor.set_image(rgb)
    untiled = predictor.predict(["a road", "the roof"], batch_size=1)
    text_calls = _count_calls(monkeypatch, predictor.model, "encode_text")
    tiled = predictor.predict_scene(rgb, ["a road", "the roof"], tile=512, batch_size=1)
    assert tiled.tiles == 1 and text_calls[0] == 2
    for a, b in zip(untiled, tiled.predictions):
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.score == pytest.approx(b.score)


def test_tiles_take_the_maximum_of_overlapping_windows(predictor):
    rgb = np.random.default_rng(5).integers(0, 256, size=(160, 250, 3), dtype=np.uint8)
    result = predictor.predict_scene(rgb, ["buildings"], tile=160, overlap=40)
    logits = result.predictions[0].logits
    boxes = tile_grid(160, 250, 160, 40)
    assert len(boxes) == 2 and boxes[0].x1 > boxes[1].x0  # two overlapping windows
    expected = np.full((160, 250), -np.inf, dtype=np.float32)
    for box in boxes:  # each window on its own, max-merged by hand
        predictor.set_image(rgb[box.slices])
        tile_logits = predictor.predict(["buildings"])[0].logits
        expected[box.slices] = np.maximum(expected[box.slices], tile_logits)
    # Equal up to float32 noise (the random tiny model amplifies last-bit differences of kernels).
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


class _CountingSource(ArraySource):
    """An in-memory scene that counts window reads."""

    reads = 0

    def read(self, box: TileBox) -> tuple[np.ndarray, np.ndarray]:
        self.reads += 1
        return super().read(box)


def _scene_with_nodata() -> _CountingSource:
    rgb = np.random.default_rng(7).integers(0, 256, size=(200, 260, 3), dtype=np.uint8)
    valid = np.ones((200, 260), dtype=bool)
    valid[:100, :130] = False  # the top-left window has no valid pixel
    return _CountingSource(as_raster_image(rgb, None, valid))


def test_tile_cache_decodes_new_expressions_without_reading_or_encoding(predictor, monkeypatch):
    source = _scene_with_nodata()
    uncached = predict_scene(predictor, source, ["the roof", "a road"], tile=100, overlap=0, heatmap=True)
    encodes = _count_calls(monkeypatch, predictor.model, "encode_image")
    cache, reads = TileCache(), source.reads
    first = predict_scene(predictor, source, ["the roof"], tile=100, overlap=0, heatmap=True, cache=cache)
    assert first.tiles == 6 and first.skipped_tiles == 1 and first.encoded_tiles == 5 and first.cached_tiles == 0
    assert encodes[0] == 5 and source.reads - reads == 6 and len(cache.tiles) == 6 and cache.tiles[TileBox(0, 0, 100, 100)] is None
    assert cache.nbytes == sum(e.nbytes for e in cache.tiles.values() if e is not None) > 0
    reads = source.reads
    second = predict_scene(predictor, source, ["the roof", "a road"], tile=100, overlap=0, heatmap=True, cache=cache)
    assert encodes[0] == 5 and source.reads == reads  # nothing read, nothing encoded
    assert second.encoded_tiles == 0 and second.cached_tiles == 5 and second.skipped_tiles == 1
    np.testing.assert_array_equal(second.valid, uncached.valid)
    for a, b in zip(uncached.predictions, second.predictions):
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.heatmap, b.heatmap)
        assert a.score == b.score and a.predicted_iou == b.predicted_iou
    predict_scene(predictor, source, ["the roof"], tile=120, overlap=0, cache=cache)  # another tiling: rebuilt
    assert encodes[0] == 5 + 6 and len(cache.tiles) == 6 and all(box.height == 120 for box in cache.tiles)


def test_tile_cache_budget_and_predictor_state(predictor):
    source = _scene_with_nodata()
    one = predictor.encode(np.zeros((100, 100, 3), dtype=np.uint8)).nbytes
    cache = TileCache(max_bytes=2 * one)
    first = predict_scene(predictor, source, ["x"], tile=100, overlap=0, cache=cache)
    assert first.encoded_tiles == 5 and cache.nbytes == 2 * one and len(cache.tiles) == 3  # 2 windows + the empty one
    second = predict_scene(predictor, source, ["x"], tile=100, overlap=0, cache=cache)
    assert second.cached_tiles == 2 and second.encoded_tiles == 3 and second.skipped_tiles == 1
    # predict_scene leaves the predictor's own image alone
    rgb = np.full((50, 60, 3), 9, dtype=np.uint8)
    predictor.set_image(rgb)
    before = predictor.features.sam.clone()
    predict_scene(predictor, source, ["x"], tile=100, overlap=0)
    assert predictor.is_image_set and predictor.image.rgb.shape == (50, 60, 3)
    assert torch.equal(predictor.features.sam, before)
    with pytest.raises(ValueError):
        TileCache(max_bytes=-1)


@pytest.mark.slow
def test_landsat_tiled_cli_bounded_memory(geotiff_dir, tiny_checkpoint, tmp_path, record_property):
    """The 2846 x 4627 Landsat scene through ``rsrefseg predict`` in its own process (clean peak RSS)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rsrefseg", "predict", str(geotiff_dir / LANDSAT), "--text", "the lake",
           "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--tile", "1024", "--overlap", "128",
           "--min-area", "2000", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    image = summary["images"][0]
    assert image["tiled"] and image["tiles"] == 24 and image["skipped_tiles"] > 0
    peak, base = summary["peak_rss_mb"], summary["rss_after_model_mb"]
    record_property("landsat_peak_rss_mb", peak)
    print(f"\nLandsat 2846x4627 tiled (tile 1024, overlap 128, {image['tiles']} tiles, "
          f"{image['skipped_tiles']} empty): peak RSS {peak:.0f} MiB, after model load {base:.0f} MiB, "
          f"scene work +{peak - base:.0f} MiB, {image['seconds']:.1f} s")
    assert peak - base < 400  # stitch buffer (53 MB) + validity + one tile + outputs, not the whole scene
    with rasterio.open(out / image["outputs"][0]["mask_tif"]) as mask_ds, rasterio.open(geotiff_dir / LANDSAT) as src:
        mask = mask_ds.read(1)
        nodata = src.read_masks(1) == 0
        assert mask_ds.crs == src.crs and mask_ds.transform == src.transform
    assert not mask[nodata].any()  # masks are 0 on nodata
    assert (mask == 255).sum() == image["outputs"][0]["mask_pixels"] > 0
