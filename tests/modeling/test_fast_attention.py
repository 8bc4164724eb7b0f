"""Blocked math attention and its transformers registration match SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from rsrefseg.modeling.fast_attention import (
    ATTN_IMPLEMENTATION,
    cpu_attention_forward,
    disable_fast_attention,
    enable_fast_attention,
    math_attention,
    use_math_path,
)

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def qkv(b: int = 2, heads: int = 5, n: int = 33, d: int = 8) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, heads, n, d, generator=gen) for _ in range(3))


@pytest.mark.parametrize("budget", [1, 3 * 33 * 33 * 4, 10**9])  # one head, three heads, all heads per block
@pytest.mark.parametrize("bias_shape", [None, (2, 5, 33, 33), (2, 1, 1, 33)])
def test_math_attention_equals_sdpa(budget: int, bias_shape: tuple[int, ...] | None) -> None:
    q, k, v = qkv()
    bias = None if bias_shape is None else torch.randn(bias_shape)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3).transpose(1, 2)  # B x N x h x d
    out = math_attention(q, k, v, 0.3, bias, budget=budget)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5


def test_math_path_only_for_low_precision_inference() -> None:
    q = torch.zeros(1, 1, 2, 2)
    assert not use_math_path(q)  # fp32: the SDPA kernel is as fast
    assert use_math_path(q.bfloat16())
    assert not use_math_path(q.bfloat16(), dropout=0.1)
    assert not use_math_path(q.bfloat16().requires_grad_())


def test_forward_delegates_causal_and_fp32_to_sdpa() -> None:
    q, k, v = (t.bfloat16() for t in qkv())
    module = torch.nn.Module()
    causal, _ = cpu_attention_forward(module, q, k, v, None, is_causal=True, scaling=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3).transpose(1, 2)
    assert (causal.float() - ref.float()).abs().max().item() == 0.0
    plain, _ = cpu_attention_forward(module, q, k, v, None, scaling=0.3)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.3).transpose(1, 2)
    assert (plain.float() - ref).abs().max().item() < 0.05


def _models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    vision = dict(SMALL, image_size=32, patch_size=8)
    return [
        SiglipModel(SiglipConfig(text_config=SMALL, vision_config=vision)).eval(),
        CLIPModel(CLIPConfig(text_config=SMALL, vision_config=vision, projection_dim=16)).eval(),
    ]


@pytest.mark.parametrize("model", _models(), ids=["siglip", "clip"])
def test_enable_keeps_fp32_exact_and_bf16_close(model: torch.nn.Module) -> None:
    ids = torch.randint(0, 99, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        assert enable_fast_attention(model) == 1
        assert model.config.vision_config._attn_implementation == ATTN_IMPLEMENTATION
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        for name in ("image_embeds", "text_embeds"):  # fp32 goes to SDPA: identical
            assert torch.equal(getattr(out, name), getattr(ref, name))
        model.bfloat16()
        fast16 = model(input_ids=ids, attention_mask=mask, pixel_values=pixels.bfloat16())
        assert disable_fast_attention(model) == 1
        assert model.config._attn_implementation == "sdpa"
        ref16 = model(input_ids=ids, attention_mask=mask, pixel_values=pixels.bfloat16())
        model.float()
    for name in ("image_embeds", "text_embeds"):  # bf16: the same up to bf16 rounding
        a, b = getattr(fast16, name).float(), getattr(ref16, name).float()
        assert (a - b).abs().max().item() < 0.02 * b.abs().max().item()
