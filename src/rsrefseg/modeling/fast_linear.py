"""oneDNN linears for CPU inference, with the bias and the MLPs' GELU fused (same parameters).

- :class:`FastLinear`: ``nn.Linear`` whose inference forward is oneDNN's inner product
  (``mkldnn._linear_pointwise``) with the bias fused; training, autocast, other devices, dtypes
  oneDNN has no kernel for (:func:`onednn_linear_supported`) and fp32 on CPUs where the BLAS GEMM
  is faster (:func:`fp32_linear_kernel`) use ``F.linear`` unchanged;
- :func:`mlp_forward` / :func:`fused_mlp`: ``lin1 -> GELU -> lin2`` with ``lin1 + GELU`` as one oneDNN
  op (exact GELU for SAM; the tanh approximation, ``gelu_pytorch_tanh``, for SigLIP), when both
  layers are plain linears (after ``merge_lora``; LoRA layers are always called as modules) and
  no gradient is needed; otherwise the module's own forward;
- :func:`enable_fast_linear` swaps the classes of every plain ``nn.Linear`` and of the SigLIP/CLIP
  MLPs in place (parameter names and values untouched); :func:`disable_fast_linear` undoes it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def onednn_linear_supported(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN has a linear (inner product) kernel for ``dtype``.

    oneDNN has bf16 kernels only on CPUs with AVX-512 (BF16/VNNI) or AMX; on an AVX2-only CPU
    creating the bf16 primitive fails. One 2 x 8 probe per dtype and process, cached.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        with torch.no_grad():
            x = torch.ones(2, 8, dtype=dtype)
            torch.ops.mkldnn._linear_pointwise(x, torch.ones(4, 8, dtype=dtype), None, "none", [], "")
    except RuntimeError:
        return False
    return True


#: Environment variable that overrides :func:`fp32_linear_kernel`: ``onednn``, ``blas`` or ``auto``.
LINEAR_KERNEL_ENV = "RSREFSEG_LINEAR_KERNEL"
LINEAR_KERNELS = ("onednn", "blas")


def cpu_flags() -> set[str]:
    """The CPU feature flags (Linux ``/proc/cpuinfo`` ``flags`` / ``Features``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: On AVX2-only x86, linears with at most this many input features (SAM's mask decoder: 64-256)
#: run on oneDNN, wider ones (the encoders: 768-4304) on BLAS.
SMALL_K = 256


@functools.cache
def _avx2_only() -> bool:
    flags = cpu_flags()
    return "avx2" in flags and "avx512f" not in flags


def fp32_linear_kernel(in_features: int | None = None) -> str:
    """The kernel of an fp32 linear with ``in_features`` inputs in CPU inference: ``"onednn"`` or
    ``"blas"`` (``F.linear``'s ``addmm``); ``None`` means a wide (encoder) linear.

    Measured at the model's own shapes (``python -m rsrefseg.bench.kernels``): on AMD Zen 5 with
    AVX-512 oneDNN's linear runs ~2x the BLAS GEMM of this PyTorch build. On an AVX2-only AMD Zen 3
    ``addmm`` is 4-16 % faster than oneDNN on every encoder shape (SAM ViT-B, SigLIP; 768-4304
    inputs), 1 and 2 threads, while oneDNN is 8-36 % faster on the mask decoder's narrow linears with
    a bias (64-256 inputs over 12,288-49,152 image tokens: out_proj, the upscaling) and within 4 %
    on the one without. So x86 CPUs with AVX2 but without AVX-512 take ``blas`` for linears wider
    than :data:`SMALL_K` inputs and ``onednn`` for the others; all other CPUs take ``onednn``. The
    rule reads CPU flags and shapes, not timings, so a machine always computes the same numbers. The
    environment variable :data:`LINEAR_KERNEL_ENV` (``onednn``/``blas``/``auto``) overrides it for
    every linear, read at each call.
    """
    chosen = os.environ.get(LINEAR_KERNEL_ENV, "auto").strip().lower()
    if chosen in LINEAR_KERNELS:
        return chosen
    if _avx2_only() and (in_features is None or in_features > SMALL_K):
        return "blas"
    return "onednn"


def onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's ``mkldnn._linear_pointwise`` may run this linear (CPU inference only) and is
    the kernel to use (:func:`fp32_linear_kernel` for fp32; bf16 always, BLAS has no fast bf16)."""
    return (
        x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and weight.is_contiguous()
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and onednn_linear_supported(x.dtype)
        and (x.dtype != torch.float32 or fp32_linear_kernel(weight.shape[-1]) == "onednn")
    )


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, attr: str = "none",
                  algorithm: str = "") -> torch.Tensor:
    """``attr(x @ weight^T + bias)`` in one oneDNN call (bias fused; ``attr``: "none" or "gelu").

    Args:
        x: ``... x K``; weight: ``N x K``; bias: ``N`` or None.
        algorithm: for "gelu", "none" (exact, erf) or "tanh" (the tanh approximation).

    Returns:
        ``... x N``.
    """
    shape = x.shape
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), weight, bias, attr, [], algorithm)
    return out.view(*shape[:-1], out.shape[-1])  # M x N -> ... x N


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False,
                approximate: str = "none") -> torch.Tensor:
    """``x @ weight^T + bias`` (then, with ``gelu``, ``F.gelu(..., approximate=approximate)``, fused on
    oneDNN): oneDNN where :func:`onednn_ok`, else ``F.linear``. ``... x K`` -> ``... x N``."""
    if onednn_ok(x, weight):
        return onednn_linear(x, weight, bias, "gelu" if gelu else "none", approximate if gelu else "")
    out = F.linear(x, weight, bias)
    # In place on the fresh output: the same kernel as F.gelu (equal bits) without a second tensor
    # (SAM ViT-B's MLP hidden: 50 MB per layer, above glibc's mmap threshold, so it page-faulted in).
    return torch.ops.aten.gelu_(out, approximate=approximate) if gelu else out


class FastLinear(nn.Linear):
    """``nn.Linear`` that runs through oneDNN for CPU inference (same parameters; class swap).

    oneDNN's fp32 GEMM with the bias fused is 10-35% faster than the ``addmm`` path (which also
    copies the broadcast bias into the output first) on AMD Zen 5; training, autocast and other
    devices use ``F.linear`` unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return fast_linear(x, self.weight, self.bias)


_PLAIN_LINEARS = (nn.Linear, FastLinear)


def gelu_algorithm(act: Any) -> str | None:
    """oneDNN's GELU algorithm for an activation module: "none" (exact), "tanh", or None (not a GELU).

    Knows transformers' ``GELUActivation`` (``act.act is F.gelu``), ``GELUTanh``
    (``functools.partial(F.gelu, approximate="tanh")``) and ``nn.GELU``.
    """
    if isinstance(act, nn.GELU):
        return {"none": "none", "tanh": "tanh"}.get(act.approximate)
    fn = getattr(act, "act", None)
    if fn is F.gelu:
        return "none"
    if isinstance(fn, functools.partial) and fn.func is F.gelu and not fn.args and fn.keywords == {"approximate": "tanh"}:
        return "tanh"
    return None


def fused_mlp(lin1: Any, act: Any, lin2: Any, x: torch.Tensor) -> torch.Tensor | None:
    """``lin2(act(lin1(x)))`` with ``lin1 + act`` as one oneDNN op (or, where BLAS runs the linears,
    the GELU in place on ``lin1``'s output), or None where that does not apply.

    Applies to plain linears, a GELU (:func:`gelu_algorithm`) and inference on the CPU
    (:func:`onednn_ok`; no gradients for the in-place GELU). ``x``: ``... x K`` -> ``... x N2``.
    """
    if type(lin1) not in _PLAIN_LINEARS or type(lin2) not in _PLAIN_LINEARS:
        return None
    algorithm = gelu_algorithm(act)
    grad = torch.is_grad_enabled() and (x.requires_grad or lin1.weight.requires_grad)
    if algorithm is None or grad or x.device.type != "cpu":
        return None
    hidden = fast_linear(x, lin1.weight, lin1.bias, gelu=True, approximate=algorithm)
    return lin2(hidden)  # type: ignore[no-any-return]


def mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SAM's MLP (lin1 -> exact GELU -> lin2); one fused oneDNN op for lin1 + GELU when possible."""
    out = fused_mlp(getattr(mlp, "lin1", None), getattr(mlp, "act", None), getattr(mlp, "lin2", None), x)
    return mlp(x) if out is None else out


class _FusedMLP(nn.Module):
    """Mixin for transformers' ``fc1 -> activation_fn -> fc2`` MLPs (SigLIP, CLIP): :func:`fused_mlp`."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = fused_mlp(self.fc1, self.activation_fn, self.fc2, hidden_states)
        return super().forward(hidden_states) if out is None else out  # type: ignore[no-any-return]


@functools.cache
def _fast_mlp_classes() -> dict[type, type]:
    """Original MLP class -> its fused subclass (built on first use: no transformers import here)."""
    from transformers.models.clip.modeling_clip import CLIPMLP
    from transformers.models.siglip.modeling_siglip import SiglipMLP

    return {cls: type("Fast" + cls.__name__, (_FusedMLP, cls), {"__doc__": f"{cls.__name__} with lin1 + GELU fused."})
            for cls in (SiglipMLP, CLIPMLP)}


_MLP_ORIGINAL = "_rsrefseg_mlp_original_class"


def enable_fast_linear(model: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` in ``model`` to :class:`FastLinear` (and SigLIP/CLIP MLPs to
    their fused forward), in place; returns the number of linears switched.

    Parameter names and values are untouched; LoRA layers keep working (their base layers become
    fast, the adapters are called as before). Use after ``merge_lora()`` for inference.
    """
    count = 0
    fast = _fast_mlp_classes()
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
            count += 1
        elif type(module) in fast:
            module.__dict__[_MLP_ORIGINAL] = type(module)
            module.__class__ = fast[type(module)]
    return count


def disable_fast_linear(model: nn.Module) -> int:
    """Undo :func:`enable_fast_linear`; returns the number of linears switched back."""
    count = 0
    for module in model.modules():
        if type(module) is FastLinear:
            module.__class__ = nn.Linear
            count += 1
        original = module.__dict__.pop(_MLP_ORIGINAL, None)
        if original is not None:
            module.__class__ = original
    return count
