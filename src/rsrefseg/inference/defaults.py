"""Defaults of tiled inference shared by the library, the CLIs and the web demo.

A module of its own, importing nothing heavy, so that ``rsrefseg --help`` and the web demo's
argument parsing read them without importing torch or the model code.
"""

from __future__ import annotations

from rsrefseg.errors import ConfigError

__all__ = ["DEFAULT_TILE_CACHE_BYTES", "DEFAULT_TILE_THRESHOLD", "MASK_PNG_MAX_PIXELS", "MAX_EXPRESSION_CHARS",
           "STREAM_MEMORY_BUDGET", "check_expression_length"]

#: Images with more pixels than this are segmented tile by tile (2048 x 2048).
DEFAULT_TILE_THRESHOLD = 2048 * 2048
#: Default byte budget of a :class:`rsrefseg.inference.tiling.TileCache` (about 270 windows of the
#: full presets, ~7.5 MB of features each).
DEFAULT_TILE_CACHE_BYTES = 2 * 1024**3
#: Memory for the stitching frontier and previews of one streamed pass over a tiled scene in
#: ``rsrefseg predict`` (more expressions than fit are run in several passes over the scene).
STREAM_MEMORY_BUDGET = 1024**3
#: Tiled scenes up to this many pixels (4096 x 4096) also get a mask PNG; larger ones only the
#: mask GeoTIFF (written window by window, never held in memory).
MASK_PNG_MAX_PIXELS = 4096 * 4096
#: Longest referring expression accepted (characters, after collapsing whitespace) by the API, the
#: CLI and the web demo. The text towers read at most 64 tokens (SigLIP) or 77 (CLIP), about
#: 250-400 characters of English; anything longer is cut by the tokenizer anyway, and unbounded
#: text only costs time (titles, file names) and memory.
MAX_EXPRESSION_CHARS = 1000


def check_expression_length(text: str, what: str) -> str:
    """``text`` unchanged, or a :class:`ConfigError` naming ``what`` when it is longer than
    :data:`MAX_EXPRESSION_CHARS` (checked before any work, in O(1))."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ConfigError(f"{what} has {len(text)} characters; at most {MAX_EXPRESSION_CHARS} are accepted "
                          "(the text encoder reads only the first 64-77 tokens)")
    return text
