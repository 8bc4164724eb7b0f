"""``--progress json``: machine-readable progress lines that a program (the QGIS plugin) can parse."""

from __future__ import annotations

import io
import json

import pytest

from rsrefseg.cli.main import main
from rsrefseg.cli.progress import JsonProgress, progress


def test_json_progress_counts_every_step() -> None:
    stream = io.StringIO()
    wrapped = JsonProgress(iter("abc"), total=3, stage="tiles", stream=stream)
    assert list(wrapped) == ["a", "b", "c"]
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["done"] for line in lines] == [0, 1, 2, 3]
    assert lines[-1] == {"event": "progress", "stage": "tiles", "done": 3, "total": 3, "fraction": 1.0,
                         "message": ""}
    assert list(progress([1, 2], "none")) == [1, 2]


def test_predict_reports_json_progress_on_stderr(nodata_tif, tiny_checkpoint, tmp_path, capsys) -> None:
    code = main(["predict", str(nodata_tif), "--text", "fields", "--checkpoint", str(tiny_checkpoint),
                 "--out", str(tmp_path / "out"), "--progress", "json",
                 "--tile-threshold", "1", "--tile", "96", "--overlap", "32"])  # 2 tiles
    err = capsys.readouterr().err
    assert code == 0
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert not [line for line in err.splitlines() if line.strip() and not line.startswith("{")]  # no bars
    stages = {line["stage"] for line in lines}
    assert stages == {"predict", "tiles"}
    last = [line for line in lines if line["stage"] == "predict"][-1]
    assert last["done"] == last["total"] == 1 and last["fraction"] == pytest.approx(1.0)
