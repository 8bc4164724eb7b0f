"""``rsrefseg predict --features``: the outputs of a feature folder equal those of the scene itself
(same tiling), without reading or encoding it; every refusal is one ``error:`` line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rsrefseg.cli.main import main

TEXTS = ["the large building", "a road"]
NAMES = ["01_the-large-building", "02_a-road"]
TILE, OVERLAP = ("--tile", "128"), ("--overlap", "16")  # 2 x 2 windows; the 2 at x0 = 0 have no valid pixel


def write_scene(path: Path) -> Path:
    """A 150 x 200 3-band int16 UTM GeoTIFF with a bright block and nodata in its 128 left columns."""
    from affine import Affine
    from rasterio.crs import CRS

    rng = np.random.default_rng(3)
    data = rng.integers(100, 3000, size=(3, 150, 200)).astype(np.int16)
    data[:, 40:100, 140:190] = 2900
    data[:, :, :128] = -9999
    profile = {"driver": "GTiff", "width": 200, "height": 150, "count": 3, "dtype": "int16", "nodata": -9999,
               "crs": CRS.from_epsg(32616), "transform": Affine(2.0, 0.0, 500000.0, 0.0, -2.0, 4000000.0)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def encoded(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The scene predicted from the image (tiled like the features), and its features in float32
    (``rsrefseg encode --out DIR``: one sub-folder per scene) and float16 (the same cast, as
    ``encode --dtype float16`` gives: tested in test_features.py); the scene is then removed."""
    from rsrefseg.inference.features import recast_features
    from rsrefseg.inference.predictor import Predictor

    work = tmp_path_factory.mktemp("predict-features")
    scene = write_scene(work / "scene.tif")
    ckpt = str(tiny_checkpoint)
    assert main(["encode", str(scene), "--checkpoint", ckpt, "--out", str(work / "float32"), *TILE, *OVERLAP,
                 "--quiet"]) == 0
    recast_features(Predictor.from_pretrained(ckpt, device="cpu"), work / "float32" / "scene",
                    work / "float16" / "scene", "float16")
    assert main(["predict", str(scene), "--text", TEXTS[0], "--text", TEXTS[1], "--checkpoint", ckpt,
                 "--out", str(work / "image"), "--tile-threshold", "1", *TILE, *OVERLAP, "--probability",
                 "--vector-format", "gpkg", "--quiet"]) == 0
    scene.unlink()  # the features must not need it
    return {"work": work, "f32": work / "float32", "f16": work / "float16", "image": work / "image"}


def predict_features(ckpt: Path, features: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--features", str(features), "--text", TEXTS[0], "--text", TEXTS[1],
                 "--checkpoint", str(ckpt), "--out", str(out), "--quiet", *extra])


