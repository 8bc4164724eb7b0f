"""ReferringDataset: items, collate, size-mismatch policy, bad records, presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from rsrefseg.data.datasets import DATASETS, ReferringDataset, collate_fn, load_preset, load_split
from rsrefseg.data.records import encode_mask, read_jsonl
from rsrefseg.data.transforms import RandomFlip, ResizeMeta
from rsrefseg.errors import DataError


def _make(tmp_path: Path, entries: list[tuple[str, tuple[int, int] | None, np.ndarray, str]]) -> Path:
    """Write images (``name``, image ``(H, W)`` or None for no file) and a JSONL of their masks."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    lines = []
    for i, (name, image_hw, mask, split) in enumerate(entries):
        if image_hw is not None:
            rgb = np.zeros((*image_hw, 3), dtype=np.uint8)
            rgb[..., 0] = np.arange(image_hw[1]) % 256  # a column ramp, to see crops
            Image.fromarray(rgb).save(images / name)
        record = {"image_id": i, "sent": f"object {i}", "file_name": name, "split": split}
        record["segmentation"] = [encode_mask(mask)]
        record["category_name"] = "ship" if i % 2 else "airplane"
        lines.append(json.dumps(record))
    path = tmp_path / "refs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _box_mask(hw: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros(hw, dtype=bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    return mask


def test_items_and_collate(tmp_path: Path) -> None:
    masks = [_box_mask((64, 48), (4, 8, 20, 40)), _box_mask((32, 32), (0, 0, 16, 16))]
    path = _make(tmp_path, [("a.png", (64, 48), masks[0], "train"), ("b.png", (32, 32), masks[1], "val")])
    dataset = load_split(path, tmp_path / "images", image_size=32)
    assert len(dataset) == 2
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.uint8
    assert item["mask"].shape == (1, 32, 32) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert np.array_equal(item["target"], masks[0])
    assert item["text"] == "object 0" and item["index"] == 0 and item["category"] == "airplane"
    assert item["rule"] is None and item["sample_id"] == "refs.jsonl:1"
    assert isinstance(item["meta"], ResizeMeta) and (item["meta"].orig_h, item["meta"].orig_w) == (64, 48)
    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate_fn)))
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 1, 32, 32)
    assert batch["index"].tolist() == [0, 1] and batch["text"] == ["object 0", "object 1"]
    assert [t.shape for t in batch["target"]] == [(64, 48), (32, 32)]
    assert batch["sample_id"] == ["refs.jsonl:1", "refs.jsonl:2"] and batch["category"] == [
        "airplane",
        "ship",
    ]
    assert len(load_split(path, tmp_path / "images", split="val", image_size=32)) == 1
    with pytest.raises(DataError, match="no record with split 'test'"):
        load_split(path, tmp_path / "images", split="test")


def test_augment_flips_pixels_mask_and_text(tmp_path: Path) -> None:
    mask = _box_mask((16, 16), (0, 0, 4, 16))
    path = _make(tmp_path, [("a.png", (16, 16), mask, "train")])
    records = read_jsonl(path)
    records[0].sent = "the leftmost ship"
    dataset = ReferringDataset(records, tmp_path / "images", 16, augment=RandomFlip(p_h=1.0))
    item = dataset[0]
    assert item["text"] == "the rightmost ship"
    assert item["mask"][0, :, 12:].all() and not item["mask"][0, :, :12].any()
    assert item["target"][:, 12:].all() and item["pixel_values"][0, 0, 15] == 0  # ramp reversed


def test_small_size_mismatch_crops_or_pads_image_to_mask(tmp_path: Path) -> None:
    mask = _box_mask((800, 800), (700, 700, 800, 800))
    entries = [("tall.png", (801, 800), mask, "test"), ("short.png", (800, 799), mask, "test")]
    path = _make(tmp_path, entries)
    dataset = load_split(path, tmp_path / "images", image_size=100, skip_bad=True)
    assert dataset.report is not None and dataset.report.n_ok == 2 and dataset.skipped == []
    assert len(dataset.report.size_mismatch) == 2
    rgb, target, _ = dataset.load(0)
    assert rgb.shape == (800, 800, 3) and target.shape == (800, 800)  # bottom row cropped
    rgb, _, _ = dataset.load(1)
    assert rgb.shape == (800, 800, 3) and not rgb[:, 799].any()  # right column zero-padded
    assert int(dataset[1]["target"].sum()) == 100 * 100


