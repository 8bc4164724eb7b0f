"""Which preset and batch size fits on a 24 / 40 / 80 GB GPU for bf16 training: an estimate.

``rsrefseg train`` with ``mixed_precision: bf16`` (accelerate's autocast) keeps the model in fp32 (the
frozen base too), fp32 gradients and fp32 AdamW state for the trainable part, and runs the forward
under bf16 autocast. The estimate per batch size ``B`` is

    fp32 weights + fp32 gradients + AdamW state                     (exact, from the parameters)
    + MARGIN x (A1 + (B - 1) x (A2 - A1))                           (activations, linear in B)
    + CUDA_OVERHEAD                                                 (CUDA context, allocator slack)

with ``A1``/``A2`` the activation peaks of batch 1 / 2 traced under CPU bf16 autocast
(:func:`rsrefseg.bench.train_trace.trace_step` with ``precision="bf16"``; they include the bf16
copies of the frozen weights that autocast makes and the backward pass keeps). CUDA's autocast keeps
layer norms and some pointwise ops in fp32 where the CPU rules use bf16, hence the margin.
It is an estimate from CPU traces until ``scripts/gpu-check.sh`` has measured a GPU.
"""

from __future__ import annotations

from typing import Any

GIB = 2**30
#: GPU memory sizes of the table (GiB, as the cards report them: 24 GB RTX 3090/4090, 40 GB A100, 80 GB A100/H100).
GPUS = {"24 GB": 24.0, "40 GB": 40.0, "80 GB": 80.0}
#: CUDA context + caching-allocator slack outside the activations (not in max_memory_allocated).
CUDA_OVERHEAD = 1.5 * GIB
#: Factor on the traced bf16 activations for what CUDA's autocast keeps in fp32 and fragmentation.
MARGIN = 1.2


def _row(preset: str, entry: dict[str, Any], ckpt: bool, batches: tuple[int, ...]) -> dict[str, Any] | None:
    suffix = "+ckpt" if ckpt else ""
    traces = entry.get("gpu_traces", {})
    t1, t2 = traces.get(f"batch1{suffix}"), traces.get(f"batch2{suffix}")
    if t1 is None or t2 is None:
        return None
    static = int(t1["weights_bytes"] + t1["gradients_bytes"] + t1["optimizer_state_bytes"])
    a1, a2 = t1["activations_bytes"], t2["activations_bytes"]
    per_image = max(a2 - a1, 0)
    estimates = {str(b): static + MARGIN * (a1 + (b - 1) * per_image) + CUDA_OVERHEAD for b in batches}
    max_batch = {gpu: max((b for b in batches if estimates[str(b)] <= cap * GIB), default=0)
                 for gpu, cap in GPUS.items()}
    return {"preset": preset, "checkpointing": ckpt, "static_bytes": static,
            "activations_batch1_bytes": a1, "activations_per_extra_image_bytes": per_image,
            "estimate_bytes": estimates, "max_batch": max_batch}


def gpu_fit(presets: dict[str, Any], batches: tuple[int, ...] = (1, 2, 4, 8, 16)) -> dict[str, Any]:
    """The GPU-fit table of every preset with bf16 traces (see the module docstring)."""
    rows = [r for p, e in presets.items() for ckpt in (False, True) if (r := _row(p, e, ckpt, batches))]
    return {"rows": rows, "gpus_gib": GPUS, "batches": list(batches), "margin": MARGIN,
            "cuda_overhead_bytes": CUDA_OVERHEAD,
            "basis": "estimate from CPU traces (fp32 weights, bf16 autocast activations); not yet confirmed on a GPU"}
