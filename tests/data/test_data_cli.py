"""`rsrefseg data ...` subcommands through their argparse registration."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from rsrefseg.cli.data_cli import add_data_parser
from rsrefseg.data.records import read_jsonl
from rsrefseg.errors import DataError


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rsrefseg")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_from_coco_cli_on_nwpu_val(
    data_nwpu_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "val.jsonl"
    annotations = str(data_nwpu_dir / "annotations" / "instances_val.json")
    assert (
        _run(
            [
                "data",
                "from-coco",
                "--annotations",
                annotations,
                "--images",
                str(data_nwpu_dir / "images"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    records = read_jsonl(out)
    assert f"wrote {len(records)} records" in printed
    for rule in ("only", "extreme", "size", "group"):
        count = sum(r.rule == rule for r in records)
        assert count > 0 and f"  {rule:<10} {count}" in printed
    assert "storage_tank" in printed and "vehicle" not in printed
    assert _run(["data", "inspect", str(out), "--images", str(data_nwpu_dir / "images"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["records"] == len(records) and report["images_missing"] == 0 and report["size_mismatches"] == 0
    )
    assert report["rules"]["group"] == sum(r.rule == "group" for r in records)


def test_inspect_cli_text_and_errors(
    data_formats_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["data", "inspect", str(data_formats_dir / "refsegrs_test_sample.jsonl")]) == 0
    assert "mask area:" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text("oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: not valid JSON"):
        _run(["data", "inspect", str(bad)])


def test_convert_rrsisd_cli_registration(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        _run(
            [
                "data",
                "convert-rrsisd",
                "--refs",
                str(tmp_path / "refs(unc).p"),
                "--instances",
                "i.json",
                "--out",
                str(tmp_path),
            ]
        )
    with pytest.raises(SystemExit):
        _run(["data", "convert-rrsisd", "--refs", "x.p"])  # --instances and --out are required
