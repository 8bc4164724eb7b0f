"""The web demo's limits and input checks, without Gradio or torch (used by :mod:`rsrefseg.demo_service`).

Everything a user sends to ``rsrefseg serve`` is checked here before any work: the expressions text
(count, length, total size, valid text: :func:`parse_expressions`) and the uploaded file (size in MB,
then ``H x W`` from the header only, so a decompression bomb or a huge GeoTIFF header is refused
before a pixel is decoded: :func:`check_upload`). Every violation is a one-line
:class:`~rsrefseg.errors.ConfigError` / :class:`~rsrefseg.errors.DataError` naming the file and the limit.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

from rsrefseg.errors import ConfigError, DataError, RSRefSegError
from rsrefseg.inference.defaults import (
    DEFAULT_TILE_CACHE_BYTES,
    DEFAULT_TILE_THRESHOLD,
    MAX_EXPRESSION_CHARS,
    check_expression_length,
)

__all__ = ["DEFAULT_MAX_EXPRESSIONS", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_UPLOAD_MB", "DEFAULT_TILE_CACHE_MB",
           "DEFAULT_TILE_THRESHOLD", "MAX_BANDS_CHARS", "PREVIEW_MAX_SIDE", "UPLOAD_TYPES", "Limits",
           "check_upload", "max_text_chars", "name_only", "parse_expressions"]


#: Default upload cap in MB (here and in Gradio's own cap, 1 MB = 2**20 bytes).
DEFAULT_MAX_UPLOAD_MB = 50.0
#: Default cap on ``H * W`` of an uploaded image (a 4096 x 4096 scene).
DEFAULT_MAX_PIXELS = 4096 * 4096
#: Expressions accepted in one run.
DEFAULT_MAX_EXPRESSIONS = 16
#: Encoded windows of a tiled upload kept between runs, in MB (about 7.5 MB per window of the full presets).
DEFAULT_TILE_CACHE_MB = DEFAULT_TILE_CACHE_BYTES / 2**20
#: Longest side of the previews, overlays and heatmaps shown in the page (masks stay full size).
PREVIEW_MAX_SIDE = 1024
#: Longest accepted band choice text ("4,3,2"; anything longer is refused before parsing).
MAX_BANDS_CHARS = 64
#: File types offered by the upload dialog.
UPLOAD_TYPES = [".tif", ".tiff", ".jpg", ".jpeg", ".png", ".bmp", ".jp2"]


@dataclass(frozen=True)
class Limits:
    """Per-request limits (a violation is a one-line :class:`DataError` / :class:`ConfigError`)."""

    #: Largest accepted upload in MB (2**20 bytes), checked before the file is opened.
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    #: Largest accepted ``H * W``, checked from the header before any pixel is decoded.
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Expressions accepted in one run (each at most ``MAX_EXPRESSION_CHARS`` characters).
    max_expressions: int = DEFAULT_MAX_EXPRESSIONS
    #: Images with more pixels are segmented tile by tile at native resolution (as ``rsrefseg
    #: predict --tile-threshold``), so small objects of a large scene are not lost in one resize.
    tile_threshold: int = DEFAULT_TILE_THRESHOLD
    #: Encoded windows of the current tiled upload kept for the next run, in MB (0: re-encode every run).
    tile_cache_mb: float = DEFAULT_TILE_CACHE_MB


def max_text_chars(max_expressions: int = DEFAULT_MAX_EXPRESSIONS) -> int:
    """Longest accepted expressions text: ``max_expressions`` lines of the longest expression."""
    return max_expressions * (MAX_EXPRESSION_CHARS + 1)


def parse_expressions(text: str | None, max_expressions: int = DEFAULT_MAX_EXPRESSIONS) -> list[str]:
    """One expression per non-blank line (whitespace collapsed).

    The whole text is refused at once, before it is split, when it is longer than
    :func:`max_text_chars` (a pasted megabyte costs nothing).

    Raises:
        ConfigError: no expression, more than ``max_expressions``, an expression longer than
            :data:`MAX_EXPRESSION_CHARS`, a text too long, or text that is not valid Unicode (lone surrogates).
    """
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ConfigError(f"the expressions must be text, one per line (got {type(text).__name__})")
    limit = max_text_chars(max_expressions)
    if len(text) > limit:
        raise ConfigError(f"the expressions are {len(text)} characters long; at most {limit} are accepted "
                          f"({max_expressions} expressions of at most {MAX_EXPRESSION_CHARS} characters, one per line)")
    expressions = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    if len(expressions) > max_expressions:
        raise ConfigError(f"{len(expressions)} expressions given; at most {max_expressions} per run")
    for number, expression in enumerate(expressions, start=1):
        check_expression_length(expression, f"expression {number}")
        try:
            expression.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError(f"expression {number} is not valid text (character {exc.start + 1} is a lone "
                              f"surrogate U+{ord(expression[exc.start]):04X}; send UTF-8)") from None
    if not expressions:
        raise ConfigError("type at least one referring expression (one per line)")
    return expressions


def _megapixels(pixels: int) -> str:
    """``pixels`` in MP for messages: ``0.012``, ``1.2``, ``16.8``, ``2,500``."""
    mp = pixels / 1e6
    return f"{mp:,.0f}" if mp >= 1000 else f"{mp:.3g}"


def check_upload(path: str | os.PathLike[str], limits: Limits) -> tuple[int, int]:
    """Check the file size and the image dimensions (header only) against ``limits``; return ``(H, W)``.

    Raises:
        DataError: missing/unreadable file, or a limit exceeded (the message names the file and the limit).
    """
    from rsrefseg.data.imageio import image_size

    source = Path(path)
    if not source.is_file():
        raise DataError(f"{source.name}: uploaded file not found")
    size_mb = source.stat().st_size / 2**20
    if size_mb > limits.max_upload_mb:
        raise DataError(
            f"{source.name}: file is {size_mb:.3g} MB, above the upload limit of {limits.max_upload_mb:g} MB"
        )
    height, width = image_size(source)
    if height * width > limits.max_pixels:
        raise DataError(
            f"{source.name}: image is {width} x {height} = {_megapixels(height * width)} MP, above the limit "
            f"of {_megapixels(limits.max_pixels)} MP ({limits.max_pixels} pixels)"
        )
    return height, width


def name_only(exc: RSRefSegError, path: Path) -> RSRefSegError:
    """``exc`` with the server-side path of ``path`` replaced by the file's name (the page shows the
    message to the user; where the server keeps uploads is none of their business)."""
    message = str(exc)
    for full in sorted({str(path.resolve()), str(path.absolute()), str(path)}, key=len, reverse=True):
        message = message.replace(full, path.name)
    if message == str(exc):
        return exc
    renamed = copy.copy(exc)
    renamed.args = (message,)
    return renamed
