"""oneDNN linears with fused GELU in the SigLIP/CLIP MLPs: equal to the plain modules, autograd falls back."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel
from transformers.activations import ACT2FN

from rsrefseg.modeling.fast_linear import (
    LINEAR_KERNEL_ENV,
    SMALL_K,
    FastLinear,
    cpu_flags,
    disable_fast_linear,
    enable_fast_linear,
    fp32_linear_kernel,
    fused_mlp,
    gelu_algorithm,
    onednn_linear_supported,
    onednn_ok,
)

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
needs_onednn = pytest.mark.skipif(not onednn_linear_supported(torch.float32), reason="no oneDNN fp32 linear")


def test_gelu_algorithms() -> None:
    assert gelu_algorithm(ACT2FN["gelu"]) == "none"
    assert gelu_algorithm(ACT2FN["gelu_pytorch_tanh"]) == "tanh"
    assert gelu_algorithm(nn.GELU(approximate="tanh")) == "tanh" and gelu_algorithm(nn.GELU()) == "none"
    assert gelu_algorithm(ACT2FN["quick_gelu"]) is None
    assert gelu_algorithm(ACT2FN["gelu_python_tanh"]) is None  # a Python formula, not F.gelu
    assert gelu_algorithm(functools.partial(F.gelu, approximate="tanh")) is None  # a bare function, no .act


def test_fp32_kernel_rule_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = cpu_flags()
    monkeypatch.delenv(LINEAR_KERNEL_ENV, raising=False)
    avx2_only = "avx2" in flags and "avx512f" not in flags
    expected = "blas" if avx2_only else "onednn"
    assert fp32_linear_kernel() == expected == fp32_linear_kernel(SMALL_K + 1)
    assert fp32_linear_kernel(SMALL_K) == "onednn"  # narrow linears (the mask decoder): oneDNN everywhere
    x, w = torch.ones(2, SMALL_K + 8), torch.ones(4, SMALL_K + 8)
    narrow_x, narrow_w = torch.ones(2, 8), torch.ones(4, 8)
    for kernel in ("onednn", "blas", "auto"):
        monkeypatch.setenv(LINEAR_KERNEL_ENV, kernel)
        chosen = expected if kernel == "auto" else kernel
        assert fp32_linear_kernel() == chosen
        with torch.no_grad():
            assert onednn_ok(x, w) == (chosen == "onednn" and onednn_linear_supported(torch.float32))
            narrow = "onednn" if kernel == "auto" else kernel
            assert onednn_ok(narrow_x, narrow_w) == (narrow == "onednn" and onednn_linear_supported(torch.float32))
    monkeypatch.setenv(LINEAR_KERNEL_ENV, "nonsense")  # unknown values: the rule
    assert fp32_linear_kernel() == expected


@pytest.mark.parametrize("kernel", ["onednn", "blas"])
def test_fast_linear_equals_plain_with_either_kernel(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LINEAR_KERNEL_ENV, kernel)
    torch.manual_seed(0)
    plain = nn.Linear(48, 40)
    fast = nn.Linear(48, 40)
    fast.load_state_dict(plain.state_dict())
    enable_fast_linear(fast)
    x = torch.randn(5, 48)
    calls: list[int] = []
    original = torch.ops.mkldnn._linear_pointwise
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or original(*a))
        out = fast(x)
    torch.testing.assert_close(out, plain(x).detach(), rtol=1e-5, atol=1e-6)
    assert bool(calls) == (kernel == "onednn" and onednn_linear_supported(torch.float32))


@needs_onednn
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_fused_mlp_equals_plain(act: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LINEAR_KERNEL_ENV, "onednn")
    torch.manual_seed(0)
    lin1, lin2, fn = nn.Linear(48, 96), nn.Linear(96, 40), ACT2FN[act]
    x = torch.randn(3, 17, 48) * 3  # the GELU's curved part and both tails
    with torch.no_grad():
        ref = lin2(fn(lin1(x)))
        out = fused_mlp(lin1, fn, lin2, x)
    assert out is not None and out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    assert fused_mlp(lin1, ACT2FN["quick_gelu"], lin2, x) is None  # not a GELU oneDNN fuses
    assert fused_mlp(lin1, fn, lin2, x.requires_grad_()) is None  # autograd: the module's own forward
    monkeypatch.setenv(LINEAR_KERNEL_ENV, "blas")  # BLAS linears: the GELU in place, the same bits as the module
    with torch.no_grad():
        blas = fused_mlp(lin1, fn, lin2, x.detach())
    assert blas is not None and torch.equal(blas, ref)
    with torch.enable_grad():
        assert fused_mlp(lin1, fn, lin2, x.detach().requires_grad_()) is None  # autograd: the module's forward


def _models() -> list[nn.Module]:
    torch.manual_seed(0)
    vision = dict(SMALL, image_size=32, patch_size=8)
    return [SiglipModel(SiglipConfig(text_config=SMALL, vision_config=vision)).eval(),
            CLIPModel(CLIPConfig(text_config={**SMALL, "hidden_act": "gelu"}, vision_config=vision,
                                 projection_dim=16)).eval()]


@pytest.mark.parametrize("model", _models(), ids=["siglip", "clip"])
def test_enable_fast_linear_keeps_outputs_names_and_gradients(model: nn.Module) -> None:
    ids = torch.randint(0, 99, (2, 7))
    pixels = torch.randn(2, 3, 32, 32)
    names = list(model.state_dict())
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels)
    mlp = next(m for n, m in model.named_modules() if n.endswith("mlp"))
    original = type(mlp)
    assert enable_fast_linear(model) > 0
    assert type(mlp).__name__ == "Fast" + original.__name__ and isinstance(mlp, original)
    assert list(model.state_dict()) == names
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    for key in ("image_embeds", "text_embeds"):
        a, b = getattr(out, key), getattr(ref, key)
        assert (a - b).abs().max().item() < 1e-5 * b.abs().max().item(), key
    # training's forward: the same modules, autograd through F.linear and the module's MLP
    pixels.requires_grad_()
    model(input_ids=ids, pixel_values=pixels).image_embeds.square().sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    pixels.grad = None
    assert disable_fast_linear(model) > 0
    assert type(mlp) is original and not any(isinstance(m, FastLinear) for m in model.modules())
    model(input_ids=ids, pixel_values=pixels).image_embeds.square().sum().backward()
    assert fast_grads and all(torch.equal(fast_grads[n], p.grad) for n, p in model.named_parameters() if n in fast_grads)
