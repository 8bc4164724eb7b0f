"""One call that prepares an ``RSRefSeg`` for fast inference: LoRA merged, fast kernels, precision.

- ``merge_lora()``: the adapters folded into their base layers (no extra matmuls);
- :func:`rsrefseg.modeling.fast_sam.enable_fast_sam`: SAM's windowed attention with relative
  positions through SDPA (fp32) or blocked ``baddbmm``/``softmax``/``bmm`` (bf16), within 1e-4 of
  the Hugging Face module in fp32;
- :func:`rsrefseg.modeling.fast_sam.enable_fast_linear`: oneDNN linears (bias and GELU fused) for
  CPU inference;
- :func:`rsrefseg.modeling.fast_attention.enable_fast_attention`: CLIP/SigLIP attention that is
  fast in bf16 on the CPU;
- :func:`rsrefseg.modeling.fast_decoder.enable_fast_decoder`: SAM's mask decoder with the image
  tokens projected once per layer and upscaled channels-last (decoding further expressions);
- :func:`rsrefseg.modeling.fast_prompter.enable_fast_prompter`: the prompter's input projection
  once per image instead of once per expression;
- ``precision="bf16"``: the SAM image encoder and the CLIP/SigLIP towers in bfloat16 (about 2x
  the matmul throughput on CPUs with AVX-512 BF16 or AMX, half their memory); the light head stays
  fp32 (:func:`cast_encoders`). Off by default: see the README for measured speed and mask
  agreement. On a CPU without bf16 kernels (:func:`bf16_cpu_support`: AVX2-only x86 CPUs such as
  AMD Zen 2/3, where PyTorch computes bf16 matmuls with reference loops, measured 50-300x slower
  than fp32) bf16 is a trap, so the model stays fp32 with a :class:`PrecisionFallbackWarning`
  unless ``fallback=False``; on a CPU whose oneDNN emulates bf16 without native instructions
  (AVX-512 without ``avx512_bf16``) bf16 runs, with a warning that it will not be faster.

All of it is in place and for inference only (the merged model can no longer be trained as LoRA).
:func:`fast_kernels` switches the fast kernels (not the merge, not the precision) on for a block
and back off after it: validation inside training runs the kernels of ``rsrefseg eval`` on the
model being trained, LoRA unmerged.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from rsrefseg.errors import ConfigError

#: Inference precisions by name.
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_precision(name: str) -> torch.dtype:
    """``"fp32"`` or ``"bf16"`` -> the torch dtype (a :class:`ConfigError` names the choices)."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ConfigError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}") from None


class PrecisionFallbackWarning(RuntimeWarning):
    """A lower precision was asked for where it is slower than fp32 (see :func:`bf16_cpu_support`)."""


def bf16_cpu_support() -> str:
    """How this CPU runs bf16 matmuls in PyTorch: ``"native"``, ``"emulated"`` or ``"none"``.

    - ``"none"``: PyTorch's oneDNN has no bf16 kernels here (x86 without AVX-512; its own check
      ``mkldnn._is_mkldnn_bf16_supported``), so bf16 ``linear``/``bmm`` run as reference loops
      (AMD EPYC Zen 3, 2 threads: 0.5-3 GFLOP/s against ~100+ for fp32);
    - ``"emulated"``: oneDNN converts bf16 to fp32 with AVX-512 (x86 without ``avx512_bf16`` and
      ``amx_bf16``): works, about as fast as fp32;
    - ``"native"``: ``avx512_bf16``/``amx_bf16`` on x86, or any CPU whose flags are not x86 (arm64
      with oneDNN bf16 support).
    """
    from rsrefseg.modeling.fast_linear import cpu_flags, onednn_linear_supported

    if not onednn_linear_supported(torch.bfloat16):
        return "none"
    flags = cpu_flags()
    if "avx2" in flags and not ({"avx512_bf16", "amx_bf16"} & flags):
        return "emulated"
    return "native"


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def optimize_for_inference(model: nn.Module, precision: str = "fp32", fallback: bool = True) -> dict[str, Any]:
    """Merge LoRA, switch on the fast kernels and cast to ``precision``, in place (eval mode).

    Args:
        model: An ``RSRefSeg`` (anything with ``merge_lora()``), or any module containing SAM
            and CLIP/SigLIP parts.
        precision: ``"fp32"`` or ``"bf16"``.
        fallback: For ``"bf16"`` on a CPU without bf16 kernels (:func:`bf16_cpu_support` is
            ``"none"``), keep fp32 and warn (:class:`PrecisionFallbackWarning`) instead of running
            50x slower; ``False`` casts anyway (to study bf16 numerics on such a CPU).

    Returns:
        What was done: ``{"precision" (the one used), "requested_precision", "fast_sam_layers",
        "fast_linear_layers", "fast_attention_models", "fast_decoders", "fast_prompters"}``, plus ``"fallback"`` (the reason) when
        the precision was not applied and ``"cast"`` (the cast modules) for bf16.
    """
    from rsrefseg.modeling.fast_attention import enable_fast_attention
    from rsrefseg.modeling.fast_decoder import enable_fast_decoder
    from rsrefseg.modeling.fast_prompter import enable_fast_prompter
    from rsrefseg.modeling.fast_sam import enable_fast_linear, enable_fast_sam

    dtype = parse_precision(precision)
    requested = precision
    reason = None
    if dtype == torch.bfloat16 and _model_device(model).type == "cpu":
        support = bf16_cpu_support()
        if support == "none" and fallback:
            reason = ("this CPU has no bf16 matmul kernels (x86 without AVX-512): bf16 would be 50x+ slower than "
                      "fp32, so the model stays fp32")
            warnings.warn(f"--precision bf16: {reason}", PrecisionFallbackWarning, stacklevel=2)
            precision, dtype = "fp32", torch.float32
        elif support == "emulated":
            warnings.warn("--precision bf16: this CPU has no native bf16 instructions (no avx512_bf16/amx_bf16): "
                          "bf16 runs emulated, not faster than fp32", PrecisionFallbackWarning, stacklevel=2)
    merge = getattr(model, "merge_lora", None)
    if callable(merge):
        merge()
    info: dict[str, Any] = {
        "precision": precision,
        "requested_precision": requested,
        "fast_sam_layers": enable_fast_sam(model),
        "fast_linear_layers": enable_fast_linear(model),
        "fast_attention_models": enable_fast_attention(model),
        "fast_decoders": enable_fast_decoder(model),
        "fast_prompters": enable_fast_prompter(model),
    }
    if reason is not None:
        info["fallback"] = reason
    if dtype != torch.float32:
        info["cast"] = cast_encoders(model, dtype)
    model.eval()
    return info


