"""``data inspect`` flags what is wrong in a JSONL (and exits 1), datasets refuse file names leaving
the image folder, evaluation counts a duplicated sample once, a UTF-8 BOM is simply read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from rsrefseg.cli.main import main
from rsrefseg.data.datasets import ReferringDataset
from rsrefseg.data.inspect import has_problems, inspect_jsonl
from rsrefseg.data.records import encode_mask, read_jsonl
from rsrefseg.errors import DataError


def _square(h: int = 40, w: int = 50) -> dict[str, Any]:
    mask = np.zeros((h, w), dtype=bool)
    mask[5:15, 10:20] = True
    return encode_mask(mask)


def _record(**fields: Any) -> dict[str, Any]:
    return {"image_id": 1, "sent": "the square", "file_name": "a.png", "segmentation": _square(), **fields}


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(tmp_path / "secret.png")  # outside the folder
    return folder


def _write(path: Path, rows: list[Any], bom: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_clean_file_exits_0_and_a_bom_is_read(images: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "ok.jsonl", [_record(bbox=[10, 5, 10, 10]), _record(sent="another")], bom=True)
    assert [r.sent for r in read_jsonl(path)] == ["the square", "another"]
    code, out, err = _cli(capsys, "data", "inspect", str(path), "--images", str(images))
    assert code == 0 and "records:     2" in out and err == ""


def test_every_problem_is_flagged_and_exits_1(images: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        _record(),
        _record(),  # duplicate of line 1
        _record(sent="a", bbox=[-3, 0, 5, 5]),  # negative
        _record(sent="b", bbox=[45, 30, 10, 20]),  # leaves the 40 x 50 image
        _record(sent="c", bbox=["x", 0, 1, 1]),  # malformed
        _record(sent="d", segmentation={"size": [40, 50], "counts": [2**64, 5]}),  # overflows int64
        _record(sent="e", segmentation={"size": [2**40, 2**40], "counts": [2**80]}),  # overflows uint32
        _record(sent="f", file_name="../secret.png"),
        _record(sent="g", file_name=str(images.parent / "secret.png")),
    ]
    path = _write(tmp_path / "bad.jsonl", rows)
    report = inspect_jsonl(path, image_dir=images)
    assert report["duplicates"] == 1 and report["duplicate_examples"] == [f"{path}:2 repeats line 1"]
    assert report["bad_bboxes"] == 3
    assert [e.split(": ", 1)[1] for e in report["bad_bbox_examples"]] == [
        "bbox [-3, 0, 5, 5] has a negative value", "bbox [45, 30, 10, 20] leaves the 40x50 image",
        "bbox must be [x, y, width, height] numbers, got ['x', 0, 1, 1]"]
    assert report["problems"] == 2 and "outside [0, 4294967295]" in report["problem_examples"][0]
    assert "larger than COCO RLE can hold" in report["problem_examples"][1]
    assert report["unsafe_file_names"] == 2 and "has a '..' component" in report["unsafe_file_name_examples"][0]
    assert report["images_found"] == 1  # the names leaving the folder were never opened
    assert has_problems(report)
    code, out, err = _cli(capsys, "data", "inspect", str(path), "--images", str(images))
    assert code == 1 and "duplicates: 1" in out and "file names leaving the image folder: 2" in out
    assert err == "" and "Traceback" not in out


@pytest.mark.parametrize("content, message", [
    (b"", None),  # an empty file: no records, nothing to flag
    (b"\xff\xfe{}\n", "cannot read JSONL"),
    (b'{"image_id": 1}\n', ":1: missing required field 'sent'"),
    (b"[1, 2]\n", ":1: expected a JSON object, got list"),
])
def test_unusable_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
                                message: str | None) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    code, _, err = _cli(capsys, "data", "inspect", str(path))
    if message is None:
        assert code == 0
        return
    assert code == 2 and err.startswith(f"error: {path}") and message in err and len(err.splitlines()) == 1


def test_datasets_refuse_file_names_leaving_the_image_folder(images: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "x.jsonl", [_record(), _record(sent="b", file_name="../secret.png")])
    records = read_jsonl(path)
    with pytest.raises(DataError, match=rf"{path}:2: file_name '../secret.png' has a '..' component"):
        ReferringDataset(records, images, 64)
    kept = ReferringDataset(records, images, 64, skip_bad=True)
    assert len(kept) == 1 and kept.skipped[0][1].startswith("unsafe file name:")


def test_eval_counts_a_duplicated_sample_once(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              tiny_checkpoint_dir: Path) -> None:
    rows = [_record(), _record(sent="the other square"), _record()]
    path = _write(tmp_path / "dup.jsonl", rows)
    code, _, err = _cli(capsys, "eval", "--checkpoint", str(tiny_checkpoint_dir), "--data", str(path),
                          "--images", str(images), "--out", str(tmp_path / "out"), "--overlays", "0")
    assert code == 0, err
    assert f"warning: {path}: 1 duplicate record(s) counted once" in err and f"{path}:3 = line 1" in err
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n"] == 2


@pytest.fixture(scope="module")
def tiny_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rsrefseg import RSRefSeg

    directory = tmp_path_factory.mktemp("ckpt") / "ckpt"
    RSRefSeg.from_preset("tiny", sam_image_size=64, clip_image_size=64,
                         arch_overrides={"sam": {"vision_config": {"image_size": 64, "window_size": 4}},
                                         "clip": {"vision_config": {"image_size": 64}}}).save_pretrained(directory)
    return directory