def bands(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as ds:
        return ds.read(), {"crs": ds.crs, "transform": ds.transform, "size": (ds.height, ds.width),
                           "descriptions": ds.descriptions, "overviews": ds.overviews(1)}


def polygons(path: Path) -> list:
    import pyogrio.raw
    import shapely

    meta, _, geometry, fields = pyogrio.raw.read(path)
    columns = dict(zip(meta["fields"], fields))
    return sorted((int(i), float(a), shapely.from_wkb(g).wkt)
                  for i, a, g in zip(columns["expr_index"], columns["area_m2"], geometry, strict=True))


def test_features_give_the_outputs_of_the_image(encoded, tiny_checkpoint, tmp_path, monkeypatch):
    from rsrefseg.inference.predictor import Predictor

    def never(*args, **kwargs):
        raise AssertionError("the image was read or encoded")

    monkeypatch.setattr(Predictor, "encode", never)
    monkeypatch.setattr("rsrefseg.inference.scene.open_scene", never)
    out = tmp_path / "out"
    assert predict_features(tiny_checkpoint, encoded["f32"], out, "--probability", "--vector-format", "gpkg") == 0
    image, features = encoded["image"], out
    ref = json.loads((image / "summary.json").read_text())["images"][0]
    got = json.loads((features / "summary.json").read_text())["images"][0]
    assert got["features"] == str(encoded["f32"] / "scene") and got["source"].endswith("scene.tif")
    for key in ("dir", "height", "width", "crs", "georeferenced", "tiled", "tile", "overlap", "tiles",
                "skipped_tiles", "complete", "vector", "vector_format"):
        assert got[key] == ref[key], key
    assert (got["tiles"], got["skipped_tiles"], got["tile"]) == (4, 2, 128)
    for a, b in zip(got["outputs"], ref["outputs"], strict=True):
        for key in ("name", "expression", "score", "predicted_iou", "mask_pixels", "polygons", "area_m2", "mask_png",
                    "mask_tif", "geojson", "overlay_png"):
            assert a[key] == b[key], key
    assert [o["name"] for o in got["outputs"]] == NAMES
    assert sum(o["mask_pixels"] for o in got["outputs"]) > 0
    for name in NAMES:
        (a, geo_a), (b, geo_b) = bands(features / "scene" / f"{name}.mask.tif"), bands(image / "scene" / f"{name}.mask.tif")
        assert a.shape == (2, 150, 200) and geo_a == geo_b  # mask + probability band, same georeference, COG
        np.testing.assert_array_equal(a, b)
        with open(features / "scene" / f"{name}.geojson") as fa, open(image / "scene" / f"{name}.geojson") as fb:
            assert json.load(fa)["features"] == json.load(fb)["features"]
    assert polygons(features / "scene" / "scene.gpkg") == polygons(image / "scene" / "scene.gpkg")
    # --resume: the finished folder is taken from the manifest
    assert predict_features(tiny_checkpoint, encoded["f32"], out, "--probability", "--vector-format", "gpkg",
                            "--resume") == 0
    assert json.loads((out / "summary.json").read_text())["images"][0]["resumed"] is True


def test_float16_features_agree_to_iou_099(encoded, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out (the manifest once took its files as relative to OUT)
    out = Path("out")
    assert predict_features(tiny_checkpoint, encoded["f16"] / "scene", out) == 0  # the scene's folder itself
    for name in NAMES:
        a, _ = bands(out / "scene" / f"{name}.mask.tif")
        b, _ = bands(encoded["image"] / "scene" / f"{name}.mask.tif")
        x, y = a[0] > 0, b[0] > 0
        assert (x | y).sum() > 0 and (x & y).sum() / (x | y).sum() >= 0.99


def other_checkpoint(tiny_checkpoint: Path, folder: Path) -> Path:
    import torch

    from rsrefseg.checkpoint import load_checkpoint, save_checkpoint

    model = load_checkpoint(tiny_checkpoint, device="cpu")
    with torch.no_grad():
        next(model.prompter.parameters()).mul_(1.5)
    return save_checkpoint(model, folder)


@pytest.mark.parametrize("case", ["tile", "overlap", "bands", "checkpoint", "checkpoint-files"])
def test_a_mismatched_folder_stops_the_command(encoded, tiny_checkpoint, tmp_path, capsys, case):
    ckpt, extra = tiny_checkpoint, []
    if case == "tile":
        extra, message = ["--tile", "96"], "encoded with tile 128 and overlap 16, not tile 96"
    elif case == "overlap":
        extra, message = ["--overlap", "8"], "not tile 128 and overlap 8"
    elif case == "bands":
        extra, message = ["--bands", "3,2,1"], "encoded with bands [1, 2, 3], not [3, 2, 1]"
    elif case == "checkpoint":
        ckpt, message = other_checkpoint(tiny_checkpoint, tmp_path / "other"), "made with another checkpoint"
    else:  # the same weights, other files: the recorded SHA-256 differs
        ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "copy"))
        (ckpt / "config.json").write_text((ckpt / "config.json").read_text() + " ")
        message = "model.safetensors differs"
    out = tmp_path / "out"
    code, err = run(capsys, "predict", "--features", str(encoded["f32"]), "--text", "x", "--checkpoint", str(ckpt),
                    "--out", str(out), "--quiet", *extra)
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith(f"error: {encoded['f32'] / 'scene'}: ") and message in err
    assert not out.exists()  # nothing created: the folder is checked before any output


def test_missing_empty_and_incomplete_folders(encoded, tiny_checkpoint, tmp_path, capsys):
    base = ["--text", "x", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--quiet"]
    code, err = run(capsys, "predict", "--features", str(tmp_path / "missing"), *base)
    assert code == 2 and err == f"error: {tmp_path / 'missing'}: --features folder not found"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run(capsys, "predict", "--features", str(empty), *base)
    assert code == 2 and err.startswith(f"error: {empty}: no feature folder here") and "\n" not in err
    code, err = run(capsys, "predict", "--features", str(encoded["work"] / "image" / "summary.json"), *base)
    assert code == 2 and "not a file" in err
    broken = Path(shutil.copytree(encoded["f32"], tmp_path / "broken"))
    window = next((broken / "scene" / "windows").glob("w*.safetensors"))
    window.unlink()
    code, err = run(capsys, "predict", "--features", str(broken), *base)
    assert code == 2 and err == (f"error: {window}: window file is missing (incomplete feature folder; rerun "
                                 "`rsrefseg encode` with the same arguments to restore it)")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["images"] == [] and summary["failures"][0]["source"] == str(broken / "scene")
    assert not (tmp_path / "out" / "scene").exists()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [([], "no input given"), (["IMAGE", "--features", "FEAT"], "not both"),
     (["--inputs-file", "LIST", "--features", "FEAT"], "not both"),
     (["--features", "FEAT", "--stac-asset", "visual"], "--stac-asset applies to STAC inputs")],
)
def test_images_or_features_exactly_one(encoded, tiny_checkpoint, tmp_path, capsys, inputs, message):
    scene = write_scene(tmp_path / "scene.tif")
    listing = tmp_path / "list.txt"
    listing.write_text(str(scene))
    values = {"IMAGE": str(scene), "FEAT": str(encoded["f32"]), "LIST": str(listing)}
    code, err = run(capsys, "predict", *[values.get(v, v) for v in inputs], "--text", "x", "--checkpoint",
                    str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--quiet")
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()
