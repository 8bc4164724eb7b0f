"""The per-shape GEMM kernel comparison runs, and its ratios are consistent with its own numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsrefseg.bench import kernels


def test_compare_small_shapes_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = kernels.compare([("small", 64, 32, 48), ("tall", 256, 16, 8)], reps=2)
    assert [r["shape"] for r in rows] == ["small", "tall"]
    for r in rows:
        assert {"addmm", "mm_bt"} <= set(r["gflops"])
        assert all(v > 0 for v in r["gflops"].values())
        assert r["ratio_to_best"][r["best"]] == 1.0
        assert max(r["ratio_to_best"].values()) == 1.0
        assert r["gflops"][r["best"]] == max(r["gflops"].values())
    text = kernels.format_rows(rows)
    assert "small" in text and "tall" in text and "100%" in text

    out = tmp_path / "k.json"
    assert kernels.main(["--reps", "1", "--out", str(out)], shapes=(("a", 32, 16, 16),)) == 0
    printed = capsys.readouterr().out
    assert "GEMM kernels" in printed and "a " in printed
    data = json.loads(out.read_text())
    assert data["threads"] == kernels.torch.get_num_threads() and data["rows"][0]["shape"] == "a"
