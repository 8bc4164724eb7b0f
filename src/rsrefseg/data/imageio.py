"""Read any remote-sensing image as display-ready RGB uint8 plus a validity mask.

- 8-bit JPEG/PNG (and palette/grey/RGBA) are read with PIL (fast path, no georeferencing);
  an alpha channel becomes the validity mask.
- Everything else (GeoTIFF, 16-bit, float, multiband...) is read with rasterio:
  1 band is replicated to 3 channels; 3 bands are used as they are; 4+ bands: the first three, or
  ``bands=(4, 3, 2)`` (1-based, like GDAL); 2 bands are refused ("unsupported band count").
- Non-uint8 data is stretched per band between the ``stretch`` percentiles (default 2 and 98),
  computed over the valid pixels only (not nodata, finite). uint8 data is kept as it is.
- Nodata / masked pixels are 0 in ``rgb`` and False in ``valid``.

EXIF orientation is deliberately ignored: masks are stored in the pixel order of the file.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rsrefseg.errors import DataError

#: Suffixes read with PIL (8-bit raster formats without georeferencing).
PIL_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
#: At most this many valid pixels per band feed the percentile estimate (deterministic stride).
_PERCENTILE_SAMPLES = 2_000_000
#: Largest image :func:`read_image` decodes whole by default: PIL's decompression-bomb limit
#: (2 x its default ``Image.MAX_IMAGE_PIXELS``, ~13,400 x 13,400), for rasterio files too. Larger
#: scenes are read window by window (``rsrefseg predict``, ``rsrefseg.inference.scene``).
MAX_IMAGE_PIXELS = 2 * 89_478_485


@dataclass
class RasterImage:
    """An image ready for the model, with its georeferencing (if any)."""

    #: H x W x 3 uint8 RGB (nodata pixels are 0).
    rgb: np.ndarray
    #: H x W bool, False on nodata / masked / non-finite pixels.
    valid: np.ndarray
    #: ``rasterio.crs.CRS`` or None for plain images.
    crs: Any
    #: ``affine.Affine`` pixel -> CRS transform, or None for plain images.
    transform: Any
    path: Path
    #: 1-based source band of each RGB channel, e.g. ``(1, 1, 1)`` for a single-band file.
    band_indices: tuple[int, int, int]

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: image not found")


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """``"4,3,2"`` -> ``(4, 3, 2)`` (1-based R, G, B), ``"1"`` -> ``(1,)``; empty -> ``None`` (automatic).

    Raises:
        ValueError: not 1 or 3 positive integers.
    """
    if text is None or not text.strip():
        return None
    try:
        bands = tuple(int(b) for b in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"bands must be 1-based integers like 4,3,2, got {text!r}") from None
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise ValueError(f"bands must name 1 or 3 bands (1-based), got {text!r}")
    return bands


def select_bands(count: int, bands: tuple[int, ...] | None, path: Path) -> tuple[int, int, int]:
    """1-based band index for each of the three output channels."""
    if bands is None:
        if count == 1:
            return (1, 1, 1)
        if count == 2:
            raise DataError(f"{path}: unsupported band count 2 (need 1, 3 or more bands)")
        return (1, 2, 3)
    chosen = tuple(int(b) for b in bands)
    if len(chosen) == 1:
        chosen = chosen * 3
    if len(chosen) != 3:
        raise DataError(f"{path}: unsupported band count: bands={bands} must name 1 or 3 bands")
    if any(b < 1 or b > count for b in chosen):
        raise DataError(
            f"{path}: unsupported band count: bands={bands} out of range for {count} band(s) (1-based)"
        )
    return chosen  # type: ignore[return-value]


def percentile_limits(values: np.ndarray, stretch: tuple[float, float]) -> tuple[float, float] | None:
    """``(low, high)`` percentiles of 1-D valid values (``None`` when there are none)."""
    if values.size == 0:
        return None
    low, high = np.percentile(values.astype(np.float64), stretch)
    return float(low), float(high)


def apply_stretch(band: np.ndarray, valid: np.ndarray, limits: tuple[float, float] | None) -> np.ndarray:
    """Linear stretch of one ``H x W`` band from ``limits`` to uint8 0..255 (0 where not valid).

    No limits (no valid pixel) or a constant band gives all zeros.
    """
    if limits is None or not limits[1] > limits[0]:
        return np.zeros(band.shape, dtype=np.uint8)
    low, high = limits
    scaled = band.astype(np.float32)
    scaled -= np.float32(low)
    scaled *= np.float32(255.0 / (high - low))
    scaled[~valid] = 0.0  # also removes NaN/inf, which are never valid
    np.clip(scaled, 0.0, 255.0, out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8)


def _stretch_band(band: np.ndarray, valid: np.ndarray, stretch: tuple[float, float]) -> np.ndarray:
    """Linear percentile stretch of one ``H x W`` band to uint8 using the valid pixels only
    (at most :data:`_PERCENTILE_SAMPLES` of them, every ``step``-th in row-major order)."""
    values = band[valid]
    step = max(1, values.size // _PERCENTILE_SAMPLES)
    return apply_stretch(band, valid, percentile_limits(values[::step], stretch))


def _to_rgb(
    data: np.ndarray, channels: tuple[int, int, int], valid: np.ndarray, stretch: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """``K x H x W`` bands of any dtype -> (``H x W x 3`` uint8, validity ``H x W``).

    ``channels[c]`` is the index into ``data`` of output channel ``c``; each band is stretched once.
    """
    if np.issubdtype(data.dtype, np.floating):
        valid = valid & np.isfinite(data).all(axis=0)
    if data.dtype == np.uint8:
        bands = list(data)
    else:
        bands = [_stretch_band(band, valid, stretch) for band in data]
    rgb = np.stack([bands[c] for c in channels], axis=-1)  # 3 x (H x W) -> H x W x 3
    rgb[~valid] = 0
    return rgb, valid


def _check_stretch(stretch: tuple[float, float]) -> tuple[float, float]:
    low, high = float(stretch[0]), float(stretch[1])
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"stretch percentiles must satisfy 0 <= low < high <= 100, got {stretch}")
    return low, high


def _channel_index(chosen: tuple[int, int, int], unique: list[int]) -> tuple[int, int, int]:
    """Position in ``unique`` of each chosen band."""
    return unique.index(chosen[0]), unique.index(chosen[1]), unique.index(chosen[2])


def check_pixels(path: Path, height: int, width: int, max_pixels: int | None) -> None:
    """DataError when a ``height x width`` image is above ``max_pixels`` (checked from the header,
    before any pixel is decoded)."""
    if max_pixels is not None and height * width > max_pixels:
        raise DataError(f"{path}: image of {height}x{width} pixels is larger than the {max_pixels} pixels read "
                        "whole; segment it tile by tile with `rsrefseg predict`")


def _read_pil(path: Path, bands: tuple[int, ...] | None, stretch: tuple[float, float],
              max_pixels: int | None = MAX_IMAGE_PIXELS) -> RasterImage:
    try:
        with Image.open(path) as img:
            check_pixels(path, img.height, img.width, max_pixels)
            img.load()
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("L" if mode == "1" else "RGB")
            final_mode = img.mode
            array = np.asarray(img)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot read image ({_one_line(exc)})") from None
    if array.ndim == 2:
        array = array[None]  # H x W -> 1 x H x W
    else:
        array = np.moveaxis(array, -1, 0)  # H x W x C -> C x H x W
    valid = np.ones(array.shape[1:], dtype=bool)
    if final_mode in ("RGBA", "LA", "PA"):  # last channel is alpha: it marks validity, it is not a band
        valid = array[-1] > 0
        array = array[:-1]
    chosen = select_bands(array.shape[0], bands, path)
    unique = sorted(set(chosen))
    data = array[[b - 1 for b in unique]]  # keep the chosen channels -> K x H x W
    rgb, valid = _to_rgb(data, _channel_index(chosen, unique), valid, stretch)
    return RasterImage(rgb=rgb, valid=valid, crs=None, transform=None, path=path, band_indices=chosen)


def _open_rasterio(path: Path) -> Any:
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        raise DataError(f"{path}: cannot read image ({_one_line(exc)})") from None


def _read_rasterio(path: Path, bands: tuple[int, ...] | None, stretch: tuple[float, float],
                   max_pixels: int | None = MAX_IMAGE_PIXELS) -> RasterImage:
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with _open_rasterio(path) as src:
            check_pixels(path, src.height, src.width, max_pixels)
            chosen = select_bands(src.count, bands, path)
            unique = sorted(set(chosen))
            try:
                data = src.read(unique)  # len(unique) x H x W, native dtype
                masks = src.read_masks(unique)  # len(unique) x H x W, 0 = nodata / masked
            except RasterioError as exc:
                raise DataError(f"{path}: cannot read image ({_one_line(exc)})") from None
            georef = src.crs is not None
            crs = src.crs if georef else None
            transform = src.transform if georef else None
    valid = (masks > 0).all(axis=0)
    rgb, valid = _to_rgb(data, _channel_index(chosen, unique), valid, stretch)
    return RasterImage(rgb=rgb, valid=valid, crs=crs, transform=transform, path=path, band_indices=chosen)


def read_image(
    path: str | os.PathLike[str],
    bands: tuple[int, ...] | None = None,
    stretch: tuple[float, float] = (2.0, 98.0),
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> RasterImage:
    """Read an image as :class:`RasterImage` (``rgb`` H x W x 3 uint8, ``valid`` H x W bool).

    Args:
        path: JPEG/PNG (PIL) or any GDAL-readable raster (rasterio).
        bands: 1-based band indices for R, G, B (one index is replicated); default: first three,
            or band 1 three times for single-band files.
        stretch: lower/upper percentiles of the per-band linear stretch for non-uint8 data.
        max_pixels: refuse (DataError, from the header) images with more pixels; None = no limit
            (PIL's own decompression-bomb check still applies to JPEG/PNG/BMP).

    Raises:
        DataError: missing, corrupt or unreadable file, or an unsupported band count/choice.
    """
    path = Path(path)
    _check_exists(path)
    stretch = _check_stretch(stretch)
    if path.suffix.lower() in PIL_SUFFIXES:
        return _read_pil(path, bands, stretch, max_pixels)
    return _read_rasterio(path, bands, stretch, max_pixels)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(H, W)`` of an image from its header only (fast; does not decode the pixels)."""
    path = Path(path)
    _check_exists(path)
    if path.suffix.lower() in PIL_SUFFIXES:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
            raise DataError(f"{path}: cannot read image ({_one_line(exc)})") from None
        return int(height), int(width)
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with _open_rasterio(path) as src:
            return int(src.height), int(src.width)


def read_geo_profile(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Georeferencing of a raster: ``crs``, ``transform``, ``width``, ``height``, ``count``, ``dtypes``,
    ``nodata`` (``crs``/``transform`` are None for non-georeferenced files)."""
    path = Path(path)
    _check_exists(path)
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with _open_rasterio(path) as src:
            georef = src.crs is not None
            return {
                "crs": src.crs if georef else None,
                "transform": src.transform if georef else None,
                "width": int(src.width),
                "height": int(src.height),
                "count": int(src.count),
                "dtypes": tuple(src.dtypes),
                "nodata": src.nodata,
            }
