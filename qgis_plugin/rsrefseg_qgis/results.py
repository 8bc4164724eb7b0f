"""Where ``rsrefseg predict`` put its files: read ``OUT/summary.json`` (no QGIS import here).

Two layouts are accepted:

- a CLI with ``--vector-format``: ``images[i]["vector"]`` is one vector file (layer ``rsrefseg``)
  holding the polygons of every expression, with fields ``expr_index``, ``expression``, ``score``,
  ``area_m2``, ``perimeter_m``, ``source``;
- an older CLI: ``images[i]["outputs"][j]["geojson"]``, one GeoJSON file per expression.

Masks are ``images[i]["outputs"][j]["mask_tif"]`` in both. Paths in the summary are relative to OUT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Layer name of the CLI's combined vector file.
VECTOR_LAYER = "rsrefseg"


class SummaryError(Exception):
    """``summary.json`` is missing, unreadable or lacks what the plugin needs."""


@dataclass
class ExpressionOutput:
    """The files of one expression on one image."""

    index: int  # 1-based position of the expression
    expression: str  # the expression text
    score: float | None  # the model's score for it
    geojson: Path | None  # per-expression GeoJSON (absent without georeference)
    mask_tif: Path | None  # uint8 0/255 GeoTIFF mask (absent without georeference)


@dataclass
class ImageOutputs:
    """The outputs of one image of a ``predict`` run."""

    source: str  # the input file as the CLI saw it
    crs: str | None  # the CLI's CRS string (None: no georeference)
    vector: Path | None  # the combined vector file (new CLIs), else None
    vector_format: str | None  # its format name (gpkg, fgb, shp, geojson)
    expressions: list[ExpressionOutput] = field(default_factory=list)  # in expression order


def read_summary(out_dir: str | Path) -> dict[str, Any]:
    """Parse ``out_dir/summary.json``.

    Raises:
        SummaryError: missing or not JSON.
    """
    path = Path(out_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SummaryError(f"{path}: cannot read the summary of rsrefseg ({exc})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("images"), list):
        raise SummaryError(f"{path}: not a summary of rsrefseg predict (no images list)")
    return summary


def _path(out_dir: Path, value: Any) -> Path | None:
    return None if not value else out_dir / str(value)


def image_outputs(summary: dict[str, Any], out_dir: str | Path, index: int = 0) -> ImageOutputs:
    """The outputs of image ``index`` of ``summary`` with absolute paths.

    Raises:
        SummaryError: the image is not in the summary (it failed: its error is in the message).
    """
    out = Path(out_dir)
    images = summary.get("images", [])
    if index >= len(images):
        failures = summary.get("failures") or []
        reason = "; ".join(str(f.get("error", "")) for f in failures) or "no image in the summary"
        raise SummaryError(f"rsrefseg produced no result: {reason}")
    record = images[index]
    outputs = []
    for j, item in enumerate(record.get("outputs", []), start=1):
        outputs.append(ExpressionOutput(
            index=int(item.get("index", j)), expression=str(item.get("expression", "")),
            score=item.get("score"), geojson=_path(out, item.get("geojson")),
            mask_tif=_path(out, item.get("mask_tif")),
        ))
    return ImageOutputs(source=str(record.get("source", "")), crs=record.get("crs"),
                        vector=_path(out, record.get("vector")), vector_format=record.get("vector_format"),
                        expressions=outputs)


def check_georeferenced(outputs: ImageOutputs) -> None:
    """Raise :class:`SummaryError` when the CLI wrote no georeferenced output for the image."""
    if outputs.vector is None and not any(e.geojson for e in outputs.expressions):
        raise SummaryError(f"{outputs.source}: the raster has no georeference (CRS and geotransform), so "
                           "rsrefseg wrote no vector or GeoTIFF output for it")
