"""``rsrefseg data inspect``: summary statistics and problems of a referring JSONL file.

The report is a plain dict (JSON-serialisable): record and image counts, splits, categories, rules,
expression lengths in words, mask areas in pixels (decoded from the RLE counts, which is exact and
needs no full decode) and, with an image folder, missing images and image/mask size mismatches.

Flagged (each counted, first 20 shown): undecodable masks, empty or over-long expressions, bounding boxes that are malformed,
negative or outside the image (the mask size, else the image size), duplicate records (same image,
expression and mask as an earlier line; ``rsrefseg eval`` counts such a sample once),
``file_name`` values that leave the image folder (absolute, ``..``: never opened), missing images
and size mismatches. :func:`has_problems` says whether any was found (``data inspect`` exits 1).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rsrefseg.data.imageio import image_size
from rsrefseg.data.records import (
    expression_problem,
    find_duplicates,
    read_jsonl,
    segmentation_area,
    segmentation_size,
    segmentation_to_rle,
    unsafe_file_name,
)
from rsrefseg.errors import DataError

AREA_PERCENTILES = (5, 25, 50, 75, 95)
MAX_EXAMPLES = 20
#: Pixels a box may exceed the image by (float rounding of boxes computed from masks or polygons).
BBOX_SLACK = 1.0


def _length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"min": 0, "mean": 0.0, "median": 0.0, "max": 0}
    values = np.asarray(lengths)
    return {
        "min": int(values.min()),
        "mean": round(float(values.mean()), 2),
        "median": float(np.median(values)),
        "max": int(values.max()),
    }


def _bbox_problem(bbox: Any, hw: tuple[int, int] | None) -> str | None:
    """Why a COCO ``[x, y, w, h]`` box is wrong (malformed, negative, outside ``hw``), or None."""
    if bbox is None:
        return None
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return f"bbox must be [x, y, width, height] numbers, got {str(bbox)[:60]}"
    x, y, w, h = bbox
    if min(x, y, w, h) < 0:
        return f"bbox {bbox} has a negative value"
    if hw is not None and (x + w > hw[1] + BBOX_SLACK or y + h > hw[0] + BBOX_SLACK):
        return f"bbox {bbox} leaves the {hw[0]}x{hw[1]} image"
    return None


def inspect_jsonl(
    path: str | os.PathLike[str], image_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Statistics of a JSONL file of records (see module docstring). Raises DataError for bad JSONL."""
    if image_dir is not None and not Path(image_dir).is_dir():
        raise DataError(f"{image_dir}: image folder not found")
    records = read_jsonl(path)
    problems: list[str] = []
    areas: list[int] = []
    image_hw: dict[str, tuple[int, int] | None] = {}
    missing: set[str] = set()
    mismatches: list[str] = []
    bad_boxes: list[str] = []
    unsafe: list[str] = []
    unknown_area = 0
    for record in records:
        reason = unsafe_file_name(record.file_name)
        if reason is not None:
            unsafe.append(f"{record.source}: file_name {record.file_name!r} {reason}")
        bad_sent = expression_problem(record.sent)
        if bad_sent is not None:
            problems.append(f"{record.source}: {bad_sent}")
        mask_hw: tuple[int, int] | None = None
        try:
            mask_hw = segmentation_size(record.segmentation, record.source)
            area = segmentation_area(record.segmentation, record.source)
        except DataError as exc:
            problems.append(str(exc))
            continue
        hw = None
        if image_dir is not None and reason is None:  # a name leaving the folder is never opened
            name = record.file_name
            if name not in image_hw:
                try:
                    image_hw[name] = image_size(Path(image_dir) / name)
                except DataError as exc:
                    image_hw[name] = None
                    if (Path(image_dir) / name).is_file():
                        problems.append(str(exc))
                    else:
                        missing.add(name)
            hw = image_hw[name]
            if hw is not None and mask_hw is not None and hw != mask_hw:
                mismatches.append(f"{record.source}: mask {mask_hw[0]}x{mask_hw[1]} vs image {hw[0]}x{hw[1]}")
        box = _bbox_problem(record.bbox, mask_hw or hw)
        if box is not None:
            bad_boxes.append(f"{record.source}: {box}")
        if area is None:  # polygons or several RLE parts: rasterise (needs the image size for polygons)
            size = mask_hw or hw
            if size is None:
                unknown_area += 1  # polygon masks without --images: not a problem of the file
                continue
            try:
                rle = segmentation_to_rle(record.segmentation, size[0], size[1], record.source)
            except DataError as exc:
                problems.append(str(exc))
                continue
            area = int(mask_utils.area(rle))
        areas.append(area)
    duplicates = [f"{records[i].source} repeats line {records[j].source.rpartition(':')[2]}"
                  for i, j in find_duplicates(records)]

    report: dict[str, Any] = {
        "file": str(path),
        "records": len(records),
        "images": len({r.file_name for r in records}),
        "splits": dict(Counter(str(r.split) for r in records).most_common()),
        "categories": dict(Counter(str(r.category_name) for r in records).most_common()),
        "rules": dict(Counter(r.rule for r in records if r.rule).most_common()),
        "expression_words": _length_stats([len(r.sent.split()) for r in records]),
        "mask_area_px": {
            f"p{q}": float(v) for q, v in zip(AREA_PERCENTILES, np.percentile(areas, AREA_PERCENTILES))
        }
        if areas
        else {},
        "empty_masks": sum(1 for a in areas if a == 0),
        "polygon_areas_unknown": unknown_area,
        "problems": len(problems),
        "problem_examples": problems[:MAX_EXAMPLES],
        "bad_bboxes": len(bad_boxes),
        "bad_bbox_examples": bad_boxes[:MAX_EXAMPLES],
        "duplicates": len(duplicates),
        "duplicate_examples": duplicates[:MAX_EXAMPLES],
        "unsafe_file_names": len(unsafe),
        "unsafe_file_name_examples": unsafe[:MAX_EXAMPLES],
    }
    if image_dir is not None:
        report["images_found"] = sum(1 for hw in image_hw.values() if hw is not None)
        report["images_missing"] = len(missing)
        report["missing_examples"] = sorted(missing)[:MAX_EXAMPLES]
        report["size_mismatches"] = len(mismatches)
        report["size_mismatch_examples"] = mismatches[:MAX_EXAMPLES]
    return report


