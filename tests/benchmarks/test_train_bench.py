"""The training section: memory guard, watchdog, derived numbers, GPU-fit estimate, CLI, smoke run."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from rsrefseg.bench import train_bench
from rsrefseg.bench.train_derive import checkpointing_at, derive, grouped, train_checks
from rsrefseg.bench.train_fit import CUDA_OVERHEAD, MARGIN, gpu_fit
from rsrefseg.cli.main import main
from rsrefseg.errors import ConfigError

GIB = 2**30


def _trace(act_gib: float, gflop: float, weights_gib: float = 4.0) -> dict[str, Any]:
    return {"activations_bytes": int(act_gib * GIB), "gflop": gflop, "weights_bytes": int(weights_gib * GIB),
            "gradients_bytes": int(0.1 * GIB), "optimizer_state_bytes": int(0.2 * GIB)}


def _measured(min_s: float, peak_gib: float, expressions: int, act_gib: float) -> dict[str, Any]:
    return {"min_s": min_s, "median_s": min_s * 1.1, "build_s": 10.0,
            "expressions_per_s_at_min": expressions / min_s, "expressions_per_s_at_median": expressions / (1.1 * min_s),
            "memory": {"steps_peak_rss_bytes": int(peak_gib * GIB), "process_peak_rss_bytes": int(peak_gib * GIB),
                       "baseline_rss_bytes": int(0.5 * GIB), "weights_bytes": int(4 * GIB),
                       "gradients_bytes": int(0.1 * GIB), "optimizer_state_bytes": int(0.2 * GIB),
                       "activations_bytes": int(act_gib * GIB)}}


def _entry(measure_plain_batch2: bool) -> dict[str, Any]:
    """A synthetic preset: batch 2 without checkpointing measured or only traced."""
    configs: dict[str, Any] = {
        "batch1": {"trace": _trace(8, 3600), "expressions": 1, "measured": _measured(40, 13.3, 1, 8)},
        "batch1+ckpt": {"trace": _trace(2, 4600), "expressions": 1, "measured": _measured(50, 7.0, 1, 2)},
        "batch2": {"trace": _trace(16, 7200), "expressions": 2},
        "batch2+ckpt": {"trace": _trace(3, 9200), "expressions": 2, "measured": _measured(100, 8.0, 2, 3)},
        "grouped1x4": {"trace": _trace(9, 4000), "expressions": 4, "measured": _measured(46, 14.0, 4, 9)},
    }
    if measure_plain_batch2:
        configs["batch2"]["measured"] = _measured(80, 21.5, 2, 16)
    return {"configs": configs}


def test_checkpointing_basis_measured_or_estimated() -> None:
    both = checkpointing_at(_entry(True), 2)
    assert both is not None and both["memory_basis"].startswith("measured")
    # resident peaks less the 0.5 GiB interpreter: 7.5 vs 21.0 GiB
    assert both["memory_reduction"] == pytest.approx(1 - 7.5 / 21.0)
    assert both["time_ratio_min"] == pytest.approx(100 / 80)
    one = checkpointing_at(_entry(False), 2)
    assert one is not None and one["memory_basis"].startswith("estimated")
    # weights + gradients + AdamW (4.3 GiB) + traced activations on both sides
    assert one["memory_reduction"] == pytest.approx(1 - 7.3 / 20.3)
    assert "time_ratio_min" not in one and one["flop_ratio"] == pytest.approx(9200 / 7200)


def test_checks_fall_back_to_batch1_time_and_say_so() -> None:
    entry = _entry(False)
    entry["derived"] = derive(entry)
    checks = train_checks({"rsrefseg-b": entry})
    assert len(checks) == 3
    mem = next(c for c in checks if "memory reduction" in c["name"])
    assert mem["met"] is True and mem["per_preset"]["rsrefseg-b"]["basis"].startswith("estimated")
    step = next(c for c in checks if "step time" in c["name"])
    assert step["value"] == pytest.approx(50 / 40) and step["met"] is True
    assert "batch 1" in step["per_preset"]["rsrefseg-b"]["basis"]
    group = next(c for c in checks if c["name"].startswith("grouped expressions"))
    # 4 expressions in 46 s vs 1 in 40 s
    assert group["value"] == pytest.approx((4 / 46) / (1 / 40)) and group["met"] is True
    assert group["basis"] == "measured, without checkpointing" and group["target"] == ">= 2.5"
    assert all(c["name"].startswith(("gradient checkpointing", "grouped expressions")) for c in checks)


def test_grouped_flop_estimate_when_not_measured() -> None:
    entry = _entry(False)
    del entry["configs"]["grouped1x4"]["measured"]
    g = grouped(entry)
    assert g is not None and "basis" not in g["plain"]
    assert g["plain"]["flop_speedup"] == pytest.approx(4 * 3600 / 4000)


def test_gpu_fit_is_linear_in_the_batch() -> None:
    presets = {"rsrefseg-b": {"gpu_traces": {"batch1": _trace(3, 1), "batch2": _trace(5, 2),
                                             "batch1+ckpt": _trace(1, 1), "batch2+ckpt": _trace(1.5, 2)}}}
    fit = gpu_fit(presets, (1, 2, 4, 8, 16))
    plain, ckpt = fit["rows"]
    static = 4.3 * GIB
    assert plain["estimate_bytes"]["4"] == pytest.approx(static + MARGIN * (3 + 3 * 2) * GIB + CUDA_OVERHEAD, rel=1e-6)
    # static 4.3 + 1.2 x (3 + 2 (B - 1)) + 1.5 = 7.0 + 2.4 B GiB: B <= 7.1 on 24 GiB, 13.8 on 40, 30.4 on 80
    assert plain["max_batch"] == {"24 GB": 4, "40 GB": 8, "80 GB": 16}
    assert ckpt["checkpointing"] is True and ckpt["max_batch"]["24 GB"] == 16
    assert "not yet confirmed on a GPU" in fit["basis"]


def test_memory_guard_skips_with_an_explicit_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_bench, "mem_available", lambda: int(6 * GIB))
    started = []
    monkeypatch.setattr(train_bench, "run_child", lambda *a, **k: started.append(a) or {})
    planner = train_bench._Planner(600.0, 2)
    item = {"trace": _trace(8, 3600)}
    train_bench._measure("rsrefseg-b", {"key": "batch1"}, item, planner, [], 4096, None, lambda _: None)
    assert not started
    # 0.45 GiB interpreter + 4.3 GiB static + 1.25 x 8 GiB activations + 1 GiB head room
    assert item["status"] == "estimated, not run: needs 15.7 GiB (with 1 GiB head room), 6.0 GiB available"
    assert item["estimated_peak_rss_bytes"] == pytest.approx((0.45 + 4.3 + 10) * GIB, rel=1e-3)


def test_time_budget_lowers_reps_then_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_bench, "mem_available", lambda: int(100 * GIB))
    planner = train_bench._Planner(100.0, 3)
    planner.rate["p"], planner.build_s["p"] = 10.0, 5.0
    # 20 + 100 / 10 x (reps + 1.5) s: 3 reps = 65 s fits in 100 s; with 82.5 s kept for one repetition of the
    # rest (250 GFLOP), even 1 rep (45 s) does not: this one still runs once, the rest may be skipped later
    assert planner.plan("p", {**_trace(0, 0), "gflop": 100.0}, [])[0] == 3
    assert planner.plan("p", {**_trace(0, 0), "gflop": 100.0}, [("p", {**_trace(0, 0), "gflop": 250.0})])[0] == 1
    assert planner.plan("p", {**_trace(0, 0), "gflop": 1000.0}, [])[0] == 0


def test_watchdog_kills_the_child_when_memory_runs_low(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_bench, "mem_available", lambda: int(0.1 * GIB))
    start = time.monotonic()
    out = train_bench.run_child({"images": 1, "per_image": 1, "checkpointing": False}, "tiny", 1, 64, 1,
                                timeout=300.0)
    assert time.monotonic() - start < 30
    assert out["error"].startswith("stopped by the memory watchdog: MemAvailable fell to 0.10 GiB")


def test_bad_train_presets_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    assert main(["bench", "--train-only", "--train-presets", "rsrefseg-b,nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --train-presets: unknown preset(s) nope; choose from rsrefseg-b, rsrefseg-l, rsrefseg-h, "
                   "clip-b16, tiny"]
    assert main(["bench", "--train", "--train-reps", "0", "--out", str(out)]) == 2
    assert not out.exists()


@pytest.mark.slow
def test_smoke_train_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--train-only", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "training step on the CPU" in text and "bf16 training on a GPU" in text and "training targets" in text
    report = json.loads(out.read_text())
    assert "--train-only" in report["meta"]["command"] and report["meta"]["wall_s"] > 0
    train = report["train"]
    tiny = train["presets"]["tiny"]
    assert set(tiny["configs"]) == {"batch1", "batch2", "batch2+ckpt", "grouped1x4"}
    for key, item in tiny["configs"].items():
        assert item["status"] == "measured", (key, item.get("status"))
        m = item["measured"]
        assert m["min_s"] > 0 and m["gflop"] > 0 and m["share_of_roofline_at_min"] > 0
        assert m["memory"]["steps_peak_rss_bytes"] > m["memory"]["activations_bytes"] > 0
        # exact without checkpointing; with it the order in which recomputed tensors die varies a little
        tolerance = 0.05 * item["trace"]["activations_bytes"] if item["checkpointing"] else 64
        assert abs(m["memory"]["activations_bytes"] - item["trace"]["activations_bytes"]) <= tolerance
        assert m["gflop"] == pytest.approx(item["trace"]["gflop"], rel=1e-9)
    assert tiny["derived"]["checkpointing"]["2"]["time_basis"] == "measured"
    assert tiny["derived"]["grouped"]["plain"]["basis"] == "measured"
    assert [r["checkpointing"] for r in train["gpu_fit"]["rows"]] == [False]
    names = [c["name"] for c in report["targets"]["checks"]]
    assert len(names) == 3 and all(c["value"] is not None for c in report["targets"]["checks"])
    assert sum(n.startswith("gradient checkpointing") for n in names) == 2
    assert sum(n.startswith("grouped expressions") for n in names) == 1


def test_trace_cache_reuses_and_rejects_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rsrefseg.bench.train_trace as train_trace

    calls = []
    monkeypatch.setattr(train_trace, "trace_step", lambda *a: calls.append(a) or {"activations_bytes": len(calls)})
    path = tmp_path / "traces.json"
    cache = train_bench.TraceCache(str(path))
    assert cache.trace("tiny", 2, 1, True, "bf16") == {"activations_bytes": 1}
    again = train_bench.TraceCache(str(path))  # a later run reads the file
    assert again.trace("tiny", 2, 1, True, "bf16") == {"activations_bytes": 1}
    assert again.trace("tiny", 2, 1, False, "bf16") == {"activations_bytes": 2}  # another configuration
    assert calls == [("tiny", 2, 1, True, "bf16"), ("tiny", 2, 1, False, "bf16")]
    assert (again.hits, again.misses) == (1, 1)
    for text, message in (("{", "not a readable trace cache (JSONDecodeError)"),
                          ('{"x": 1}', "not a trace cache (no 'traces' object)")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            train_bench.TraceCache(str(path))
