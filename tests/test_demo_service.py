"""Tests of rsrefseg.demo_service: the web demo's work without Gradio (caching, limits, outputs, tiling)."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rsrefseg.demo_service import DemoService, Limits, check_upload, parse_expressions
from rsrefseg.errors import ConfigError, DataError
from rsrefseg.inference.outputs import heatmap_image


def _png(path: Path, height: int, width: int, seed: int = 0) -> Path:
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _geotiff(path: Path, height: int = 48, width: int = 64) -> Path:
    """A 3-band uint16 GeoTIFF in UTM 31N with a nodata value."""
    import rasterio
    from affine import Affine

    data = np.random.default_rng(1).integers(100, 4000, size=(3, height, width), dtype=np.uint16)
    data[:, :4, :4] = 0
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 3, "dtype": "uint16",
               "crs": "EPSG:32631", "transform": Affine(10.0, 0, 500000.0, 0, -10.0, 4500000.0), "nodata": 0}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def tiny_predictor() -> Any:
    """A :class:`Predictor` on the ``tiny`` preset at seeded random init."""
    from rsrefseg import RSRefSeg
    from rsrefseg.inference.predictor import Predictor

    return Predictor(RSRefSeg.from_preset("tiny"))


def small_service(predictor: Any, tmp_path: Path) -> DemoService:
    """A service with small limits (5 MB, 200 x 200 pixels, 4 expressions), keeping 2 runs."""
    return DemoService(predictor, Limits(max_upload_mb=5, max_pixels=200 * 200, max_expressions=4),
                       workdir=tmp_path / "work", keep_runs=2)


@pytest.fixture(scope="module")
def predictor() -> Any:
    return tiny_predictor()


@pytest.fixture()
def service(predictor: Any, tmp_path: Path) -> DemoService:
    return small_service(predictor, tmp_path)


# ---------------------------------------------------------------- pure helpers
def test_parse_expressions_one_per_line() -> None:
    assert parse_expressions("  the  ship \n\n\tthe road on the left\n") == ["the ship", "the road on the left"]
    with pytest.raises(ConfigError, match="at least one"):
        parse_expressions(" \n \n")
    with pytest.raises(ConfigError, match="at least one"):
        parse_expressions(None)
    with pytest.raises(ConfigError, match="3 expressions given; at most 2"):
        parse_expressions("a\nb\nc", max_expressions=2)
    with pytest.raises(ConfigError, match="expression 2 has 5000 characters; at most 1000"):
        parse_expressions("ok\n" + "z" * 5000)
    assert parse_expressions("\n".join(["y" * 1000] * 2), max_expressions=2) == ["y" * 1000] * 2  # the maximum
    with pytest.raises(ConfigError, match=r"^the expressions are 2003 characters long; at most 2002 are accepted"):
        parse_expressions("\n".join(["y" * 1000] * 2) + "\n\n", max_expressions=2)
    with pytest.raises(ConfigError, match=r"expression 1 is not valid text .* lone surrogate U\+DC80"):
        parse_expressions("caf\udc80", max_expressions=2)  # how undecodable bytes arrive (surrogateescape)
    with pytest.raises(ConfigError, match=r"the expressions must be text, one per line \(got int\)"):
        parse_expressions(42)  # type: ignore[arg-type]  # an API client sending a number


def test_check_upload_limits_name_the_file_and_the_limit(tmp_path: Path) -> None:
    image = _png(tmp_path / "scene.png", 120, 100)
    assert check_upload(image, Limits(max_upload_mb=1, max_pixels=120 * 100)) == (120, 100)
    with pytest.raises(DataError) as info:
        check_upload(image, Limits(max_upload_mb=0.001))
    message = str(info.value)
    assert message.startswith("scene.png: file is 0.0") and "above the upload limit of 0.001 MB" in message
    assert "\n" not in message
    with pytest.raises(DataError, match=r"scene\.png: image is 100 x 120 = 0\.012 MP, above the limit of 0\.012 MP \(11999 pixels\)"):
        check_upload(image, Limits(max_pixels=11_999))
    with pytest.raises(DataError, match=r"missing\.png: uploaded file not found"):
        check_upload(tmp_path / "missing.png", Limits())
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"junk\.png"):
        check_upload(tmp_path / "junk.png", Limits())


def test_heatmap_image_shape_and_range() -> None:
    preview = np.zeros((30, 40, 3), dtype=np.uint8)
    heat = np.linspace(0, 1, 60 * 80, dtype=np.float32).reshape(60, 80)
    out = heatmap_image(preview, heat)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    assert out[-1, -1].sum() > out[0, 0].sum()  # bright where the activation is high


# ---------------------------------------------------------------- the service
def test_run_writes_overlays_heatmaps_and_downloads(service: DemoService, tmp_path: Path) -> None:
    image = _png(tmp_path / "my scene.png", 90, 120)
    result = service.run(image, "the ship\nthe white building\n")
    scores = [r["score"] for r in result.records]
    assert [caption for _, caption in result.overlays] == [f"the ship (score {scores[0]:.2f})",
                                                           f"the white building (score {scores[1]:.2f})"]
    assert [caption for _, caption in result.heatmaps] == ["the ship", "the white building"]
    for path, _ in result.overlays + result.heatmaps:
        assert Path(path).is_file() and Path(path).is_relative_to(service.workdir)
    zip_path, *files = result.downloads
    assert Path(zip_path).name == "my_scene_masks.zip"
    assert [Path(f).name for f in files] == ["01_the-ship.mask.png", "02_the-white-building.mask.png"]
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(archive.namelist())
    assert names == ["my_scene/01_the-ship.mask.png", "my_scene/01_the-ship.overlay.png",
                     "my_scene/02_the-white-building.mask.png", "my_scene/02_the-white-building.overlay.png"]
    from PIL import Image

    with Image.open(files[0]) as mask:
        assert mask.size == (120, 90) and mask.mode == "L"
    assert "120 x 90 px, not georeferenced" in result.summary and "| 2 | the white building |" in result.summary


def test_features_are_cached_per_upload(service: DemoService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _png(tmp_path / "a.png", 64, 64, seed=1), _png(tmp_path / "b.png", 64, 80, seed=2)
    calls: list[Any] = []
    original = service.predictor.set_image
    monkeypatch.setattr(service.predictor, "set_image", lambda image, **kw: (calls.append(image), original(image, **kw)))
    preview = service.load(a)  # on upload
    assert preview.shape == (64, 64, 3)
    service.run(a, "the ship")
    service.run(a, "the road\nthe field")  # new expressions, same image: no re-encoding
    assert len(calls) == 1
    service.run(b, "the ship")
    service.run(a, "the ship")  # another user's image came in between: encode again
    assert len(calls) == 3 and service.encodes == 3
    assert len(list(service.workdir.glob("run-*"))) == 2  # keep_runs=2: older outputs removed


def test_runs_are_kept_per_output_folder_and_uploads_released(predictor: Any, tmp_path: Path) -> None:
    """``keep_runs`` counts per output folder (one per session in the server); ``release`` forgets
    the current upload (its file is about to be deleted), so it is encoded again if it comes back."""
    service = DemoService(predictor, Limits(max_pixels=200 * 200), workdir=tmp_path / "work", keep_runs=1)
    a, b = _png(tmp_path / "a.png", 48, 48, seed=1), _png(tmp_path / "b.png", 48, 48, seed=2)
    service.run(a, "the ship")
    service.run(a, "the ship", out_dir=tmp_path / "session-1")
    service.run(a, "the ship", out_dir=tmp_path / "session-1")
    assert len(list((tmp_path / "session-1").glob("run-*"))) == 1
    assert len(list(service.workdir.glob("run-*"))) == 1  # untouched by the other folder
    assert service.encodes == 1
    assert service.release(b) is False and service.release(a) is True
    service.load(a)
    assert service.encodes == 2


def test_geotiff_upload_offers_geojson_and_geotiff(service: DemoService, tmp_path: Path) -> None:
    result = service.run(_geotiff(tmp_path / "utm.tif"), "the building")
    names = [Path(f).name for f in result.downloads]
    assert names == ["utm_masks.zip", "01_the-building.mask.png", "01_the-building.geojson", "01_the-building.mask.tif"]
    collection = json.loads(Path(result.downloads[2]).read_text())
    assert collection["type"] == "FeatureCollection" and "32631" in json.dumps(collection["crs"])
    assert "georeferenced;" in result.summary
    from PIL import Image

    with Image.open(result.downloads[1]) as png:
        mask = np.asarray(png) > 0
    assert not mask[:4, :4].any()  # nodata is never in the mask


def test_limits_are_enforced_before_reading(service: DemoService, tmp_path: Path) -> None:
    big = _png(tmp_path / "big.png", 250, 200)
    with pytest.raises(DataError, match=r"big\.png: image is 200 x 250 = 0\.05 MP, above the limit of 0\.04 MP \(40000 pixels\)"):
        service.run(big, "the ship")
    with pytest.raises(DataError, match=r"big\.png"):
        service.load(big)
    assert service.encodes == 0
    with pytest.raises(ConfigError, match="5 expressions given; at most 4"):
        service.run(_png(tmp_path / "ok.png", 32, 32), "a\nb\nc\nd\ne")
    with pytest.raises(ConfigError, match="threshold"):
        service.run(tmp_path / "ok.png", "a", threshold=1.0)


def test_concurrent_runs_do_not_mix_images(service: DemoService, tmp_path: Path) -> None:
    paths = [_png(tmp_path / f"img{i}.png", 40 + 10 * i, 50, seed=i) for i in range(3)]
    shapes: dict[int, tuple[int, int]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            result = service.run(paths[i], "the ship")
            from PIL import Image

            with Image.open(result.downloads[1]) as mask:
                shapes[i] = (mask.height, mask.width)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and shapes == {i: (40 + 10 * i, 50) for i in range(3)}


def test_band_choice_reencodes_and_bad_bands_are_one_line(service: DemoService, tmp_path: Path) -> None:
    """A band choice (e.g. 3,2,1 of a multispectral GeoTIFF) is applied, counted as a new image."""
    tif = _geotiff(tmp_path / "bands.tif")
    auto = service.load(tif)
    swapped = service.load(tif, "3,2,1")
    assert service.encodes == 2
    np.testing.assert_array_equal(swapped, auto[..., ::-1])  # R and B exchanged
    service.run(tif, "the ship", bands="3,2,1")  # same bands: cached, no re-encoding
    assert service.encodes == 2
    grey = service.load(tif, " 2 ")  # one band, shown as grey
    assert (grey[..., 0] == grey[..., 1]).all() and service.encodes == 3
    for bad in ("4,3,2", "1,2", "x"):
        with pytest.raises((ConfigError, DataError)) as info:
            service.load(tif, bad)
        assert "\n" not in str(info.value) and ("band" in str(info.value))


def test_large_upload_is_tiled(predictor: Any, tmp_path: Path) -> None:
    """Above tile_threshold the run goes tile by tile at native resolution, the encoded windows are
    reused by the next run, and masks/heatmaps/GeoJSON still cover the whole scene (nodata excluded)."""
    service = DemoService(predictor, Limits(max_pixels=200 * 200, tile_threshold=40 * 40), workdir=tmp_path / "w")
    tif = _geotiff(tmp_path / "scene.tif", height=90, width=300 // 2)  # 150 x 90 > 40 x 40: tiled
    service.load(tif)
    assert service.encodes == 0 and not predictor.is_image_set  # nothing encoded on upload
    result = service.run(tif, "the building\nthe road", threshold=0.5)
    assert service.encodes == 1 and "tile by tile" in result.summary
    assert len(result.heatmaps) == 2 and all(Path(p).is_file() for p, _ in result.heatmaps)
    from PIL import Image

    with Image.open(result.downloads[1]) as png:
        mask = np.asarray(png)
    assert mask.shape == (90, 150) and not mask[:4, :4].any()
    tiles = service.encoded_tiles
    assert tiles >= 1 and "already encoded: 0)" in result.summary
    again = service.run(tif, "the ship\nthe building")  # new expressions: the windows are not encoded again
    assert service.encodes == 1 and service.encoded_tiles == tiles
    assert f"already encoded: {tiles})" in again.summary
    assert again.records[1]["mask_pixels"] == result.records[0]["mask_pixels"]  # same expression, same mask
    small = DemoService(predictor, Limits(max_pixels=200 * 200, tile_threshold=40 * 40, tile_cache_mb=0),
                        workdir=tmp_path / "w0")
    small.run(tif, "the ship")
    small.run(tif, "the ship")  # no cache budget: every run encodes the windows
    assert small.encodes == 2 and small.encoded_tiles == 2 * tiles
