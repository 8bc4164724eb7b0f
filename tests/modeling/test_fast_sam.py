"""The fast SAM vision attention (and oneDNN linears) match the Hugging Face modules to 1e-4."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.conftest import tiny_images
from transformers import SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionEncoder

from rsrefseg.modeling import fast_sam
from rsrefseg.modeling.fast_sam import (
    FastLinear,
    FastSamVisionAttention,
    disable_fast_linear,
    disable_fast_sam,
    enable_fast_linear,
    enable_fast_sam,
    rel_pos_table,
)

TOL = 1e-4


def small_config(window_size: int, image_size: int = 128, attn: str = "sdpa") -> SamVisionConfig:
    """8 x 8 tokens at 128 px; windows of 3 need padding (8 = 2 * 3 + 2), windows of 4 do not."""
    cfg = SamVisionConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, global_attn_indexes=[1],
        image_size=image_size, patch_size=16, window_size=window_size, output_channels=16,
        num_pos_feats=16, mlp_ratio=2.0, mlp_dim=64,
    )
    cfg._attn_implementation = attn
    return cfg


def make_encoder(cfg: SamVisionConfig, seed: int = 0) -> SamVisionEncoder:
    torch.manual_seed(seed)
    enc = SamVisionEncoder(cfg).eval()
    with torch.no_grad():
        for module in enc.modules():
            if isinstance(module, SamVisionAttention):
                module.rel_pos_h.normal_()  # the HF init is zeros: make the bias matter
                module.rel_pos_w.normal_()
                module.qkv.bias.normal_()  # padding tokens get qkv(0) = bias
        enc.pos_embed.normal_(std=0.5)
    return enc


def images(size: int = 128, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("window", [3, 4, 8, 11])
def test_encoder_matches_reference(attn: str, window: int) -> None:
    enc = make_encoder(small_config(window, attn=attn))
    x = images()
    with torch.no_grad():
        ref = enc(x).last_hidden_state
        assert enable_fast_sam(enc) == 3
        out = enc(x).last_hidden_state
    assert all(type(layer.attn) is FastSamVisionAttention for layer in enc.layers)
    assert (out - ref).abs().max().item() < TOL


@pytest.mark.parametrize("budget", [1, 20_000, 40_000, 10**9])
def test_bias_blocks_and_inference_mode(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """Blocks of query rows, of heads, of batch items (global layer) and of windows."""
    enc = make_encoder(small_config(3))
    x = images()
    monkeypatch.setattr(fast_sam, "BIAS_BLOCK_BYTES", budget)
    monkeypatch.setattr(fast_sam, "MIN_BLOCK_QUERIES", 1)
    with torch.inference_mode():
        ref = enc(x).last_hidden_state
        enable_fast_sam(enc)
        out = enc(x).last_hidden_state
    assert (out - ref).abs().max().item() < TOL


def test_attention_drop_in_on_windows() -> None:
    """Called like the reference (on windows the caller made) it is the same function."""
    cfg = small_config(4)
    torch.manual_seed(0)
    ref = SamVisionAttention(cfg, window_size=4).eval()
    with torch.no_grad():
        ref.rel_pos_h.normal_()
        ref.rel_pos_w.normal_()
    fast = SamVisionAttention(cfg, window_size=4).eval()
    fast.load_state_dict(ref.state_dict())
    fast.__class__ = FastSamVisionAttention
    x = torch.randn(6, 4, 4, 32)
    with torch.no_grad():
        assert (fast(x)[0] - ref(x)[0]).abs().max().item() < TOL


@pytest.mark.parametrize(("q", "k", "rows"), [(8, 8, 15), (8, 8, 27), (4, 8, 15), (14, 14, 27)])
def test_rel_pos_table(q: int, k: int, rows: int) -> None:
    cfg = small_config(4)
    attn = SamVisionAttention(cfg, window_size=4)
    table = torch.randn(rows, 16)
    assert torch.allclose(rel_pos_table(table, q, k), attn.get_rel_pos(q, k, table))


def test_gradients_match() -> None:
    cfg = small_config(3)
    ref = make_encoder(cfg)
    fast = make_encoder(cfg)
    enable_fast_sam(fast)
    x = images(batch=1)
    for enc in (ref, fast):
        enc.train()
        enc(x).last_hidden_state.square().mean().backward()
    for (name, p_ref), (_, p_fast) in zip(ref.named_parameters(), fast.named_parameters()):
        assert p_ref.grad is not None and p_fast.grad is not None, name
        scale = p_ref.grad.abs().max().item() + 1e-12
        assert (p_ref.grad - p_fast.grad).abs().max().item() / scale < 1e-3, name


def test_lora_wrapped_qkv_and_state_dict_names() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    cfg = small_config(3)
    enc = make_encoder(cfg)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*attn\.(qkv|proj)|.*mlp\.lin1", lora_dropout=0.0)
    inject_adapter_in_model(lora, enc)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a non-zero adapter, so LoRA changes the output
    names = list(enc.state_dict())
    x = images()
    with torch.no_grad():
        ref = enc(x).last_hidden_state
        assert enable_fast_sam(enc) == 3
        out = enc(x).last_hidden_state
    assert list(enc.state_dict()) == names
    assert (out - ref).abs().max().item() < TOL
    assert disable_fast_sam(enc) == 3
    assert not any(isinstance(m, FastSamVisionAttention) for m in enc.modules())


def test_rsrefseg_tiny(tiny_model: Any) -> None:
    model = tiny_model
    x = tiny_images(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SamVisionAttention):
                module.rel_pos_h.normal_()
                module.rel_pos_w.normal_()
        ref = model.encode_image(x).sam
        assert enable_fast_sam(model) == len(model.sam.vision_encoder.layers)
        out = model.encode_image(x).sam
    assert (out - ref).abs().max().item() < TOL


def test_fast_linear_matches_and_falls_back() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    ref = torch.nn.Linear(48, 40)
    ref.load_state_dict(lin.state_dict())
    no_bias = torch.nn.Sequential(torch.nn.Linear(48, 8, bias=False))
    assert enable_fast_linear(lin) == 1 and enable_fast_linear(no_bias) == 1
    assert type(lin) is FastLinear and list(lin.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        assert (lin(x) - ref(x)).abs().max().item() < TOL
        assert no_bias(x).shape == (3, 5, 8)
        assert (lin.bfloat16()(x.bfloat16()).float() - ref(x)).abs().max().item() < 0.1
    lin.float()
    out = lin(x.requires_grad_())  # training: F.linear, gradients flow
    out.sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    assert disable_fast_linear(lin) == 1 and type(lin) is torch.nn.Linear


def test_fast_linear_and_fast_sam_together_with_lora() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    enc = make_encoder(small_config(3))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*attn\.qkv", lora_dropout=0.0)
    inject_adapter_in_model(lora, enc)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "lora_B" in name:
                p.normal_()
    names = list(enc.state_dict())
    x = images()
    with torch.no_grad():
        ref = enc(x).last_hidden_state
        enable_fast_sam(enc)
        assert enable_fast_linear(enc) > 0  # base layers of the LoRA qkv included
        out = enc(x).last_hidden_state
    assert list(enc.state_dict()) == names
    assert (out - ref).abs().max().item() < TOL


@pytest.mark.parametrize("budget", [1, 10**9])
def test_bf16_math_path(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """bf16 on the CPU without gradients uses baddbmm + softmax + bmm: close to the fp32 reference."""
    enc = make_encoder(small_config(3))
    x = images()
    with torch.no_grad():
        ref = enc(x).last_hidden_state
        enable_fast_sam(enc)
        enc.bfloat16()
        monkeypatch.setattr(fast_sam, "MATH_BLOCK_BYTES", budget)
        out = enc(x.bfloat16()).last_hidden_state.float()
        enc.float()
        hf = enc(x).last_hidden_state  # still the fast path, fp32: the SDPA kernel
    assert (hf - ref).abs().max().item() < TOL
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()
