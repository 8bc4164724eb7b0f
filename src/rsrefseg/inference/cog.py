"""Streaming writer of mask GeoTIFFs as Cloud Optimized GeoTIFF (COG).

:class:`COGMaskWriter` takes the mask of an ``H x W`` scene window by window, so a 200000 x 200000
scene is written with memory bounded by one window plus GDAL's block cache (capped at
``cache_mb`` while the writer works), and produces a COG:

- band 1 ``mask``: ``uint8``, foreground 255 / background 0, no nodata (as
  :func:`rsrefseg.inference.geo.write_mask_geotiff`: background is an answer, not missing data);
- optional band 2 ``probability``: ``uint8`` = ``round(255 * sigmoid(logit))``
  (:func:`probability_uint8`);
- tiled 512 x 512, DEFLATE with the horizontal predictor, overviews (nearest: masks stay binary)
  down to one tile, COG layout (all IFDs first, then the tiles from the smallest overview to full
  resolution, with GDAL's ``LAYOUT=IFDS_BEFORE_DATA`` ghost header), so GIS and web viewers can
  read any zoom level with a few range requests.

How: windows go into a temporary tiled GeoTIFF (BigTIFF when it could pass 4 GB; never-written
regions read as 0); :meth:`COGMaskWriter.close` has GDAL's COG driver copy it with overviews into a
second temporary file, which is then renamed onto the target. Everything temporary lives in one
hidden folder next to the target, removed on success, on error and on :meth:`COGMaskWriter.abort`,
so a crash never leaves a half-written ``.tif`` (a SIGKILL can leave the hidden folder, never the
target). Windows aligned to the 512-pixel grid (e.g. strips of 512 rows) are the cheapest to write;
any window works, later writes overwrite earlier ones.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from rsrefseg.errors import DataError
from rsrefseg.inference.geo import MASK_FOREGROUND
from rsrefseg.utils import current_umask

__all__ = ["COG_BLOCK", "COGMaskWriter", "probability_uint8"]

#: Tile size of the written COGs (pixels).
COG_BLOCK = 512


def probability_uint8(logits: np.ndarray) -> np.ndarray:
    """``round(255 * sigmoid(logits))`` as ``uint8``, for an ``h x w`` array of logits.

    The sigmoid is computed as ``0.5 * (1 + tanh(x / 2))`` (no overflow for large ``|x|``); NaN
    logits give 0.
    """
    x = np.asarray(logits, dtype=np.float32)
    prob = 0.5 * (1.0 + np.tanh(0.5 * x))  # h x w in [0, 1]
    return np.nan_to_num(np.rint(prob * 255.0), nan=0.0).astype(np.uint8)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class COGMaskWriter:
    """Write an ``H x W`` mask (and optionally its probability) window by window into a COG.

    Use it as a context manager: a normal exit calls :meth:`close` (overviews, COG layout,
    atomic rename), an exception calls :meth:`abort` (the target is left as it was)::

        with COGMaskWriter(path, H, W, crs, transform, probability=True) as cog:
            for y0 in range(0, H, 512):
                cog.write(y0, 0, mask[y0:y0 + 512], probability_uint8(logits[y0:y0 + 512]))

    Args:
        path: The target ``.tif``.
        height, width: Scene size ``H x W`` in pixels.
        crs: The scene's CRS (``None`` for none; custom WKT CRSs are kept).
        transform: Pixel -> CRS affine transform of the scene (``Affine.identity()`` for pixels).
        probability: Add the second band ``probability`` (``uint8``).
        tags: GDAL metadata stored in the file (e.g. the expression, score and source).
        cache_mb: GDAL block cache (MiB) while this writer works; bounds its memory.
        threads: Compression threads GDAL may use (``1`` = none besides the caller's).

    Raises:
        ValueError: non-positive size.
        DataError: the temporary file cannot be created (bad folder, permissions, full disk).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        height: int,
        width: int,
        crs: CRS | None,
        transform: Affine,
        probability: bool = False,
        tags: Mapping[str, Any] | None = None,
        cache_mb: int = 64,
        threads: int = 1,
    ) -> None:
        if height <= 0 or width <= 0:
            raise ValueError(f"raster size must be positive, got {height} x {width}")
        self.path = Path(path)
        self.height, self.width = int(height), int(width)
        self.crs = crs
        self.probability = probability
        self._env = {"GDAL_PAM_ENABLED": "NO", "GDAL_CACHEMAX": int(cache_mb) * 1024 * 1024}
        self._threads = max(1, int(threads))
        count = 2 if probability else 1
        profile: dict[str, Any] = {
            "driver": "GTiff", "width": self.width, "height": self.height, "count": count, "dtype": "uint8",
            "crs": crs, "transform": transform, "nodata": None, "tiled": True, "blockxsize": COG_BLOCK,
            "blockysize": COG_BLOCK, "compress": "deflate", "predictor": 2, "bigtiff": "IF_SAFER",
            "sparse_ok": True, "interleave": "band", "photometric": "MINISBLACK", "num_threads": self._threads,
        }
        self._tmpdir: Path | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
            with self._gdal(), warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)  # crs=None, identity: intended
                self._dst = rasterio.open(self._tmpdir / "stream.tif", "w", **profile)
                self._dst.set_band_description(1, "mask")
                if probability:
                    self._dst.set_band_description(2, "probability")
                metadata = {str(k): str(v) for k, v in (tags or {}).items()}
                self._dst.update_tags(**{**metadata, "mask_foreground": str(MASK_FOREGROUND)})
        except OSError as exc:  # rasterio's errors are OSErrors too
            self.abort()
            raise DataError(f"{self.path}: cannot write GeoTIFF ({_one_line(exc)})") from exc

    def _gdal(self) -> rasterio.Env:
        """The GDAL settings of every step (no ``.aux.xml`` sidecar, bounded block cache)."""
        return rasterio.Env(**self._env)

    @property
    def closed(self) -> bool:
        """Whether the writer was closed or aborted."""
        return self._tmpdir is None

    def write(self, y0: int, x0: int, mask: np.ndarray, probability: np.ndarray | None = None) -> None:
        """Write the ``h x w`` window whose top-left pixel is row ``y0``, column ``x0``.

        Args:
            y0, x0: Window origin in scene pixels.
            mask: ``h x w`` bool/integer mask (non-zero = foreground, stored as 255).
            probability: ``h x w`` ``uint8`` (see :func:`probability_uint8`); required when the
                writer has the probability band, refused otherwise.

        Raises:
            ValueError: bad shapes/dtypes, a window outside the scene, or a closed writer.
            DataError: GDAL cannot write (e.g. full disk); the writer is then aborted.
        """
        if self.closed:
            raise ValueError("the COG writer is closed")
        fg = np.asarray(mask)
        if fg.ndim != 2 or not (fg.dtype == np.bool_ or np.issubdtype(fg.dtype, np.integer)):
            raise ValueError(f"mask must be a 2-D bool/integer array (h x w), got {fg.dtype} {fg.shape}")
        h, w = fg.shape
        if not (0 <= y0 and 0 <= x0 and y0 + h <= self.height and x0 + w <= self.width):
            raise ValueError(f"window rows {y0}:{y0 + h}, cols {x0}:{x0 + w} is outside the"
                             f" {self.height} x {self.width} scene")
        if (probability is None) == self.probability:
            raise ValueError("probability must be given exactly when the writer has a probability band")
        if probability is not None and (probability.shape != fg.shape or probability.dtype != np.uint8):
            raise ValueError(f"probability must be uint8 {fg.shape}, got {probability.dtype} {probability.shape}")
        window = Window(x0, y0, w, h)
        try:
            with self._gdal():
                # h x w bool -> h x w uint8 in {0, 255}.
                self._dst.write(np.where(fg != 0, np.uint8(MASK_FOREGROUND), np.uint8(0)), 1, window=window)
                if probability is not None:
                    self._dst.write(probability, 2, window=window)
        except OSError as exc:
            self.abort()
            raise DataError(f"{self.path}: cannot write GeoTIFF ({_one_line(exc)})") from exc

    def close(self) -> None:
        """Build the overviews, write the COG and rename it onto the target (atomic).

        Raises:
            DataError: GDAL cannot finish the file; nothing is left behind.
        """
        if self.closed:
            return
        assert self._tmpdir is not None
        stream, cog = self._tmpdir / "stream.tif", self._tmpdir / "cog.tif"
        try:
            with self._gdal(), warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._dst.close()
                rasterio.shutil.copy(
                    stream, cog, driver="COG", COMPRESS="DEFLATE", PREDICTOR="YES", BLOCKSIZE=COG_BLOCK,
                    OVERVIEWS="AUTO", RESAMPLING="NEAREST", BIGTIFF="IF_SAFER", NUM_THREADS=self._threads,
                )
            os.chmod(cog, 0o666 & ~current_umask())  # the mode a plain open() would give
            os.replace(cog, self.path)
        except OSError as exc:
            raise DataError(f"{self.path}: cannot write GeoTIFF ({_one_line(exc)})") from exc
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop everything written so far; the target is left as it was."""
        dst = getattr(self, "_dst", None)
        if dst is not None and not dst.closed:
            try:
                with self._gdal():
                    dst.close()
            except OSError:
                pass
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> COGMaskWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
