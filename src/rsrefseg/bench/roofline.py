"""The machine's matmul roofline: the best GEMM this process can run, per dtype.

Several GEMM kinds are probed, because on some CPUs they differ by 2x: ``torch.mm`` (MKL's
``sgemm`` for fp32 with this PyTorch build, which takes a generic AVX2 path on AMD CPUs), the same
with ``B`` in transposed layout (``x @ W^T``, the layout of every ``nn.Linear``), and oneDNN's
linear (``mkldnn._linear_pointwise``, which the fast inference path uses; bf16 only where this
CPU's oneDNN has a bf16 kernel). The roofline of a dtype is the best of them. The suite also runs
these probes inside its timing rounds, so that stages are held against the best GEMM measured
under the same conditions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rsrefseg.bench.timing import time_fn

#: Seconds one timed GEMM probe may take at most (estimated from a 512^2 run): on CPUs without
#: bf16 kernels a 4096^2 bf16 ``torch.mm`` would take minutes, so such probes run smaller.
PROBE_BUDGET_S = 3.0
CALIBRATION_SIZE = 512

#: GEMM kinds: key suffix of the probe's name -> label. ``""`` is ``torch.mm`` (the first roofline).
GEMM_KINDS: dict[str, str] = {"": "torch.mm", "mm_bt": "torch.mm (B transposed)", "onednn": "oneDNN linear"}
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gemm_kinds(dtype: torch.dtype, device: str = "cpu") -> list[str]:
    """The GEMM kinds (keys of :data:`GEMM_KINDS`) that exist for ``dtype`` on ``device``."""
    from rsrefseg.modeling.fast_linear import onednn_linear_supported

    kinds = ["", "mm_bt"]
    if device == "cpu" and onednn_linear_supported(dtype):
        kinds.append("onednn")
    return kinds


def gemm_probe(size: int, dtype: torch.dtype, kind: str = "", device: str = "cpu") -> tuple[Callable[[], Any], float]:
    """``(fn, GFLOP)``: a ``size x size`` GEMM of the given kind (``2 n^3`` FLOPs)."""
    gen = torch.Generator(device="cpu").manual_seed(size)
    a, b = (torch.randn(size, size, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    gflop = 2.0 * size**3 / 1e9
    if kind == "onednn":  # b as an out_features x in_features weight
        return (lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")), gflop
    if kind == "mm_bt":
        bt = b.t()  # a transposed view: the layout of x @ W^T
        return (lambda: torch.mm(a, bt, out=out)), gflop
    if kind:
        raise ValueError(f"unknown GEMM kind {kind!r}")
    return (lambda: torch.mm(a, b, out=out)), gflop


def matmul_probe(size: int, dtype: torch.dtype, onednn: bool = False,
                 device: str = "cpu") -> tuple[Callable[[], Any], float]:
    """``(fn, GFLOP)``: ``torch.mm`` or oneDNN's linear on ``size x size`` (see :func:`gemm_probe`)."""
    return gemm_probe(size, dtype, "onednn" if onednn else "", device)


def probes(prefix: str, size: int, dtype: torch.dtype, device: str = "cpu") -> tuple[dict[str, Callable[[], Any]], float]:
    """Every GEMM kind of ``dtype`` as round entries ``prefix`` / ``prefix + "_" + kind``; and the GFLOP."""
    fns = {}
    gflop = 0.0
    for kind in gemm_kinds(dtype, device):
        fns[prefix + ("_" + kind if kind else "")], gflop = gemm_probe(size, dtype, kind, device)
    return fns, gflop


