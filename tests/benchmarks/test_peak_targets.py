"""The physical peak from CPU features, the best-GEMM roofline of a round, and the targets' logic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rsrefseg.bench.peak import lookup, physical_peak, read_cpuinfo
from rsrefseg.bench.roofline import affordable, round_roofline
from rsrefseg.bench.suite import evaluate_targets

ZEN3 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "1", "model name": "AMD EPYC",
        "cpu MHz": "2445.430", "flags": "fpu sse avx fma avx2 hypervisor"}


def _cpu(**changes: str) -> dict[str, str]:
    return {**ZEN3, **changes}


def test_peak_of_zen3_under_a_hypervisor(tmp_path: Path) -> None:
    peak = physical_peak(cpuinfo=ZEN3, cpufreq=tmp_path / "none", cores=2)
    assert peak["microarchitecture"] == "Zen 3" and peak["fp32_flop_per_cycle_per_core"] == 32
    assert peak["fp32_gflops"] == pytest.approx(2 * 32 * 2.44543)
    assert peak["bf16_gflops"] is None and not peak["native_bf16"]
    assert "estimate" in peak["note"] and "hypervisor" in peak["note"] and "no native bf16" in peak["note"]
    assert physical_peak(threads=1, cpuinfo=ZEN3, cpufreq=tmp_path / "none", cores=2)["cores"] == 1


def test_peak_table_rows(tmp_path: Path) -> None:
    zen5 = _cpu(**{"cpu family": "26", "model": "2", "flags": "avx2 fma avx512f avx512_bf16"})
    peak = physical_peak(cpuinfo=zen5, cpufreq=tmp_path, cores=2)
    assert peak["fp32_flop_per_cycle_per_core"] == 64 and peak["bf16_gflops"] == 2 * peak["fp32_gflops"]
    zen4 = lookup("AuthenticAMD", 25, 0x11, {"avx2", "fma", "avx512f"})
    assert zen4 is not None and zen4.width_bits == 256  # AVX-512 on 256-bit datapaths
    xeon = lookup("GenuineIntel", 6, 143, {"avx2", "fma", "avx512f"})
    assert xeon is not None and xeon.width_bits == 512 and xeon.upper_bound
    unknown = physical_peak(cpuinfo=_cpu(vendor_id="HygonGenuine"), cpufreq=tmp_path, cores=2)
    assert unknown["fp32_gflops"] is None and "unknown" in unknown["note"]
    mobile_zen5 = physical_peak(cpuinfo=_cpu(**{"cpu family": "26", "model": "36", "flags": "avx2 fma avx512f"}),
                                cpufreq=tmp_path, cores=2)
    assert mobile_zen5["fp32_gflops"] is None  # 256-bit Zen 5 parts: not in the table, not guessed


def test_cpufreq_clock_wins(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo_max_freq").write_text("3700000\n")
    peak = physical_peak(cpuinfo=ZEN3, cpufreq=tmp_path, cores=1)
    assert peak["clock_ghz"] == pytest.approx(3.7) and peak["clock_source"].startswith("cpufreq")


def test_read_cpuinfo_first_processor(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n\nprocessor\t: 1\nvendor_id\t: X\n")
    assert read_cpuinfo(path) == {"processor": "0", "vendor_id": "AuthenticAMD", "cpu family": "25"}
    assert read_cpuinfo(tmp_path / "missing") == {}


def test_round_roofline_is_the_best_kind() -> None:
    t = {"min_s": 1.0, "median_s": 2.0}
    timings = {"roofline_fp32": t, "roofline_fp32_onednn": {"min_s": 0.5, "median_s": 0.5},
               "roofline_fp32_mm_bt": {"min_s": 0.8, "median_s": 1.0}, "other": t}
    roof = round_roofline(timings, "roofline_fp32", 10.0)
    assert set(timings) == {"other"}  # the probes are popped
    assert roof["best_gflops_at_min"] == 20.0 and roof["best_kind_at_min"] == "oneDNN linear"
    assert roof["gflops_at_min"] == 10.0 and roof["onednn_gflops_at_min"] == 20.0  # the first suite's keys


def test_affordable_sizes() -> None:
    assert affordable([2048, 3072, 4096], 150.0) == [2048, 3072, 4096]
    assert affordable([2048, 3072, 4096], 10.0) == [2048]  # 1.7 s; 3072 would be 5.8 s
    assert affordable([2048, 3072, 4096], 1.0) == [1024]  # bf16 without bf16 kernels: smaller
    assert affordable([2048, 3072, 4096], 0.01) == [512]  # at least the calibration size


def _model(speedup: float | None, ceiling: float) -> dict[str, Any]:
    ratios: dict[str, Any] = {"first_over_further_batched_min": 30.0, "first_over_further_batched_median": 29.0,
                              "naive_over_further_batched_min": 31.0, "naive_over_further_batched_median": 30.0,
                              "bf16_gemm_ceiling_min": ceiling, "bf16_gemm_ceiling_median": ceiling}
    if speedup is not None:
        ratios.update(bf16_speedup_first_min=speedup, bf16_speedup_first_median=speedup)
    first = {"share_of_roofline_at_min": 0.86, "share_of_roofline_at_median": 0.84, "share_of_torch_mm_at_min": 1.4}
    return {"pipeline": {"first_expression": first, "ratios": ratios}, "memory": {"ratio": 1.1}}


def test_targets_use_the_best_gemm_and_the_bf16_ceiling() -> None:
    checks = {c["name"].split(":")[0]: c for c in evaluate_targets(_model(1.8, 1.96))}
    first = checks["first expression"]
    assert first["value"] == 0.86 and first["met"] and first["of_torch_mm"] == 1.4
    bf16 = checks["bf16 first expression"]
    assert bf16["value"] == pytest.approx(1.8 / 1.96) and bf16["met"]
    assert not evaluate_targets(_model(1.6, 1.96))[3]["met"]  # 0.82 of the ceiling
    na = evaluate_targets(_model(1.0, 0.11))[3]
    assert na["met"] is None and na["not_applicable"] == "not applicable on this CPU (ceiling 0.11)"
    untimed = evaluate_targets(_model(None, 0.02))[3]
    assert untimed["value"] is None and untimed["met"] is None
