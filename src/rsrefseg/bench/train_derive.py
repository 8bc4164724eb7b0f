"""What the training section's numbers mean: checkpointing's saving and cost, grouping's gain, targets.

Every derived number says its ``basis``: ``"measured"`` (both sides measured in this run), or an
estimate from the traced parts (:mod:`rsrefseg.bench.train_trace`) when a side could not run here.
"""

from __future__ import annotations

from typing import Any

#: Presets of the full run (the targets are theirs) and the expressions per image of the grouped step.
FULL_PRESETS = ("rsrefseg-b", "rsrefseg-l")
GROUP_K = 4
MEMORY_TARGET = 0.40  # checkpointing: peak training memory at least 40 % lower (batch 2)
TIME_TARGET = 1.4  # checkpointing: step time at most 1.4x
GROUPED_TARGET = 2.5  # grouped expressions at K = 4: >= 2.5x the expressions per second


def parts_bytes(item: dict[str, Any]) -> dict[str, int]:
    """Weights, gradients, AdamW state and activations of a configuration (measured where it ran)."""
    trace = item["trace"]
    mem = item.get("measured", {}).get("memory")
    src = mem if mem else trace
    out = {k: int(src[k]) for k in ("weights_bytes", "gradients_bytes", "optimizer_state_bytes", "activations_bytes")}
    out["total_bytes"] = sum(out.values())
    return out


