"""Tests for rsrefseg.inference.vectors / vector_io: GeoPackage, FlatGeobuf, Shapefile and GeoJSON
outputs of the real shared GeoTIFF samples' polygons, polygon options, limits and merging."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
import shapely
from rasterio.crs import CRS
from shapely.geometry import MultiPolygon, Point, Polygon, box, shape

from rsrefseg import paths
from rsrefseg.errors import ConfigError, DataError
from rsrefseg.inference import vector_io
from rsrefseg.inference.geo import area_m2
from rsrefseg.inference.vectors import (
    FIELDS,
    LAYER,
    VECTOR_FORMATS,
    VectorFeature,
    clean_polygon,
    features_from_polygons,
    merge_vectors,
    perimeter_m,
    vector_files,
    vector_format,
    vector_path,
    write_vectors,
)

SAMPLES = [
    ("albers_3band_int16.tif", "albers_3band_int16_labels.geojson"),
    ("landsat_large_nodata_wgs84.tif", "landsat_large_nodata_wgs84_labels.geojson"),
    ("spacenet_pan_uint16.tif", "spacenet_pan_uint16_buildings.geojson"),
]
FORMATS = sorted(VECTOR_FORMATS)
UTM16 = CRS.from_epsg(32616)


def _sample(name: str) -> Path:
    """A file of the shared GeoTIFF samples, or skip the test when the data is absent."""
    path = paths.geotiff_root() / name
    if not path.is_file():
        pytest.skip(f"shared GeoTIFF sample {path} not available (set $RSREFSEG_DATA)")
    return path


def _load(image: str, labels: str) -> tuple[CRS, list[Any]]:
    """The sample image's CRS and its label polygons (shapely), in that CRS."""
    with rasterio.open(_sample(image)) as ds:
        crs = ds.crs
    collection = json.loads(_sample(labels).read_text(encoding="utf-8"))
    return crs, [shape(f["geometry"]) for f in collection["features"]]


def _read(path: Path) -> tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]:
    """(info, shapely geometries, field name -> values) of the only layer of ``path``."""
    info = pyogrio.read_info(path)
    meta, _fids, wkb, data = pyogrio.raw.read(path)
    return info, shapely.from_wkb(wkb), dict(zip(meta["fields"], data))


def _same_geometries(stored: np.ndarray, expected: list[Any], fmt: str) -> bool:
    """Exact equality, in order (FlatGeobuf's spatial index stores features in Hilbert order; a
    Shapefile does not tell a one-part MultiPolygon from a Polygon)."""

    def key(geom: Any) -> bytes:
        if fmt == "shp" and isinstance(geom, MultiPolygon) and len(geom.geoms) == 1:
            geom = geom.geoms[0]
        return shapely.to_wkb(shapely.force_2d(geom))

    a = [key(g) for g in stored]
    b = [key(g) for g in expected]
    return sorted(a) == sorted(b) if fmt == "fgb" else a == b


