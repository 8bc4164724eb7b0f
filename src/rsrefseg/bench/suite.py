"""Run the whole benchmark in one process, evaluate the targets, write JSON atomically, print a table."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The issue's starting point ("Performance: a benchmark suite, and inference close to this
#: machine's limit"), for the re-measurement: GFLOP/s, and (GFLOP, seconds) per stage.
ISSUE_BASELINE = {
    "roofline_fp32_gflops": 149.0,
    "roofline_bf16_gflops": 388.0,
    "sam_image_encoder": (742.0, 11.7),
    "clip_image_encoder": (604.0, 4.3),
    "text_encoder_per_expression": (53.0, 0.46),
}
SMOKE_PRESET = "tiny"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="rsrefseg-b", help="full-size preset to measure (tiny is always added)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (default 3)")
    parser.add_argument("--out", default="bench.json", help="JSON report (written atomically)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="tiny only, 1 repetition, 1 thread unless --threads (CI: structure, not speed)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 CPU path")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocess")
    parser.add_argument("--agreement", metavar="CKPT", default=None,
                        help="trained checkpoint: evaluate it in fp32 and bf16 on --agreement-data and compare the masks "
                             "(the issue: the tiny demo model on NWPU val, IoU >= 0.98)")
    parser.add_argument("--agreement-data", metavar="JSONL", default=None, help="records for --agreement (e.g. the demo's val.jsonl)")
    parser.add_argument("--agreement-images", metavar="DIR", default=None, help="image folder of --agreement-data")
    from rsrefseg.bench.train_bench import add_train_arguments

    add_train_arguments(parser)  # --train, --train-only, ...


def _check(name: str, value: float | None, target: float, higher_is_better: bool, **extra: Any) -> dict[str, Any]:
    met = None if value is None else (value >= target if higher_is_better else value <= target)
    op = ">=" if higher_is_better else "<="
    return {"name": name, "value": value, "target": f"{op} {target:g}", "met": met, **extra}


#: The targets (issue 15): the first expression against the best fp32 GEMM measured in the same
#: rounds, and the bf16 path against what this CPU's bf16 GEMMs allow.
FIRST_EXPRESSION_TARGET = 0.85
BF16_OF_CEILING_TARGET = 0.9


def evaluate_targets(model: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, from the measurements of one preset (ratios from one run).

    Every share is of the best GEMM (over ``torch.mm``, ``torch.mm`` with ``B`` transposed and
    oneDNN's linear) measured in the same rounds. The bf16 target is the bf16 path's speed-up over
    fp32 as a fraction of the bf16 GEMM ceiling (best bf16 / best fp32 GEMM, same rounds); it does
    not apply where that ceiling is below 1 (no native bf16: bf16 cannot be faster there).
    """
    pipe, ratios = model["pipeline"], model["pipeline"]["ratios"]
    first = pipe["first_expression"]
    mem = model.get("memory", {})
    checks = [
        _check("first expression: share of the best fp32 GEMM (same rounds)", first["share_of_roofline_at_min"],
               FIRST_EXPRESSION_TARGET, True, median=first["share_of_roofline_at_median"],
               of_torch_mm=first.get("share_of_torch_mm_at_min"),
               note="roofline: the best of torch.mm, torch.mm with B transposed and oneDNN's linear in the same "
                    "rounds; of_torch_mm: against torch.mm alone (for comparison)"),
        _check("further expression (batched) time / first expression", 1.0 / ratios["first_over_further_batched_min"],
               1 / 15, False, median=1.0 / ratios["first_over_further_batched_median"]),
        _check("naive pipeline / further expression (batched): speed-up", ratios["naive_over_further_batched_min"],
               15.0, True, median=ratios["naive_over_further_batched_median"]),
    ]
    ceiling = ratios.get("bf16_gemm_ceiling_min")
    if ceiling is not None:
        speedup = ratios.get("bf16_speedup_first_min")
        median = ratios.get("bf16_speedup_first_median")
        check = _check("bf16 first expression: speed-up / bf16 GEMM ceiling", None if speedup is None else speedup / ceiling,
                       BF16_OF_CEILING_TARGET, True,
                       median=None if median is None else median / ratios["bf16_gemm_ceiling_median"],
                       speedup=speedup, gemm_ceiling=ceiling, bf16_path=model.get("bf16_path", {}).get("status"),
                       note="gemm_ceiling: best bf16 / best fp32 GEMM in the same rounds, the speed-up of an "
                            "all-GEMM model")
        if ceiling < 1.0:
            check["met"] = None
            check["not_applicable"] = f"not applicable on this CPU (ceiling {ceiling:.2f})"
        checks.append(check)
    checks.append(_check("peak resident memory / (weights + one image's activations)", mem.get("ratio"), 1.3, False))
    return checks


