"""Where the first expression's time goes: ``torch.profiler`` per op and per module.

``python benchmarks/profile_first.py --preset rsrefseg-b --precision fp32`` builds the model exactly as
the suite does (:func:`rsrefseg.bench.cpu.build_fast`, plus the library's bf16 path for
``--precision bf16``), runs one warm-up and then ``--reps`` profiled first expressions, and prints

- per op class (GEMM, attention kernel, softmax, layer norm, GELU, element-wise, copies and layout
  changes, the resize, ...): seconds per expression and share of the total, from the ops' self CPU
  time (children are not double counted);
- per module (SAM patch embedding, windowed and global layers, neck; SigLIP embeddings, layers,
  head; text tower; prompter and decoder): seconds from forward hooks around ``record_function``;
- the GEMMs' own rate (their FLOPs from the shapes / their time) next to the best GEMM measured
  right before (the gap between the two is the time "above the best GEMM");
- the same first expression once more without the profiler, timed per module and per part (the
  attention and the MLP of SAM's windowed and global layers and of SigLIP's image layers) with
  forward hooks only. Trust these seconds, not the profiled ones: on the Zen 3 machine of
  2026-12-03 the profiler stretched a 16.5 s expression to 21.7 s, mostly in large element-wise ops
  (``aten::gelu`` on SAM's 4096 x 3072 MLP hidden: ~300 ms per call profiled, 8-12 ms with hooks
  only; the bias fill of ``addmm`` likewise), so the op-class shares overstate GELU and copies.

The JSON (``--out``) holds the same tables. Under ``flock /tmp/rsrefseg-heavy.lock`` on a shared
machine: the fractions are more robust than the absolute seconds.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

#: Op classes by aten/mkldnn op name (first match of a substring wins); the rest is "other".
OP_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GEMM (linear, oneDNN)", ("mkldnn::_linear_pointwise",)),
    ("GEMM (addmm/mm, BLAS)", ("aten::addmm", "aten::mm", "aten::_addmm_activation")),
    ("attention matmuls (bmm/baddbmm)", ("aten::bmm", "aten::baddbmm")),
    ("attention kernel (SDPA flash)", ("aten::_scaled_dot_product_flash_attention_for_cpu",)),
    ("softmax", ("aten::_softmax", "aten::softmax")),
    ("layer norm", ("aten::native_layer_norm", "aten::layer_norm")),
    ("GELU", ("aten::gelu",)),
    ("convolution", ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::conv")),
    ("resize (interpolate)", ("aten::_upsample", "aten::upsample")),
    ("copies and layout changes", ("aten::copy_", "aten::clone", "aten::contiguous", "aten::to",
                                   "aten::_to_copy", "aten::cat", "aten::index", "aten::fill_", "aten::zero_")),
    ("element-wise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::exp", "aten::sigmoid",
                      "aten::tanh", "aten::rsqrt", "aten::pow", "aten::sqrt", "aten::mean", "aten::sum",
                      "aten::where", "aten::neg", "aten::relu", "aten::erf")),
)


def op_class(name: str) -> str:
    """The :data:`OP_CLASSES` class of an op name (``"other"`` when none matches)."""
    for label, prefixes in OP_CLASSES:
        if any(name.startswith(p) for p in prefixes):
            return label
    return "other"


def gemm_flop(name: str, shapes: Sequence[Sequence[int]]) -> float:
    """FLOPs of a GEMM-like op from its recorded input shapes (0 for anything else)."""
    try:
        if name == "mkldnn::_linear_pointwise":  # x: M x K, w: N x K
            x, w = shapes[0], shapes[1]
            rows = 1
            for n in x[:-1]:
                rows *= n
            return 2.0 * rows * x[-1] * w[0]
        if name in ("aten::mm", "aten::addmm"):
            a, b = (shapes[0], shapes[1]) if name == "aten::mm" else (shapes[1], shapes[2])
            return 2.0 * a[0] * a[1] * b[1]
        if name in ("aten::bmm", "aten::baddbmm"):
            a, b = (shapes[0], shapes[1]) if name == "aten::bmm" else (shapes[1], shapes[2])
            return 2.0 * a[0] * a[1] * a[2] * b[2]
        if name == "aten::_scaled_dot_product_flash_attention_for_cpu":  # q: B x h x Nq x d, k: B x h x Nk x d
            q, k = shapes[0], shapes[1]
            return 4.0 * q[0] * q[1] * q[2] * k[2] * q[3]
    except (IndexError, TypeError):
        return 0.0
    return 0.0


#: Modules whose time is reported (by the class name; each instance by its qualified name).
MODULE_KINDS = ("SamVisionLayer", "FastSamVisionLayer", "SamPatchEmbeddings", "SamVisionNeck", "SiglipVisionEmbeddings",
                "SiglipEncoderLayer", "SiglipMultiheadAttentionPoolingHead", "SiglipTextTransformer", "CLIPTextTransformer",
                "CLIPEncoderLayer", "CLIPVisionEmbeddings", "Prompter", "TextActivation", "SamMaskDecoder",
                "SamPromptEncoder", "SiglipTextModel", "CLIPTextModel")


def _sam_kind(layer: nn.Module) -> str:
    """"global" or "windowed" for a SAM vision layer."""
    return "global" if getattr(layer, "window_size", 0) == 0 else "windowed"


def _sam_attention_label(kind: str) -> str:
    return f"SAM {kind}: attention (qkv, attention, proj)"


def module_groups(model: nn.Module) -> dict[str, str]:
    """Qualified name -> group label (SAM global/windowed layers apart; SigLIP layers together)."""
    groups: dict[str, str] = {}
    for name, module in model.named_modules():
        kind = type(module).__name__.removeprefix("Fast")  # our drop-in subclasses count as theirs
        if kind not in MODULE_KINDS:
            continue
        if "SamVisionLayer" in kind:
            label = f"SAM layer, {_sam_kind(module)}"
        elif kind == "CLIPEncoderLayer":
            label = "CLIP layer (image)" if "vision" in name else "CLIP layer (text)"
        elif kind == "SiglipEncoderLayer":
            label = "SigLIP layer (image)" if "vision" in name else None  # text layers: inside the text tower
        else:
            label = kind
        if label and not any(name.startswith(parent + ".") for parent in groups):
            groups[name] = label
    return groups


def part_groups(model: nn.Module) -> dict[str, str]:
    """Qualified name -> label for the attention and the MLP inside SAM's and SigLIP's image layers.

    SAM's MLP can run as one fused call that bypasses the module (``mlp_forward``), so for SAM only
    the attention is hooked; :func:`profile_first_expression` reports the layer minus its attention.
    """
    groups: dict[str, str] = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if "SamVisionLayer" in kind:
            groups[f"{name}.attn"] = _sam_attention_label(_sam_kind(module))  # the rest: see below
        elif kind == "SiglipEncoderLayer" and "vision" in name:
            groups[f"{name}.self_attn"] = "SigLIP image: attention (q, k, v, attention, out)"
            groups[f"{name}.mlp"] = "SigLIP image: MLP"
    return groups


class ModuleTimer:
    """Forward hooks that time the modules of :func:`module_groups` (or ``groups``; CPU: synchronous)."""

    def __init__(self, model: nn.Module, groups: dict[str, str] | None = None) -> None:
        self.groups = module_groups(model) if groups is None else groups
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name, label in self.groups.items():
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name, label)))

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name: str, label: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.seconds[label] += time.perf_counter() - self._start.pop(name)
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def profile_first_expression(preset: str = "rsrefseg-b", precision: str = "fp32", reps: int = 1,
                             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Profile ``reps`` first expressions (after one warm-up); see the module docstring."""
    from rsrefseg.bench.cpu import EXPRESSIONS, build_fast, seeded_image
    from rsrefseg.bench.roofline import matmul_gflops
    from rsrefseg.modeling.optimize import optimize_for_inference

    model, _ = build_fast(preset)
    if precision != "fp32":
        optimize_for_inference(model, precision, fallback=False)  # the real bf16 path, even where it is slow
    image = seeded_image(model.image_size)
    text = EXPRESSIONS[:1]

    def first() -> Any:
        return model.decode(model.encode_image(image), model.encode_text(text))

    with torch.inference_mode():
        first()  # warm-up
        gemm = {name: matmul_gflops(4096 if preset != "tiny" else 512, torch.float32, 2, onednn=onednn)["gflops_at_min"]
                for name, onednn in (("torch.mm", False), ("oneDNN linear", True))}
        log(f"fp32 GEMM right before: {gemm}")
        timer = ModuleTimer(model)
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(reps):
                first()
        wall = (time.perf_counter() - start) / reps
        timer.remove()
        # The same without the profiler: module and part times from hooks only (see the docstring).
        plain = ModuleTimer(model, {**module_groups(model), **part_groups(model)})
        start = time.perf_counter()
        for _ in range(reps):
            first()
        plain_wall = (time.perf_counter() - start) / reps
        plain.remove()
    parts = {k: v / reps for k, v in plain.seconds.items()}
    for kind in ("global", "windowed"):
        layer, attention = parts.get(f"SAM layer, {kind}"), parts.get(_sam_attention_label(kind))
        if layer is not None and attention is not None:
            parts[f"SAM {kind}: MLP, norms, residuals (layer - attention)"] = layer - attention
    ops: dict[str, dict[str, float]] = defaultdict(lambda: {"s": 0.0, "calls": 0, "gflop": 0.0})
    classes: dict[str, dict[str, float]] = defaultdict(lambda: {"s": 0.0, "gflop": 0.0})
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        seconds = event.self_cpu_time_total / 1e6 / reps
        if seconds <= 0:
            continue
        flop = gemm_flop(event.name, event.input_shapes) / 1e9 / reps
        entry = ops[event.name]
        entry["s"] += seconds
        entry["calls"] += 1 / reps
        entry["gflop"] += flop
        cls = classes[op_class(event.name)]
        cls["s"] += seconds
        cls["gflop"] += flop
    total = sum(c["s"] for c in classes.values())
    modules = {k: v / reps for k, v in sorted(timer.seconds.items(), key=lambda kv: -kv[1])}
    return {"preset": preset, "precision": precision, "reps": reps, "wall_s": wall, "profiled_self_s": total,
            "fp32_gemm_gflops": gemm, "op_classes": _ranked(classes, total), "ops": _ranked(ops, total, 25),
            "modules_s": modules, "threads": torch.get_num_threads(), "unprofiled_wall_s": plain_wall,
            "unprofiled_modules_s": dict(sorted(parts.items(), key=lambda kv: -kv[1]))}