def matmul_gflops(size: int, dtype: torch.dtype, reps: int, device: str = "cpu", onednn: bool = False,
                  kind: str | None = None) -> dict[str, Any]:
    """Time a GEMM probe: min/median seconds and GFLOP/s (``kind`` overrides ``onednn``)."""
    fn, gflop = gemm_probe(size, dtype, kind if kind is not None else ("onednn" if onednn else ""), device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    with torch.inference_mode():
        timing = time_fn(fn, reps=reps, warmup=1, sync=sync)
    timing["gflop"] = gflop
    timing["gflops_at_min"] = gflop / timing["min_s"]
    timing["gflops_at_median"] = gflop / timing["median_s"]
    return timing


def calibrate(dtype: torch.dtype, kind: str = "", device: str = "cpu") -> float:
    """GFLOP/s of one :data:`CALIBRATION_SIZE` GEMM of this kind (after one untimed call)."""
    return matmul_gflops(CALIBRATION_SIZE, dtype, 1, device, kind=kind)["gflops_at_min"]


def affordable(sizes: list[int], gflops: float, budget_s: float = PROBE_BUDGET_S) -> list[int]:
    """The sizes whose GEMM takes at most ``budget_s`` at ``gflops``; when none does, the largest of
    1024 and :data:`CALIBRATION_SIZE` that does (or the calibration size itself)."""
    def fits(n: int) -> bool:
        return 2.0 * n**3 / 1e9 / max(gflops, 1e-9) <= budget_s

    return [n for n in sizes if fits(n)] or [next((n for n in (1024, CALIBRATION_SIZE) if fits(n)), CALIBRATION_SIZE)]


def probe_size(dtype: torch.dtype, largest: int, device: str = "cpu", budget_s: float = PROBE_BUDGET_S) -> int:
    """The size of the in-round probes of ``dtype``: the largest of ``largest``, 3072, 2048, 1024, 512
    at which the slowest GEMM kind stays within ``budget_s``."""
    if largest <= CALIBRATION_SIZE:
        return largest
    slowest = min(calibrate(dtype, kind, device) for kind in gemm_kinds(dtype, device))
    candidates = sorted({largest, *(n for n in (3072, 2048, 1024, 512) if n < largest)}, reverse=True)
    return max(affordable(candidates, slowest, budget_s))


def roofline(sizes: list[int], reps: int, dtypes: tuple[str, ...] = ("fp32", "bf16"), device: str = "cpu") -> dict[str, Any]:
    """Per dtype and GEMM kind: each size's timing and the best GFLOP/s over sizes.

    Keys ``<dtype>`` (``torch.mm``) and ``<dtype>_<kind>`` (see :data:`GEMM_KINDS`), and
    ``best``: per dtype the best GFLOP/s over kinds and sizes (at min and at median) and its kind.
    A kind runs only the sizes it can do within :data:`PROBE_BUDGET_S` per call (``skipped_sizes``).
    """
    out: dict[str, Any] = {}
    best: dict[str, Any] = {}
    for name in dtypes:
        for kind in gemm_kinds(DTYPES[name], device):
            run = affordable(sizes, calibrate(DTYPES[name], kind, device)) if device == "cpu" else sizes
            per_size = {str(n): matmul_gflops(n, DTYPES[name], reps, device, kind=kind) for n in run}
            top = max(per_size.values(), key=lambda t: t["gflops_at_min"])
            entry = {"kind": GEMM_KINDS[kind], "sizes": per_size, "gflops": top["gflops_at_min"],
                     "gflops_at_median": max(t["gflops_at_median"] for t in per_size.values()),
                     "skipped_sizes": [n for n in sizes if n not in run]}
            out[name + ("_" + kind if kind else "")] = entry
            b = best.setdefault(name, {"gflops": 0.0, "gflops_at_median": 0.0, "kind": None})
            if entry["gflops"] > b["gflops"]:
                b["gflops"], b["kind"] = entry["gflops"], entry["kind"]
            b["gflops_at_median"] = max(b["gflops_at_median"], entry["gflops_at_median"])
    out["best"] = best
    return out


def round_roofline(timings: dict[str, Any], prefix: str, gflop: float) -> dict[str, Any]:
    """Pop the probe timings ``prefix[_kind]`` of a round into GFLOP/s per kind and the best of them.

    Returns:
        ``{"size_gflop", "kinds": {label: {"gflops_at_min", "gflops_at_median"}}, "best_gflops_at_min",
        "best_gflops_at_median", "best_kind_at_min", "gflops_at_min"/"gflops_at_median" (torch.mm),
        "onednn_gflops_at_min"/"onednn_gflops_at_median" (when run)}``.
    """
    out: dict[str, Any] = {"size_gflop": gflop, "kinds": {}}
    for kind, label in GEMM_KINDS.items():
        t = timings.pop(prefix + ("_" + kind if kind else ""), None)
        if t is None:
            continue
        rate = {"gflops_at_min": gflop / t["min_s"], "gflops_at_median": gflop / t["median_s"]}
        out["kinds"][label] = rate
        if kind in ("", "onednn"):  # the keys of the first suite (train_step.py reads them)
            out.update({(kind + "_" if kind else "") + k: v for k, v in rate.items()})
    for at in ("min", "median"):
        rates = {label: r[f"gflops_at_{at}"] for label, r in out["kinds"].items()}
        top = max(rates, key=rates.__getitem__) if rates else None
        out[f"best_gflops_at_{at}"] = rates[top] if top else 0.0
        out[f"best_kind_at_{at}"] = top
    return out
