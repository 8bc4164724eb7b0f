"""The GEMM kernels side by side at the model's own linear shapes (which one should a linear use?).

The roofline probes square matrices; the model's linears are tall and thin (SAM ViT-B: 4096
tokens x 768; SigLIP so400m: 729 x 1152; its text tower: a few expressions x 64 tokens; SAM's
mask decoder: expressions x 4096 image tokens x 256). For each shape ``M x K -> N`` this times,
in rounds (every kernel once per round, so drifts of a shared machine hit all alike):

- ``onednn``: oneDNN's inner product with the bias fused (``mkldnn._linear_pointwise``, what
  :class:`rsrefseg.modeling.fast_linear.FastLinear` runs);
- ``addmm``: ``torch.addmm(bias, x, W^T)`` (what ``F.linear`` runs on the CPU);
- ``mm_bt``: ``torch.mm(x, W^T)`` without the bias (the layout of the roofline's best GEMM here).

It prints GFLOP/s at the min of the rounds and each kernel's ratio to the best of the shape.
``python -m rsrefseg.bench.kernels [--threads N] [--reps R] [--out F.json]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: ``(name, M, K, N)``: the linears of ``rsrefseg-b`` (3 expressions where expressions count).
SHAPES: tuple[tuple[str, int, int, int], ...] = (
    ("SAM ViT-B qkv", 4096, 768, 2304),
    ("SAM ViT-B mlp fc1", 4096, 768, 3072),
    ("SAM ViT-B mlp fc2", 4096, 3072, 768),
    ("SigLIP image qkv", 729, 1152, 3456),
    ("SigLIP image fc1", 729, 1152, 4304),
    ("SigLIP image fc2", 729, 4304, 1152),
    ("SigLIP text fc1 (3 x 64 tokens)", 192, 1152, 4304),
    ("SigLIP text fc2 (3 x 64 tokens)", 192, 4304, 1152),
    ("decoder image projections (3 x 4096)", 12288, 256, 384),
    ("decoder out_proj (3 x 4096)", 12288, 128, 256),
)


def kernels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The candidate kernels for ``x @ weight^T + bias`` (``mm_bt`` without the bias)."""
    from rsrefseg.modeling.fast_linear import onednn_linear_supported

    weight_t = weight.t()
    out: dict[str, Callable[[], Any]] = {
        "addmm": lambda: F.linear(x, weight, bias),
        "mm_bt": lambda: torch.mm(x, weight_t),
    }
    if onednn_linear_supported(x.dtype):
        out["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return out


def compare(shapes: Sequence[tuple[str, int, int, int]] = SHAPES, reps: int = 5,
            dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """Time every kernel on every shape; one row per shape with GFLOP/s (at min) and ratios to the best."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, m, k, n in shapes:
            x = torch.randn(m, k, generator=gen).to(dtype)
            weight, bias = torch.randn(n, k, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
            fns = kernels(x, weight, bias)
            times: dict[str, list[float]] = {kind: [] for kind in fns}
            for r in range(reps + 1):  # the first round warms up
                for kind, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    if r:
                        times[kind].append(time.perf_counter() - start)
            gflop = 2.0 * m * k * n / 1e9
            rates = {kind: gflop / min(t) for kind, t in times.items()}
            best = max(rates.values())
            rows.append({"shape": name, "m": m, "k": k, "n": n, "gflops": rates,
                         "ratio_to_best": {kind: rate / best for kind, rate in rates.items()},
                         "best": max(rates, key=rates.__getitem__)})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A text table of :func:`compare` (GFLOP/s, and each kernel's share of the shape's best)."""
    kinds = sorted({kind for r in rows for kind in r["gflops"]})
    lines = [f"{'shape':40s} {'M x K -> N':>20s}  " + "  ".join(f"{k:>14s}" for k in kinds) + "  best"]
    for r in rows:
        cells = [f"{r['gflops'][k]:6.1f} ({r['ratio_to_best'][k]:4.0%})" if k in r["gflops"] else " " * 14
                 for k in kinds]
        lines.append(f"{r['shape']:40s} {r['m']:>6d} x {r['k']:>4d} -> {r['n']:>4d}  " + "  ".join(cells)
                     + f"  {r['best']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, shapes: Sequence[tuple[str, int, int, int]] = SHAPES) -> int:
    """The command line (module docstring); ``shapes`` replaces :data:`SHAPES` (tests)."""
    parser = argparse.ArgumentParser(prog="python -m rsrefseg.bench.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per shape (default 5)")
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = compare(shapes, reps=args.reps)
    print(f"GEMM kernels at the model's shapes, fp32, {torch.get_num_threads()} threads, GFLOP/s at min "
          f"(share of the shape's best)")
    print(format_rows(rows))
    if args.out:
        from rsrefseg.utils import atomic_write_json

        atomic_write_json(args.out, {"threads": torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