def agreement_check(agreement: dict[str, Any]) -> dict[str, Any]:
    """The bf16 agreement target from :func:`rsrefseg.bench.agreement.precision_agreement`."""
    from rsrefseg.bench.agreement import AGREEMENT_TARGET

    a = agreement["agreement"]
    return _check("bf16 vs fp32 masks of a trained checkpoint: mean IoU per sample", a["mean_iou"], AGREEMENT_TARGET,
                  True, median=None, overall=a["overall_iou"], n=a["n"])


def issue_check(roof: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """The issue's starting numbers next to this run's (stock FlopCounterMode, HF attention)."""
    flops, stages = model["flops"], model["stages"]
    rows: dict[str, Any] = {
        "roofline_fp32_gflops": {"issue": ISSUE_BASELINE["roofline_fp32_gflops"], "measured": roof["fp32"]["gflops"]},
        "roofline_bf16_gflops": {"issue": ISSUE_BASELINE["roofline_bf16_gflops"],
                                 "measured": roof.get("bf16", {}).get("gflops")},
    }
    pairs = {"sam_image_encoder": "sam_image_encoder_reference", "clip_image_encoder": "clip_image_encoder",
             "text_encoder_per_expression": "text_encoder_per_expression"}
    for name, measured in pairs.items():
        gflop, seconds = ISSUE_BASELINE[name]  # type: ignore[misc]
        rows[name] = {"issue_gflop": gflop, "issue_s": seconds,
                      "measured_gflop_stock_counter": flops[measured]["gflop_stock_counter"],
                      "measured_gflop_with_attention": flops[measured]["gflop"],
                      "measured_min_s": stages[measured]["min_s"], "measured_median_s": stages[measured]["median_s"]}
    return rows


def run_suite(
    preset: str = "rsrefseg-b",
    reps: int = 3,
    out: str | Path | None = "bench.json",
    smoke: bool = False,
    threads: int | None = None,
    bf16: bool = True,
    memory: bool = True,
    argv: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    agreement: tuple[str, str, str] | None = None,
    train: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the suite and return the report (also written to ``out`` and printed as a table).

    The torch thread count is restored afterwards (``threads`` only applies to this run).
    ``agreement``: ``(checkpoint, jsonl, images)`` of a trained model to compare bf16 and fp32 masks on.
    ``train``: options of the training section (:func:`rsrefseg.bench.train_bench.train_options`).
    """
    import torch  # here, not at the top: `rsrefseg --help` registers this module's arguments without torch

    previous_threads = torch.get_num_threads()
    if smoke:
        reps = 1
        # Tiny ops on 2 OpenMP threads of a shared 2-core machine can wait a whole scheduler slice
        # per op (100x slower); the smoke run only checks the report, so it uses one thread.
        threads = threads or 1
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(preset, reps, out, smoke, bf16, memory, threads, argv, log, agreement, train)
    finally:
        torch.set_num_threads(previous_threads)


def _run(preset: str, reps: int, out: str | Path | None, smoke: bool, bf16: bool, memory: bool,
         threads: int | None, argv: Sequence[str] | None, log: Callable[[str], None],
         agreement: tuple[str, str, str] | None = None, train: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from rsrefseg.bench.cpu import bench_model
    from rsrefseg.bench.gpu import NO_GPU, bench_gpu
    from rsrefseg.bench.memory import measure_memory
    from rsrefseg.bench.peak import physical_peak
    from rsrefseg.bench.report import format_table
    from rsrefseg.bench.roofline import roofline
    from rsrefseg.bench.timing import CpuMonitor, contention, load_average, machine_info

    monitor = CpuMonitor()
    started = time.perf_counter()
    meta = machine_info(list(argv) if argv is not None else sys.argv)
    report: dict[str, Any] = {"meta": meta, "settings": {"preset": preset, "reps": reps, "warmup": 1,
                                                         "smoke": smoke, "bf16": bf16, "memory": memory,
                                                         "threads": torch.get_num_threads()}}
    if train is not None and train["only"]:
        from rsrefseg.bench.train_bench import run_train_only

        return run_train_only(report, train, smoke, threads, log, lambda r: _save(r, out))
    log("roofline (the best GEMM: torch.mm, torch.mm with B transposed, oneDNN linear)")
    sizes = [512, 1024] if smoke else [2048, 3072, 4096]
    roof = roofline(sizes, reps=max(reps, 1 if smoke else 3))
    report["roofline"] = roof
    report["physical_peak"] = physical_peak(torch.get_num_threads())  # context, never a target
    presets = [SMOKE_PRESET] if smoke else list(dict.fromkeys([preset, SMOKE_PRESET]))
    # Memory first: a child's ru_maxrss starts from its parent's resident size at fork, so the
    # children are started while this process holds no model.
    memories = {}
    for name in presets if memory else []:
        log(f"[{name}] peak memory (fresh subprocess)")
        memories[name] = measure_memory(name, threads)
    if train is not None:  # its children too start while this process holds no model
        from rsrefseg.bench.train_bench import train_section

        report["train"] = train_section(train, smoke, threads, log)
    report["models"] = {}
    for name in presets:
        result = bench_model(name, reps, probe_size=1024 if smoke else 4096, bf16=bf16, log=log)
        if name in memories:
            result["memory"] = memories[name]
        report["models"][name] = result
    main = presets[0]
    report["targets"] = {"preset": main, "checks": evaluate_targets(report["models"][main])}
    report["targets"]["checks"] += report.get("train", {}).get("checks", [])
    if main == "rsrefseg-b":
        report["issue_check"] = issue_check(roof, report["models"][main])
    if smoke:
        report["gpu"] = {"status": NO_GPU if not torch.cuda.is_available() else "not measured (smoke)"}
    else:
        report["gpu"] = bench_gpu(preset, reps, log=log)
    meta.update(contention(meta["load_average_start"], load_average(), monitor.stop()["others_cpu_fraction"],
                           torch.get_num_threads()))
    meta["wall_s"] = time.perf_counter() - started
    _save(report, out)  # the timings are kept even if the agreement step fails
    if agreement is not None:
        from rsrefseg.bench.agreement import precision_agreement

        report["agreement"] = precision_agreement(*agreement, precision="bf16", log=log)
        report["targets"]["checks"].append(agreement_check(report["agreement"]))
        meta["wall_s"] = time.perf_counter() - started
        _save(report, out)
    log(format_table(report))
    return report


def _save(report: dict[str, Any], out: str | Path | None) -> None:
    """Write the report atomically (nothing when ``out`` is None)."""
    if out is not None:
        from rsrefseg.utils import atomic_write_json

        atomic_write_json(out, report)


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/bench.py`` (the same options as ``rsrefseg bench``)."""
    parser = argparse.ArgumentParser(prog="bench", description="RSRefSeg benchmark suite")
    add_arguments(parser)
    args = parser.parse_args(argv)
    run_suite(args.preset, args.reps, args.out, args.smoke, args.threads, args.bf16, args.memory,
              argv=["bench", *(argv if argv is not None else sys.argv[1:])], agreement=agreement_args(args),
              train=train_options(args))
    return 0


def train_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The training section's options (``--train*``), or None."""
    from rsrefseg.bench.train_bench import train_options as options

    return options(args)


def agreement_args(args: argparse.Namespace) -> tuple[str, str, str] | None:
    """``(checkpoint, jsonl, images)`` from ``--agreement*``, or None; a ConfigError if incomplete."""
    from rsrefseg.errors import ConfigError

    given = (args.agreement, args.agreement_data, args.agreement_images)
    if not any(given):
        return None
    if not all(given):
        raise ConfigError("--agreement needs --agreement-data and --agreement-images too")
    return (str(args.agreement), str(args.agreement_data), str(args.agreement_images))