def _ranked(table: dict[str, dict[str, float]], total: float, limit: int | None = None) -> dict[str, dict[str, float]]:
    rows = sorted(table.items(), key=lambda kv: -kv[1]["s"])[:limit]
    out = {}
    for name, row in rows:
        out[name] = {**row, "share": row["s"] / total if total else 0.0}
        if row["gflop"]:
            out[name]["gflops"] = row["gflop"] / row["s"]
    return out


def format_profile(result: dict[str, Any]) -> str:
    """The tables of :func:`profile_first_expression` as text."""
    best = max(result["fp32_gemm_gflops"].values())
    lines = [f"{result['preset']} {result['precision']} first expression: {result['wall_s']:.2f} s per expression "
             f"(profiled), {result['threads']} threads; best fp32 GEMM right before {best:.0f} GFLOP/s "
             f"({', '.join(f'{k} {v:.0f}' for k, v in result['fp32_gemm_gflops'].items())})", "", "per op class:"]
    for name, row in result["op_classes"].items():
        rate = f"  {row['gflops']:.0f} GFLOP/s" if "gflops" in row else ""
        lines.append(f"  {name:<38}{row['s']:>8.3f} s {100 * row['share']:>5.1f} %{rate}")
    lines += ["", "top ops:"]
    for name, row in result["ops"].items():
        rate = f"  {row['gflops']:.0f} GFLOP/s" if "gflops" in row else ""
        lines.append(f"  {name:<52}{row['s']:>8.3f} s {100 * row['share']:>5.1f} % {row['calls']:>7.0f} calls{rate}")
    lines += ["", "per module (forward hooks, seconds per expression, profiled):"]
    for name, seconds in result["modules_s"].items():
        lines.append(f"  {name:<38}{seconds:>8.3f} s")
    if "unprofiled_wall_s" in result:
        lines += ["", f"without the profiler (forward hooks only): {result['unprofiled_wall_s']:.2f} s per expression"]
        for name, seconds in result["unprofiled_modules_s"].items():
            lines.append(f"  {name:<60}{seconds:>8.3f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/profile_first.py [--preset P] [--precision fp32|bf16] [--reps N] [--out F]``."""
    parser = argparse.ArgumentParser(prog="profile", description="torch.profiler of the first expression")
    parser.add_argument("--preset", default="rsrefseg-b")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON file for the tables")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from rsrefseg.allocator import retain_freed_memory

    allocator = retain_freed_memory()  # as the rsrefseg command and the suite run
    print(f"malloc: {allocator}")
    result = profile_first_expression(args.preset, args.precision, args.reps)
    print(format_profile(result))
    if args.out:
        from rsrefseg.utils import atomic_write_json

        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":  # python -m rsrefseg.bench.profile
    import os
    import sys

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
