"""Tests for rsrefseg.inference.cog: windowed Cloud Optimized GeoTIFF masks (layout checked by
parsing the TIFF structure), on the real shared GeoTIFF grids, and bounded memory on a huge raster."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from rsrefseg import paths
from rsrefseg.errors import DataError
from rsrefseg.inference.cog import COG_BLOCK, COGMaskWriter, probability_uint8
from rsrefseg.inference.geo import read_georeference, write_mask_geotiff

_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 7: 1, 11: 4, 12: 8, 16: 8, 17: 8}
_TYPE_CODES = {1: "B", 3: "H", 4: "I", 16: "Q"}


def _sample(name: str) -> Path:
    path = paths.geotiff_root() / name
    if not path.is_file():
        pytest.skip(f"shared GeoTIFF sample {path} not available (set $RSREFSEG_DATA)")
    return path


def tiff_ifds(path: Path) -> list[dict[str, Any]]:
    """Every IFD of a (Big)TIFF in file order: its offset, size and integer tags (as tuples)."""
    data = path.read_bytes()
    e = "<" if data[:2] == b"II" else ">"
    big = struct.unpack(e + "H", data[2:4])[0] == 43
    offset = struct.unpack(e + "Q", data[8:16])[0] if big else struct.unpack(e + "I", data[4:8])[0]
    count_fmt, entry, field = ("Q", 20, 8) if big else ("H", 12, 4)
    ifds = []
    while offset:
        n = struct.unpack_from(e + count_fmt, data, offset)[0]
        start = offset + (8 if big else 2)
        tags: dict[int, tuple[int, ...]] = {}
        for i in range(n):
            pos = start + i * entry
            tag, typ = struct.unpack_from(e + "HH", data, pos)
            count = struct.unpack_from(e + ("Q" if big else "I"), data, pos + 4)[0]
            if typ not in _TYPE_CODES:
                continue
            value_pos = pos + 4 + field
            if count * _TYPE_SIZES[typ] > field:
                value_pos = struct.unpack_from(e + ("Q" if big else "I"), data, value_pos)[0]
            tags[tag] = struct.unpack_from(f"{e}{count}{_TYPE_CODES[typ]}", data, value_pos)
        end = start + n * entry
        ifds.append({"offset": offset, "end": end + field, "tags": tags})
        offset = struct.unpack_from(e + ("Q" if big else "I"), data, end)[0]
    return ifds


def assert_cog_layout(path: Path) -> list[dict[str, Any]]:
    """The checks of a COG validator: tiled 512, DEFLATE + predictor, overviews down to one tile,
    GDAL's ghost header, every IFD before the tile data, smaller overviews' tiles first."""
    assert b"LAYOUT=IFDS_BEFORE_DATA" in path.read_bytes()[:400]
    with rasterio.open(path) as ds:
        assert ds.profile["tiled"] and ds.block_shapes[0] == (COG_BLOCK, COG_BLOCK)
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.compression.name.lower() == "deflate"
        assert ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "2"
        factors = ds.overviews(1)
        if max(ds.height, ds.width) > COG_BLOCK:
            assert factors and max(ds.height, ds.width) / factors[-1] <= COG_BLOCK
    ifds = tiff_ifds(path)
    assert len(ifds) == 1 + len(factors)
    data_start = min(o for ifd in ifds for o in ifd["tags"][324] if o)  # 324 = TileOffsets
    assert max(ifd["end"] for ifd in ifds) <= data_start  # IFDs before data
    widths = [ifd["tags"][256][0] for ifd in ifds]  # 256 = ImageWidth: full resolution first
    assert widths == sorted(widths, reverse=True)
    firsts = [min(o for o in ifd["tags"][324] if o) for ifd in ifds]
    assert firsts == sorted(firsts, reverse=True)  # smallest overview's tiles first
    return ifds


def _blobs(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth ``H x W`` logits: a few Gaussian blobs (compressible, like real masks)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)  # two H x W grids
    logits = np.full((height, width), -4.0, dtype=np.float32)
    for cy, cx, r in zip(rng.uniform(0, height, 6), rng.uniform(0, width, 6), rng.uniform(40, 200, 6)):
        logits = np.maximum(logits, 6.0 - ((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r) * 8.0)
    return logits


def test_strip_writes_give_a_valid_cog_with_probability(tmp_path: Path) -> None:
    georef = read_georeference(_sample("albers_3band_int16.tif"))
    assert georef is not None and georef.crs is not None and georef.crs.to_epsg() is None
    height, width = 1300, 1100  # not multiples of 512
    logits = _blobs(height, width)
    path = tmp_path / "m.mask.tif"
    tags = {"expression": "the lake ü", "score": "0.9"}
    with COGMaskWriter(path, height, width, georef.crs, georef.transform, probability=True, tags=tags) as cog:
        for y0 in range(0, height, COG_BLOCK):
            rows = slice(y0, y0 + COG_BLOCK)
            cog.write(y0, 0, logits[rows] > 0, probability_uint8(logits[rows]))
    assert [p.name for p in tmp_path.iterdir()] == ["m.mask.tif"]  # no temporaries, no .aux.xml
    assert_cog_layout(path)
    with rasterio.open(path) as ds:
        assert ds.count == 2 and ds.dtypes == ("uint8", "uint8") and ds.nodata is None
        assert ds.descriptions == ("mask", "probability")
        assert ds.crs == georef.crs and ds.transform == georef.transform
        assert ds.tags()["expression"] == "the lake ü" and ds.tags()["mask_foreground"] == "255"
        mask, prob = ds.read()
        assert np.array_equal(mask, np.where(logits > 0, 255, 0))
        assert np.array_equal(prob, probability_uint8(logits))
        overview = ds.read(1, out_shape=(height // 4, width // 4))
        assert set(np.unique(overview)) <= {0, 255}  # nearest: the overviews stay binary


def test_matches_the_plain_geotiff_writer_on_a_real_image(tmp_path: Path) -> None:
    source = _sample("spacenet_pan_uint16.tif")
    georef = read_georeference(source)
    assert georef is not None
    with rasterio.open(source) as ds:
        mask = ds.read(1) > np.percentile(ds.read(1), 70)  # bright roofs and roads, 900 x 900
    write_mask_geotiff(tmp_path / "plain.tif", mask, georef)
    with COGMaskWriter(tmp_path / "cog.tif", *georef.shape, georef.crs, georef.transform) as cog:
        # Unaligned, overlapping windows in scrambled order.
        for y0, x0, h, w in [(500, 300, 400, 600), (0, 0, 700, 700), (600, 0, 300, 900), (0, 650, 900, 250)]:
            cog.write(y0, x0, mask[y0 : y0 + h, x0 : x0 + w])
    assert_cog_layout(tmp_path / "cog.tif")
    with rasterio.open(tmp_path / "plain.tif") as a, rasterio.open(tmp_path / "cog.tif") as b:
        assert np.array_equal(a.read(), b.read())
        assert a.crs == b.crs == CRS.from_epsg(32616) and a.transform == b.transform


def test_unwritten_regions_are_background_and_small_rasters_need_no_overview(tmp_path: Path) -> None:
    path = tmp_path / "s.tif"
    with COGMaskWriter(path, 300, 200, None, Affine.identity()) as cog:
        cog.write(10, 20, np.ones((5, 7), dtype=bool))
    with rasterio.open(path) as ds:
        data = ds.read(1)
        assert ds.overviews(1) == [] and ds.crs is None
    expected = np.zeros((300, 200), dtype=np.uint8)
    expected[10:15, 20:27] = 255
    assert np.array_equal(data, expected)
    assert_cog_layout(path)


def test_error_inside_the_block_keeps_the_old_file_and_leaves_no_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "keep.tif"
    path.write_bytes(b"previous result")
    with pytest.raises(RuntimeError, match="boom"):
        with COGMaskWriter(path, 600, 600, CRS.from_epsg(32616), Affine(1, 0, 0, 0, -1, 0)) as cog:
            cog.write(0, 0, np.ones((512, 600), dtype=bool))
            raise RuntimeError("boom")
    assert path.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.tif"]
    assert cog.closed


def test_bad_windows_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        COGMaskWriter(tmp_path / "z.tif", 0, 10, None, Affine.identity())
    cog = COGMaskWriter(tmp_path / "a.tif", 100, 100, None, Affine.identity(), probability=True)
    ok = np.zeros((10, 10), dtype=bool)
    prob = np.zeros((10, 10), dtype=np.uint8)
    with pytest.raises(ValueError, match="outside"):
        cog.write(95, 0, ok, prob)
    with pytest.raises(ValueError, match="outside"):
        cog.write(-1, 0, ok, prob)
    with pytest.raises(ValueError, match="bool/integer"):
        cog.write(0, 0, ok.astype(np.float32), prob)
    with pytest.raises(ValueError, match="exactly when"):
        cog.write(0, 0, ok)
    with pytest.raises(ValueError, match="probability must be uint8"):
        cog.write(0, 0, ok, prob.astype(np.float32))
    cog.abort()
    with pytest.raises(ValueError, match="closed"):
        cog.write(0, 0, ok, prob)
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="cannot write GeoTIFF"):
        COGMaskWriter(blocker / "m.tif", 10, 10, None, Affine.identity())


def test_probability_uint8_rounding_and_extremes() -> None:
    logits = np.array([[-1e9, -3.0, 0.0], [3.0, 1e9, np.nan]], dtype=np.float32)
    expected = [[0, round(255 / (1 + np.exp(3))), 128], [round(255 / (1 + np.exp(-3))), 255, 0]]
    assert probability_uint8(logits).tolist() == expected


_HUGE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from affine import Affine
    from rasterio.crs import CRS
    from rsrefseg.inference.cog import COGMaskWriter

    def peak_rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    size, path = int(sys.argv[1]), sys.argv[2]
    strip = np.zeros((512, size), dtype=bool)
    strip[:, :1000] = True  # a 1000-pixel-wide band of foreground down the left edge
    base = peak_rss_mb()
    with COGMaskWriter(path, size, size, CRS.from_epsg(32616), Affine(0.5, 0, 0, 0, -0.5, 0)) as cog:
        for y0 in range(0, size, 512):
            cog.write(y0, 0, strip[: min(512, size - y0)])
    print(json.dumps({"base_mb": base, "peak_mb": peak_rss_mb()}))
    """
)


@pytest.mark.slow
def test_huge_raster_is_written_with_bounded_memory(tmp_path: Path) -> None:
    size = 20000  # 400 MP: 400 MB as one uint8 array, 800 MB with the bool mask
    path = tmp_path / "huge.tif"
    result = subprocess.run([sys.executable, "-c", _HUGE_SCRIPT, str(size), str(path)],
                            capture_output=True, text=True, timeout=600, check=True)
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    assert memory["peak_mb"] - memory["base_mb"] < 200, memory  # one 10 MB strip + 64 MB cache + GDAL
    ifds = assert_cog_layout(path)
    assert ifds[0]["tags"][256][0] == size and len(ifds) >= 6  # overviews down to < 512 px
    with rasterio.open(path) as ds:
        window = ds.read(1, window=rasterio.windows.Window(900, 19000, 200, 1000))
        assert (window[:, :100] == 255).all() and (window[:, 100:] == 0).all()
        overview = ds.read(1, out_shape=(size // 64, size // 64))
        assert overview[:, : 1000 // 64].min() == 255 and overview[:, 1000 // 64 + 1 :].max() == 0