#: Report counts that make ``data inspect`` exit 1.
PROBLEM_COUNTS = ("problems", "bad_bboxes", "duplicates", "unsafe_file_names", "images_missing", "size_mismatches")


def has_problems(report: dict[str, Any]) -> bool:
    """Whether an :func:`inspect_jsonl` report flags anything (see :data:`PROBLEM_COUNTS`)."""
    return any(report.get(key, 0) for key in PROBLEM_COUNTS)


def format_report(report: dict[str, Any]) -> str:
    """Human-readable text of an :func:`inspect_jsonl` report."""

    def counts(mapping: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in mapping.items()) or "-"

    words = report["expression_words"]
    lines = [
        f"file:        {report['file']}",
        f"records:     {report['records']}  (images: {report['images']})",
        f"splits:      {counts(report['splits'])}",
        f"categories:  {counts(report['categories'])}",
    ]
    if report["rules"]:
        lines.append(f"rules:       {counts(report['rules'])}")
    lines.append(
        f"words:       min {words['min']}  mean {words['mean']}  median {words['median']}  max {words['max']}"
    )
    if report["mask_area_px"]:
        lines.append(
            "mask area:   " + "  ".join(f"{k} {v:.0f}" for k, v in report["mask_area_px"].items()) + " px"
        )
    lines.append(f"empty masks: {report['empty_masks']}")
    if "images_found" in report:
        lines.append(f"images:      found {report['images_found']}, missing {report['images_missing']}")
        lines += [f"  missing: {name}" for name in report["missing_examples"]]
        lines.append(f"size mismatches (image vs mask): {report['size_mismatches']}")
        lines += [f"  {m}" for m in report["size_mismatch_examples"]]
    if report.get("polygon_areas_unknown"):
        lines.append(f"polygon masks without area (pass --images): {report['polygon_areas_unknown']}")
    for key, examples, title in (("bad_bboxes", "bad_bbox_examples", "bad bboxes:"),
                                 ("duplicates", "duplicate_examples", "duplicates:"),
                                 ("unsafe_file_names", "unsafe_file_name_examples",
                                  "file names leaving the image folder:")):
        if report.get(key):
            lines.append(f"{title} {report[key]}")
            lines += [f"  {m}" for m in report[examples]]
    lines.append(f"problems:    {report['problems']}")
    lines += [f"  {p}" for p in report["problem_examples"]]
    return "\n".join(lines)
