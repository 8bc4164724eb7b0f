"""inspect_jsonl statistics on the real samples and on a synthetic file with problems."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsrefseg.data.datasets import ReferringDataset
from rsrefseg.data.inspect import format_report, inspect_jsonl
from rsrefseg.data.records import encode_mask
from rsrefseg.errors import DataError


def test_inspect_real_samples(data_formats_dir: Path, tmp_path: Path) -> None:
    report = inspect_jsonl(data_formats_dir / "risbench_test_sample.jsonl")
    assert report["records"] == 2 and report["images"] == 2 and report["splits"] == {"test": 2}
    assert report["categories"] == {"ship": 2}
    assert report["expression_words"] == {"min": 10, "mean": 11.0, "median": 11.0, "max": 12}
    assert report["mask_area_px"]["p50"] == (711 + 1061) / 2
    assert report["mask_area_px"]["p5"] == 711 + 0.05 * (1061 - 711)
    assert report["problems"] == 0 and "images_found" not in report
    # the RRSIS-D record with the DIOR sample standing in for its 800 x 800 image
    (tmp_path / "03600.jpg").symlink_to(data_formats_dir / "dior_00001.jpg")
    report = inspect_jsonl(data_formats_dir / "rrsisd_test_sample.jsonl", image_dir=tmp_path)
    assert report["images_found"] == 1 and report["images_missing"] == 0 and report["size_mismatches"] == 0
    assert report["mask_area_px"]["p50"] == 1410.0
    text = format_report(report)
    assert "records:     1" in text and "windmill 1" in text


def test_inspect_reports_missing_images_mismatches_and_bad_masks(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((801, 800, 3), dtype=np.uint8)).save(images / "a.png")
    square = np.zeros((800, 800), dtype=bool)
    square[:10, :10] = True
    lines = [
        {"image_id": 1, "sent": "a b c", "file_name": "a.png", "segmentation": encode_mask(square)},
        {"image_id": 2, "sent": "a", "file_name": "b.png", "segmentation": [encode_mask(square)]},
        {"image_id": 3, "sent": "a b", "file_name": "a.png", "segmentation": {"size": [2, 2], "counts": [1]}},
        {"image_id": 1, "sent": "poly", "file_name": "a.png", "segmentation": [[0, 0, 20, 0, 20, 20, 0, 20]]},
    ]
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    report = inspect_jsonl(path, image_dir=images)
    assert report["records"] == 4 and report["images"] == 2
    assert (
        report["images_found"] == 1
        and report["images_missing"] == 1
        and report["missing_examples"] == ["b.png"]
    )
    assert (
        report["size_mismatches"] == 1
        and "mask 800x800 vs image 801x800" in report["size_mismatch_examples"][0]
    )
    assert report["problems"] == 1 and f"{path}:3: RLE counts do not cover" in report["problem_examples"][0]
    assert report["mask_area_px"]["p50"] == 100.0  # 100, 100 and the ~400 px polygon
    without_images = inspect_jsonl(path)
    assert without_images["problems"] == 1  # the polygon's area needs the image size: noted, not a problem
    assert without_images["polygon_areas_unknown"] == 1
    assert "size mismatches (image vs mask): 1" in format_report(report)


def test_missing_image_folder_is_reported(data_formats_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere: image folder not found"):
        inspect_jsonl(data_formats_dir / "rrsisd_test_sample.jsonl", image_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"nowhere: image folder not found"):
        ReferringDataset([], tmp_path / "nowhere", 64)
