"""Rule-generated records: re-checked from the NWPU VHR-10 ground truth, plus synthetic rule cases."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from rsrefseg.data.from_coco import (
    RuleConfig,
    from_coco_file,
    generate_records,
    human_name,
    plural,
    split_from_name,
)
from rsrefseg.data.records import decode_mask

COLOUR_WORDS = {"red", "green", "blue", "white", "black", "grey", "gray", "yellow", "orange", "brown"}


def _instance_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Independent decode: pycocotools polygons -> H x W bool (not through rsrefseg code)."""
    rles = mask_utils.frPyObjects(ann["segmentation"], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the foreground, x1/y1 exclusive."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


class _Truth:
    """Independently decoded instances of one class in one image, with boxes and areas."""

    def __init__(self, anns: list[dict[str, Any]], height: int, width: int) -> None:
        self.hw = (height, width)
        self.masks = {a["id"]: _instance_mask(a, height, width) for a in anns}
        self.boxes = {i: _box(m) for i, m in self.masks.items()}
        self.areas = {i: int(m.sum()) for i, m in self.masks.items()}


def _check_rule(rule: str, params: dict[str, Any], target: list[int], truth: _Truth) -> None:
    """Assert from the ground truth that ``rule`` holds and picks out exactly ``target``."""
    ids = sorted(truth.masks)
    if rule == "only":
        assert ids == target
        return
    if rule == "group":
        assert len(ids) >= 2 and ids == target and params["count"] == len(ids)
        return
    (tid,) = target
    others = [i for i in ids if i != tid]
    assert others, "a comparative rule needs other instances"
    if rule == "size":
        areas = truth.areas
        if params["which"] == "largest":
            assert all(areas[tid] >= 1.5 * areas[o] for o in others)
        else:
            assert all(areas[o] >= 1.5 * areas[tid] for o in others)
        return
    assert rule == "extreme"
    direction = params["direction"]
    axis = 0 if direction in ("left", "right") else 1
    side = truth.hw[1] if axis == 0 else truth.hw[0]
    boxes = truth.boxes
    centre = {i: (boxes[i][axis] + boxes[i][axis + 2]) / 2 for i in ids}
    lo, hi = axis, axis + 2
    for o in others:
        if direction in ("left", "top"):
            assert centre[o] - centre[tid] >= 0.1 * side
            assert boxes[tid][hi] <= boxes[o][lo]  # no overlap along the axis
        else:
            assert centre[tid] - centre[o] >= 0.1 * side
            assert boxes[tid][lo] >= boxes[o][hi]


@pytest.mark.parametrize("split", ["val", pytest.param("train", marks=pytest.mark.slow)])
def test_nwpu_records_hold_in_the_ground_truth(data_nwpu_dir: Path, split: str) -> None:
    ann_path = data_nwpu_dir / "annotations" / f"instances_{split}.json"
    coco = json.loads(ann_path.read_text())
    records, stats = from_coco_file(ann_path, image_dir=data_nwpu_dir / "images", seed=0)
    assert records and all(r.split == split for r in records)
    assert set(stats.per_rule) == {"only", "extreme", "size", "group"}
    assert sum(stats.per_rule.values()) == len(records)

    images = {img["id"]: img for img in coco["images"]}
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    anns = defaultdict(list)
    for ann in coco["annotations"]:
        anns[(ann["image_id"], ann["category_id"])].append(ann)
    by_image = defaultdict(list)
    for record in records:
        by_image[record.image_id].append(record)
    only_expected = {
        key for key, group in anns.items() if len(group) == 1 and categories[key[1]] != "vehicle"
    }
    only_found = set()
    for image_id, recs in by_image.items():
        image = images[image_id]
        hw = (image["height"], image["width"])
        cache: dict[int, _Truth] = {}
        for record in recs:
            assert record.file_name == image["file_name"]
            assert categories[record.category_id] == record.category_name != "vehicle"
            if record.category_id not in cache:
                cache[record.category_id] = _Truth(anns[(image_id, record.category_id)], *hw)
            truth = cache[record.category_id]
            assert set(record.referred_ann_ids) <= set(truth.masks)  # same image, same class
            union = np.zeros(hw, dtype=bool)
            for ann_id in record.referred_ann_ids:
                union |= truth.masks[ann_id]
            decoded = decode_mask(record.segmentation, *hw)
            assert np.array_equal(decoded, union), f"{record.sent} mask != union of {record.referred_ann_ids}"
            x0, y0, x1, y1 = _box(union)
            assert record.bbox == [x0, y0, x1 - x0, y1 - y0]
            _check_rule(record.rule, record.extra["rule_params"], record.referred_ann_ids, truth)
            if record.rule == "only":
                only_found.add((image_id, record.category_id))
            words = set(re.findall(r"[a-z]+", record.sent))
            assert not words & COLOUR_WORDS and "_" not in record.sent
            assert human_name(record.category_name).split()[0] in record.sent
    assert only_found == only_expected  # every single-instance class got its 'only' record


def test_generation_is_deterministic_and_seeded(data_nwpu_dir: Path) -> None:
    ann_path = data_nwpu_dir / "annotations" / "instances_val.json"
    first, _ = from_coco_file(ann_path, seed=0)
    again, _ = from_coco_file(ann_path, seed=0)
    other, _ = from_coco_file(ann_path, seed=1)
    assert [r.to_dict() for r in first] == [r.to_dict() for r in again]
    assert [r.segmentation for r in first] == [r.segmentation for r in other]
    assert [r.sent for r in first] != [r.sent for r in other]
    assert len({r.sent for r in first if r.rule == "extreme"}) > 8  # phrasing actually varies


def _square(x: int, y: int, side: int) -> list[list[float]]:
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


def _coco(
    objects: list[tuple[int, list[list[float]]]], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "images": [{"id": 1, "file_name": "1.jpg", "height": 100, "width": 100}],
        "categories": [{"id": 1, "name": "storage_tank"}, {"id": 2, "name": "vehicle"}],
        "annotations": [
            {"id": i, "image_id": 1, "category_id": cat, "segmentation": seg, "iscrowd": 0, **(extra or {})}
            for i, (cat, seg) in enumerate(objects, start=1)
        ],
    }


def test_synthetic_rules_and_margins() -> None:
    # tanks at x = 5 and x = 60 (clear), third at x = 66 overlaps the second horizontally
    coco = _coco(
        [(1, _square(5, 40, 10)), (1, _square(60, 10, 20)), (1, _square(66, 70, 10)), (2, _square(0, 0, 5))]
    )
    records, stats = generate_records(coco, split="val", seed=0)
    found = {
        (
            r.rule,
            r.extra["rule_params"].get("direction") or r.extra["rule_params"].get("which"),
        ): r.referred_ann_ids
        for r in records
    }
    assert found[("extreme", "left")] == [1]
    assert ("extreme", "right") not in found  # tanks 2 and 3 overlap along x
    assert found[("extreme", "top")] == [2] and found[("extreme", "bottom")] == [3]
    assert found[("size", "largest")] == [2]  # 400 px vs 100 px
    assert ("size", "smallest") not in found  # 100 vs 100: no clear smallest
    assert found[("group", None)] == [1, 2, 3]
    assert "vehicle" not in stats.per_class  # skipped by default (not exhaustively labelled)
    with_vehicles, _ = generate_records(coco, config=RuleConfig(skip_classes=()))
    assert any(r.category_name == "vehicle" and r.rule == "only" and r.sent for r in with_vehicles)
    group = next(r for r in records if r.rule == "group")
    assert group.ann_id is None and group.sent in {
        "all the storage tanks",
        "all storage tanks in the image",
        "every storage tank",
        "all of the storage tanks",
    }


def test_margin_threshold_and_crowd_skip() -> None:
    # centres 10 px apart = 0.1 x width: exactly at the margin -> accepted; 9 px -> refused
    near = generate_records(
        _coco([(1, _square(0, 0, 4)), (1, _square(10, 50, 4))]), config=RuleConfig(rules=("extreme",))
    )[0]
    assert {r.extra["rule_params"]["direction"] for r in near} == {"left", "right", "top", "bottom"}
    nearer = generate_records(
        _coco([(1, _square(0, 0, 4)), (1, _square(9, 50, 4))]), config=RuleConfig(rules=("extreme",))
    )[0]
    assert {r.extra["rule_params"]["direction"] for r in nearer} == {"top", "bottom"}
    crowd, stats = generate_records(_coco([(1, _square(0, 0, 4))], extra={"iscrowd": 1}))
    assert crowd == [] and stats.skipped_groups["crowd"] == 1


def test_names_and_split() -> None:
    assert human_name("ground_track_field") == "ground track field"
    assert (
        plural("storage tank") == "storage tanks"
        and plural("bus") == "buses"
        and plural("ferry") == "ferries"
    )
    assert plural("harbor") == "harbors"
    assert split_from_name("instances_train.json") == "train" and split_from_name("x.json") is None
