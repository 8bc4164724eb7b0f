"""read_image on plain images, the sample GeoTIFFs and broken files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.errors
from affine import Affine
from PIL import Image

from rsrefseg.data.imageio import image_size, read_geo_profile, read_image
from rsrefseg.errors import DataError


def _write_tif(path: Path, data: np.ndarray, nodata: float | None = None) -> Path:
    """Write a ``C x H x W`` array as a (non-georeferenced) GeoTIFF."""
    profile = {"driver": "GTiff", "count": data.shape[0], "height": data.shape[1], "width": data.shape[2]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", dtype=data.dtype, nodata=nodata, **profile) as dst:
            dst.write(data)
    return path


def test_plain_jpeg(data_formats_dir: Path) -> None:
    image = read_image(data_formats_dir / "dior_00001.jpg")
    assert image.rgb.shape == (800, 800, 3) and image.rgb.dtype == np.uint8
    assert image.valid.all() and image.crs is None and image.transform is None
    assert image.band_indices == (1, 2, 3)
    assert np.array_equal(image.rgb, np.asarray(Image.open(data_formats_dir / "dior_00001.jpg")))
    assert image_size(data_formats_dir / "dior_00001.jpg") == (800, 800)


def test_single_band_uint16_is_replicated_and_stretched(data_geotiff_dir: Path) -> None:
    path = data_geotiff_dir / "spacenet_pan_uint16.tif"
    image = read_image(path)
    assert image.rgb.shape == (900, 900, 3) and image.band_indices == (1, 1, 1)
    assert np.array_equal(image.rgb[..., 0], image.rgb[..., 1])
    assert np.array_equal(image.rgb[..., 0], image.rgb[..., 2])
    assert image.crs.to_epsg() == 32616 and image.transform.a == pytest.approx(0.5)
    with rasterio.open(path) as src:
        raw = src.read(1).astype(np.float64)
        nodata = src.nodata
    valid = raw != nodata
    assert np.array_equal(image.valid, valid)
    low, high = np.percentile(raw[valid], (2, 98))
    expected = np.clip(np.rint((raw - low) * 255.0 / (high - low)), 0, 255)
    assert np.abs(image.rgb[..., 0].astype(int) - expected).max() <= 1
    # 2 / 98 percentile stretch: about 2 % of the valid pixels saturate at each end
    assert 0.01 < (image.rgb[valid, 0] == 0).mean() < 0.04
    assert 0.01 < (image.rgb[valid, 0] == 255).mean() < 0.04


def test_four_band_float_with_band_choice(data_geotiff_dir: Path) -> None:
    path = data_geotiff_dir / "multispectral_4band_float64.tif"
    default = read_image(path)
    chosen = read_image(path, bands=(4, 3, 2))
    assert default.band_indices == (1, 2, 3) and chosen.band_indices == (4, 3, 2)
    assert chosen.rgb.shape == (300, 300, 3) and chosen.rgb.dtype == np.uint8
    # band 3 and band 2 are stretched identically whichever channel they land in
    assert np.array_equal(chosen.rgb[..., 1], default.rgb[..., 2])
    assert np.array_equal(chosen.rgb[..., 2], default.rgb[..., 1])
    assert not np.array_equal(chosen.rgb[..., 0], default.rgb[..., 0])
    assert chosen.crs.to_epsg() == 32631
    with pytest.raises(DataError) as info:
        read_image(path, bands=(5, 3, 2))
    assert "unsupported band count" in str(info.value) and str(path) in str(info.value)


def test_int16_nodata_is_invalid_and_black(data_geotiff_dir: Path) -> None:
    path = data_geotiff_dir / "landsat_large_nodata_wgs84.tif"
    image = read_image(path)
    with rasterio.open(path) as src:
        raw = src.read(1)
        nodata = src.nodata
    assert image.rgb.shape == (4627, 2846, 3)
    assert np.array_equal(image.valid, raw != nodata)
    assert 0.3 < image.valid.mean() < 0.9
    assert not image.rgb[~image.valid].any()
    # the stretch ignores nodata: only ~2 % of valid pixels are clipped to 0 (with nodata in the
    # percentiles the lower bound would be -9999 and almost none would)
    assert 0.005 < (image.rgb[image.valid, 0] == 0).mean() < 0.05
    assert image.crs.to_epsg() == 4326


def test_custom_crs_is_read(data_geotiff_dir: Path) -> None:
    path = data_geotiff_dir / "albers_3band_int16.tif"
    image = read_image(path)
    assert image.rgb.shape == (512, 512, 3) and image.band_indices == (1, 2, 3)
    assert image.crs is not None and image.crs.to_epsg() is None
    assert "Albers" in image.crs.to_wkt()
    assert image.transform == Affine(30.0, 0.0, -673425.0, 0.0, -30.0, 2130165.0)
    profile = read_geo_profile(path)
    assert profile["crs"] == image.crs and profile["count"] == 3 and profile["nodata"] == -9999


def test_two_bands_are_refused(tmp_path: Path) -> None:
    path = _write_tif(tmp_path / "two.tif", np.ones((2, 8, 8), dtype=np.uint16))
    with pytest.raises(DataError, match=r"two\.tif: unsupported band count 2"):
        read_image(path)


def test_float_nan_and_plain_tif(tmp_path: Path) -> None:
    data = np.linspace(0, 1, 3 * 16 * 16, dtype=np.float32).reshape(3, 16, 16)
    data[:, 0, 0] = np.nan
    path = _write_tif(tmp_path / "f.tif", data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the NotGeoreferencedWarning of plain files is suppressed
        image = read_image(path)
    assert not image.valid[0, 0] and image.valid.sum() == 255 and not image.rgb[0, 0].any()
    assert image.crs is None and image.transform is None  # not georeferenced, no warning
    raw8 = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    plain = read_image(_write_tif(tmp_path / "u8.tif", raw8))
    assert np.array_equal(plain.rgb, np.moveaxis(raw8, 0, -1))  # uint8 is never stretched


def test_png_16bit_grey_and_rgba(tmp_path: Path) -> None:
    grey = (np.arange(64 * 64).reshape(64, 64) * 10).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    assert image.rgb.dtype == np.uint8 and image.rgb[..., 0].min() == 0 and image.rgb[..., 0].max() == 255
    rgba = np.full((4, 4, 4), 200, dtype=np.uint8)
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.valid.sum() == 15 and not image.rgb[0, 0].any() and (image.rgb[1, 1] == 200).all()


@pytest.mark.parametrize("name", ["broken.jpg", "broken.png", "broken.tif"])
def test_corrupt_image_is_a_one_line_data_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not an image\n" * 20)
    with pytest.raises(DataError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot read image") and "\n" not in message


def test_truncated_jpeg_and_missing_file(data_formats_dir: Path, tmp_path: Path) -> None:
    data = (data_formats_dir / "dior_00001.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg: cannot read image"):
        read_image(tmp_path / "cut.jpg")
    with pytest.raises(DataError, match=r"nope\.tif: image not found"):
        read_image(tmp_path / "nope.tif")