def cast_encoders(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Cast the heavy encoders to ``dtype``, keep the light head (and the logit scale/bias) as they are.

    The SAM image encoder and the CLIP/SigLIP towers are > 99 % of the FLOPs; the activation,
    prompter, SAM prompt encoder and mask decoder (~6 GFLOP per expression for ``rsrefseg-b``)
    stay in fp32, which is where bf16 rounding would flip the most mask pixels (the decoder turns
    near-zero logits into masks). ``RSRefSeg.encode_image``/``encode_text`` cast features to the
    head's dtype. Returns the names of the cast modules.
    """
    from transformers import CLIPModel, SiglipModel
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    cast: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(done + ".") for done in cast):
            continue
        if isinstance(module, SamVisionEncoder):
            module.to(dtype)
            cast.append(name)
        elif isinstance(module, (CLIPModel, SiglipModel)):
            for child_name, child in module.named_children():  # towers and projections, not logit_scale/bias
                child.to(dtype)
                cast.append(f"{name}.{child_name}")
            cast.append(name)
    if not cast:  # some other module: cast it whole
        model.to(dtype)
        cast.append("")
    return cast


@contextlib.contextmanager
def fast_kernels(model: nn.Module) -> Iterator[dict[str, int]]:
    """The fast SAM attention, oneDNN linears and CLIP/SigLIP attention of :func:`optimize_for_inference`
    for the duration of the block (no LoRA merge, no cast), then exactly the previous kernels again.

    Parameters are untouched (class swaps and the towers' attention setting only), so this can wrap
    the validation of a model in training, LoRA and optimizer state included. Layers that were fast
    before the block stay fast after it. Yields the counts of layers switched on.
    """
    from rsrefseg.modeling.fast_attention import _towers, disable_fast_attention, enable_fast_attention
    from rsrefseg.modeling.fast_decoder import FastSamMaskDecoder, disable_fast_decoder, enable_fast_decoder
    from rsrefseg.modeling.fast_linear import _MLP_ORIGINAL
    from rsrefseg.modeling.fast_prompter import FastPrompter, disable_fast_prompter, enable_fast_prompter
    from rsrefseg.modeling.fast_sam import FastLinear, enable_fast_linear, enable_fast_sam

    originals = {id(m) for m in model.modules() if "_rsrefseg_original_class" in m.__dict__}
    towers = {id(t) for t in _towers(model) if "_rsrefseg_original_attn" in t.__dict__}
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    plain_mlps = [m for m in model.modules() if _MLP_ORIGINAL not in m.__dict__]  # fused MLPs stay fused after
    fast_heads = {id(m) for m in model.modules() if isinstance(m, (FastSamMaskDecoder, FastPrompter))}
    info = {"fast_sam_layers": enable_fast_sam(model), "fast_linear_layers": enable_fast_linear(model),
            "fast_attention_models": enable_fast_attention(model), "fast_decoders": enable_fast_decoder(model),
            "fast_prompters": enable_fast_prompter(model)}
    try:
        yield info
    finally:
        for module in model.modules():
            if id(module) not in originals and "_rsrefseg_original_class" in module.__dict__:
                module.__class__ = module.__dict__.pop("_rsrefseg_original_class")
        for module in linears:
            if type(module) is FastLinear:
                module.__class__ = nn.Linear
        for module in plain_mlps:  # SigLIP/CLIP MLPs switched to their fused fc1 + GELU forward
            original = module.__dict__.pop(_MLP_ORIGINAL, None)
            if original is not None:
                module.__class__ = original
        for tower in _towers(model):
            if id(tower) not in towers:
                disable_fast_attention(tower)
        for module in list(model.modules()):
            if id(module) in fast_heads:
                continue
            if isinstance(module, FastSamMaskDecoder):
                disable_fast_decoder(module)
            elif isinstance(module, FastPrompter):
                disable_fast_prompter(module)
