"""The machine's matmul roofline: GFLOP/s of large square ``torch.mm`` per dtype."""

from __future__ import annotations

from typing import Any

import torch

from rsrefseg.bench.timing import time_fn


def matmul_gflops(size: int, dtype: torch.dtype, reps: int, device: str = "cpu", onednn: bool = False) -> dict[str, Any]:
    """Time ``a @ b`` for ``size x size`` matrices (``torch.mm``, or oneDNN's linear); ``2 n^3`` FLOPs."""
    gen = torch.Generator(device="cpu").manual_seed(size)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else None
    if onednn:
        def fn() -> Any:
            return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    else:
        def fn() -> Any:
            return torch.mm(a, b, out=out)
    with torch.inference_mode():
        timing = time_fn(fn, reps=reps, warmup=1, sync=sync)
    flops = 2.0 * size**3
    timing["gflop"] = flops / 1e9
    timing["gflops_at_min"] = flops / timing["min_s"] / 1e9
    timing["gflops_at_median"] = flops / timing["median_s"] / 1e9
    return timing


def roofline(sizes: list[int], reps: int, dtypes: tuple[str, ...] = ("fp32", "bf16"), device: str = "cpu") -> dict[str, Any]:
    """Per dtype: each size's timing and the best GFLOP/s over sizes (the roofline).

    On the CPU the same is measured with oneDNN's linear (``<dtype>_onednn``), which the fast
    inference path uses and which beats ``torch.mm`` on some CPUs.
    """
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    onednn = device == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    out: dict[str, Any] = {}
    for name, use_onednn in [(d, False) for d in dtypes] + ([(d, True) for d in dtypes] if onednn else []):
        per_size = {str(n): matmul_gflops(n, names[name], reps, device, use_onednn) for n in sizes}
        best = max(per_size.values(), key=lambda t: t["gflops_at_min"])
        out[name + ("_onednn" if use_onednn else "")] = {
            "sizes": per_size,
            "gflops": best["gflops_at_min"],
            "gflops_at_median": max(t["gflops_at_median"] for t in per_size.values()),
        }
    return out
