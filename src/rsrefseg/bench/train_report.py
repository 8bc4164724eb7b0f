"""The human-readable table of the training section (``rsrefseg bench --train``)."""

from __future__ import annotations

from typing import Any

GIB = 2**30


def _g(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x / GIB, fmt)


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _config_row(key: str, item: dict[str, Any]) -> str:
    trace, m = item["trace"], item.get("measured")
    act = f"{_g(m['memory']['activations_bytes'])} ({_g(trace['activations_bytes'])})" if m else \
        f"- ({_g(trace['activations_bytes'])})"
    if m:
        share = m.get("share_of_roofline_at_min")
        timing = (f"{m['min_s']:>8.2f}{m['median_s']:>9.2f}{m['gflops_at_min']:>9.1f}"
                  f"{_f(None if share is None else 100 * share, '.0f'):>6}%{m['expressions_per_s_at_min']:>9.3f}")
        peak = _g(m["memory"]["steps_peak_rss_bytes"])
        status = "measured"
    else:
        timing = f"{'-':>8}{'-':>9}{'-':>9}{'-':>7}{'-':>9}"
        peak = "est " + _g(item.get("estimated_peak_rss_bytes"), ".1f")
        status = item.get("status", "not run")
    return (f"  {key:<18}{item['expressions']:>4}{trace['gflop']:>9.1f}{timing}{peak:>10}  {act:<18}  {status}")


def _derived_lines(entry: dict[str, Any]) -> list[str]:
    lines = []
    for batch, c in entry["derived"]["checkpointing"].items():
        if not c:
            continue
        time = (f"step time {c['time_ratio_min']:.2f}x ({c['time_ratio_median']:.2f}x median), measured"
                if "time_ratio_min" in c else "step time not measured")
        lines.append(f"  checkpointing at batch {batch}: peak memory {-100 * c['memory_reduction']:+.0f}% "
                     f"({_g(c['peak_bytes'], '.1f')} -> {_g(c['peak_ckpt_bytes'], '.1f')} GiB; {c['memory_basis']}), "
                     f"activations {-100 * c['activations_reduction']:+.0f}%; {time}; executed FLOPs "
                     f"{c['flop_ratio']:.2f}x")
    for key, row in (entry["derived"].get("grouped") or {}).items():
        label = "without" if key == "plain" else "with"
        if row.get("basis") == "measured":
            lines.append(f"  grouped K = {row['k']} ({label} checkpointing): {row['grouped_expressions_per_s']:.3f} vs "
                         f"{row['ungrouped_expressions_per_s']:.3f} expressions/s = {row['speedup_min']:.2f}x "
                         f"({row['speedup_median']:.2f}x median); FLOP ratio {row['flop_speedup']:.2f}x")
        else:
            lines.append(f"  grouped K = {row['k']} ({label} checkpointing): not measured; FLOP ratio "
                         f"{row['flop_speedup']:.2f}x")
    return lines


def format_gpu_fit(fit: dict[str, Any]) -> list[str]:
    """The GPU-fit rows (also the README table's source)."""
    gpus = list(fit["gpus_gib"])
    lines = [f"bf16 training on a GPU: largest batch (of {fit['batches']}) that fits, {fit['basis']} "
             f"(activations x {fit['margin']:g} + {fit['cuda_overhead_bytes'] / GIB:.1f} GiB CUDA overhead)",
             f"  {'preset':<12}{'checkpointing':<15}{'weights+grads+AdamW':>21}{'act. batch 1':>14}"
             f"{'+ per image':>13}{'est. batch 1':>14}{'est. batch 2':>14}  " + "  ".join(f"{g:>6}" for g in gpus)]
    for r in fit["rows"]:
        est = r["estimate_bytes"]
        lines.append(f"  {r['preset']:<12}{'yes' if r['checkpointing'] else 'no':<15}{_g(r['static_bytes']):>17} GiB"
                     f"{_g(r['activations_batch1_bytes']):>10} GiB{_g(r['activations_per_extra_image_bytes']):>9} GiB"
                     f"{_g(est.get('1')):>10} GiB{_g(est.get('2')):>10} GiB  "
                     + "  ".join(f"{r['max_batch'][g] or 'none':>6}" for g in gpus))
    return lines


def format_train(section: dict[str, Any]) -> str:
    """Per preset: every configuration, checkpointing and grouping; then the GPU-fit estimate and the checks."""
    s = section["settings"]
    lines = [f"training step on the CPU (fp32, seeded random init, the trainer's model/loss/AdamW; min / median of "
             f"up to {s['reps']} steps after an instrumented warm-up, each configuration in a fresh process; "
             f"MemAvailable {_g(s['mem_available_start_bytes'], '.1f')} of {_g(s['mem_total_bytes'], '.1f')} GiB "
             f"at the start; section wall time {section.get('wall_s', 0):.0f} s)"]
    head = (f"  {'config':<18}{'expr':>4}{'GFLOP':>9}{'min s':>8}{'median s':>9}{'GFLOP/s':>9}{'roof':>7}"
            f"{'expr/s':>9}{'peak GiB':>10}  {'act. GiB (traced)':<18}  status")
    for preset, entry in section["presets"].items():
        rec = entry["recipe"]
        lines += ["", f"[{preset}] {entry['parameters'] / 1e6:.1f} M parameters, {entry['trainable_parameters'] / 1e6:.1f} M "
                  f"trainable ({rec['overrides'].get('finetune')}); weights {_g(entry['weights_bytes'])} GiB, gradients "
                  f"{_g(entry['gradients_bytes'])} GiB; loss (bce, dice, activation) {tuple(rec['loss'])}", head]
        for key, item in entry["configs"].items():
            lines.append(_config_row(key, item))
        measured = [i["measured"] for i in entry["configs"].values() if i.get("measured")]
        if measured:
            m = measured[0]["memory"]
            lines.append(f"  memory split (first measured config): weights {_g(m['weights_bytes'])}, gradients "
                         f"{_g(m['gradients_bytes'])}, AdamW state {_g(m['optimizer_state_bytes'])}, interpreter + "
                         f"libraries {_g(m['baseline_rss_bytes'])} GiB; activations per row above "
                         "(roof: share of the best fp32 GEMM timed in the same rounds)")
        lines += _derived_lines(entry)
    lines += ["", *format_gpu_fit(section["gpu_fit"])]
    lines += ["", "training targets (value at min; basis in the JSON)"]
    for c in section["checks"]:
        met = {True: "MET", False: "NOT MET", None: "n/a"}[c["met"]]
        lines.append(f"  {c['name']:<86}{_f(c['value']):>7} {c['target']:>9}  {met}")
    return "\n".join(lines)
