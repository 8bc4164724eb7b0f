"""One training step measured in a fresh process: time, FLOPs, share of the roofline, memory.

``python -m rsrefseg.bench.train_step --preset P --images U --per-image K [--checkpointing]`` builds
the preset as ``rsrefseg train`` does (seeded random init, the preset's recipe of
:data:`rsrefseg.bench.train_trace.RECIPES`: LoRA and 5 x BCE for the full-size presets, the
optimizer of :func:`rsrefseg.training.setup.build_optimizer`, gradient checkpointing through
:func:`rsrefseg.modeling.checkpointing.enable_gradient_checkpointing`), and runs full steps on
``U`` images with ``K`` expressions each (``K = 1``: ungrouped pairs):
``LossModule`` forward, backward, gradient clip (if the recipe clips), AdamW step, ``zero_grad``.

1. a warm-up step, instrumented: FLOPs (:func:`rsrefseg.bench.train_trace.count_step_flops`)
   and the peak of live tensor storage of forward + backward
   (:class:`rsrefseg.bench.train_trace.StorageTracker`); it also creates AdamW's state;
2. the kernel's resident high-water mark is reset (``/proc/self/clear_refs``);
3. ``reps`` rounds, each one timed step and one ``probe^2`` fp32 matmul (``torch.mm`` and, where the
   CPU has it, oneDNN's linear): the step's GFLOP/s are held against the best GEMM of the same
   rounds.

It prints one JSON line: timings, FLOPs, the memory split (weights, gradients, AdamW state,
activations) and the resident peak of the steady-state steps (the high-water mark after the reset)
and of the whole process (building and the warm-up included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch


def build_training(preset: str, checkpointing: bool) -> tuple[Any, Any, Any, float | None]:
    """``(model, loss_module, optimizer, grad_clip)`` as the trainer makes them (random init)."""
    from rsrefseg.bench.train_trace import recipe
    from rsrefseg.build import build_from_preset
    from rsrefseg.modeling.checkpointing import enable_gradient_checkpointing
    from rsrefseg.training.setup import build_optimizer
    from rsrefseg.training.train import LossModule
    from rsrefseg.training.train_config import TrainConfig

    spec = recipe(preset)
    model = build_from_preset(preset, random_init=True, **spec["overrides"])
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    config = TrainConfig()  # AdamW lr 1e-4, weight decay 0.05 (paper), fused update
    optimizer = build_optimizer(model, config)
    bce, dice, act = spec["loss"]
    return model, LossModule(model, bce, dice, act), optimizer, spec["grad_clip"]


def child(preset: str, images: int, per_image: int, checkpointing: bool, reps: int, probe: int,
          threads: int | None) -> dict[str, Any]:
    """Runs in the fresh process; see the module docstring."""
    if threads:
        torch.set_num_threads(threads)
    import peft  # noqa: F401  (libraries belong to the baseline, not to the model)
    import transformers  # noqa: F401

    import rsrefseg.build  # noqa: F401
    from rsrefseg.bench.cpu import _roof, rounds
    from rsrefseg.bench.memory import _hwm_bytes, _reset_hwm, _rss_bytes
    from rsrefseg.bench.roofline import matmul_probe
    from rsrefseg.bench.train_trace import (
        StorageTracker,
        count_step_flops,
        parameter_bytes,
        step_inputs,
        storage_keys,
    )
    from rsrefseg.modeling.fast_sam import onednn_linear_supported

    baseline = _rss_bytes()
    start = time.perf_counter()
    model, loss_module, optimizer, clip = build_training(preset, checkpointing)
    build_s = time.perf_counter() - start
    info = parameter_bytes(model)
    batch = step_inputs(model.image_size, images, per_image)
    trainable = [p for p in model.parameters() if p.requires_grad]
    after_build = _rss_bytes()

    def forward_backward() -> None:
        loss = loss_module(batch["pixel_values"], batch["texts"], batch["target"], batch["image_index"])
        loss.backward()

    def update() -> None:
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        forward_backward()
        update()

    tracker = StorageTracker(exclude=storage_keys(model))

    def instrumented() -> None:
        with tracker:
            forward_backward()

    start = time.perf_counter()
    flops = count_step_flops(instrumented)  # the warm-up step
    update()
    warmup_s = time.perf_counter() - start
    state = sum(t.untyped_storage().nbytes() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    before_steps = _rss_bytes()
    build_peak = _hwm_bytes()  # building + the warm-up step
    reset = _reset_hwm()
    probe_fn, probe_gflop = matmul_probe(probe, torch.float32)
    fns = {"step": step, "roofline_fp32": probe_fn}
    if onednn_linear_supported(torch.float32):
        fns["roofline_fp32_onednn"] = matmul_probe(probe, torch.float32, onednn=True)[0]
    for name, fn in fns.items():
        if name != "step":
            fn()  # warm the probes up too
    timed = rounds(fns, reps, warmup=0)  # the instrumented step was the warm-up
    steps_peak = _hwm_bytes() if reset else None
    cpu = timed.pop("_cpu")
    roof = _roof(timed, "roofline_fp32", probe_gflop)
    t = timed["step"]
    best = {at: max(roof.get(f"gflops_at_{at}", 0.0), roof.get(f"onednn_gflops_at_{at}", 0.0)) for at in ("min", "median")}
    gflop = flops["gflop"]
    expressions = images * per_image
    return {
        **info,
        "preset": preset, "images": images, "per_image": per_image, "expressions": expressions,
        "checkpointing": checkpointing, "threads": torch.get_num_threads(), "build_s": build_s,
        "warmup_s": warmup_s, **{k: t[k] for k in ("min_s", "median_s", "reps", "times_s")},
        "gflop": gflop, "gflop_attention": flops["gflop_attention"],
        "gflops_at_min": gflop / t["min_s"], "gflops_at_median": gflop / t["median_s"],
        "roofline_in_rounds": roof,
        "share_of_roofline_at_min": gflop / t["min_s"] / best["min"] if best["min"] else None,
        "share_of_roofline_at_median": gflop / t["median_s"] / best["median"] if best["median"] else None,
        "expressions_per_s_at_min": expressions / t["min_s"],
        "expressions_per_s_at_median": expressions / t["median_s"],
        "contention": cpu,
        "memory": {
            "baseline_rss_bytes": baseline,
            "rss_after_build_bytes": after_build,
            "rss_before_steps_bytes": before_steps,
            "steps_peak_rss_bytes": steps_peak,
            "warmup_peak_rss_bytes": build_peak,
            # VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts from its parent's resident size
            "process_peak_rss_bytes": max(build_peak or 0, steps_peak or 0) or None,
            "weights_bytes": info["weights_bytes"],
            "gradients_bytes": info["gradients_bytes"],
            "optimizer_state_bytes": state,
            "activations_bytes": tracker.peak,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=1, help="distinct images per step (U)")
    parser.add_argument("--per-image", type=int, default=1, help="expressions per image (K; 1 = ungrouped pairs)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the encoders")
    parser.add_argument("--reps", type=int, default=2, help="timed steps after the warm-up")
    parser.add_argument("--probe", type=int, default=4096, help="side of the fp32 matmul probed in every round")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    result = child(args.preset, args.images, args.per_image, args.checkpointing, args.reps, args.probe, args.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
