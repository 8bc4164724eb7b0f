"""What a web-demo run shows: :class:`DemoResult`, the summary table and the upload preview."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsrefseg.demo_limits import PREVIEW_MAX_SIDE

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from rsrefseg.inference.scene import ScenePrediction

__all__ = ["DemoResult", "markdown_table", "preview", "safe_stem"]


@dataclass
class DemoResult:
    """What one run shows and offers.

    Attributes:
        overlays: ``(png path, caption)`` per expression, caption = the expression and its score.
        heatmaps: ``(png path, caption)`` per expression: the text-activation heatmap.
        downloads: The zip of every file first, then the mask PNGs, GeoJSONs and GeoTIFF masks.
        summary: A Markdown table (expression, score, mask pixels, polygons, area).
        records: The per-expression summary records of :func:`write_prediction_outputs`.
    """

    overlays: list[tuple[str, str]]
    heatmaps: list[tuple[str, str]]
    downloads: list[str]
    summary: str
    records: list[dict[str, Any]] = field(default_factory=list)



def preview(rgb: np.ndarray) -> np.ndarray:
    """Downscale ``H x W x 3`` uint8 so that its longest side is at most :data:`PREVIEW_MAX_SIDE`."""
    import numpy as np
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = PREVIEW_MAX_SIDE / max(h, w)
    if scale >= 1:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def safe_stem(path: Path) -> str:
    """A file stem safe as a folder name (word characters, dots and dashes; ``image`` if none is left)."""
    return re.sub(r"[^\w.-]+", "_", path.stem).strip("._") or "image"


def markdown_table(name: str, loaded: Any, records: list[dict[str, Any]], seconds: float,
                    scene: ScenePrediction | None = None) -> str:
    """The run summary shown on the page: one line about the scene, then a row per expression.

    ``loaded`` is the service's current scene (``width``, ``height``, ``georef``); ``records`` the
    per-expression records of ``write_prediction_outputs``; ``scene`` the tiled run, if any.
    """
    geo = "georeferenced" if loaded.georef is not None else "not georeferenced (no GeoJSON)"
    tiled = ""
    if scene is not None:
        tiled = (f", segmented tile by tile at native resolution (windows: {scene.tiles}, without valid "
                 f"pixels: {scene.skipped_tiles}, already encoded: {scene.cached_tiles})")
    lines = [
        f"**{name}**: {loaded.width} x {loaded.height} px, {geo}{tiled}; {len(records)} expression(s) in "
        f"{seconds:.1f} s",
        "",
        "| # | expression | score | mask pixels | polygons | area (m²) |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(records, start=1):
        area = r.get("area_m2")
        text = r["expression"].replace("|", "\\|")
        lines.append(
            f"| {i} | {text} | {r['score']:.3f} | {r['mask_pixels']} | {r.get('polygons', '-')} | "
            f"{'-' if area is None else f'{area:,.0f}'} |"
        )
    return "\n".join(lines)
