"""Memory of ``rsrefseg predict`` does not grow with the number of expressions or the scene size.

Each run is a fresh process, so its ``summary.json`` ``peak_rss_mb`` (VmHWM) is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window


def _predict(*argv: str) -> dict:
    out = Path(argv[argv.index("--out") + 1])
    done = subprocess.run([sys.executable, "-m", "rsrefseg", "predict", *argv, "--quiet"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_expressions(make_geotiff, tiny_checkpoint, tmp_path):
    """8 vs 64 expressions on a 1024 x 1024 GeoTIFF (not tiled), 8 decoded at a time.

    Keeping every expression's 1024 x 1024 float32 logits and bool mask until the end (as before)
    costs 5 MiB per expression: 56 more expressions = +280 MiB. Writing each as soon as it is
    decoded keeps one batch (8 x 4 MiB) whatever the count; the bound (48 MiB) leaves room for
    allocator noise and the summary, and is far below the 280 MiB."""
    image = make_geotiff(tmp_path / "medium.tif", height=1024, width=1024, bands=3, nodata_cols=0)
    peaks = {}
    for count in (8, 64):
        texts = tmp_path / f"texts{count}.txt"
        texts.write_text("".join(f"object number {i} next to the road\n" for i in range(count)))
        summary = _predict(str(image), "--texts-file", str(texts), "--checkpoint", str(tiny_checkpoint),
                           "--out", str(tmp_path / f"out{count}"), "--batch-size", "8", "--vector-format", "gpkg")
        assert summary["outputs"] == count
        peaks[count] = summary["peak_rss_mb"] - summary["rss_after_model_mb"]
    print(f"\npeak RSS above the loaded model: 8 expressions {peaks[8]:.0f} MiB, 64 expressions {peaks[64]:.0f} MiB")
    assert peaks[64] - peaks[8] < 48


def sparse_scene(path: Path, height: int, width: int, valid: tuple[slice, slice]) -> Path:
    """A uint8 GeoTIFF that is nodata (0) everywhere but in ``valid`` (never-written blocks are nodata,
    so the file stays small whatever its size)."""
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": "uint8", "nodata": 0,
               "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate", "sparse_ok": True,
               "bigtiff": "IF_SAFER", "crs": CRS.from_epsg(32616),
               "transform": Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)}
    rows, cols = valid
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        block = rng.integers(1, 256, size=(rows.stop - rows.start, cols.stop - cols.start), dtype=np.uint8)
        dst.write(block, 1, window=Window(cols.start, rows.start, block.shape[1], block.shape[0]))
    return path


@pytest.mark.slow
def test_large_scene_is_streamed_in_bounded_memory(tiny_checkpoint, tmp_path):
    """A 2500 x 40000 scene (100 Mpx) with heatmaps. Held in memory, its logits and heat logits
    would take 800 MB and its validity and mask 200 MB more, on top of the ~200 MB that inference
    itself adds to the loaded model (activations, thread pools: see the test above). Streamed, the
    run stays within that inference overhead plus a few windows, the frontier strip (128 x 2500)
    and GDAL's capped block caches: the bound (400 MiB) is less than half of the in-memory cost."""
    height, width = 2500, 40000
    scene = sparse_scene(tmp_path / "wide.tif", height, width, (slice(0, 2500), slice(1000, 3500)))
    out = tmp_path / "out"
    summary = _predict(str(scene), "--text", "the field", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                       "--tile", "1024", "--overlap", "128", "--heatmaps", "--probability")
    image = summary["images"][0]
    extra = summary["peak_rss_mb"] - summary["rss_after_model_mb"]
    print(f"\n{height} x {width} scene streamed: {image['tiles']} windows ({image['skipped_tiles']} empty), "
          f"peak RSS {summary['peak_rss_mb']:.0f} MiB, {extra:.0f} MiB above the loaded model")
    assert image["tiled"] and image["skipped_tiles"] > image["tiles"] * 0.8
    assert extra < 400
    record = image["outputs"][0]
    assert "mask_png" not in record  # above MASK_PNG_MAX_PIXELS: the GeoTIFF is the mask
    with rasterio.open(out / record["mask_tif"]) as ds:
        assert (ds.height, ds.width, ds.count) == (height, width, 2) and ds.overviews(1)
        assert ds.read(1, window=Window(0, 0, 1000, 2500)).max() == 0  # nodata: never in the mask
        inside = ds.read(1, window=Window(1000, 0, 2500, 2500))
    assert (inside == 255).sum() == record["mask_pixels"] > 0
    for key in ("overlay_png", "heatmap_png"):
        with rasterio.open(out / record[key]) as png:
            assert max(png.width, png.height) <= 2048 + 64  # a preview, never the full scene
