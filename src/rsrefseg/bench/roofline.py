"""The machine's matmul roofline: GFLOP/s of large square ``torch.mm`` per dtype."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rsrefseg.bench.timing import time_fn


def matmul_probe(size: int, dtype: torch.dtype, onednn: bool = False,
                 device: str = "cpu") -> tuple[Callable[[], Any], float]:
    """``(fn, GFLOP)``: a ``size x size`` matmul, ``torch.mm`` or oneDNN's linear (``2 n^3`` FLOPs).

    ``torch.mm`` is the issue's roofline; oneDNN's linear, which the fast path uses, is faster than
    ``torch.mm`` on some CPUs (then the ``torch.mm`` "roofline" is not the peak). The suite also
    runs these inside its timing rounds, so that stages are held against the roofline measured
    under the same conditions.
    """
    gen = torch.Generator(device="cpu").manual_seed(size)
    a, b = (torch.randn(size, size, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    if onednn:
        return (lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")), 2.0 * size**3 / 1e9
    return (lambda: torch.mm(a, b, out=out)), 2.0 * size**3 / 1e9


def matmul_gflops(size: int, dtype: torch.dtype, reps: int, device: str = "cpu", onednn: bool = False) -> dict[str, Any]:
    """Time :func:`matmul_probe`: min/median seconds and GFLOP/s."""
    fn, gflop = matmul_probe(size, dtype, onednn, device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    with torch.inference_mode():
        timing = time_fn(fn, reps=reps, warmup=1, sync=sync)
    timing["gflop"] = gflop
    timing["gflops_at_min"] = gflop / timing["min_s"]
    timing["gflops_at_median"] = gflop / timing["median_s"]
    return timing


def roofline(sizes: list[int], reps: int, dtypes: tuple[str, ...] = ("fp32", "bf16"), device: str = "cpu") -> dict[str, Any]:
    """Per dtype: each size's timing and the best GFLOP/s over sizes (the roofline).

    On the CPU the same is measured with oneDNN's linear (``<dtype>_onednn``), which the fast
    inference path uses and which beats ``torch.mm`` on some CPUs.
    """
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    onednn = device == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    out: dict[str, Any] = {}
    from rsrefseg.modeling.fast_sam import onednn_linear_supported

    with_onednn = [d for d in dtypes if onednn and onednn_linear_supported(names[d])]
    for name, use_onednn in [(d, False) for d in dtypes] + [(d, True) for d in with_onednn]:
        per_size = {str(n): matmul_gflops(n, names[name], reps, device, use_onednn) for n in sizes}
        best = max(per_size.values(), key=lambda t: t["gflops_at_min"])
        out[name + ("_onednn" if use_onednn else "")] = {
            "sizes": per_size,
            "gflops": best["gflops_at_min"],
            "gflops_at_median": max(t["gflops_at_median"] for t in per_size.values()),
        }
    return out
