"""``rsrefseg predict`` GIS outputs: vector files of the shared GeoTIFFs, COG masks, merge, STAC inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.crs import CRS

from rsrefseg.cli.main import main

SAMPLES = ["spacenet_pan_uint16.tif", "albers_3band_int16.tif", "multispectral_4band_float64.tif",
           "landsat_large_nodata_wgs84.tif"]
TEXTS = ["the buildings", "the river"]


@pytest.fixture(scope="module")
def geotiff_dir() -> Path:
    from rsrefseg import paths

    folder = paths.geotiff_root()
    if not folder.is_dir():
        pytest.skip(f"shared GeoTIFF samples not available at {folder} (set $RSREFSEG_DATA)")
    return folder


def _predict(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["predict", *argv, "--quiet"])
    return code, capsys.readouterr().err


def _read_layer(path: Path) -> tuple[CRS, list, dict]:
    """CRS, shapely geometries and fields of the one layer of a vector file (read back with pyogrio)."""
    meta, _fids, geometry, fields = pyogrio.raw.read(path)
    geoms = list(shapely.from_wkb(geometry))
    return CRS.from_user_input(meta["crs"]), geoms, dict(zip(meta["fields"], fields, strict=True))


@pytest.mark.parametrize("fmt", ["gpkg", "fgb", "shp"])
def test_vector_file_of_each_shared_geotiff(geotiff_dir, tiny_checkpoint, tmp_path, capsys, fmt):
    """CRS equal to the source (the Albers sample has no EPSG code), polygon count and total area
    equal to the per-expression GeoJSONs, read back with pyogrio."""
    out = tmp_path / fmt
    # the Landsat scene (13 Mpx) is tiled and streamed: its vector file comes from the seam-merged polygons
    code, err = _predict(capsys, *(str(geotiff_dir / n) for n in SAMPLES), *[a for t in TEXTS for a in ("--text", t)],
                         "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--vector-format", fmt,
                         "--tile", "1024", "--overlap", "128", "--min-area", "1e-12")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(i["source"]).name for i in summary["images"]] == SAMPLES
    assert [i["tiled"] for i in summary["images"]] == [False, False, False, True]
    for image in summary["images"]:
        stem = Path(image["source"]).stem
        assert image["vector"] == f"{stem}/{stem}.{fmt}" and image["vector_format"] == fmt
        crs, geoms, fields = _read_layer(out / image["vector"])
        with rasterio.open(image["source"]) as src:
            assert crs == src.crs
        expected = []
        for record in image["outputs"]:
            collection = json.loads((out / record["geojson"]).read_text())
            assert len(collection["features"]) == record["polygons"]
            expected += [shapely.geometry.shape(f["geometry"]) for f in collection["features"]]
        assert len(geoms) == len(expected) == sum(r["polygons"] for r in image["outputs"]) > 0
        assert sum(g.area for g in geoms) == pytest.approx(sum(g.area for g in expected), rel=1e-9)
        assert sorted(set(fields["expr_index"].tolist())) == [1, 2]
        assert set(fields["expression"].tolist()) == set(TEXTS)
        assert set(fields["source"].tolist()) == {image["source"]}
        area_m2 = fields["area_m2"].astype(float)
        assert np.isfinite(area_m2).all() and area_m2.sum() == pytest.approx(
            sum(r["area_m2"] for r in image["outputs"]), rel=1e-6)
        perimeter = fields["perim_m" if fmt == "shp" else "perimeter_m"].astype(float)
        assert (perimeter > 0).all()


def test_cog_masks_probability_and_merge(geotiff_dir, tiny_checkpoint, tmp_path, capsys):
    out, merged = tmp_path / "out", tmp_path / "all.gpkg"
    inputs = [geotiff_dir / "spacenet_pan_uint16.tif", geotiff_dir / "albers_3band_int16.tif"]
    code, err = _predict(capsys, *map(str, inputs), "--text", TEXTS[0], "--checkpoint", str(tiny_checkpoint),
                         "--out", str(out), "--probability", "--merge", str(merged), "--merge-crs", "EPSG:4326",
                         "--min-area", "10")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    for image in summary["images"]:
        record = image["outputs"][0]
        with rasterio.open(out / record["mask_tif"]) as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and ds.count == 2
            assert ds.descriptions == ("mask", "probability")
            mask, probability = ds.read(1), ds.read(2)
        assert ((mask == 255) == (probability > 127)).mean() > 0.999  # threshold 0 = probability 0.5
        _crs, geoms, _fields = _read_layer(out / image["vector"])
        assert min(g.area for g in geoms) >= 10  # --min-area in CRS units squared (m2 here)
    crs, geoms, fields = _read_layer(merged)
    assert crs == CRS.from_epsg(4326) and summary["merge"]["features"] == len(geoms)
    assert len(geoms) == sum(i["outputs"][0]["polygons"] for i in summary["images"])
    assert set(fields["source"].tolist()) == {str(p) for p in inputs}
    lon, lat = shapely.get_coordinates(geoms).T
    assert (np.abs(lon) <= 180).all() and (np.abs(lat) <= 90).all()


def test_stac_item_collection_and_path_lists(make_geotiff, tiny_checkpoint, tmp_path, capsys):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for name in ("a", "b"):
        make_geotiff(scenes / f"{name}.tif", height=48, width=64, nodata_cols=0)
    stac = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "stac_version": "1.0.0", "id": f"item-{name}", "geometry": None, "properties": {},
         "links": [], "assets": {"visual": {"href": f"scenes/{name}.tif", "type": "image/tiff"},
                                 "thumbnail": {"href": "thumb.png", "type": "image/png"}}}
        for name in ("a", "b")]}
    (tmp_path / "items.json").write_text(json.dumps(stac))
    out = tmp_path / "out"
    code, err = _predict(capsys, str(tmp_path / "items.json"), "--stac-asset", "visual", "--text", "x",
                         "--checkpoint", str(tiny_checkpoint), "--out", str(out))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert [i["stac_item"] for i in summary["images"]] == ["item-a", "item-b"]
    assert [i["dir"] for i in summary["images"]] == ["item-a", "item-b"]
    code, err = _predict(capsys, str(tmp_path / "items.json"), "--stac-asset", "nir", "--text", "x",
                         "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "never"))
    assert code == 2 and "nir" in err and "visual" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()
    listing = tmp_path / "list.txt"
    listing.write_text("# two scenes\nscenes/a.tif\n\nscenes/b.tif\n")
    code, err = _predict(capsys, "--inputs-file", str(listing), f"@{listing}", "--text", "x",
                         "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "listed"))
    assert code == 0, err
    summary = json.loads((tmp_path / "listed" / "summary.json").read_text())
    assert [i["dir"] for i in summary["images"]] == ["a", "b"]  # each scene once
