"""Feature folders with the tiny model: decoding equals the in-memory path, resume, every refusal, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from rsrefseg.cli.main import main
from rsrefseg.errors import ConfigError, DataError, RSRefSegError
from rsrefseg.inference import feature_files as ff
from rsrefseg.inference.features import (
    encode_scene,
    find_feature_folders,
    folder_bytes,
    open_features,
    predict_from_features,
    recast_features,
)
from rsrefseg.inference.predictor import Predictor
from rsrefseg.inference.scene import open_scene, predict_scene
from rsrefseg.inference.tiling import TileBox

TEXTS = ["the large building", "a road"]
TILE, OVERLAP = 128, 16  # 2 x 3 windows on the 150 x 250 scene; the 2 at x0 = 0 have no valid pixel


class Stop(Exception):
    """Raised by :func:`stop_after` to interrupt an encode."""


def stop_after(k: int) -> Callable[[Iterator[TileBox], int], Iterator[TileBox]]:
    """A progress wrapper that interrupts the run when window ``k`` (0-based) is reached."""

    def wrap(iterator: Iterator[TileBox], total: int) -> Iterator[TileBox]:
        for i, box in enumerate(iterator):
            if i == k:
                raise Stop
            yield box

    return wrap


def count_encodes(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = predictor.encode

    def encode(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(predictor, "encode", encode)
    return calls


@pytest.fixture(scope="module")
def scene_tif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS

    rng = np.random.default_rng(3)
    data = rng.integers(100, 3000, size=(3, 150, 250)).astype(np.int16)
    data[:, 40:100, 140:230] = 2900  # a bright block: something for the masks to find
    data[:, :, :128] = -9999  # nodata: the windows at x0 = 0 have no valid pixel
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    profile = {"driver": "GTiff", "width": 250, "height": 150, "count": 3, "dtype": "int16", "nodata": -9999,
               "crs": CRS.from_epsg(32616), "transform": Affine(2.0, 0.0, 500000.0, 0.0, -2.0, 4000000.0)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def module_predictor(tiny_session_model) -> Predictor:
    return Predictor(tiny_session_model)


@pytest.fixture(scope="module")
def reference(module_predictor: Predictor, scene_tif: Path):
    """The in-memory path: predict_scene on the image, no cache."""
    with open_scene(scene_tif) as source:
        return predict_scene(module_predictor, source, TEXTS, tile=TILE, overlap=OVERLAP, heatmap=True)


@pytest.fixture(scope="module")
def encoded(module_predictor: Predictor, scene_tif: Path, tmp_path_factory: pytest.TempPathFactory,
            tiny_checkpoint: Path) -> Path:
    folder = tmp_path_factory.mktemp("features") / "scene"
    result = encode_scene(module_predictor, scene_tif, folder, tile=TILE, overlap=OVERLAP, checkpoint=tiny_checkpoint)
    assert (result.windows, result.encoded, result.reused, result.empty) == (6, 4, 0, 2)
    assert result.bytes == folder_bytes(folder)
    return folder


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def same_window_files(a: Path, b: Path) -> None:
    """Window files of two folders hold equal tensors and metadata (the header's key order varies)."""
    from safetensors import safe_open

    names = sorted(p.name for p in (a / "windows").glob("w*.safetensors"))
    assert names == sorted(p.name for p in (b / "windows").glob("w*.safetensors")) and names
    for name in names:
        with safe_open(str(a / "windows" / name), "pt") as x, safe_open(str(b / "windows" / name), "pt") as y:
            assert x.metadata() == y.metadata() and sorted(x.keys()) == sorted(y.keys())
            for key in x.keys():
                assert torch.equal(x.get_tensor(key), y.get_tensor(key))


def assert_same(a, b, exact: bool = True) -> None:
    for x, y in zip(a.predictions, b.predictions, strict=True):
        if exact:
            np.testing.assert_array_equal(x.mask, y.mask)
            np.testing.assert_array_equal(x.logits, y.logits)
            if x.heatmap is not None:
                np.testing.assert_array_equal(x.heatmap, y.heatmap)
            assert (x.score, x.predicted_iou) == (y.score, y.predicted_iou)
        else:
            union = (x.mask | y.mask).sum()
            assert union > 0 and (x.mask & y.mask).sum() / union >= 0.99
    np.testing.assert_array_equal(a.valid, b.valid)


# ------------------------------------------------------------------------------------ decoding
def test_features_decode_exactly_like_the_image(module_predictor, encoded, reference, scene_tif, monkeypatch):
    calls = count_encodes(module_predictor, monkeypatch)
    fs = open_features(encoded, module_predictor)
    assert (fs.tile, fs.overlap, fs.bands, fs.dtype, fs.precision) == (TILE, OVERLAP, (1, 2, 3), "float32", "fp32")
    assert fs.source.georef is not None and fs.source.georef.crs.to_epsg() == 32616
    assert fs.source.georef.transform.c == 500000.0 and fs.source.path == scene_tif.resolve()
    result = predict_from_features(module_predictor, fs, TEXTS, heatmap=True)
    assert calls[0] == 0 and fs.cache.loaded == 4  # nothing encoded, every window file read once
    assert (result.encoded_tiles, result.cached_tiles, result.skipped_tiles) == (0, 4, 2)
    assert all(0 < p.mask.sum() < p.mask.size for p in reference.predictions)  # non-trivial masks
    assert_same(result, reference)
    # The same through predict_scene and the protocol objects, and without the scene file.
    moved = copy(encoded, Path(str(encoded) + "-moved").parent / "elsewhere")
    index = json.loads((moved / "index.json").read_text())
    assert index["scene"]["file_size"] == scene_tif.stat().st_size
    fs2 = open_features(moved, module_predictor)
    again = predict_scene(module_predictor, fs2.source, TEXTS, tile=fs2.tile, overlap=fs2.overlap, cache=fs2.cache)
    for x, y in zip(again.predictions, reference.predictions, strict=True):
        np.testing.assert_array_equal(x.logits, y.logits)


def test_preview_and_read(module_predictor, encoded, scene_tif):
    fs = open_features(encoded, module_predictor)
    with open_scene(scene_tif) as source:
        expected_rgb, expected_valid = source.preview(2048)
    rgb, valid = fs.source.preview(2048)
    np.testing.assert_array_equal(rgb, expected_rgb)
    np.testing.assert_array_equal(valid, expected_valid)
    small, small_valid = fs.source.preview(100)
    assert small.shape == (60, 100, 3) and small_valid.shape == (60, 100) and small.dtype == np.uint8
    assert not small_valid[:, :50].any() and small_valid[:, 53:].all()
    with pytest.raises(DataError, match="holds no pixels"):
        fs.source.read(TileBox(0, 0, 10, 10))
    assert fs.cache.put(TileBox(0, 0, 128, 128), None) is False
    assert fs.cache.get(TileBox(1, 2, 3, 4)) == (False, None)


@pytest.mark.slow
def test_float16_features_and_recast(module_predictor, encoded, reference, scene_tif, tmp_path):
    f16 = encode_scene(module_predictor, scene_tif, tmp_path / "f16", tile=TILE, overlap=OVERLAP, dtype="float16")
    assert f16.encoded == 4
    result = predict_from_features(module_predictor, tmp_path / "f16", TEXTS)
    assert_same(result, reference, exact=False)
    windows_32 = sum(p.stat().st_size for p in (encoded / "windows").iterdir())
    windows_16 = sum(p.stat().st_size for p in (tmp_path / "f16" / "windows").iterdir())
    assert 0.45 < windows_16 / windows_32 < 0.55
    # Recasting the float32 folder gives exactly the float16 encode.
    recast_features(module_predictor, encoded, tmp_path / "recast", "float16")
    same_window_files(tmp_path / "recast", tmp_path / "f16")
    assert json.loads((tmp_path / "recast" / "index.json").read_text())["key"] == \
        json.loads((tmp_path / "f16" / "index.json").read_text())["key"]


# ------------------------------------------------------------------------------------ resume
def test_interrupted_encode_resumes_without_re_encoding(module_predictor, encoded, scene_tif, tmp_path, monkeypatch):
    folder = tmp_path / "scene"
    calls = count_encodes(module_predictor, monkeypatch)
    with pytest.raises(Stop):
        encode_scene(module_predictor, scene_tif, folder, tile=TILE, overlap=OVERLAP, progress=stop_after(4))
    # Windows 0..3 were handled: 0 and 3 have no valid pixel (x0 = 0), so 2 were encoded.
    assert calls[0] == 2 and len(list((folder / "windows").glob("w*.safetensors"))) == 2
    with pytest.raises(DataError, match="incomplete feature folder"):
        open_features(folder, module_predictor)
    # A killed writer's temporary file and a damaged window: cleaned / encoded again.
    (folder / "windows" / ".w000004.safetensors.x1.tmp").write_bytes(b"partial")
    damaged = folder / "windows" / "w000001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    calls[0] = 0
    result = encode_scene(module_predictor, scene_tif, folder, tile=TILE, overlap=OVERLAP)
    assert calls[0] == 4 - 2 + 1 and (result.encoded, result.reused, result.empty) == (3, 1, 2)
    assert not list((folder / "windows").glob(".*"))
    same_window_files(folder, encoded)  # the windows of the uninterrupted run
    index, full = (json.loads((f / "index.json").read_text()) for f in (folder, encoded))
    assert index["windows"] == full["windows"] and index["key"] == full["key"] and index["complete"]
    calls[0] = 0
    assert encode_scene(module_predictor, scene_tif, folder, tile=TILE, overlap=OVERLAP).reused == 4
    assert calls[0] == 0


KILL_SCRIPT = """
import os, signal, sys
from rsrefseg.checkpoint import load_checkpoint
from rsrefseg.inference.features import encode_scene
from rsrefseg.inference.predictor import Predictor

def kill_after(it, n):
    for i, box in enumerate(it):
        if i == int(sys.argv[4]):
            os.kill(os.getpid(), signal.SIGKILL)
        yield box

predictor = Predictor(load_checkpoint(sys.argv[1], device="cpu"))
encode_scene(predictor, sys.argv[2], sys.argv[3], tile=128, overlap=16, progress=kill_after)
"""


@pytest.mark.slow
def test_sigkill_then_resume(module_predictor, encoded, scene_tif, tiny_checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "scene"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    run = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tiny_checkpoint), str(scene_tif), str(folder), "5"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert len(list((folder / "windows").glob("w*.safetensors"))) == 3  # windows 1, 2, 4
    calls = count_encodes(module_predictor, monkeypatch)
    result = encode_scene(module_predictor, scene_tif, folder, tile=TILE, overlap=OVERLAP)
    assert calls[0] == 1 and (result.encoded, result.reused) == (1, 3)
    same_window_files(folder, encoded)


# ------------------------------------------------------------------------------------ refusals
def one_line(exc: pytest.ExceptionInfo, *names: object) -> str:
    text = str(exc.value)
    assert "\n" not in text and isinstance(exc.value, RSRefSegError)
    for name in names:
        assert str(name) in text
    return text


def test_another_checkpoint_is_refused(module_predictor, encoded, tiny_checkpoint, tmp_path):
    from rsrefseg.checkpoint import load_checkpoint, save_checkpoint

    other_model = load_checkpoint(tiny_checkpoint, device="cpu")
    with torch.no_grad():
        next(other_model.prompter.parameters()).mul_(1.5)
    other = Predictor(other_model)
    with pytest.raises(ConfigError, match="another checkpoint") as exc:
        open_features(encoded, other)
    one_line(exc, encoded)
    fs = open_features(encoded, module_predictor)
    with pytest.raises(ConfigError, match="another checkpoint"):  # a cache bound to another model
        predict_scene(other, fs.source, TEXTS, tile=fs.tile, overlap=fs.overlap, cache=fs.cache)
    # The recorded checkpoint files: the same checkpoint passes, another one (same model) is refused.
    open_features(encoded, module_predictor, checkpoint=tiny_checkpoint)
    copy_ckpt = save_checkpoint(load_checkpoint(tiny_checkpoint, device="cpu"), tmp_path / "ckpt2")
    (copy_ckpt / "config.json").write_text((copy_ckpt / "config.json").read_text() + " ")
    with pytest.raises(ConfigError, match=r"model\.safetensors differs") as exc:
        open_features(encoded, module_predictor, checkpoint=copy_ckpt)
    one_line(exc, encoded, copy_ckpt)


def test_fingerprint_ignores_precision_and_optimisation(tiny_checkpoint):
    from rsrefseg.checkpoint import load_checkpoint
    from rsrefseg.modeling.optimize import optimize_for_inference

    plain = ff.model_fingerprint(load_checkpoint(tiny_checkpoint, device="cpu"))
    for precision in ("fp32", "bf16"):
        model = load_checkpoint(tiny_checkpoint, device="cpu")
        # fallback=False: the bf16 encoders even on a CPU without bf16 kernels (the fingerprint and
        # the recorded precision are what is tested here, not the speed).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimize_for_inference(model, precision, fallback=False)
        assert ff.model_fingerprint(model) == plain
        assert ff.model_precision(model) == precision
    assert ff.checkpoint_fingerprint(tiny_checkpoint) == ff.checkpoint_fingerprint(tiny_checkpoint)


def test_another_tiling_or_band_choice_is_refused(module_predictor, encoded, scene_tif, tmp_path):
    with pytest.raises(ConfigError, match="tile 128 and overlap 16, not tile 160 and overlap 16") as exc:
        open_features(encoded, module_predictor, tile=160)
    one_line(exc, encoded)
    with pytest.raises(ConfigError, match="not tile 128 and overlap 8"):
        open_features(encoded, module_predictor, overlap=8)
    fs = open_features(encoded, module_predictor, tile=TILE, overlap=OVERLAP, bands=(1, 2, 3))
    with pytest.raises(ConfigError, match="tile 128 and overlap 16, not tile 256 and overlap 32"):
        predict_scene(module_predictor, fs.source, TEXTS, cache=fs.cache)  # default tiling of the model
    with pytest.raises(ConfigError, match=r"bands \[1, 2, 3\], not \[3, 2, 1\]") as exc:
        open_features(encoded, module_predictor, bands=(3, 2, 1))
    one_line(exc, encoded)
    swapped = encode_scene(module_predictor, scene_tif, tmp_path / "bgr", tile=256, overlap=0, bands=(3, 2, 1))
    assert open_features(swapped.folder, module_predictor, bands=(3, 2, 1)).bands == (3, 2, 1)
    with pytest.raises(ConfigError, match="bands"):
        open_features(swapped.folder, module_predictor, bands=(1, 2, 3))
    grey = encode_scene(module_predictor, scene_tif, tmp_path / "grey", tile=256, overlap=0, bands=(2,))
    assert open_features(grey.folder, module_predictor, bands=(2,)).bands == (2, 2, 2)


def test_encode_into_a_folder_of_other_settings(module_predictor, encoded, scene_tif, tmp_path):
    folder = copy(encoded, tmp_path)
    with pytest.raises(ConfigError, match="tiling differ") as exc:
        encode_scene(module_predictor, scene_tif, folder, tile=160, overlap=OVERLAP)
    one_line(exc, folder, "--overwrite")
    with pytest.raises(ConfigError, match="dtype differ"):
        encode_scene(module_predictor, scene_tif, folder, tile=TILE, overlap=OVERLAP, dtype="float16")
    result = encode_scene(module_predictor, scene_tif, folder, tile=256, overlap=0, overwrite=True)
    assert result.encoded == 1 and len(list((folder / "windows").iterdir())) == 1
    with pytest.raises(ConfigError, match="unknown feature dtype"):
        encode_scene(module_predictor, scene_tif, folder, dtype="int8")
    for tile in (8, 9000):
        with pytest.raises(ConfigError, match="tile must be"):
            encode_scene(module_predictor, scene_tif, folder, tile=tile)
    with pytest.raises(ConfigError, match="preview side must be"):
        encode_scene(module_predictor, scene_tif, folder, preview_max_side=5000)


def test_two_writers_on_one_folder(module_predictor, scene_tif, tmp_path):
    import fcntl

    folder = tmp_path / "f"
    folder.mkdir()
    with open(folder / ".encode.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process encoding into it
        with pytest.raises(ConfigError, match="another `rsrefseg encode` is writing this folder"):
            encode_scene(module_predictor, scene_tif, folder, tile=TILE, overlap=OVERLAP)
    assert not (folder / "index.json").exists()


def test_changed_or_missing_scene(module_predictor, scene_tif, tiny_checkpoint, tmp_path):
    scene = Path(shutil.copy(scene_tif, tmp_path / "scene.tif"))
    folder = encode_scene(module_predictor, scene, tmp_path / "f", tile=256, overlap=0).folder
    os.utime(scene, ns=(scene.stat().st_atime_ns, scene.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="the scene changed") as exc:
        open_features(folder, module_predictor)
    one_line(exc, scene, folder)
    open_features(folder, module_predictor, check_scene=False, checkpoint=tiny_checkpoint)  # none recorded: model check only
    with pytest.raises(ConfigError, match="scene file differ"):  # encode refuses to mix the two versions
        encode_scene(module_predictor, scene, folder, tile=256, overlap=0)
    scene.unlink()
    assert open_features(folder, module_predictor).source.height == 150  # the scene is not needed


def test_missing_and_corrupt_files(module_predictor, encoded, tmp_path):
    folder = copy(encoded, tmp_path)
    window = folder / "windows" / "w000005.safetensors"
    data = window.read_bytes()
    window.unlink()
    with pytest.raises(DataError, match="window file is missing") as exc:
        open_features(folder, module_predictor)
    one_line(exc, window)
    start = 8 + int.from_bytes(data[:8], "little")  # the first tensor's data (float32)
    window.write_bytes(data[:start] + b"\0\0\xc0\x7f" + data[start + 4 :])  # its first value -> NaN
    fs = open_features(folder, module_predictor)
    box = TileBox(*fs.index["windows"][5][:4])
    with pytest.raises(DataError, match="NaN") as exc:
        fs.cache.get(box)
    one_line(exc, window)
    shutil.copy(folder / "windows" / "w000004.safetensors", window)  # another window's file
    with pytest.raises(DataError, match="holds window"):
        fs.cache.get(box)
    with pytest.raises(DataError, match="holds window"):  # and through predict_scene
        predict_from_features(module_predictor, fs, TEXTS[:1])
    window.write_bytes(data)
    (folder / "preview.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read the preview") as exc:
        open_features(folder, module_predictor).source.preview(512)
    one_line(exc, folder / "preview.png")
    (folder / "preview.png").unlink()
    with pytest.raises(DataError, match="preview is missing"):
        open_features(folder, module_predictor)
    index = json.loads((encoded / "index.json").read_text())
    index["tiling"]["overlap"] = 8  # settings changed by hand: the key no longer fits
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"is not window|key does not match"):
        open_features(folder, module_predictor)
    index = json.loads((encoded / "index.json").read_text())
    index["dtype"] = "float16"
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="key does not match"):
        open_features(folder, module_predictor)
    (folder / "index.json").write_text("{")
    with pytest.raises(DataError, match="corrupt index"):
        open_features(folder, module_predictor)
    with pytest.raises(DataError, match="not a feature folder"):
        open_features(tmp_path, module_predictor)


def test_unreachable_scene_path_is_ignored(module_predictor, encoded, tmp_path):
    """A (hand-made, key recomputed) index whose scene path cannot even be stat'ed: features still open."""
    from rsrefseg.inference import feature_index as fi

    folder = copy(encoded, tmp_path)
    index = json.loads((folder / "index.json").read_text())
    index["scene"]["path"] = "/" + "x" * 300 + "/scene.tif"  # ENAMETOOLONG
    index["key"] = ff.settings_key(fi.key_settings(index))
    (folder / "index.json").write_text(json.dumps(index))
    for name in (p.name for p in (folder / "windows").iterdir()):  # the windows carry the key too
        sam, clip, valid = ff.read_window(folder / "windows" / name, ff.expected_window(
            ff.model_shapes(module_predictor.model), "float32", tuple(index["windows"][int(name[1:7])][:4])),
            json.loads((encoded / "index.json").read_text())["key"], tuple(index["windows"][int(name[1:7])][:4]))
        ff.write_window(folder / "windows" / name, sam, clip, valid, "float32", index["key"],
                        tuple(index["windows"][int(name[1:7])][:4]))
    fs = open_features(folder, module_predictor)
    assert fs.source.path.name == "scene.tif"
    assert predict_from_features(module_predictor, fs, TEXTS[:1]).cached_tiles == 4


def test_scene_size_limit(module_predictor, encoded):
    with pytest.raises(DataError, match="above the limit of 1000 pixels"):
        open_features(encoded, module_predictor, max_pixels=1000)


def test_find_feature_folders(encoded, tmp_path):
    assert find_feature_folders(encoded) == [encoded]
    assert find_feature_folders(encoded.parent) == [encoded]
    with pytest.raises(DataError, match="no feature folder"):
        find_feature_folders(tmp_path)


# ------------------------------------------------------------------------------------ CLI
def test_encode_cli(module_predictor, scene_tif, tiny_checkpoint, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    second = Path(shutil.copy(scene_tif, other / scene_tif.name))  # same stem -> scene-2
    out = tmp_path / "out"
    argv = ["encode", str(scene_tif), str(second), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
            "--tile", "256", "--overlap", "0", "--dtype", "float16", "--progress", "json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.err.splitlines()]
    assert {e["event"] for e in events} == {"progress", "done"} and len(events[-1]["scenes"]) == 2
    assert "1 encoded, 0 already there" in captured.out
    assert sorted(p.name for p in find_feature_folders(out)) == ["scene", "scene-2"]
    fs = open_features(out / "scene-2", module_predictor, checkpoint=tiny_checkpoint)
    assert fs.dtype == "float16" and fs.index["scene"]["path"] == str(second.resolve())
    assert main([*argv[:-2], "--quiet"]) == 0  # resumed: nothing to encode
    assert "0 encoded, 1 already there" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--tile", "8"], "--tile must be >= 16"), (["--overlap", "300", "--tile", "256"], "--overlap must be"),
     (["--preview-max-side", "5000"], "--preview-max-side must be"), (["--checkpoint", "/nonexistent"], "nonexistent")],
)
def test_encode_cli_argument_errors(scene_tif, tiny_checkpoint, tmp_path, capsys, extra, message):
    argv = ["encode", str(scene_tif), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_encode_cli_bad_scene(scene_tif, tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\0garbage")
    out = tmp_path / "out"
    base = ["encode", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--quiet", "--tile", "256"]
    assert main([*base, str(bad)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {bad}")
    assert main([*base, str(bad), str(scene_tif)]) == 1
    assert (out / "scene" / "index.json").is_file()
    assert main([*base, str(tmp_path / "missing.tif")]) == 2


@pytest.mark.slow
def test_landsat_features_equal_the_image(module_predictor, tmp_path, monkeypatch):
    """The shared Landsat sample (2846 x 4627, nodata, EPSG:4326) in 6 windows of 2048 px (resized to
    the tiny model's 256): float32 features decode exactly as the image, float16 to IoU >= 0.99."""
    from rsrefseg import paths

    scene = paths.geotiff_root() / "landsat_large_nodata_wgs84.tif"
    if not scene.is_file():
        pytest.skip(f"shared Landsat sample not available at {scene}")
    result = encode_scene(module_predictor, scene, tmp_path / "f32", tile=2048, overlap=256)
    assert result.windows == 6 and result.encoded == 6
    recast_features(module_predictor, tmp_path / "f32", tmp_path / "f16", "float16")
    texts = ["the river", "bright fields in the north"]
    with open_scene(scene) as source:
        reference = predict_scene(module_predictor, source, texts, tile=2048, overlap=256)
    calls = count_encodes(module_predictor, monkeypatch)
    fs = open_features(tmp_path / "f32", module_predictor, tile=2048, overlap=256)
    assert fs.source.georef.crs.to_epsg() == 4326 and fs.index["stretch"]["limits"]
    assert_same(predict_from_features(module_predictor, fs, texts), reference)
    assert_same(predict_from_features(module_predictor, tmp_path / "f16", texts), reference, exact=False)
    assert calls[0] == 0
    assert all(0 < p.mask.sum() < p.mask.size for p in reference.predictions)
