"""The fast SAM mask decoder equals the Hugging Face module (fp32, relative 1e-4) and falls back
to it wherever its fast path does not apply."""

from __future__ import annotations

import pytest
import torch
from transformers import SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import SamMaskDecoder

from rsrefseg.modeling import fast_decoder
from rsrefseg.modeling.fast_decoder import FastSamMaskDecoder, disable_fast_decoder, enable_fast_decoder
from rsrefseg.modeling.fast_linear import LINEAR_KERNEL_ENV

TOL = 1e-4


def make_decoder(seed: int = 0, layers: int = 2) -> SamMaskDecoder:
    cfg = SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, mlp_dim=64,
                               iou_head_hidden_dim=32)
    torch.manual_seed(seed)
    dec = SamMaskDecoder(cfg).eval()
    with torch.no_grad():
        for p in dec.parameters():  # the default init leaves biases at 0 and logits ~1e-3
            p.normal_(std=0.3)
    return dec


def inputs(b: int = 3, grid: int = 8, tokens: int | None = 5, seed: int = 1) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 32, grid, grid, generator=gen)
    pe = torch.randn(1, 32, grid, grid, generator=gen)
    return {
        "image_embeddings": image.expand(b, -1, -1, -1),  # one image, b expressions (as RSRefSeg.decode)
        "image_positional_embeddings": pe.expand(b, -1, -1, -1),
        "sparse_prompt_embeddings": None if tokens is None else torch.randn(b, 1, tokens, 32, generator=gen),
        "dense_prompt_embeddings": torch.randn(b, 32, grid, grid, generator=gen),
    }


def _close(fast: torch.Tensor, ref: torch.Tensor) -> None:
    assert fast.shape == ref.shape
    scale = float(ref.abs().max())
    assert scale > 1e-2, "the test needs non-trivial outputs"
    assert float((fast - ref).abs().max()) <= TOL * scale


@pytest.mark.parametrize("kernel", ["auto", "blas", "onednn"])
@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("tokens", [5, None])
@pytest.mark.parametrize("layers", [1, 2])
def test_matches_reference(multimask: bool, tokens: int | None, layers: int, kernel: str,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LINEAR_KERNEL_ENV, kernel)  # the fused upscaling GELU (oneDNN) and the in-place one (BLAS)
    dec = make_decoder(layers=layers)
    args = inputs(tokens=tokens)
    with torch.no_grad():
        ref_masks, ref_iou = dec(**args, multimask_output=multimask)
        assert enable_fast_decoder(dec) == 1 and type(dec) is FastSamMaskDecoder
        masks, iou = dec(**args, multimask_output=multimask)
    _close(masks, ref_masks)
    _close(iou, ref_iou)
    assert masks.shape[2] == (3 if multimask else 1)


def test_positional_terms_are_cached_and_follow_parameter_and_encoding_changes() -> None:
    dec = make_decoder()
    enable_fast_decoder(dec)
    args = inputs()
    calls = []
    original = torch.addmm

    def counting(*a: object, **k: object) -> torch.Tensor:
        calls.append(1)
        return original(*a, **k)  # type: ignore[arg-type]

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast_decoder.torch, "addmm", counting)
        dec(**args, multimask_output=False)
        first = len(calls)
        dec(**args, multimask_output=False)
        assert len(calls) == first  # same encoding and parameters: cached
        # an in-place parameter update (an optimizer step) invalidates the cache
        dec.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.add_(0.5)
        masks, _ = dec(**args, multimask_output=False)
        assert len(calls) == 2 * first
        # another positional encoding too
        other = dict(args, image_positional_embeddings=torch.randn(1, 32, 8, 8).expand(3, -1, -1, -1))
        masks_other, _ = dec(**other, multimask_output=False)
        assert len(calls) == 3 * first
    disable_fast_decoder(dec)
    with torch.no_grad():
        _close(masks, dec(**args, multimask_output=False)[0])
        _close(masks_other, dec(**other, multimask_output=False)[0])


def test_parameters_made_under_inference_mode_are_not_cached() -> None:
    """Inference tensors have no version counter: the terms are computed on every call, and an
    in-place change of such a parameter is seen."""
    with torch.inference_mode():
        dec = make_decoder()
        copy = make_decoder()
        enable_fast_decoder(dec)
        args = inputs()
        first, _ = dec(**args, multimask_output=False)
        assert fast_decoder._CACHE not in dec.__dict__
        for module in (dec, copy):
            module.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.add_(0.5)
        changed, _ = dec(**args, multimask_output=False)
        ref, _ = copy(**args, multimask_output=False)
    assert not torch.allclose(first, changed)
    _close(changed, ref)


def test_gradients_and_prompt_batches_use_the_reference_forward() -> None:
    dec = make_decoder()
    args = inputs()
    ref, _ = dec(**args, multimask_output=False)
    ref.sum().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in dec.parameters()]
    dec.zero_grad()
    enable_fast_decoder(dec)
    out, _ = dec(**args, multimask_output=False)  # training: the reference forward, same graph
    out.sum().backward()
    assert torch.equal(out, ref)
    assert any(g is not None for g in grads)
    assert all((p.grad is None and g is None) or torch.equal(p.grad, g) for p, g in zip(dec.parameters(), grads))
    # two prompt sets per image (SAM's point batch) are left to the reference
    two = dict(args, sparse_prompt_embeddings=torch.randn(3, 2, 5, 32))
    with torch.no_grad():
        fast = dec(**two, multimask_output=False)[0]
        disable_fast_decoder(dec)
        assert torch.equal(fast, dec(**two, multimask_output=False)[0])


def test_disable_restores_the_class() -> None:
    dec = make_decoder()
    enable_fast_decoder(dec)
    with torch.no_grad():
        dec(**inputs(), multimask_output=False)
    assert disable_fast_decoder(dec) == 1
    assert type(dec) is SamMaskDecoder and not any(k.startswith("_rsrefseg") for k in dec.__dict__)


def test_rsrefseg_decode_with_the_fast_decoder(sharp_tiny_model: torch.nn.Module) -> None:
    model = sharp_tiny_model
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    texts = ["the red square", "the circle on the right", "everything"]
    index = torch.tensor([0, 1, 1])
    with torch.no_grad():
        ref = model(images, texts, image_index=index)
        assert enable_fast_decoder(model) == 1
        fast = model(images, texts, image_index=index)
    _close(fast.mask_logits, ref.mask_logits)
    torch.testing.assert_close(fast.iou_scores, ref.iou_scores, rtol=TOL, atol=1e-7)  # ~1e-3 here
