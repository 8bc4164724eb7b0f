"""The machine's matmul roofline: GFLOP/s of large square ``torch.mm`` per dtype."""

from __future__ import annotations

from typing import Any

import torch

from rsrefseg.bench.timing import time_fn


def matmul_gflops(size: int, dtype: torch.dtype, reps: int, device: str = "cpu") -> dict[str, Any]:
    """Time ``a @ b`` for ``size x size`` matrices; ``2 n^3`` FLOPs."""
    gen = torch.Generator(device="cpu").manual_seed(size)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else None
    with torch.inference_mode():
        timing = time_fn(lambda: torch.mm(a, b, out=out), reps=reps, warmup=1, sync=sync)
    flops = 2.0 * size**3
    timing["gflop"] = flops / 1e9
    timing["gflops_at_min"] = flops / timing["min_s"] / 1e9
    timing["gflops_at_median"] = flops / timing["median_s"] / 1e9
    return timing


def roofline(sizes: list[int], reps: int, dtypes: tuple[str, ...] = ("fp32", "bf16"), device: str = "cpu") -> dict[str, Any]:
    """Per dtype: each size's timing and the best GFLOP/s over sizes (the roofline)."""
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    out: dict[str, Any] = {}
    for name in dtypes:
        per_size = {str(n): matmul_gflops(n, names[name], reps, device) for n in sizes}
        best = max(per_size.values(), key=lambda t: t["gflops_at_min"])
        out[name] = {
            "sizes": per_size,
            "gflops": best["gflops_at_min"],
            "gflops_at_median": max(t["gflops_at_median"] for t in per_size.values()),
        }
    return out