def _measured(item: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if item is None else item.get("measured")


def _steps_peak(item: dict[str, Any]) -> int | None:
    """The training memory of a measured step: its resident peak less the interpreter and libraries."""
    m = _measured(item)
    if m is None or not m["memory"]["steps_peak_rss_bytes"]:
        return None
    return int(m["memory"]["steps_peak_rss_bytes"] - m["memory"]["baseline_rss_bytes"])


def checkpointing_at(entry: dict[str, Any], batch: int) -> dict[str, Any] | None:
    """Memory saving and time cost of checkpointing at ``batch`` (None without that pair)."""
    plain, ckpt = entry["configs"].get(f"batch{batch}"), entry["configs"].get(f"batch{batch}+ckpt")
    if plain is None or ckpt is None:
        return None
    out: dict[str, Any] = {"batch": batch}
    p_parts, c_parts = parts_bytes(plain), parts_bytes(ckpt)
    peaks = _steps_peak(plain), _steps_peak(ckpt)
    if peaks[0] and peaks[1]:
        out.update(memory_basis="measured: resident peak of the steps less interpreter and libraries",
                   peak_bytes=peaks[0], peak_ckpt_bytes=peaks[1])
    else:  # the same basis on both sides: the parts, traced where a side did not run
        p_total = static_total(plain) + plain["trace"]["activations_bytes"]
        c_total = static_total(ckpt) + ckpt["trace"]["activations_bytes"]
        out.update(memory_basis="estimated: weights + gradients + AdamW state + traced activations",
                   peak_bytes=p_total, peak_ckpt_bytes=c_total)
    out["memory_reduction"] = 1.0 - out["peak_ckpt_bytes"] / out["peak_bytes"]
    out["activations_reduction"] = 1.0 - c_parts["activations_bytes"] / p_parts["activations_bytes"]
    mp, mc = _measured(plain), _measured(ckpt)
    if mp and mc:
        out.update(time_basis="measured", time_ratio_min=mc["min_s"] / mp["min_s"],
                   time_ratio_median=mc["median_s"] / mp["median_s"])
    out["flop_ratio"] = ckpt["trace"]["gflop"] / plain["trace"]["gflop"]
    return out


def static_total(item: dict[str, Any]) -> int:
    t = item["trace"]
    return int(t["weights_bytes"] + t["gradients_bytes"] + t["optimizer_state_bytes"])


def grouped(entry: dict[str, Any]) -> dict[str, Any] | None:
    """Expressions per second, K expressions of one image vs pairs one by one (per checkpointing setting)."""
    out: dict[str, Any] = {}
    for suffix in ("", "+ckpt"):
        g, u = entry["configs"].get(f"grouped1x{GROUP_K}{suffix}"), entry["configs"].get(f"batch1{suffix}")
        if g is None or u is None:
            continue
        row: dict[str, Any] = {"k": GROUP_K, "flop_speedup": GROUP_K * u["trace"]["gflop"] / g["trace"]["gflop"]}
        mg, mu = _measured(g), _measured(u)
        if mg and mu:
            row.update(basis="measured", grouped_expressions_per_s=mg["expressions_per_s_at_min"],
                       ungrouped_expressions_per_s=mu["expressions_per_s_at_min"],
                       speedup_min=mg["expressions_per_s_at_min"] / mu["expressions_per_s_at_min"],
                       speedup_median=mg["expressions_per_s_at_median"] / mu["expressions_per_s_at_median"])
        out["checkpointing" if suffix else "plain"] = row
    return out or None


def derive(entry: dict[str, Any]) -> dict[str, Any]:
    """Checkpointing at batch 1 and 2, and grouping, of one preset."""
    return {"checkpointing": {str(b): checkpointing_at(entry, b) for b in (1, 2)}, "grouped": grouped(entry)}


def _check(name: str, value: float | None, target: str, met: bool | None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "value": value, "target": target, "met": met, **extra}


def _time_ratio(entry: dict[str, Any]) -> tuple[float | None, float | None, str]:
    """Checkpointing's step-time ratio at batch 2: measured there, else at batch 1, else from FLOPs."""
    d = entry["derived"]["checkpointing"]
    for batch, basis in (("2", "measured at batch 2"), ("1", "measured at batch 1 (batch 2 without "
                                                             "checkpointing did not run)")):
        c = d.get(batch)
        if c and "time_ratio_min" in c:
            return c["time_ratio_min"], c["time_ratio_median"], basis
    c = d.get("2") or d.get("1")
    if c:
        return c["flop_ratio"], None, "estimated: executed FLOPs with / without (no measured pair)"
    return None, None, "no data"


def train_checks(presets: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's two targets (checkpointing; grouped expressions) and the reported tiny speed-up.

    The checkpointing targets cover the full-size presets present (rsrefseg-b, rsrefseg-l), or every
    preset of the run when there is none (``--smoke``); the grouped target is rsrefseg-b's (else the
    first preset with a grouped measurement).
    """
    full = [p for p in presets if p in FULL_PRESETS] or list(presets)
    mem: dict[str, Any] = {}
    times: dict[str, Any] = {}
    for p in full:
        c = presets[p]["derived"]["checkpointing"].get("2")
        if c:
            mem[p] = {"reduction": c["memory_reduction"], "basis": c["memory_basis"],
                      "peak_gib": c["peak_bytes"] / 2**30, "peak_ckpt_gib": c["peak_ckpt_bytes"] / 2**30}
        ratio, median, basis = _time_ratio(presets[p])
        times[p] = {"ratio": ratio, "median": median, "basis": basis}
    names = ", ".join(full)
    mem_value = min((v["reduction"] for v in mem.values()), default=None)
    time_values = [v["ratio"] for v in times.values() if v["ratio"] is not None]
    time_value = max(time_values, default=None)
    checks = [
        _check(f"gradient checkpointing: peak training memory reduction at batch 2 ({names})", mem_value,
               f">= {MEMORY_TARGET:g}", None if mem_value is None else mem_value >= MEMORY_TARGET, per_preset=mem),
        _check(f"gradient checkpointing: step time with / without at batch 2 ({names})", time_value,
               f"<= {TIME_TARGET:g}", None if time_value is None else time_value <= TIME_TARGET, per_preset=times),
    ]
    target_preset = "rsrefseg-b" if "rsrefseg-b" in presets else next(
        (p for p in presets if (presets[p]["derived"].get("grouped") or {})), None)
    for preset in dict.fromkeys([target_preset, "tiny"]):
        if preset is None or preset not in presets:
            continue
        value, basis, extra = _grouped_value(presets[preset])
        reported = preset == "tiny" and target_preset != "tiny"
        name = f"grouped expressions: training expressions/s at K = {GROUP_K} / ungrouped ({preset}, CPU)"
        if reported:
            checks.append(_check(name + ", reported", value, "reported", None, basis=basis, **extra))
        else:
            checks.append(_check(name, value, f">= {GROUPED_TARGET:g}",
                                 None if value is None else value >= GROUPED_TARGET, basis=basis, **extra))
    return checks


def _grouped_value(entry: dict[str, Any]) -> tuple[float | None, str, dict[str, Any]]:
    """The grouped speed-up: measured without checkpointing, else with, else the FLOP ratio."""
    g = entry["derived"].get("grouped") or {}
    for key, label in (("plain", "measured, without checkpointing"), ("checkpointing", "measured, with checkpointing")):
        row = g.get(key)
        if row and row.get("basis") == "measured":
            return row["speedup_min"], label, {"median": row["speedup_median"]}
    row = g.get("plain") or g.get("checkpointing")
    if row:
        return row["flop_speedup"], "estimated: FLOP ratio (no measured pair)", {}
    return None, "no data", {}
