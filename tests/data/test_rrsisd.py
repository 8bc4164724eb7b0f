"""Raw RRSIS-D (refs pickle + COCO instances) -> JSONL, on a small synthetic release."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from rsrefseg.data.records import decode_mask, encode_mask, read_jsonl
from rsrefseg.data.rrsisd import convert_rrsisd
from rsrefseg.errors import DataError


def _release(tmp_path: Path) -> tuple[Path, Path, dict[int, np.ndarray]]:
    """Two 40 x 50 images, three annotations in the three segmentation encodings, three refs."""
    truth = {}
    polygon_mask = decode_mask([[5, 5, 20, 5, 20, 15, 5, 15]], 40, 50)
    rle_mask = np.zeros((40, 50), dtype=bool)
    rle_mask[10:30, 30:45] = True
    raw_mask = np.zeros((40, 50), dtype=bool)
    raw_mask[0:3, 0:2] = True
    truth = {11: polygon_mask, 12: rle_mask, 13: raw_mask}
    raw_runs = [0, 3, 37, 3, 37 + 48 * 40]  # columns 0 and 1 start with 3 foreground rows
    instances = {
        "images": [
            {"id": 1, "file_name": "00001.jpg", "height": 40, "width": 50},
            {"id": 2, "file_name": "00002.jpg", "height": 40, "width": 50},
        ],
        "annotations": [
            {
                "id": 11,
                "image_id": 1,
                "category_id": 3,
                "segmentation": [[5, 5, 20, 5, 20, 15, 5, 15]],
                "bbox": [5, 5, 15, 10],
            },
            {
                "id": 12,
                "image_id": 1,
                "category_id": 4,
                "segmentation": [encode_mask(rle_mask)],
                "bbox": [30, 10, 15, 20],
            },
            {
                "id": 13,
                "image_id": 2,
                "category_id": 3,
                "segmentation": {"size": [40, 50], "counts": raw_runs},
                "bbox": [0, 0, 2, 3],
            },
        ],
        "categories": [{"id": 3, "name": "airplane"}, {"id": 4, "name": "storage tank"}],
    }
    refs = [
        {"ref_id": 0, "image_id": 1, "ann_id": 11, "split": "train", "category_id": 3,
         "sentences": [{"sent": "the airplane on the left", "raw": "The airplane on the left", "sent_id": 0},
                       {"sent": "the small airplane", "sent_id": 1}]},
        {"ref_id": 1, "image_id": 1, "ann_id": 12, "split": "val", "category_id": 4,
         "sentences": [{"raw": "The storage tank", "sent_id": 2}]},
        {"ref_id": 2, "image_id": 2, "ann_id": 13, "split": "test", "category_id": 3,
         "sentences": [{"sent": "a plane at the top left corner", "sent_id": 3}]},
    ]  # fmt: skip
    refs_path = tmp_path / "refs(unc).p"
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    instances_path = tmp_path / "instances.json"
    instances_path.write_text(json.dumps(instances))
    return refs_path, instances_path, truth


def test_convert_one_record_per_sentence(tmp_path: Path) -> None:
    refs_path, instances_path, truth = _release(tmp_path)
    counts = convert_rrsisd(refs_path, instances_path, tmp_path / "out")
    assert counts == {"test": 1, "train": 2, "val": 1}
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert [r.sent for r in train] == ["the airplane on the left", "the small airplane"]
    assert all(r.file_name == "00001.jpg" and r.category_name == "airplane" and r.ann_id == 11 for r in train)
    assert [r.extra for r in train] == [{"ref_id": 0, "sent_id": 0}, {"ref_id": 0, "sent_id": 1}]
    (val,) = read_jsonl(tmp_path / "out" / "val.jsonl")
    assert val.sent == "The storage tank" and val.split == "val" and val.category_name == "storage tank"
    (test,) = read_jsonl(tmp_path / "out" / "test.jsonl")
    for record in [*train, val, test]:
        assert isinstance(record.segmentation, dict) and isinstance(record.segmentation["counts"], str)
        assert np.array_equal(record.decode(40, 50), truth[record.ann_id])


def test_bad_release_files(tmp_path: Path) -> None:
    refs_path, instances_path, _ = _release(tmp_path)
    evil = tmp_path / "evil.p"
    evil.write_bytes(pickle.dumps([{"x": Path("/")}]))  # needs a class to load: refused
    with pytest.raises(DataError, match=r"evil\.p: cannot read refs pickle"):
        convert_rrsisd(evil, instances_path, tmp_path / "out")
    refs = pickle.loads(refs_path.read_bytes())
    refs[1]["ann_id"] = 99
    refs_path.write_bytes(pickle.dumps(refs))
    with pytest.raises(DataError, match=r"ref 1: ann_id 99 not in .*instances\.json"):
        convert_rrsisd(refs_path, instances_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    instances_path.write_text("{}")
    with pytest.raises(DataError, match="not a COCO instances file"):
        convert_rrsisd(refs_path, instances_path, tmp_path / "out")
