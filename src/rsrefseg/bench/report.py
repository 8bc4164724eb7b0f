"""The human-readable table of a benchmark report."""

from __future__ import annotations

from typing import Any

STAGES = [
    ("sam_image_encoder", "SAM image encoder (fast attention)"),
    ("sam_image_encoder_reference", "SAM image encoder (HF attention)"),
    ("clip_image_encoder", "CLIP/SigLIP image encoder"),
    ("text_encoder_per_expression", "text encoder, 1 expression"),
    ("text_encoder_batch_per_expression", "text encoder, batched, per expr."),
    ("decode_per_expression", "prompter + decoder, 1 expression"),
    ("decode_batch_per_expression", "prompter + decoder, batched, per expr."),
]
PIPELINE = [
    ("first_expression", "first expression, new image (end to end)"),
    ("further_expression_batched_per_expression", "further expression, cached, batched"),
    ("further_expression_single", "further expression, cached, alone"),
    ("naive_per_expression", "naive: re-encode image per expression"),
    ("bf16_first_expression", "bf16 path: first expression"),
    ("bf16_further_expression_batched_per_expression", "bf16 path: further, batched"),
]


def _f(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _roof_text(r: dict[str, Any]) -> str:
    """``best X/Y (kind)`` and every GEMM kind's GFLOP/s at min / median of one round's probes."""
    kinds = r.get("kinds") or {"torch.mm": r}
    text = ", ".join(f"{label} {k['gflops_at_min']:.1f}/{k['gflops_at_median']:.1f}" for label, k in kinds.items())
    if "best_gflops_at_min" in r:
        text = f"best {r['best_gflops_at_min']:.1f}/{r['best_gflops_at_median']:.1f} ({r['best_kind_at_min']}); " + text
    return text


def _peak_lines(peak: dict[str, Any] | None, best: dict[str, Any]) -> list[str]:
    """The physical peak from the CPU's features, next to the best measured GEMMs."""
    if not peak:
        return []
    fp32 = best.get("fp32", {}).get("gflops")
    if peak.get("fp32_gflops"):
        head = (f"physical peak (context): {peak['cores']} cores x {peak['fp32_flop_per_cycle_per_core']} fp32 FLOP/cycle "
                f"({peak['fma_units']} x {peak['fma_width_bits']}-bit FMA, {peak['microarchitecture']}) x "
                f"{peak['clock_ghz']:.2f} GHz = {peak['fp32_gflops']:.0f} GFLOP/s fp32")
        if peak.get("bf16_gflops"):
            head += f", {peak['bf16_gflops']:.0f} bf16"
        if fp32:
            head += f"; best fp32 GEMM = {100 * fp32 / peak['fp32_gflops']:.0f} % of it"
    else:
        head = f"physical peak (context): unknown for this CPU ({peak.get('cpu')})"
    return [head, f"  ({peak.get('note')})"]


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _timing_rows(items: list[tuple[str, str]], data: dict[str, Any], width: int) -> list[str]:
    rows = []
    for key, label in items:
        t = data.get(key)
        if t is None:
            continue
        share = t.get("share_of_roofline_at_min")
        rows.append(f"  {label:<{width}}{t['gflop']:>9.1f}{t['min_s']:>10.3f}{t['median_s']:>10.3f}"
                    f"{t['gflops_at_min']:>9.1f}{_f(None if share is None else 100 * share, '.0f'):>7}%")
    return rows


def format_table(report: dict[str, Any]) -> str:
    """Roofline, then per preset: stages, pipelines, ratios, memory; targets; GPU."""
    meta = report["meta"]
    lines = [
        f"RSRefSeg benchmark  {meta['date']}  torch {meta['torch']}  transformers {meta['transformers']}",
        f"command: {meta['command']}" + (f"  (suite wall time {meta['wall_s']:.0f} s)" if "wall_s" in meta else ""),
        f"cpu: {meta['cpu']}  cores {meta['cpu_count']}  torch threads {meta['torch_threads']}  "
        f"avx512_bf16 {meta['avx512_bf16']}  amx_bf16 {meta['amx_bf16']}"
        + (f"  (family {report['physical_peak']['family']} model {report['physical_peak']['model']})"
           if report.get("physical_peak") else ""),
        f"load average start {meta['load_average_start']} end {meta.get('load_average_end')}; other processes "
        f"used {_f(_pct(meta.get('others_cpu_fraction')), '.0f')}% of the CPUs; contended: {meta.get('contended')}",
        "",
        "GEMMs (GFLOP/s at min / median); the roofline of a dtype is its best GEMM",
    ]
    roof = report["roofline"]
    for dtype, data in roof.items():
        if dtype == "best":
            continue
        sizes = "  ".join(f"{n}^2 {t['gflops_at_min']:.0f}/{t['gflops_at_median']:.0f}" for n, t in data["sizes"].items())
        lines.append(f"  {dtype:<12} {data.get('kind', ''):<24} best {data['gflops']:>7.1f}   ({sizes})")
    for dtype, b in roof.get("best", {}).items():
        lines.append(f"  roofline {dtype}: {b['gflops']:.1f} GFLOP/s ({b['kind']})")
    lines += _peak_lines(report.get("physical_peak"), roof.get("best", {}))
    width = 42
    head = f"  {'':<{width}}{'GFLOP':>9}{'min s':>10}{'median s':>10}{'GFLOP/s':>9}{'roof':>8}  (roof: share of the best GEMM measured in the same rounds, min vs min)"
    for name, m in report["models"].items():
        lines += ["", f"[{name}]  {m['parameters'] / 1e6:.1f} M parameters, image {m['image_size']}, "
                  f"{m['batch_expressions']} expressions per batch; GFLOP include attention; "
                  f"reps {report['settings']['reps']} after 1 warm-up", head]
        rr, cont = m["roofline_in_rounds"], m["contention"]
        lines += _timing_rows(STAGES, m["stages"], width)
        lines.append(f"  (fp32 GEMMs in these rounds: {_roof_text(rr['stages_fp32'])} GFLOP/s; other processes used "
                     f"{_f(_pct(cont['stages']['others_cpu_fraction']), '.0f')}% of the CPUs)")
        lines += _timing_rows(PIPELINE, m["pipeline"], width)
        bf = rr.get("pipelines_bf16")
        lines.append(f"  (GEMMs in these rounds: fp32 {_roof_text(rr['pipelines_fp32'])}"
                     + (f"; bf16 {_roof_text(bf)}" if bf else "")
                     + f" GFLOP/s; other processes used {_f(_pct(cont['pipelines']['others_cpu_fraction']), '.0f')}%)")
        r = m["pipeline"]["ratios"]
        lines.append(f"  ratios (min / median): first/further {r['first_over_further_batched_min']:.1f}/"
                     f"{r['first_over_further_batched_median']:.1f}x, naive/further {r['naive_over_further_batched_min']:.1f}/"
                     f"{r['naive_over_further_batched_median']:.1f}x, fast SAM {m['fast_sam']['speedup_min']:.2f}/"
                     f"{m['fast_sam']['speedup_median']:.2f}x (max |diff| {m['fast_sam']['max_abs_diff_vs_hf']:.1e})")
        if m.get("bf16_path"):
            lines.append(f"  bf16 path: {m['bf16_path']['status']}; --precision bf16 runs {m['bf16_path']['library']}")
        if "bf16_gemm_ceiling_min" in r and "bf16_speedup_first_min" not in r:
            lines.append(f"  bf16 GEMM ceiling (best bf16 / best fp32 GEMM, same rounds) "
                         f"{r['bf16_gemm_ceiling_min']:.2f}/{r['bf16_gemm_ceiling_median']:.2f}x")
        if "bf16_speedup_first_min" in r:
            agree = m["pipeline"]["bf16_agreement"]
            lines.append(f"  bf16 speed-up first {r['bf16_speedup_first_min']:.2f}/{r['bf16_speedup_first_median']:.2f}x, "
                         f"further batched {r['bf16_speedup_further_batched_min']:.2f}x; mask IoU vs fp32 (random weights) "
                         f"{agree['mask_iou']:.3f}")
            if "bf16_gemm_ceiling_min" in r:
                lines.append(f"  bf16 GEMM ceiling (best bf16 / best fp32 GEMM, same rounds) "
                             f"{r['bf16_gemm_ceiling_min']:.2f}/{r['bf16_gemm_ceiling_median']:.2f}x")
        mem = m.get("memory")
        if mem and "error" not in mem:
            gib = 2**30
            lines.append(f"  memory: peak RSS {mem['peak_rss_bytes'] / gib:.2f} GiB = {mem['ratio']:.2f}x (weights "
                         f"{mem['weights_bytes'] / gib:.2f} GiB + activations {mem['activations_bytes'] / gib:.2f} GiB);"
                         f" build peak {(mem['build_peak_rss_bytes'] or 0) / gib:.2f}, inference peak "
                         f"{(mem['inference_peak_rss_bytes'] or 0) / gib:.2f} GiB; interpreter+libraries "
                         f"{mem['baseline_rss_bytes'] / gib:.2f} GiB")
        elif mem:
            lines.append(f"  memory: {mem['error']}")
    targets = report.get("targets")
    if targets:
        lines += ["", f"targets ({targets['preset']}; value at min, median in brackets)"]
        for c in targets["checks"]:
            met = {True: "MET", False: "NOT MET", None: "n/a"}[c["met"]]
            if c.get("not_applicable"):
                met = c["not_applicable"]
            extra = f"  [of torch.mm alone {c['of_torch_mm']:.3f}]" if c.get("of_torch_mm") else ""
            extra += (f"  [speed-up {_f(c.get('speedup'))}x, bf16 GEMM ceiling {c['gemm_ceiling']:.2f}x]"
                      if c.get("gemm_ceiling") else "")  # speed-up None: the bf16 path was not timed
            lines.append(f"  {c['name']:<64}{_f(c['value']):>8} ({_f(c.get('median'))}) {c['target']:>9}  {met}{extra}")
    agreement = report.get("agreement")
    if agreement:
        a = agreement["agreement"]
        lines += ["", f"bf16 vs fp32 on {agreement['n']} samples of {agreement['data']} ({agreement['checkpoint']}):",
                  f"  mask IoU mean {a['mean_iou']:.4f}, overall {a['overall_iou']:.4f}, min {a['min_iou']:.3f}, "
                  f"5th percentile {a['p05_iou']:.3f}; {100 * a['share_at_least_target']:.0f}% of samples >= 0.98; "
                  f"identical masks {a['identical_masks']}",
                  f"  vs ground truth: fp32 mIoU {100 * agreement['fp32']['mIoU']:.2f} oIoU {100 * agreement['fp32']['oIoU']:.2f}"
                  f" ({agreement['fp32']['seconds']:.1f} s), bf16 mIoU {100 * agreement['bf16']['mIoU']:.2f} oIoU "
                  f"{100 * agreement['bf16']['oIoU']:.2f} ({agreement['bf16']['seconds']:.1f} s)"]
    issue = report.get("issue_check")
    if issue:
        lines += ["", "issue's starting point vs this run (stock FlopCounterMode excludes CPU attention)"]
        for k in ("roofline_fp32_gflops", "roofline_bf16_gflops"):
            lines.append(f"  {k:<30} issue {issue[k]['issue']:>7.0f}   measured {_f(issue[k]['measured'], '.0f'):>7}")
        for k, v in issue.items():
            if "issue_gflop" in v:
                lines.append(f"  {k:<30} issue {v['issue_gflop']:>5.0f} GFLOP {v['issue_s']:>6.2f} s   measured "
                             f"{v['measured_gflop_stock_counter']:>5.0f} GFLOP (+attention {v['measured_gflop_with_attention']:.0f})"
                             f" {v['measured_min_s']:.2f}/{v['measured_median_s']:.2f} s")
    if "train" in report:
        from rsrefseg.bench.train_report import format_train

        lines += ["", format_train(report["train"])]
    gpu = report.get("gpu", {})
    lines += ["", f"gpu: {gpu.get('status')}"]
    if gpu.get("status") == "measured":
        lat, thr, tr = gpu["latency_batch1"], gpu["throughput"], gpu["training_step"]
        lines.append(f"  {gpu['device']}: bf16 latency batch 1 {lat['min_s'] * 1e3:.1f} ms; best throughput "
                     f"{thr['images_per_s']:.1f} images/s at batch {thr['best_batch']}; training step "
                     f"{tr['min_s'] * 1e3:.1f} ms (batch {tr['batch']}), MFU {100 * tr['mfu_at_min']:.1f}%")
    return "\n".join(lines)
