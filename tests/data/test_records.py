"""RefRecord JSONL I/O and mask codecs (real RRSIS-D / RefSegRS / RISBench samples + hand cases)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rsrefseg.data.records import (
    RefRecord,
    decode_mask,
    encode_mask,
    read_jsonl,
    segmentation_area,
    write_jsonl,
)
from rsrefseg.errors import DataError

EXPECTED_AREAS = {"rrsisd": [1410], "refsegrs": [284], "risbench": [711, 1061]}


@pytest.mark.parametrize("family", sorted(EXPECTED_AREAS))
def test_shared_samples_decode_to_known_areas(data_formats_dir: Path, family: str) -> None:
    records = read_jsonl(data_formats_dir / f"{family}_test_sample.jsonl")
    assert [int(r.decode().sum()) for r in records] == EXPECTED_AREAS[family]
    assert [segmentation_area(r.segmentation) for r in records] == EXPECTED_AREAS[family]
    for record in records:
        assert record.split == "test"
        assert record.source.endswith(f"{family}_test_sample.jsonl:{records.index(record) + 1}")
        height, width = record.mask_size()
        assert record.decode().shape == (height, width)


def test_shared_samples_keep_their_field_types(data_formats_dir: Path) -> None:
    rrsisd = read_jsonl(data_formats_dir / "rrsisd_test_sample.jsonl")[0]
    assert rrsisd.image_id == 3600 and rrsisd.ann_id == 3600 and rrsisd.category_name == "windmill"
    assert rrsisd.mask_size() == (800, 800)
    assert rrsisd.extra == {"area": 273329}  # not a pixel count: kept verbatim, never used
    refsegrs = read_jsonl(data_formats_dir / "refsegrs_test_sample.jsonl")[0]
    assert refsegrs.image_id == "4213" and refsegrs.file_name == "4213.tif"
    risbench = read_jsonl(data_formats_dir / "risbench_test_sample.jsonl")
    assert all("sam3" in r.extra for r in risbench)


def test_write_jsonl_round_trips_unknown_fields(data_formats_dir: Path, tmp_path: Path) -> None:
    originals = [
        json.loads(line)
        for name in ("rrsisd", "refsegrs", "risbench")
        for line in (data_formats_dir / f"{name}_test_sample.jsonl").read_text().splitlines()
    ]
    records = [RefRecord.from_dict(d, source=f"x:{i}") for i, d in enumerate(originals)]
    out = tmp_path / "sub" / "all.jsonl"
    write_jsonl(records, out)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == originals  # every field, known or not, survives unchanged
    again = read_jsonl(out)
    assert [r.to_dict() for r in again] == originals
    assert not list(out.parent.glob(".*.tmp"))  # atomic write leaves no temp file


def test_generated_fields_round_trip(tmp_path: Path) -> None:
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 2:4] = True
    record = RefRecord(
        image_id=7,
        sent="all the ships",
        file_name="007.jpg",
        segmentation=encode_mask(mask),
        split="val",
        rule="group",
        referred_ann_ids=[3, 4],
        extra={"rule_params": {"count": 2}},
    )
    write_jsonl([record], tmp_path / "g.jsonl")
    (back,) = read_jsonl(tmp_path / "g.jsonl")
    assert back.rule == "group" and back.referred_ann_ids == [3, 4]
    assert back.extra == {"rule_params": {"count": 2}}
    assert np.array_equal(back.decode(), mask)
    assert back.sample_id == "g.jsonl:1"


def test_non_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = {"image_id": 1, "sent": "x", "file_name": "a.jpg", "segmentation": encode_mask(np.ones((2, 2)))}
    path.write_text(json.dumps(good) + "\n\n{not json\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: not valid JSON")
    assert "\n" not in message


def test_missing_field_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.jsonl"
    path.write_text(json.dumps({"image_id": 1, "file_name": "a.jpg", "segmentation": []}) + "\n")
    with pytest.raises(DataError, match=r"missing\.jsonl:1: missing required field 'sent'"):
        read_jsonl(path)
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r":1: expected a JSON object"):
        read_jsonl(path)


def test_uncompressed_rle_is_column_major() -> None:
    # counts alternate 0-runs and 1-runs over the column-major (Fortran) pixel order.
    mask = decode_mask({"size": [2, 3], "counts": [1, 2, 3]})
    assert mask.tolist() == [[False, True, False], [True, False, False]]
    assert np.array_equal(decode_mask([{"size": [2, 3], "counts": [1, 2, 3]}]), mask)
    assert segmentation_area({"size": [2, 3], "counts": [1, 2, 3]}) == 2


def test_encode_decode_round_trip() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    rle = encode_mask(mask)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    assert np.array_equal(decode_mask(rle), mask)
    assert np.array_equal(decode_mask([rle], 37, 53), mask)
    assert segmentation_area(rle) == int(mask.sum())


def test_polygon_decode_needs_size_and_fills_area() -> None:
    square = [[10.0, 10.0, 20.0, 10.0, 20.0, 20.0, 10.0, 20.0]]
    with pytest.raises(DataError, match="needs the image height and width"):
        decode_mask(square)
    mask = decode_mask(square, 32, 40)
    assert mask.shape == (32, 40)
    assert abs(int(mask.sum()) - 100) <= 25  # COCO rasterisation of a 10 x 10 square
    ys, xs = np.nonzero(mask)
    assert 9 <= xs.min() and xs.max() <= 20 and 9 <= ys.min() and ys.max() <= 20
    with pytest.raises(DataError, match="at least 3"):
        decode_mask([[1.0, 2.0, 3.0, 4.0]], 10, 10)


def test_rle_size_disagreeing_with_image_names_the_record() -> None:
    rle = encode_mask(np.ones((800, 800), dtype=bool))
    with pytest.raises(DataError) as info:
        decode_mask(rle, 512, 512, source="val.jsonl:12")
    message = str(info.value)
    assert message == "val.jsonl:12: RLE size 800x800 disagrees with the image size 512x512"


def test_corrupt_rle_counts_are_refused() -> None:
    with pytest.raises(DataError, match="do not cover its size"):
        decode_mask({"size": [4, 4], "counts": [3, 3]}, source="f.jsonl:1")
    good = encode_mask(np.eye(6, dtype=bool))["counts"]
    with pytest.raises(DataError, match="do not cover its size"):
        decode_mask({"size": [6, 6], "counts": good[:-2]})
    with pytest.raises(DataError, match=r"invalid \(non-ASCII\) character"):
        decode_mask({"size": [6, 6], "counts": "\u00e9\u00e9"})
    with pytest.raises(DataError, match="invalid character"):
        decode_mask({"size": [6, 6], "counts": "~~"})
    with pytest.raises(DataError, match="truncated"):
        decode_mask({"size": [6, 6], "counts": "6P"})  # 'P' = 0x20 | ...: a value that never ends
    with pytest.raises(DataError, match="RLE 'size'"):
        decode_mask({"size": [6], "counts": good})
    with pytest.raises(DataError, match="segmentation must be"):
        decode_mask("not a mask")


def _reference_counts(counts: str) -> list[int]:
    """Straight port of ``rleFrString`` from pycocotools' maskApi.c."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            code = ord(counts[pos]) - 48
            value |= (code & 0x1F) << (5 * shift)
            more = bool(code & 0x20)
            pos += 1
            shift += 1
            if not more and code & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def test_vectorised_rle_string_parser_matches_maskapi(data_formats_dir: Path) -> None:
    from rsrefseg.data.records import _rle_string_counts

    rng = np.random.default_rng(1)
    strings = [encode_mask(rng.random((h, w)) > p)["counts"] for h, w, p in [(40, 70, 0.5), (300, 200, 0.99)]]
    strings.append(encode_mask(np.zeros((1000, 1000), dtype=bool))["counts"])  # one huge run
    strings += [
        r.segmentation[0]["counts"] if isinstance(r.segmentation, list) else r.segmentation["counts"]
        for name in ("rrsisd", "refsegrs", "risbench")
        for r in read_jsonl(data_formats_dir / f"{name}_test_sample.jsonl")
    ]
    for counts in strings:
        assert _rle_string_counts(counts, "x").tolist() == _reference_counts(counts)
