"""optimize_for_inference: fp32 within 1e-4 of the model as trained; bf16 close; precision names."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tests.conftest import tiny_images

from rsrefseg.cli.args import PRECISION_NAMES
from rsrefseg.errors import ConfigError
from rsrefseg.modeling import optimize
from rsrefseg.modeling.fast_sam import FastLinear, FastSamVisionAttention
from rsrefseg.modeling.optimize import (
    PRECISIONS,
    PrecisionFallbackWarning,
    bf16_cpu_support,
    optimize_for_inference,
    parse_precision,
)
from rsrefseg.modeling.rsrefseg import RSRefSeg

TEXTS = ["the storage tank on the far left", "the largest airplane"]


def test_precision_names() -> None:
    assert tuple(PRECISIONS) == PRECISION_NAMES
    assert parse_precision("bf16") is torch.bfloat16
    with pytest.raises(ConfigError, match="fp32, bf16"):
        parse_precision("fp16x")


def _sharpened(model: RSRefSeg) -> RSRefSeg:
    """Scale the random decoder's mask output so that logits are O(0.1), not O(1e-4)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "output_hypernetworks_mlps" in name and ".proj_out." in name:
                param.mul_(1000.0)
    return model.eval()


def test_fp32_matches_and_bf16_agrees(tiny_model: RSRefSeg) -> None:
    model = _sharpened(tiny_model)
    images = tiny_images(2, size=model.image_size)
    with torch.inference_mode():
        ref = model(images, TEXTS).mask_logits
    tokenizer = model.clip.tokenizer
    fast = copy.deepcopy(model, memo={id(tokenizer): tokenizer})
    info = optimize_for_inference(fast, "fp32")
    assert info["fast_sam_layers"] > 0 and info["fast_linear_layers"] > 0 and info["fast_attention_models"] == 1
    assert any(isinstance(m, FastSamVisionAttention) for m in fast.modules())
    assert any(isinstance(m, FastLinear) for m in fast.modules())
    assert not any("lora_" in name for name, _ in fast.named_parameters())  # merged
    with torch.inference_mode():
        out = fast(images, TEXTS).mask_logits
        assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
        optimize_for_inference(fast, "bf16", fallback=False)  # again, now in bf16 (idempotent swaps)
        assert next(fast.sam.vision_encoder.parameters()).dtype is torch.bfloat16
        assert next(fast.clip.model.vision_model.parameters()).dtype is torch.bfloat16
        assert fast.head_dtype is torch.float32 and fast.clip.model.logit_scale.dtype is torch.float32
        low = fast(images, TEXTS).mask_logits.float()
    a, b = low > 0, ref > 0
    assert (a & b).sum().item() / max(1, (a | b).sum().item()) > 0.9


@pytest.mark.parametrize("support", ["none", "emulated", "native"])
def test_bf16_on_a_cpu_without_bf16_kernels_stays_fp32(tiny_model: RSRefSeg, monkeypatch: pytest.MonkeyPatch,
                                                       support: str) -> None:
    """No bf16 kernels: fp32 and a warning (bf16 would be 50x+ slower); emulated: bf16 with a warning."""
    monkeypatch.setattr(optimize, "bf16_cpu_support", lambda: support)
    tokenizer = tiny_model.clip.tokenizer
    model = copy.deepcopy(tiny_model, memo={id(tokenizer): tokenizer})
    if support == "native":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            info = optimize_for_inference(model, "bf16")
    else:
        with pytest.warns(PrecisionFallbackWarning, match="no bf16 matmul kernels" if support == "none" else "emulated"):
            info = optimize_for_inference(model, "bf16")
    encoder = next(model.sam.vision_encoder.parameters()).dtype
    assert info["requested_precision"] == "bf16"
    if support == "none":
        assert info["precision"] == "fp32" and "fallback" in info and "cast" not in info
        assert encoder is torch.float32
    else:
        assert info["precision"] == "bf16" and "fallback" not in info and encoder is torch.bfloat16
    forced = copy.deepcopy(tiny_model, memo={id(tokenizer): tokenizer})
    monkeypatch.setattr(optimize, "bf16_cpu_support", lambda: "none")
    assert optimize_for_inference(forced, "bf16", fallback=False)["precision"] == "bf16"
    assert next(forced.sam.vision_encoder.parameters()).dtype is torch.bfloat16


def test_bf16_cpu_support_matches_this_cpu() -> None:
    """"none" exactly where oneDNN has no bf16 linear (AVX2-only x86, e.g. AMD Zen 2/3)."""
    from rsrefseg.modeling.fast_sam import onednn_linear_supported

    support = bf16_cpu_support()
    assert support in ("none", "emulated", "native")
    assert (support == "none") == (not onednn_linear_supported(torch.bfloat16))
    from rsrefseg.modeling.fast_linear import cpu_flags

    flags = cpu_flags()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert support == "native"
