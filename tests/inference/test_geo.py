"""Tests for rsrefseg.inference.geo: GeoTIFF/GeoJSON outputs on real GeoTIFF samples."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from shapely.geometry import box, shape

from rsrefseg import paths
from rsrefseg.errors import DataError
from rsrefseg.inference import geo
from rsrefseg.inference.geo import (
    GeoReference,
    area_m2,
    mask_to_polygons,
    polygons_to_feature_collection,
    rasterize_polygons,
    read_georeference,
    write_geojson,
    write_mask_geotiff,
)

UTM16 = CRS.from_epsg(32616)
HALF_METRE = Affine(0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0)  # SpaceNet-like grid


def _sample(name: str) -> Path:
    """A file of the shared GeoTIFF samples, or skip the test when the data is absent."""
    path = paths.geotiff_root() / name
    if not path.is_file():
        pytest.skip(f"shared GeoTIFF sample {path} not available (set $RSREFSEG_DATA)")
    return path


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _read_geojson(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _disk(size: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]  # two size x size coordinate grids
    return (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius**2


@pytest.mark.parametrize(
    ("image", "labels"),
    [
        ("spacenet_pan_uint16.tif", "spacenet_pan_uint16_buildings.geojson"),
        ("albers_3band_int16.tif", "albers_3band_int16_labels.geojson"),  # custom CRS, no EPSG code
        ("landsat_large_nodata_wgs84.tif", "landsat_large_nodata_wgs84_labels.geojson"),  # EPSG:4326
    ],
)
def test_real_scene_round_trip(tmp_path: Path, image: str, labels: str):
    src_path, labels_path = _sample(image), _sample(labels)
    georef = read_georeference(src_path)
    assert georef is not None
    with rasterio.open(src_path) as src:
        src_crs, src_transform, src_shape = src.crs, src.transform, (src.height, src.width)
    assert georef.shape == src_shape
    geoms = [shape(f["geometry"]) for f in _read_geojson(labels_path)["features"]]
    mask = rasterize_polygons(geoms, georef.shape, georef.transform)
    assert mask.dtype == np.bool_ and mask.shape == src_shape and mask.sum() > 100

    tif, gj = tmp_path / "mask.tif", tmp_path / "mask.geojson"
    write_mask_geotiff(tif, mask, georef, tags={"expression": "the buildings"})
    with rasterio.open(tif) as out:
        assert out.crs == src_crs and out.crs.to_wkt() == src_crs.to_wkt()
        assert out.transform == src_transform  # exact, not almost-equal
        assert (out.count, out.dtypes[0], out.nodata) == (1, "uint8", None)
        assert out.profile["compress"] == "deflate" and out.profile["tiled"]
        assert out.tags()["expression"] == "the buildings"
        assert np.array_equal(out.read(1), mask.astype(np.uint8) * 255)

    polygons = mask_to_polygons(mask, georef.transform)
    assert all(p.is_valid for p in polygons)
    props = {"expression": "the buildings", "score": np.float32(0.75), "source": src_path}
    write_geojson(gj, polygons_to_feature_collection(polygons, georef.crs, props))
    assert sorted(os.listdir(tmp_path)) == ["mask.geojson", "mask.tif"]  # no temp files, no sidecars

    written = _read_geojson(gj)
    crs_name = written["crs"]["properties"]["name"]
    if crs_name == "urn:ogc:def:crs:OGC:1.3:CRS84":  # EPSG:4326 with lon/lat axis order
        assert src_crs.to_epsg() == 4326
    else:
        assert CRS.from_user_input(crs_name) == src_crs
    assert CRS.from_wkt(written["crs_wkt"]) == src_crs
    first = written["features"][0]["properties"]
    assert first["expression"] == "the buildings" and first["source"] == str(src_path)
    assert first["score"] == pytest.approx(0.75) and first["area_m2"] > 0
    back = rasterize_polygons(
        [shape(f["geometry"]) for f in written["features"]], georef.shape, georef.transform
    )
    assert _iou(back, mask) >= 0.99
    assert np.array_equal(back, mask)  # exact without simplification


def test_custom_crs_is_named_by_wkt_and_epsg_crs_by_urn():
    spacenet = read_georeference(_sample("spacenet_pan_uint16.tif"))
    albers = read_georeference(_sample("albers_3band_int16.tif"))
    landsat = read_georeference(_sample("landsat_large_nodata_wgs84.tif"))
    assert spacenet is not None and albers is not None and landsat is not None
    assert geo.geojson_crs_member(spacenet.crs)["properties"]["name"] == "urn:ogc:def:crs:EPSG::32616"
    assert geo.geojson_crs_member(landsat.crs)["properties"]["name"] == "urn:ogc:def:crs:OGC:1.3:CRS84"
    albers_name = geo.geojson_crs_member(albers.crs)["properties"]["name"]
    assert albers_name.startswith("PROJCS[") and "Albers" in albers_name
    assert polygons_to_feature_collection([], None).keys() == {"type", "features"}


def test_geographic_area_matches_label_hectares():
    """The Landsat labels carry HECTARES computed independently; EPSG:4326 areas agree within 0.5 %."""
    georef = read_georeference(_sample("landsat_large_nodata_wgs84.tif"))
    assert georef is not None and georef.crs.is_geographic
    features = _read_geojson(_sample("landsat_large_nodata_wgs84_labels.geojson"))["features"]
    for feature in features:
        expected = feature["properties"]["HECTARES"] * 1e4
        assert area_m2(shape(feature["geometry"]), georef.crs) == pytest.approx(expected, rel=5e-3)


def test_geographic_area_matches_closed_form_ellipsoid():
    a, f = 6378137.0, 1 / 298.257223563  # WGS84
    b, e = a * (1 - f), math.sqrt(f * (2 - f))

    def zone(lat: float) -> float:  # area from the equator to `lat`, per radian of longitude
        s = math.sin(math.radians(lat))
        return b * b / 2 * (s / (1 - e * e * s * s) + math.log((1 + e * s) / (1 - e * s)) / (2 * e))

    for lat0, lat1 in [(0.0, 1.0), (45.0, 46.0), (-30.0, -20.0)]:
        expected = math.radians(1.0) * (zone(lat1) - zone(lat0))
        got = area_m2(box(10.0, lat0, 11.0, lat1), CRS.from_epsg(4326))
        assert got == pytest.approx(expected, rel=1e-6)


def test_projected_area_and_units():
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:15, 20:30] = True  # 10 x 10 pixels at 0.5 m = 25 m²
    (square,) = mask_to_polygons(mask, HALF_METRE)
    assert square.area == pytest.approx(25.0)
    assert area_m2(square, UTM16) == pytest.approx(25.0)
    feet = box(0, 0, 10, 10)  # 100 US survey ft² in EPSG:2263
    assert area_m2(feet, CRS.from_epsg(2263)) == pytest.approx(100 * 0.3048006096**2)
    assert area_m2(square, None) is None
    fc = polygons_to_feature_collection([square], UTM16, {"expression": "x"})
    assert fc["features"][0]["properties"]["area_m2"] == pytest.approx(25.0)
    assert fc["features"][0]["properties"]["area_crs_units"] == pytest.approx(25.0)


def test_holes_are_kept():
    ring = _disk(60, 25) & ~_disk(60, 10)
    polygons = mask_to_polygons(ring, HALF_METRE)
    assert len(polygons) == 1 and len(polygons[0].interiors) == 1
    assert np.array_equal(rasterize_polygons(polygons, ring.shape, HALF_METRE), ring)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_random_masks_round_trip_exactly(connectivity: int):
    rng = np.random.default_rng(0)
    for _ in range(8):
        mask = rng.random((37, 53)) < 0.45  # speckle: holes, corner contacts, single pixels
        polygons = mask_to_polygons(mask, HALF_METRE, connectivity=connectivity)
        assert all(p.is_valid for p in polygons)
        assert np.array_equal(rasterize_polygons(polygons, mask.shape, HALF_METRE), mask)


def test_min_area_drops_small_blobs():
    mask = np.zeros((50, 50), dtype=bool)
    mask[5:25, 5:25] = True  # 400 px = 100 m²
    mask[40:42, 40:43] = True  # 6 px = 1.5 m²
    assert len(mask_to_polygons(mask, HALF_METRE)) == 2
    kept = mask_to_polygons(mask, HALF_METRE, min_area=2.0)
    assert [p.area for p in kept] == [pytest.approx(100.0)]


def test_simplification_reduces_vertices_and_keeps_shape():
    disk = _disk(200, 70)
    exact = mask_to_polygons(disk, HALF_METRE)
    simple = mask_to_polygons(disk, HALF_METRE, simplify_tolerance=0.5)  # one pixel
    assert len(exact) == len(simple) == 1 and simple[0].is_valid
    assert len(simple[0].exterior.coords) < len(exact[0].exterior.coords) / 4
    assert _iou(rasterize_polygons(simple, disk.shape, HALF_METRE), disk) >= 0.98


def test_empty_inputs():
    assert mask_to_polygons(np.zeros((8, 8), dtype=np.uint8), HALF_METRE) == []
    assert not rasterize_polygons([], (8, 8), HALF_METRE).any()


def test_bad_masks_are_rejected(tmp_path: Path):
    georef = GeoReference(UTM16, HALF_METRE, width=8, height=6)
    with pytest.raises(ValueError, match="does not match"):
        write_mask_geotiff(tmp_path / "m.tif", np.zeros((8, 6), bool), georef)
    with pytest.raises(TypeError):
        mask_to_polygons(np.zeros((6, 8), np.float32), HALF_METRE)
    with pytest.raises(ValueError):
        mask_to_polygons(np.zeros((1, 6, 8), bool), HALF_METRE)


def test_plain_images_have_no_georeference(tmp_path: Path):
    png = tmp_path / "plain.png"
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(png)
    assert read_georeference(png) is None
    jpg = paths.formats_root() / "dior_00001.jpg"
    if jpg.is_file():
        assert read_georeference(jpg) is None
    # a plain mask can still be written as a (non-geographic) TIFF
    write_mask_geotiff(tmp_path / "plain.tif", np.ones((16, 24), bool), None)
    with rasterio.open(tmp_path / "plain.tif") as out:
        assert out.crs is None and out.read(1).min() == 255


def test_unreadable_inputs_raise_one_line_data_error(tmp_path: Path):
    with pytest.raises(DataError, match=r"missing.tif") as missing:
        read_georeference(tmp_path / "missing.tif")
    notraster = tmp_path / "notes.tif"
    notraster.write_text("not a raster\n")
    with pytest.raises(DataError, match=r"notes.tif") as bad:
        read_georeference(notraster)
    for err in (missing, bad):
        assert "\n" not in str(err.value)


def test_unwritable_output_raises_data_error(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    georef = GeoReference(UTM16, HALF_METRE, width=8, height=6)
    with pytest.raises(DataError, match=r"mask.tif"):
        write_mask_geotiff(blocker / "mask.tif", np.zeros((6, 8), bool), georef)
    with pytest.raises(DataError, match=r"out.geojson"):
        write_geojson(blocker / "out.geojson", polygons_to_feature_collection([], UTM16))


def test_failed_geotiff_write_leaves_previous_file_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "mask.tif"
    georef = GeoReference(UTM16, HALF_METRE, width=8, height=6)
    write_mask_geotiff(target, np.ones((6, 8), bool), georef)
    before = target.read_bytes()
    real_open = rasterio.open

    def failing_open(path: Any, mode: str = "r", **kwargs: Any) -> Any:
        if mode == "w":  # write part of the file, then fail like a full disk would
            with real_open(path, mode, **kwargs) as dst:
                dst.write(np.zeros((1, 6, 8), np.uint8))
            raise OSError("No space left on device")
        return real_open(path, mode, **kwargs)

    monkeypatch.setattr(geo.rasterio, "open", failing_open)
    with pytest.raises(DataError, match=r"mask.tif"):
        write_mask_geotiff(target, np.zeros((6, 8), bool), georef)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["mask.tif"]


def test_failed_geojson_write_leaves_previous_file_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "out.geojson"
    target.write_text('{"old": true}\n')

    def failing_replace(src: Any, dst: Any) -> None:
        raise RuntimeError("crash before the rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    fc = polygons_to_feature_collection([box(0, 0, 1, 1)], UTM16, {"expression": "x"})
    with pytest.raises(RuntimeError):
        write_geojson(target, fc)
    monkeypatch.undo()
    assert target.read_text() == '{"old": true}\n'
    assert os.listdir(tmp_path) == ["out.geojson"]
