"""One call that prepares an ``RSRefSeg`` for fast inference: LoRA merged, fast kernels, precision.

- ``merge_lora()``: the adapters folded into their base layers (no extra matmuls);
- :func:`rsrefseg.modeling.fast_sam.enable_fast_sam`: SAM's windowed attention with relative
  positions through SDPA (fp32) or blocked ``baddbmm``/``softmax``/``bmm`` (bf16), within 1e-4 of
  the Hugging Face module in fp32;
- :func:`rsrefseg.modeling.fast_sam.enable_fast_linear`: oneDNN linears (bias and GELU fused) for
  CPU inference;
- :func:`rsrefseg.modeling.fast_attention.enable_fast_attention`: CLIP/SigLIP attention that is
  fast in bf16 on the CPU;
- ``precision="bf16"``: the SAM image encoder and the CLIP/SigLIP towers in bfloat16 (about 2x
  the matmul throughput on CPUs with AVX-512 BF16 or AMX, half their memory); the light head stays
  fp32 (:func:`cast_encoders`). Off by default: see the README for measured speed and mask
  agreement.

All of it is in place and for inference only (the merged model can no longer be trained as LoRA).
:func:`fast_kernels` switches the fast kernels (not the merge, not the precision) on for a block
and back off after it: validation inside training runs the kernels of ``rsrefseg eval`` on the
model being trained, LoRA unmerged.
"""

from __future__ import annotations

import contextlib
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


def optimize_for_inference(model: nn.Module, precision: str = "fp32") -> dict[str, Any]:
    """Merge LoRA, switch on the fast kernels and cast to ``precision``, in place (eval mode).

    Args:
        model: An ``RSRefSeg`` (anything with ``merge_lora()``), or any module containing SAM
            and CLIP/SigLIP parts.
        precision: ``"fp32"`` or ``"bf16"``.

    Returns:
        What was done: ``{"precision", "fast_sam_layers", "fast_linear_layers", "fast_attention_models"}``.
    """
    from rsrefseg.modeling.fast_attention import enable_fast_attention
    from rsrefseg.modeling.fast_sam import enable_fast_linear, enable_fast_sam

    dtype = parse_precision(precision)
    merge = getattr(model, "merge_lora", None)
    if callable(merge):
        merge()
    info = {
        "precision": precision,
        "fast_sam_layers": enable_fast_sam(model),
        "fast_linear_layers": enable_fast_linear(model),
        "fast_attention_models": enable_fast_attention(model),
    }
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
    from rsrefseg.modeling.fast_sam import FastLinear, enable_fast_linear, enable_fast_sam

    originals = {id(m) for m in model.modules() if "_rsrefseg_original_class" in m.__dict__}
    towers = {id(t) for t in _towers(model) if "_rsrefseg_original_attn" in t.__dict__}
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    info = {"fast_sam_layers": enable_fast_sam(model), "fast_linear_layers": enable_fast_linear(model),
            "fast_attention_models": enable_fast_attention(model)}
    try:
        yield info
    finally:
        for module in model.modules():
            if id(module) not in originals and "_rsrefseg_original_class" in module.__dict__:
                module.__class__ = module.__dict__.pop("_rsrefseg_original_class")
        for module in linears:
            if type(module) is FastLinear:
                module.__class__ = nn.Linear
        for tower in _towers(model):
            if id(tower) not in towers:
                disable_fast_attention(tower)
