"""``rsrefseg bench --smoke`` runs end to end and writes a complete report (structure, never speed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rsrefseg.cli.main import main

STAGES = {"sam_image_encoder", "sam_image_encoder_reference", "clip_image_encoder", "text_encoder_per_expression",
          "decode_per_expression", "text_encoder_batch_per_expression", "decode_batch_per_expression"}
PIPELINE = {"first_expression", "further_expression_batched_per_expression", "further_expression_single",
            "naive_per_expression", "bf16_first_expression"}  # tiny's bf16 path is timed on every CPU (forced if need be)
FLOPS = {"sam_image_encoder", "clip_image_encoder", "text_encoder_per_expression", "decode_per_expression",
         "first_expression"}


def _positive_timing(t: dict[str, Any]) -> None:
    assert t["min_s"] > 0 and t["median_s"] >= t["min_s"]
    assert t["gflop"] > 0 and t["gflops_at_min"] > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert main(["bench", "--smoke", "--out", str(out)]) == 0
    return json.loads(Path(out).read_text())


@pytest.mark.slow
def test_smoke_report_structure(report: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert {"meta", "settings", "roofline", "models", "targets", "gpu"} <= set(report)
    assert report["settings"]["smoke"] is True and report["settings"]["reps"] == 1
    assert report["meta"]["date"] and "bench" in report["meta"]["command"] and report["meta"]["wall_s"] > 0
    for dtype in ("fp32", "bf16"):
        assert report["roofline"][dtype]["gflops"] > 0
        best = report["roofline"]["best"][dtype]
        kinds = [v for k, v in report["roofline"].items() if k == dtype or k.startswith(dtype + "_")]
        assert len(kinds) >= 2 and best["gflops"] == max(v["gflops"] for v in kinds)  # the roofline: the best GEMM
    peak = report["physical_peak"]
    assert peak["cores"] >= 1 and peak["note"]
    assert peak["fp32_gflops"] is None or peak["fp32_gflops"] > 0
    assert set(report["models"]) == {"tiny"}
    tiny = report["models"]["tiny"]
    assert tiny["fast_sam_layers"] > 0 and tiny["fast_linear_layers"] > 0
    assert FLOPS <= set(tiny["flops"])
    for f in tiny["flops"].values():
        assert f["gflop"] > 0 and f["gflop"] >= f["gflop_stock_counter"] >= 0
    assert tiny["flops"]["sam_image_encoder"]["gflop_attention"] > 0
    assert STAGES <= set(tiny["stages"])
    for t in tiny["stages"].values():
        _positive_timing(t)
    assert PIPELINE <= set(tiny["pipeline"])
    for key in PIPELINE:
        _positive_timing(tiny["pipeline"][key])
    ratios = tiny["pipeline"]["ratios"]
    assert all(v > 0 for v in ratios.values())
    assert {"bf16_speedup_first_min", "bf16_gemm_ceiling_min", "bf16_gemm_ceiling_median"} <= set(ratios)
    assert tiny["bf16_path"]["timed"] and tiny["bf16_path"]["support"] in ("none", "emulated", "native")
    for where in ("stages_fp32", "pipelines_fp32", "pipelines_bf16"):  # every share is of the best GEMM of its rounds
        r = tiny["roofline_in_rounds"][where]
        assert r["best_gflops_at_min"] == max(k["gflops_at_min"] for k in r["kinds"].values()) > 0
    first = tiny["pipeline"]["first_expression"]
    best = tiny["roofline_in_rounds"]["pipelines_fp32"]["best_gflops_at_min"]
    assert first["share_of_roofline_at_min"] == pytest.approx(first["gflops_at_min"] / best)
    assert tiny["fast_sam"]["max_abs_diff_vs_hf"] < 1e-3
    mem = tiny["memory"]
    assert "error" not in mem, mem
    for key in ("ru_maxrss_bytes", "weights_bytes", "activations_bytes", "ratio", "baseline_rss_bytes"):
        assert mem[key] > 0
    checks = report["targets"]["checks"]
    assert len(checks) == 5 and all(c["value"] is not None and c["value"] > 0 for c in checks)
    bf16_check = next(c for c in checks if c["name"].startswith("bf16 first expression"))
    assert bf16_check["gemm_ceiling"] == ratios["bf16_gemm_ceiling_min"]
    assert bf16_check["value"] == pytest.approx(ratios["bf16_speedup_first_min"] / ratios["bf16_gemm_ceiling_min"])
    assert (bf16_check["met"] is None) == (ratios["bf16_gemm_ceiling_min"] < 1)
    assert report["gpu"]["status"]


@pytest.mark.slow
def test_smoke_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rsrefseg.bench.report import format_table

    out = tmp_path / "b.json"
    assert main(["bench", "--smoke", "--no-memory", "--no-bf16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "the roofline of a dtype is its best GEMM" in text and "[tiny]" in text and "targets" in text
    data = json.loads(out.read_text())
    assert "memory" not in data["models"]["tiny"]
    assert format_table(data).splitlines()[0].startswith("RSRefSeg benchmark")
