"""Tests of ``rsrefseg predict``: every input kind, geo outputs, summary, errors, multi-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from rsrefseg.cli.main import main
from rsrefseg.cli.predict_cli import DEFAULT_TILE_THRESHOLD, collect_expressions, expand_inputs
from rsrefseg.inference.outputs import (
    expression_names,
    image_dir_names,
    merge_summaries,
    slugify,
    unique_names,
)

TEXTS = ["the large building", "Road on the LEFT!"]
NAMES = ["01_the-large-building", "02_road-on-the-left"]


@pytest.fixture(scope="module")
def data_root() -> Path:
    from rsrefseg import paths

    root = paths.data_root()
    if not (root / "geotiff").is_dir():
        pytest.skip(f"shared data not available at {root} (set $RSREFSEG_DATA)")
    return root


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["predict", *argv, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _mask_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _check_outputs(out: Path, inputs: list[Path], names: list[str]) -> dict:
    """Check mask/overlay PNGs, GeoTIFFs and GeoJSON of every input against summary.json."""
    summary = json.loads((out / "summary.json").read_text())
    assert [i["source"] for i in summary["images"]] == [str(p) for p in inputs]
    for path, image in zip(inputs, summary["images"]):
        folder = out / path.stem
        assert image["dir"] == path.stem and not image["tiled"]
        geo_expected = path.suffix == ".tif"
        assert image["georeferenced"] == geo_expected
        assert [r["name"] for r in image["outputs"]] == names
        for name, record in zip(names, image["outputs"]):
            mask = _mask_png(folder / f"{name}.mask.png")
            assert mask.shape == (image["height"], image["width"]) and set(np.unique(mask)) <= {0, 255}
            assert (mask == 255).sum() == record["mask_pixels"] > 0
            overlay = Image.open(folder / f"{name}.overlay.png")
            assert overlay.mode == "RGB" and overlay.width == image["width"] and overlay.height > image["height"]
            assert (folder / f"{name}.mask.tif").exists() == geo_expected
            assert (folder / f"{name}.geojson").exists() == geo_expected
            if not geo_expected:
                assert "mask_tif" not in record and "geojson" not in record
                continue
            assert record["mask_tif"] == f"{path.stem}/{name}.mask.tif"
            with rasterio.open(folder / f"{name}.mask.tif") as ds, rasterio.open(path) as src:
                assert ds.crs == src.crs and ds.transform == src.transform and ds.dtypes == ("uint8",)
                assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"  # Cloud Optimized GeoTIFF
                np.testing.assert_array_equal(ds.read(1), mask)
                nodata = (src.read_masks() == 0).any(axis=0)
            assert not mask[nodata].any()
            collection = json.loads((folder / f"{name}.geojson").read_text())
            assert collection["type"] == "FeatureCollection" and len(collection["features"]) == record["polygons"]
            props = collection["features"][0]["properties"]
            assert props["expression"] == record["expression"] and props["source"] == str(path)
            assert props["score"] == pytest.approx(record["score"]) and props["area_m2"] > 0
            assert record["area_m2"] == pytest.approx(sum(f["properties"]["area_m2"] for f in collection["features"]))
        if geo_expected:  # one vector file per image with every expression's polygons
            assert image["vector"] == f"{path.stem}/{path.stem}.geojson" and image["vector_format"] == "geojson"
            layer = json.loads((out / image["vector"]).read_text())
            assert len(layer["features"]) == sum(r["polygons"] for r in image["outputs"])
        else:
            assert "vector" not in image
        assert image["complete"]
    return summary


def test_every_input_kind(data_root, tiny_checkpoint, tmp_path, capsys):
    geo = data_root / "geotiff"
    spacenet, multi = geo / "spacenet_pan_uint16.tif", geo / "multispectral_4band_float64.tif"
    albers, dior = geo / "albers_3band_int16.tif", data_root / "formats" / "dior_00001.jpg"
    texts = tmp_path / "texts.txt"
    texts.write_text("# comment\n\nRoad on the LEFT!\n", encoding="utf-8")
    # Float 4-band with --bands 4,3,2 and two expressions (--text + --texts-file); --bands does not
    # fit the 1-band file, which fails without stopping the batch.
    out = tmp_path / "bands"
    code, _, err = _run(capsys, str(spacenet), str(multi), "--text", TEXTS[0], "--texts-file", str(texts),
                        "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--bands", "4,3,2")
    assert code == 1 and "spacenet_pan_uint16.tif: unsupported band count" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["expressions"] == TEXTS and summary["names"] == NAMES
    assert [f["source"] for f in summary["failures"]] == [str(spacenet)]
    _check_outputs(out, [multi], NAMES)
    # 1-band uint16 (UTM), 3-band int16 with a custom CRS, and a plain JPEG (no geo outputs).
    out = tmp_path / "kinds"
    code, stdout, _ = _run(capsys, str(spacenet), str(albers), str(dior), "--text", TEXTS[0],
                           "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--min-area", "16",
                           "--simplify", "0.5")
    assert code == 0 and "3 image(s)" in stdout
    summary = _check_outputs(out, [spacenet, albers, dior], NAMES[:1])
    assert summary["failures"] == [] and summary["peak_rss_mb"] > 0
    assert summary["settings"]["min_area"] == 16 and summary["settings"]["simplify"] == 0.5
    assert summary["settings"]["polygon_units"] == "crs"
    custom = json.loads((out / "albers_3band_int16" / f"{NAMES[0]}.geojson").read_text())
    assert custom["crs"]["properties"]["name"].startswith("PROJCS")  # no EPSG code: the WKT


def test_nodata_is_never_in_masks_tiled_or_not(nodata_tif, tiny_checkpoint, tmp_path, capsys):
    with rasterio.open(nodata_tif) as src:
        valid = src.read_masks(1) > 0
    for tiled, precision in ((False, "fp32"), (True, "bf16")):
        out = tmp_path / f"tiled-{tiled}"
        extra = ["--tile-threshold", "1", "--tile", "96", "--overlap", "32"] if tiled else []  # 2 tiles
        code, _, _ = _run(capsys, str(nodata_tif), "--text", "fields", "--threshold=-1e9", *extra,
                          "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--precision", precision,
                          "--heatmaps")
        assert code == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["images"][0]["tiled"] == tiled and summary["settings"]["precision"] == precision
        heatmap = summary["images"][0]["outputs"][0]["heatmap_png"]  # asked for: tiled scenes too (stitched)
        assert (out / heatmap).is_file()
        mask = _mask_png(out / "nodata_scene" / "01_fields.mask.png") > 0
        np.testing.assert_array_equal(mask, valid)  # everything selected, except nodata
        record = summary["images"][0]["outputs"][0]
        assert record["polygons"] == 1 and record["area_m2"] == pytest.approx(valid.sum() * 4.0)


def test_errors_before_any_work(tiny_checkpoint, nodata_tif, tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        (["--text", "ok", "--text", "  "], "--text #2 is empty"),
        ([], "no expression"),
        (["--text", "x", "--texts-file", str(tmp_path / "missing.txt")], "texts file"),
        (["--text", "x", "--batch-size", "0"], "--batch-size"),
        (["--text", "x" * 20_000], "--text #1 has 20000 characters; at most 1000"),
    ]
    long_file = tmp_path / "long.txt"
    long_file.write_text("\ufeffok\n# comment\n" + "y" * 1001 + "\n", encoding="utf-8")
    cases.append((["--texts-file", str(long_file)], f"{long_file}:3 has 1001 characters"))
    for extra, message in cases:
        code, _, err = _run(capsys, str(nodata_tif), *extra, "--checkpoint", str(tiny_checkpoint), "--out", str(out))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, str(tmp_path / "nope.tif"), "--text", "x", "--checkpoint", str(tiny_checkpoint),
                        "--out", str(out))
    assert code == 2 and "nope.tif: no such image" in err
    assert not out.exists()  # rejected before any work

    wrong = tmp_path / "wrong-ckpt"
    shutil.copytree(tiny_checkpoint, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["model"]["lora_r"] = 8  # another architecture than the saved weights
    (wrong / "config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, str(nodata_tif), "--text", "x", "--checkpoint", str(wrong), "--out", str(out))
    assert code == 2 and "does not fit preset 'tiny'" in err and len(err.strip().splitlines()) == 1


def test_failed_images_do_not_stop_the_batch(tiny_checkpoint, nodata_tif, make_geotiff, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00 this is not a tiff")
    two_band = make_geotiff(tmp_path / "two_band.tif", bands=2)
    broken_jpg = tmp_path / "broken.jpg"
    broken_jpg.write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out"
    code, _, err = _run(capsys, str(corrupt), str(nodata_tif), str(two_band), str(broken_jpg), "--text", "x",
                        "--checkpoint", str(tiny_checkpoint), "--out", str(out))
    assert code == 1
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert [i["input_index"] for i in summary["images"]] == [1]
    failures = {Path(f["source"]).name: f for f in summary["failures"]}
    assert set(failures) == {"corrupt.tif", "two_band.tif", "broken.jpg"}
    assert "unsupported band count" in failures["two_band.tif"]["error"]
    assert all("\n" not in f["error"] for f in failures.values())
    assert (out / "nodata_scene" / "01_x.mask.tif").exists()

    code, _, err = _run(capsys, str(corrupt), "--text", "x", "--checkpoint", str(tiny_checkpoint),
                        "--out", str(tmp_path / "only-bad"))
    assert code == 2 and err.startswith("error: ") and "corrupt.tif" in err


def test_names_inputs_and_options(tmp_path):
    assert slugify("Road on the LEFT! (near the café)") == "road-on-the-left-near-the-cafe"
    assert slugify("???") == "expr"
    assert expression_names(["a"] * 3) == ["01_a", "02_a", "03_a"]
    assert expression_names(["a"] * 100)[0] == "001_a"
    assert image_dir_names([Path("a/x.tif"), Path("b/x.tif"), Path("y.jpg")]) == ["x", "x-2", "y"]
    (tmp_path / "d").mkdir()
    for name in ("b.tif", "a.jpg", "notes.txt"):
        (tmp_path / "d" / name).write_bytes(b"")
    found = expand_inputs([str(tmp_path / "d"), str(tmp_path / "d" / "*.tif")])
    assert [s.path.name for s in found] == ["a.jpg", "b.tif"] and [s.name for s in found] == ["a", "b"]
    assert unique_names(["x", "X", "x", "", "x-2"]) == ["x", "X-2", "x-3", "image", "x-2-2"]
    assert collect_expressions(["  two   spaces "], None) == ["two spaces"]
    parts = [
        {"rank": 1, "world_size": 2, "peak_rss_mb": 9.0, "failures": [{"input_index": 1}],
         "images": [{"input_index": 3, "outputs": [{}]}]},
        {"rank": 0, "world_size": 2, "peak_rss_mb": 7.0, "failures": [],
         "images": [{"input_index": 0, "outputs": [{}, {}]}, {"input_index": 2, "outputs": []}]},
    ]
    merged = merge_summaries(parts)
    assert [i["input_index"] for i in merged["images"]] == [0, 2, 3] and merged["outputs"] == 3
    assert merged["peak_rss_mb"] == 9.0 and [r["rank"] for r in merged["ranks"]] == [0, 1]
    assert "rank" not in merged and merged["world_size"] == 2
    from rsrefseg.inference.scene import DEFAULT_TILE_THRESHOLD as SCENE_DEFAULT

    assert DEFAULT_TILE_THRESHOLD == SCENE_DEFAULT


@pytest.mark.slow
def test_accelerate_two_cpu_processes_shard_and_merge(tiny_checkpoint, make_geotiff, tmp_path):
    inputs = [make_geotiff(tmp_path / f"scene{i}.tif", height=64, width=64, nodata_cols=8, seed=i)
              for i in range(3)]
    inputs.append(tmp_path / "corrupt.tif")
    inputs[-1].write_bytes(b"not an image")
    out = tmp_path / "out"
    accelerate = Path(sys.executable).with_name("accelerate")
    # On a CPU-only machine --multi_gpu starts torchrun workers; the CLI then uses gloo on the CPU
    # (accelerate's --cpu flag would start one single process).
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rsrefseg", "predict",
           *map(str, inputs), "--text", "fields", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0  # one input is corrupt: exit status 1 on every rank
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert [r["images"] + r["failures"] for r in summary["ranks"]] == [2, 2]  # inputs r::2
    assert [i["input_index"] for i in summary["images"]] == [0, 1, 2]
    assert [f["input_index"] for f in summary["failures"]] == [3]
    assert summary["outputs"] == 3 and not list(out.glob("summary.rank*.json"))
    for i in range(3):
        assert (out / f"scene{i}" / "01_fields.geojson").exists()
    # Again with --resume: both ranks find their finished scenes in the shared manifest and skip
    # them; the corrupt input is tried again (failures are not recorded as finished).
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.mask.tif")}
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode != 0 and "corrupt.tif" in again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [i["input_index"] for i in summary["images"]] == [0, 1, 2]
    assert all(i["resumed"] for i in summary["images"]) and [f["input_index"] for f in summary["failures"]] == [3]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.mask.tif")} == stamps
    assert (out / "manifest.jsonl").read_text().count("\n") == 3
