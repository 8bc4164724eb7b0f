"""``rsrefseg data inspect``: summary statistics of a referring JSONL file.

The report is a plain dict (JSON-serialisable): record and image counts, splits, categories, rules,
expression lengths in words, mask areas in pixels (decoded from the RLE counts, which is exact and
needs no full decode) and, with an image folder, missing images and image/mask size mismatches.
Problems with single masks are collected (first 20) instead of stopping at the first one.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rsrefseg.data.imageio import image_size
from rsrefseg.data.records import read_jsonl, segmentation_area, segmentation_size, segmentation_to_rle
from rsrefseg.errors import DataError

AREA_PERCENTILES = (5, 25, 50, 75, 95)
MAX_EXAMPLES = 20


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
    for record in records:
        mask_hw: tuple[int, int] | None = None
        try:
            mask_hw = segmentation_size(record.segmentation, record.source)
            area = segmentation_area(record.segmentation, record.source)
        except DataError as exc:
            problems.append(str(exc))
            continue
        hw = None
        if image_dir is not None:
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
        if area is None:  # polygons or several RLE parts: rasterise (needs the image size for polygons)
            size = mask_hw or hw
            if size is None:
                problems.append(f"{record.source}: polygon mask area unknown without --images")
                continue
            try:
                rle = segmentation_to_rle(record.segmentation, size[0], size[1], record.source)
            except DataError as exc:
                problems.append(str(exc))
                continue
            area = int(mask_utils.area(rle))
        areas.append(area)

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
        "problems": len(problems),
        "problem_examples": problems[:MAX_EXAMPLES],
    }
    if image_dir is not None:
        report["images_found"] = sum(1 for hw in image_hw.values() if hw is not None)
        report["images_missing"] = len(missing)
        report["missing_examples"] = sorted(missing)[:MAX_EXAMPLES]
        report["size_mismatches"] = len(mismatches)
        report["size_mismatch_examples"] = mismatches[:MAX_EXAMPLES]
    return report


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
    lines.append(f"problems:    {report['problems']}")
    lines += [f"  {p}" for p in report["problem_examples"]]
    return "\n".join(lines)
