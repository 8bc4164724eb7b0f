"""The plugin's Processing algorithms in a headless QGIS, on every shared GeoTIFF, against the CLI.

One QGIS process (tests/qgis/run_qgis_checks.py, QGIS's Python, offscreen) loads the plugin, sets its
environment to this venv's ``rsrefseg`` and runs: "Segment by expression" on each scene (the
Landsat scene clipped to an extent, the 4-band scene with explicit bands), compared with one reference
``rsrefseg predict`` run on the same inputs; a run cancelled at the first progress line; a run with a
bad checkpoint; and, when this checkout's CLI has them, "Encode scene features" and "Segment from
features". The tests below assert on its report.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import PLUGIN_DIR, ROOT, cli_help, qgis_env, rsrefseg_command

pytestmark = pytest.mark.slow

EXPRESSIONS = ["the building", "water"]
#: name -> (bands, extent in the scene's CRS as pixel rows/cols window, or None)
SCENES: dict[str, dict[str, Any]] = {
    "albers_3band_int16.tif": {},
    "multispectral_4band_float64.tif": {"bands": "1,2,3"},  # the CLI's default: one reference run for all
    "spacenet_pan_uint16.tif": {},
    "landsat_large_nodata_wgs84.tif": {"window": (2150, 2470, 1260, 1580)},  # rows, cols: 320 x 320 pixels
}


def _extent(path: Path, window: tuple[int, int, int, int]) -> list[float]:
    """``xmin, ymin, xmax, ymax`` of a pixel window (rows r0:r1, cols c0:c1)."""
    import rasterio

    r0, r1, c0, c1 = window
    with rasterio.open(path) as src:
        t = src.transform
    xs, ys = (t.c + c0 * t.a, t.c + c1 * t.a), (t.f + r0 * t.e, t.f + r1 * t.e)
    return [min(xs), min(ys), max(xs), max(ys)]


def _has_features() -> bool:
    return bool(cli_help("encode")) and "--features" in cli_help("predict")


@pytest.fixture(scope="module")
def report(qgis_python: str, qgis_checkpoint: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("qgis-headless")
    scenes = []
    for name, options in SCENES.items():
        path = shared_data / "geotiff" / name
        if not path.is_file():
            pytest.skip(f"shared GeoTIFF {path} not found")
        scene: dict[str, Any] = {"path": str(path)}
        if options.get("bands"):
            scene["bands"] = options["bands"]
        if options.get("window"):
            scene["extent"] = _extent(path, options["window"])
        scenes.append(scene)
    bad = work / "bad-checkpoint"
    bad.mkdir()
    (bad / "config.json").write_text((qgis_checkpoint / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
    (bad / "model.safetensors").write_bytes(b"this is not a safetensors file")
    # what `rsrefseg predict --checkpoint bad` prints: "error: " + the message of the loader's error
    from rsrefseg.errors import RSRefSegError
    from rsrefseg.inference.predictor import Predictor

    with pytest.raises(RSRefSegError) as info:
        Predictor.from_pretrained(str(bad), device="cpu", precision="fp32")
    expected_error = f"error: {info.value}"
    checks = ["segment", "vector_layout", "cancel", "bad_checkpoint", "bad_inputs"] + (["features"] if _has_features() else [])
    config = {
        "plugin_dir": str(PLUGIN_DIR), "environment": rsrefseg_command(), "child_pythonpath": str(ROOT / "src"),
        "checkpoint": str(qgis_checkpoint), "bad_checkpoint": str(bad), "scenes": scenes,
        "expressions": EXPRESSIONS, "work": str(work), "profile": str(work / "profile"), "checks": checks,
        "has_vector_format": "--vector-format" in cli_help("predict"),
    }
    config["expected_bad_checkpoint_error"] = expected_error
    config_path, report_path = work / "config.json", work / "report.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    done = subprocess.run(
        [qgis_python, str(Path(__file__).with_name("run_qgis_checks.py")), str(config_path), str(report_path)],
        capture_output=True, text=True, timeout=1800, cwd=work,
        env=qgis_env(XDG_CONFIG_HOME=str(work / "config"), XDG_RUNTIME_DIR=str(work), HOME=str(work / "home")),
    )
    if done.returncode != 0 or not report_path.is_file():
        pytest.fail(f"QGIS checks exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    result = json.loads(report_path.read_text(encoding="utf-8"))
    assert not result.get("exceptions"), result.get("exceptions")
    return result


def test_provider_has_the_three_algorithms(report: dict[str, Any]) -> None:
    assert report["algorithms"] == ["rsrefseg:encode", "rsrefseg:segment", "rsrefseg:segment_features"]


@pytest.mark.parametrize("name", list(SCENES))
def test_segment_matches_the_cli_on_each_geotiff(report: dict[str, Any], name: str) -> None:
    entry = report["segment"][name]
    assert entry["ok"], entry["errors"]
    assert entry["vector_valid"] and entry["mask_valid"]
    # CRS of both outputs = the source raster's (also the custom Albers CRS without EPSG code)
    assert entry["vector_crs_equal"], (entry["vector_crs_wkt"], entry["source_crs_wkt"])
    assert entry["mask_crs_equal"]
    plugin, reference = entry["plugin"], entry["reference"]
    assert plugin["count"] == reference["count"] == entry["feature_count_output"]
    assert plugin["count"] > 0  # the sharpened tiny model finds something for these expressions
    assert plugin["area"] == pytest.approx(reference["area"], rel=1e-9)
    assert plugin["area_m2"] == pytest.approx(reference["area_m2"], rel=1e-9)
    assert entry["fields"] == ["fid", "expr_index", "expression", "score", "area_m2", "perimeter_m", "source"]
    assert entry["expressions"] == sorted(EXPRESSIONS)
    # the mask raster: one band per expression, named after it, pixel-equal to the CLI's masks
    assert entry["mask_bands"] == len(EXPRESSIONS)
    assert [n.split(": ", 1)[1] for n in entry["mask_band_names"]] == EXPRESSIONS
    assert entry["masks_equal_reference"]
    assert entry["progress_max"] == pytest.approx(100.0)
    assert any("--progress json" in c for c in entry["commands"])


def test_albers_output_keeps_the_custom_crs(report: dict[str, Any]) -> None:
    entry = report["segment"]["albers_3band_int16.tif"]
    assert "Albers" in entry["vector_crs_wkt"] and "29.5" in entry["vector_crs_wkt"]


def test_extent_clips_the_input(report: dict[str, Any]) -> None:
    entry = report["segment"]["landsat_large_nodata_wgs84.tif"]
    assert entry["extent_within_source"] is True
    assert any(".vrt" in c for c in entry["commands"])  # the CLI read the clipped VRT, not the 13 Mpx scene


def test_bands_are_passed_to_the_cli(report: dict[str, Any]) -> None:
    entry = report["segment"]["multispectral_4band_float64.tif"]
    assert any("--bands 1,2,3" in c for c in entry["commands"])


def test_cancel_stops_the_cli_and_leaves_no_output(report: dict[str, Any]) -> None:
    entry = report["cancel"]
    assert entry["cancelled_after_progress"]
    assert entry["ok"] is False
    assert entry["outputs_left"] == []
    assert entry["work_folders_left"] == []
    assert entry["processes_left"] == []


def test_bad_checkpoint_reports_the_cli_error(report: dict[str, Any]) -> None:
    entry = report["bad_checkpoint"]
    cli_error = entry["expected_error"]
    assert entry["ok"] is False
    assert entry["plugin_errors"][0] == cli_error  # the CLI's line as it printed it, live
    assert cli_error in entry["plugin_errors"][-1]  # and the algorithm's failure message
    assert any(m["critical"] and cli_error in m["message"] for m in entry["log"])  # QGIS log -> message bar
    assert entry["outputs_left"] == []


@pytest.mark.parametrize(("case", "message"), [
    ("no_expression", "No expression: type at least one referring expression"),
    ("two_bands", "Choose 1 or 3 bands (red, green, blue), not 2"),
    ("extent_outside", "does not overlap the raster"),
    ("no_checkpoint", "No checkpoint: choose a checkpoint folder"),
    ("not_a_feature_folder", "not a feature folder (no index.json)"),
    ("missing_environment", "no-such-env: no such file or folder (RSRefSeg environment setting)"),
])
def test_bad_inputs_fail_before_running_rsrefseg(report: dict[str, Any], case: str, message: str) -> None:
    entry = report["bad_inputs"][case]
    assert entry["ok"] is False
    assert len(entry["errors"]) == 1 and message in entry["errors"][0], entry["errors"]
    assert entry["commands"] == []  # rsrefseg was not started
    assert report["bad_inputs"]["outputs_left"] == []


def test_plugin_reads_the_combined_vector_file_of_the_contract(report: dict[str, Any]) -> None:
    entry = report["vector_layout"]
    assert entry["from_vector_file"] and entry["count_vector_file"] == entry["count_geojson"] > 0
    assert entry["rows_equal"] and entry["crs_equal"]


def test_plugin_reads_the_cli_geopackage(report: dict[str, Any]) -> None:
    if "--vector-format" not in cli_help("predict"):
        pytest.skip("this checkout's rsrefseg predict has no --vector-format yet (the plugin used the GeoJSON files)")
    for entry in report["segment"].values():
        assert entry["reference_is_vector_file"]
        assert any("--vector-format gpkg" in c for c in entry["commands"])


def test_segment_from_features_matches_the_cli(report: dict[str, Any]) -> None:
    if not _has_features():
        pytest.skip("this checkout's rsrefseg has no encode / predict --features yet")
    entry = report["features"]
    assert entry["encode_ok"], entry["encode_errors"]
    assert Path(entry["features"], "index.json").is_file()
    assert entry["reference_returncode"] == 0, entry["reference_stderr"]
    segment = entry["segment"]
    assert segment["ok"], segment["errors"]
    assert segment["vector_crs_equal"] and segment["mask_crs_equal"]
    assert segment["plugin"]["count"] == segment["reference"]["count"] > 0
    assert segment["plugin"]["area"] == pytest.approx(segment["reference"]["area"], rel=1e-9)
    assert segment["masks_equal_reference"]


def test_qgis_python_imports_nothing_of_rsrefseg(report: dict[str, Any]) -> None:
    assert report["heavy_modules_in_qgis"] == []
