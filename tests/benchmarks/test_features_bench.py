"""``python -m rsrefseg.bench.features`` on the tiny preset: a complete report (structure and agreement, never speed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture()
def small_scene(tmp_path: Path) -> Path:
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS

    data = np.random.default_rng(0).integers(100, 3000, size=(3, 150, 200)).astype(np.int16)
    data[:, 30:90, 60:160] = 2900
    data[:, :, :20] = -9999
    path = tmp_path / "small.tif"
    with rasterio.open(path, "w", driver="GTiff", width=200, height=150, count=3, dtype="int16", nodata=-9999,
                       crs=CRS.from_epsg(32616), transform=Affine(2.0, 0.0, 0.0, 0.0, -2.0, 0.0)) as dst:
        dst.write(data)
    return path


@pytest.mark.slow
def test_bench_features_tiny(small_scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rsrefseg.bench.features import main

    out = tmp_path / "report.json"
    assert main(["--preset", "tiny", "--scene", str(small_scene), "--tile", "128", "--workdir",
                 str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["preset"] == "tiny" and (report["height"], report["width"]) == (150, 200)
    assert report["windows"] == 4 and report["encoded_windows"] == 4
    for key in ("encode_s", "features_s", "features_float16_s", "again_s", "speedup", "text_s"):
        assert report[key] > 0
    for key in ("encode_per_window_s", "decode_per_window_s"):  # differences of two timings, floored at 0:
        assert report[key] >= 0  # on tiny, encoding costs about as much as timing noise
    assert report["float32_equal"] is True and report["float32_differing_pixels"] == [0, 0, 0]
    assert report["float16_iou_min"] >= 0.99 and report["targets"]["float16_iou_met"] is True
    assert all(0 < f < 1 for f in report["mask_fraction"])  # sharpened: masks with structure
    assert 0 < report["mb_per_megapixel_float16"] < report["mb_per_megapixel_float32"]  # (+ the same preview)
    assert (tmp_path / "work" / "float16" / "index.json").is_file()
    table = capsys.readouterr().out
    assert "speedup (again / float32 files)" in table and "folder size per megapixel" in table
