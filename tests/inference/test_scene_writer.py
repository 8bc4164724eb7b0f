"""The streamed outputs of a tiled scene equal the in-memory path: masks, scores, polygons."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rasterio

from rsrefseg.errors import DataError
from rsrefseg.inference.outputs import write_prediction_outputs
from rsrefseg.inference.scene import RasterioSource, predict_scene
from rsrefseg.inference.scene_writer import SceneOutputOptions, write_scene_outputs

TEXTS = ["the field", "a road"]
NAMES = ["01_the-field", "02_a-road"]


@pytest.mark.parametrize("budget", [1 << 30, 1])  # one pass for both expressions, or one pass each
def test_streamed_outputs_equal_the_in_memory_scene(predictor, make_geotiff, tmp_path, budget):
    path = make_geotiff(tmp_path / "scene.tif", height=100, width=170, bands=3, nodata_cols=30, seed=4)
    with RasterioSource(path) as source:
        # batch_size=1: one pass per expression decodes them one by one, bit-identical to this
        memory = predict_scene(predictor, source, TEXTS, tile=64, overlap=16, heatmap=True, batch_size=1)
        options = SceneOutputOptions(heatmap=True, probability=True, overlay_max_side=100, memory_budget=budget,
                                     batch_size=1)
        seen: list[int] = []
        batches: dict[int, int] = {}

        def polygons(k: int, text: str, score: float, batch: list) -> None:
            assert text == TEXTS[k]
            batches[k] = batches.get(k, 0) + len(batch)

        records, run = write_scene_outputs(predictor, source, TEXTS, NAMES, tmp_path / "out", options,
                                           tile=64, overlap=16, on_record=lambda k, r: seen.append(k),
                                           on_polygons=polygons)
    assert seen == [0, 1] and run.tiles == memory.tiles and run.skipped_tiles == memory.skipped_tiles
    expected = tmp_path / "expected"
    for name, prediction, record in zip(NAMES, memory.predictions, records, strict=True):
        # The stream sums each region's probabilities in float64, mask_score sums rows in float32
        # (pairwise) and those in float64: equal to ~1e-7 relative, not to the last bit.
        assert record["score"] == pytest.approx(prediction.score, rel=1e-7)
        assert record["mask_pixels"] == prediction.area_pixels > 0
        assert record["predicted_iou"] == pytest.approx(prediction.predicted_iou, rel=1e-9)
        with rasterio.open(tmp_path / "out" / record["mask_tif"]) as ds, rasterio.open(path) as src:
            assert ds.crs == src.crs and ds.transform == src.transform and ds.count == 2
            assert ds.descriptions == ("mask", "probability") and ds.tags()["expression"] == prediction.expression
            np.testing.assert_array_equal(ds.read(1), prediction.mask.astype(np.uint8) * 255)
            probability = np.round(255 / (1 + np.exp(-prediction.logits.astype(np.float64))))
            probability[~memory.valid] = 0
            assert np.abs(ds.read(2).astype(int) - probability).max() <= 1  # float32 vs float64 sigmoid
        png = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "out" / record["mask_png"]))
        np.testing.assert_array_equal(png > 0, prediction.mask)
        reference = write_prediction_outputs(expected, name, prediction, np.zeros((10, 10, 3), np.uint8), str(path),
                                             source.georef)
        assert record["polygons"] == reference["polygons"] == batches[records.index(record)] > 0
        assert record["area_m2"] == pytest.approx(reference["area_m2"], rel=1e-9)
        streamed = json.loads((tmp_path / "out" / record["geojson"]).read_text())
        assert streamed["crs"] == json.loads((expected / reference["geojson"]).read_text())["crs"]
        for key in ("overlay_png", "heatmap_png"):
            assert (tmp_path / "out" / record[key]).is_file()
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


def test_a_failing_write_leaves_no_temporary_file(predictor, make_geotiff, tmp_path, monkeypatch):
    path = make_geotiff(tmp_path / "scene.tif", height=100, width=120, bands=1, nodata_cols=0)
    from rsrefseg.inference import scene_writer

    calls = [0]
    real = scene_writer._ExpressionSink.add

    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(scene_writer._ExpressionSink, "add", failing)
    with RasterioSource(path) as source, pytest.raises(OSError, match="No space"):
        write_scene_outputs(predictor, source, ["x"], ["01_x"], tmp_path / "out", tile=48, overlap=8)
    assert os.listdir(tmp_path / "out") == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with RasterioSource(path) as source, pytest.raises((DataError, OSError)):
        write_scene_outputs(predictor, source, ["x"], ["01_x"], blocker / "out", tile=48, overlap=8)