def _folder_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(("image", "labels"), SAMPLES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_of_shared_samples(tmp_path: Path, image: str, labels: str, fmt: str) -> None:
    crs, polygons = _load(image, labels)
    features = features_from_polygons(polygons, 2, "the largest field ü", 0.75, image)
    path = vector_path(tmp_path, "scene", fmt)
    assert write_vectors(path, features, crs) == len(polygons)

    info, geoms, fields = _read(path)
    assert CRS.from_user_input(info["crs"]) == crs
    assert info["features"] in (len(polygons), -1)  # FlatGeobuf may not report a count
    assert len(geoms) == len(polygons)
    assert info["layer_name"] == ("scene" if fmt == "shp" else LAYER)
    perimeter_field = "perim_m" if fmt == "shp" else "perimeter_m"
    expected_names = [perimeter_field if n == "perimeter_m" else n for n in FIELDS]
    assert list(info["fields"]) == expected_names
    assert list(info["dtypes"]) == ["int32", "object", "float64", "float64", "float64", "object"]
    # Geometry is stored exactly (no reprojection, no axis swap, full precision).
    assert math.isclose(shapely.area(geoms).sum(), sum(p.area for p in polygons), rel_tol=1e-12)
    assert shapely.total_bounds(geoms) == pytest.approx(shapely.total_bounds(np.array(polygons)), abs=1e-9)
    assert _same_geometries(geoms, polygons, fmt)
    assert set(fields["expr_index"]) == {2}
    assert set(fields["expression"]) == {"the largest field ü"}
    assert set(fields["source"]) == {image}
    assert np.allclose(fields["score"], 0.75)
    by_geometry = {shapely.to_wkb(shapely.force_2d(p)).hex(): p for p in polygons}
    originals = [by_geometry.get(shapely.to_wkb(g).hex()) or by_geometry[shapely.to_wkb(MultiPolygon([g])).hex()]
                 for g in geoms]
    assert np.allclose(fields["area_m2"], [area_m2(p, crs) for p in originals], rtol=1e-12)
    assert np.allclose(fields[perimeter_field], [perimeter_m(p, crs) for p in originals], rtol=1e-12)
    assert _folder_files(tmp_path) == sorted(p.name for p in vector_files(path))  # no temporaries left


def test_custom_albers_crs_has_no_epsg_and_round_trips(tmp_path: Path) -> None:
    crs, polygons = _load(*SAMPLES[0])
    assert crs.to_epsg() is None
    for fmt in FORMATS:
        path = vector_path(tmp_path, "albers", fmt)
        write_vectors(path, features_from_polygons(polygons[:3], 1, "x", 1.0, "a.tif"), crs)
        stored = CRS.from_user_input(pyogrio.read_info(path)["crs"])
        assert stored == crs, fmt
        assert stored.to_dict()["proj"] == "aea"
    document = json.loads((tmp_path / "albers.geojson").read_text(encoding="utf-8"))
    assert CRS.from_wkt(document["crs_wkt"]) == crs
    assert document["name"] == LAYER


def test_shapefile_sidecars_encoding_and_text_limit(tmp_path: Path) -> None:
    long_text = "é" * 200 + "x" * 10  # 410 UTF-8 bytes
    features = [VectorFeature(box(0, 0, 10, 10), 1, long_text, 0.5, "s.tif")]
    path = tmp_path / "out.shp"
    write_vectors(path, features, UTM16)
    assert _folder_files(tmp_path) == ["out.cpg", "out.dbf", "out.prj", "out.shp", "out.shx"]
    assert (tmp_path / "out.cpg").read_text().strip() == "UTF-8"
    assert CRS.from_wkt((tmp_path / "out.prj").read_text()) == UTM16
    _info, _geoms, fields = _read(path)
    stored = fields["expression"][0]
    assert stored == "é" * 127  # cut at 254 bytes, on a character boundary
    assert fields["perim_m"][0] == pytest.approx(40.0)


def test_shapefile_field_names_are_unique_and_short() -> None:
    names = vector_io.shapefile_field_names(["perimeter_m", "addr_housenumber", "addr_housename", "ADDR_HOUSE"])
    assert names == ["perim_m", "addr_house", "addr_hou_1", "ADDR_HOU_2"]
    assert all(len(n) <= 10 for n in names)


def test_shapefile_size_limit_is_refused_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.shp"
    write_vectors(path, [VectorFeature(box(0, 0, 1, 1), 1, "old", 0.1, "a")], UTM16)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(vector_io, "SHAPEFILE_MAX_BYTES", 5000)
    features = [VectorFeature(box(i, 0, i + 1, 1), 1, "new", 0.2, "a") for i in range(200)]
    with pytest.raises(DataError, match="too large for a Shapefile"):
        write_vectors(path, features, UTM16)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old file intact, no temp
    # A GeoPackage has no such limit.
    assert write_vectors(tmp_path / "big.gpkg", features, UTM16) == 200


def test_replacing_a_shapefile_removes_its_stale_spatial_index(tmp_path: Path) -> None:
    path = tmp_path / "s.shp"
    write_vectors(path, [VectorFeature(box(0, 0, 1, 1), 1, "a", 0.1, "a")], UTM16)
    (tmp_path / "s.qix").write_bytes(b"old index")
    write_vectors(path, [VectorFeature(box(5, 5, 6, 6), 1, "b", 0.1, "a")], UTM16)
    assert not (tmp_path / "s.qix").exists()
    assert _read(path)[2]["expression"].tolist() == ["b"]


def test_clean_polygon_min_area_then_topology_preserving_simplify() -> None:
    circle = Point(0, 0).buffer(10, quad_segs=64)
    holed = Polygon(circle.exterior.coords, [Point(0, 0).buffer(3, quad_segs=32).exterior.coords])
    small = box(50, 50, 51, 51)
    multi = MultiPolygon([holed, small])
    assert clean_polygon(multi, min_area=2.0).equals(MultiPolygon([holed]))
    assert clean_polygon(small, min_area=2.0) is None
    assert clean_polygon(small, min_area=1.0) == small  # exact area 1 is kept (>=)
    simplified = clean_polygon(holed, simplify=0.5)
    assert isinstance(simplified, Polygon) and simplified.is_valid
    assert len(simplified.interiors) == 1  # the hole survives
    assert len(simplified.exterior.coords) < len(holed.exterior.coords) / 3
    assert simplified.area == pytest.approx(holed.area, rel=0.02)
    with pytest.raises(ValueError, match="Polygon and MultiPolygon"):
        clean_polygon(Point(0, 0))
    with pytest.raises(ValueError, match=">= 0"):
        clean_polygon(small, simplify=-1)


def test_polygon_options_are_applied_identically_for_every_format(tmp_path: Path) -> None:
    crs, polygons = _load(*SAMPLES[2])  # SpaceNet buildings, metres
    areas = sorted(p.area for p in polygons)
    min_area = areas[len(areas) // 2]  # drop about half of them
    features = features_from_polygons(polygons, 1, "building", 0.9, "s.tif")
    results = {}
    for fmt in FORMATS:
        path = vector_path(tmp_path, "opts", fmt)
        count = write_vectors(path, features, crs, fmt, simplify=1.0, min_area=min_area)
        results[fmt] = (count, _read(path)[1])
    expected = [g for g in (clean_polygon(p, 1.0, min_area) for p in polygons) if g is not None]
    assert 0 < len(expected) < len(polygons)
    for fmt, (count, geoms) in results.items():
        assert count == len(geoms) == len(expected), fmt
        assert _same_geometries(geoms, expected, fmt), fmt
        assert shapely.get_num_coordinates(geoms).sum() < sum(shapely.get_num_coordinates(polygons))


def test_empty_geometries_are_skipped_and_empty_layers_keep_fields_and_crs(tmp_path: Path) -> None:
    features = [VectorFeature(Polygon(), 1, "nothing", 0.0, "a"), VectorFeature(box(0, 0, 2, 2), 1, "b", 0.1, "a")]
    for fmt in FORMATS:
        assert write_vectors(vector_path(tmp_path, "one", fmt), features, UTM16) == 1
        empty = vector_path(tmp_path, "empty", fmt)
        assert write_vectors(empty, [], UTM16) == 0
        info, geoms, _fields = _read(empty)
        assert len(geoms) == 0 and CRS.from_user_input(info["crs"]) == UTM16
        # GeoJSON has no schema: GDAL infers fields from the features, so an empty file has none.
        assert len(info["fields"]) == (0 if fmt == "geojson" else len(FIELDS))


def test_null_area_without_linear_unit_and_pixel_coordinates(tmp_path: Path) -> None:
    features = [VectorFeature(box(0, 0, 4, 2), 3, "x", float("nan"), "p.png")]
    for fmt in FORMATS:
        path = vector_path(tmp_path, "px", fmt)
        write_vectors(path, features, None)
        info, _geoms, fields = _read(path)
        assert info["crs"] == ("EPSG:4326" if fmt == "geojson" else None), fmt  # GeoJSON's default CRS
        perimeter = fields["perim_m" if fmt == "shp" else "perimeter_m"]
        for value in (fields["area_m2"][0], perimeter[0], fields["score"][0]):
            assert value is None or math.isnan(value), fmt  # all-null GeoJSON fields read back as text


def test_perimeter_projected_units_and_geographic_ellipsoid() -> None:
    rect = box(0, 0, 10, 20)
    assert perimeter_m(rect, UTM16) == pytest.approx(60.0)
    assert perimeter_m(rect, CRS.from_epsg(2263)) == pytest.approx(60 * 1200 / 3937, rel=1e-9)  # US survey ft
    assert perimeter_m(rect, None) is None
    holed = box(0, 0, 10, 10).difference(box(4, 4, 6, 6))
    assert perimeter_m(holed, UTM16) == pytest.approx(48.0)  # holes count
    # 1 deg x 1 deg cell at the equator on WGS84: two meridian arcs 0..1 deg (110574.389 m each,
    # published value) and the parallels at 0 and 1 deg (N cos(phi) dlambda).
    a, e2 = 6378137.0, 6.69437999014e-3
    parallel = [a / math.sqrt(1 - e2 * math.sin(math.radians(p)) ** 2) * math.cos(math.radians(p)) * math.pi / 180
                for p in (0.0, 1.0)]
    expected = 2 * 110574.389 + sum(parallel)
    assert perimeter_m(box(0, 0, 1, 1), CRS.from_epsg(4326)) == pytest.approx(expected, abs=0.05)


def test_geographic_perimeter_matches_the_landsat_labels_own_attribute() -> None:
    crs, polygons = _load(*SAMPLES[1])
    collection = json.loads(_sample(SAMPLES[1][1]).read_text(encoding="utf-8"))
    for polygon, feature in zip(polygons, collection["features"]):
        expected_m = feature["properties"]["PERIMETER"] * 0.3048  # the attribute is in feet
        assert perimeter_m(polygon, crs) == pytest.approx(expected_m, rel=5e-3)


@pytest.mark.parametrize(
    ("path", "fmt", "message"),
    [
        ("out.kml", None, "cannot tell the vector format"),
        ("out", None, "cannot tell the vector format"),
        ("out.gpkg", "kml", "unknown vector format 'kml'; choices: fgb, geojson, gpkg, shp"),
        ("out.gpkg", "shp", "does not match the vector format 'shp'"),
        ("out.json", "geojson", "expected .geojson"),
    ],
)
def test_format_errors(tmp_path: Path, path: str, fmt: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        write_vectors(tmp_path / path, [VectorFeature(box(0, 0, 1, 1), 1, "x", 0.1, "a")], UTM16, fmt)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="unknown vector format"):
        vector_path(tmp_path, "x", "kml")
    assert vector_format("A.GPKG") == "gpkg"


def test_write_error_is_a_data_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="cannot write"):
        write_vectors(blocker / "out.gpkg", [], UTM16)


def _write_samples(tmp_path: Path, fmts: list[str]) -> list[tuple[Path, CRS, list[Any]]]:
    written = []
    for (image, labels), fmt in zip(SAMPLES, fmts):
        crs, polygons = _load(image, labels)
        path = vector_path(tmp_path, Path(image).stem, fmt)
        write_vectors(path, features_from_polygons(polygons, 1, "x", 0.5, image), crs)
        written.append((path, crs, polygons))
    return written


@pytest.mark.parametrize("out_fmt", FORMATS)
def test_merge_reprojects_into_the_first_crs(tmp_path: Path, out_fmt: str) -> None:
    written = _write_samples(tmp_path / "in", ["gpkg", "shp", "geojson"])
    out = vector_path(tmp_path, "merged", out_fmt)
    total = sum(len(p) for _path, _crs, p in written)
    assert merge_vectors([w[0] for w in written], out) == total
    info, geoms, fields = _read(out)
    albers = written[0][1]
    assert CRS.from_user_input(info["crs"]) == albers
    assert len(geoms) == total
    perimeter = "perim_m" if out_fmt == "shp" else "perimeter_m"
    assert perimeter in info["fields"]  # the Shapefile's perim_m came back as perimeter_m
    expected_sources = [Path(w[0]).stem + ".tif" for w in written for _ in w[2]]
    assert sorted(fields["source"].tolist()) == sorted(expected_sources)
    if out_fmt != "fgb":  # FlatGeobuf stores features in spatial order
        assert fields["source"].tolist() == expected_sources
    # Albers is equal-area: the reprojected UTM and lon/lat polygons keep their area in m².
    merged_area = shapely.area(geoms)
    assert np.allclose(merged_area, fields["area_m2"].astype(float), rtol=2e-3)
    assert np.isfinite(fields[perimeter].astype(float)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", *[p.name for p in vector_files(out)]])


def test_merge_union_of_fields_and_explicit_crs(tmp_path: Path) -> None:
    ours = _write_samples(tmp_path, ["fgb"])[0][0]
    buildings = _sample(SAMPLES[2][1])  # 70 OSM attribute fields
    extra = tmp_path / "extra.gpkg"  # a field name too long for a Shapefile, typed int here
    pyogrio.raw.write(extra, shapely.to_wkb(np.array([box(733700, 3724700, 733710, 3724710)])),
                      field_data=[np.array([7], dtype="int64"), np.array([1.5])],
                      fields=["a_very_long_field_name", "osm_id"], crs="EPSG:32616", geometry_type="Polygon")
    _crs, polygons = _load(*SAMPLES[2])
    building_fields = list(pyogrio.read_info(buildings)["fields"])
    gpkg = tmp_path / "all.gpkg"
    assert merge_vectors([ours, buildings, extra], gpkg) == 19 + len(polygons) + 1
    info, _geoms, fields = _read(gpkg)
    assert list(info["fields"]) == [*FIELDS, *building_fields, "a_very_long_field_name"]
    dtypes = dict(zip(info["fields"], info["dtypes"]))
    assert dtypes["osm_id"] == "float64"  # int in the buildings, float in `extra`
    assert dtypes["expr_index"] == "int32" and dtypes["area_m2"] == "float64"
    assert np.isnan(fields["expr_index"][19:].astype(float)).all()  # buildings have no expr_index

    out = tmp_path / "all.shp"
    merge_vectors([ours, buildings, extra], out, crs="EPSG:4326")
    info, geoms, fields = _read(out)
    assert CRS.from_user_input(info["crs"]) == CRS.from_epsg(4326)
    assert -180 < shapely.total_bounds(geoms)[0] < 0  # lon/lat order, west of Greenwich
    assert info["fields"][-1] == "a_very_lon" and fields["a_very_lon"][-1] == 7
    assert all(len(n) <= 10 for n in info["fields"])
    assert len(set(n.lower() for n in info["fields"])) == len(info["fields"])


def test_merge_errors(tmp_path: Path) -> None:
    ours = _write_samples(tmp_path, ["gpkg"])[0][0]
    with pytest.raises(DataError, match="vector file not found"):
        merge_vectors([ours, tmp_path / "missing.gpkg"], tmp_path / "m.gpkg")
    with pytest.raises(ConfigError, match="not a coordinate reference system"):
        merge_vectors([ours], tmp_path / "m.gpkg", crs="EPSG:999999")
    with pytest.raises(ConfigError, match="no input"):
        merge_vectors([], tmp_path / "m.gpkg")
    with pytest.raises(ConfigError, match="cannot tell the vector format"):
        merge_vectors([ours], tmp_path / "m.csv")
    points = tmp_path / "points.gpkg"
    pyogrio.raw.write(points, shapely.to_wkb(np.array([Point(0, 0)])), field_data=[], fields=[],
                      geometry_type="Point", crs="EPSG:32616")
    with pytest.raises(DataError, match="only polygons can be merged"):
        merge_vectors([ours, points], tmp_path / "m.gpkg")
    no_crs = tmp_path / "nocrs.gpkg"  # (a GeoJSON without CRS means WGS84 to GDAL)
    write_vectors(no_crs, [VectorFeature(box(0, 0, 1, 1), 1, "x", 0.1, "a")], None)
    with pytest.raises(DataError, match="has no CRS"):
        merge_vectors([ours, no_crs], tmp_path / "m.gpkg")
    garbage = tmp_path / "garbage.gpkg"
    garbage.write_bytes(b"\x00not a geopackage")
    with pytest.raises(DataError, match="cannot be read as a vector file"):
        merge_vectors([garbage], tmp_path / "m.gpkg")
    assert not (tmp_path / "m.gpkg").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_merge_streams_one_layer_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = _write_samples(tmp_path / "in", ["gpkg", "fgb", "shp"])
    events: list[str] = []
    real_read, real_write = pyogrio.raw.read, vector_io.LayerWriter.write

    def read(*args: Any, **kwargs: Any) -> Any:
        events.append("read")
        return real_read(*args, **kwargs)

    def write(self: Any, geoms: Any, columns: Any) -> None:
        events.append("write")
        real_write(self, geoms, columns)

    monkeypatch.setattr(pyogrio.raw, "read", read)
    monkeypatch.setattr(vector_io.LayerWriter, "write", write)
    merge_vectors([w[0] for w in written], tmp_path / "m.fgb")
    assert events == ["read", "write"] * 3  # each input is written before the next one is read