def test_large_size_mismatch_is_an_error_naming_the_record(tmp_path: Path) -> None:
    path = _make(tmp_path, [("a.png", (800, 800), _box_mask((512, 512), (0, 0, 5, 5)), "test")])
    dataset = load_split(path, tmp_path / "images", image_size=64)
    with pytest.raises(DataError) as info:
        dataset[0]
    message = str(info.value)
    assert message.startswith(f"{path}:1: mask size 512x512 disagrees with image")
    assert "a.png" in message and "\n" not in message
    skipping = load_split(path, tmp_path / "images", image_size=64, skip_bad=True)
    assert len(skipping) == 0 and skipping.report is not None
    assert skipping.report.reasons() == {"size mismatch": 1}


def test_bad_records_raise_or_are_skipped_and_counted(tmp_path: Path) -> None:
    good = _box_mask((20, 20), (2, 2, 8, 8))
    path = _make(
        tmp_path,
        [
            ("ok.png", (20, 20), good, "test"),
            ("gone.png", None, good, "test"),
            ("bad.png", (20, 20), good, "test"),
        ],
    )
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    lines = path.read_text().splitlines()
    broken = json.loads(lines[0])
    broken["segmentation"] = {"size": [20, 20], "counts": [5, 5]}
    path.write_text("\n".join([*lines, json.dumps(broken)]) + "\n")
    dataset = load_split(path, tmp_path / "images", image_size=16)
    with pytest.raises(DataError, match=rf"^{path}:2: image not found: .*gone\.png$"):
        dataset[1]
    with pytest.raises(DataError, match=rf"^{path}:3: .*bad\.png: cannot read image"):
        dataset[2]
    with pytest.raises(DataError, match=rf"^{path}:4: RLE counts do not cover"):
        dataset[3]
    skipping = load_split(path, tmp_path / "images", image_size=16, skip_bad=True)
    assert len(skipping) == 1 and skipping[0]["text"] == "object 0"
    assert skipping.report is not None
    assert skipping.report.reasons() == {"missing image": 1, "unreadable image": 1, "bad mask": 1}
    assert [source for source, _ in skipping.skipped] == [f"{path}:{n}" for n in (2, 3, 4)]


def test_real_rrsisd_record_on_a_dior_image(data_formats_dir: Path, tmp_path: Path) -> None:
    """The real RRSIS-D record, with the real 800 x 800 DIOR sample standing in for its image."""
    (record,) = read_jsonl(data_formats_dir / "rrsisd_test_sample.jsonl")
    (tmp_path / record.file_name).symlink_to(data_formats_dir / "dior_00001.jpg")
    item = ReferringDataset([record], tmp_path, image_size=1024)[0]
    assert int(item["target"].sum()) == 1410 and item["target"].shape == (800, 800)
    assert abs(item["mask"].sum().item() - 1410 * (1024 / 800) ** 2) < 0.05 * 1410 * (1024 / 800) ** 2
    assert item["pixel_values"].shape == (3, 1024, 1024)


def test_presets(tmp_path: Path) -> None:
    assert DATASETS["rrsisd"].image_hw == (800, 800) and DATASETS["rrsisd"].image_ext == ".jpg"
    assert DATASETS["refsegrs"].image_ext == ".tif" and DATASETS["risbench"].image_ext == ".png"
    assert DATASETS["nwpu"].image_hw is None
    path = _make(tmp_path, [("a.png", (8, 8), _box_mask((8, 8), (0, 0, 2, 2)), "val")])
    path.rename(tmp_path / "val.jsonl")
    assert len(load_preset("risbench", tmp_path, "val", image_size=8)) == 1
    with pytest.raises(DataError, match="unknown dataset"):
        load_preset("coco", tmp_path, "val")
