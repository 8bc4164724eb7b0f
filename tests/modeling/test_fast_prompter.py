"""The prompter projecting each image once equals the reference prompter (fp32, relative 1e-5)."""

from __future__ import annotations

import pytest
import torch
from transformers import SamVisionConfig
from transformers.models.sam.modeling_sam import SamPositionalEmbedding

from rsrefseg.modeling.activation import TextActivation
from rsrefseg.modeling.fast_prompter import FastPrompter, disable_fast_prompter, enable_fast_prompter
from rsrefseg.modeling.prompter import BRANCHES, Prompter

TOL = 1e-5


def _case(branches: tuple[str, ...], index: list[int] | None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d, b = 12, 2
    prompter = Prompter(d, 16, down_spatial_times=1, branches=branches).eval()
    pe = SamPositionalEmbedding(SamVisionConfig(num_pos_feats=8))
    images = torch.randn(b, d, 9, 9, generator=gen)
    t = len(index) if index is not None else b
    visual = images[torch.tensor(index)] if index is not None else images
    tokens, pooled = torch.randn(t, 5, d, generator=gen), torch.randn(t, d, generator=gen)
    mask = torch.ones(t, 5, dtype=torch.bool)
    mask[0, 3:] = False
    act = TextActivation()(visual, tokens, mask, pooled, torch.tensor(10.0), torch.tensor(-2.0))
    return prompter, pe, images, act


@pytest.mark.parametrize("branches", [BRANCHES, ("local", "visual"), ("global", "visual"), ("visual",)])
@pytest.mark.parametrize("index", [[0, 1, 1, 0, 1], None])
def test_matches_the_reference_prompter(branches: tuple[str, ...], index: list[int] | None) -> None:
    prompter, pe, images, act = _case(branches, index)
    idx = torch.tensor(index) if index is not None else None
    with torch.no_grad():
        ref = prompter.prompt_tokens(act, pe, images, idx)
        assert enable_fast_prompter(prompter) == 1 and type(prompter) is FastPrompter
        fast = prompter.prompt_tokens(act, pe, images, idx)
    assert fast.shape == ref.shape == (act.visual.shape[0], 25, 16)
    assert float(ref.abs().max()) > 0.1
    assert float((fast - ref).abs().max()) <= TOL * float(ref.abs().max())
    # the maps really differ per expression: the fast path did not drop the activation
    if branches != ("visual",) and index is not None:
        assert not torch.allclose(fast[0], fast[3])  # same image, other expression


def test_gradients_use_the_reference_path_and_disable_restores() -> None:
    prompter, pe, images, act = _case(BRANCHES, [0, 1, 1])
    enable_fast_prompter(prompter)
    out = prompter.prompt_tokens(act, pe, images, torch.tensor([0, 1, 1]))
    out.sum().backward()  # the reference forward with its graph
    assert prompter.input_proj[0].weight.grad is not None
    assert disable_fast_prompter(prompter) == 1 and type(prompter) is Prompter


def test_rsrefseg_with_fast_prompter(sharp_tiny_model: torch.nn.Module) -> None:
    model = sharp_tiny_model
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    texts = ["the red square", "the circle on the right", "everything"]
    index = torch.tensor([1, 0, 1])
    with torch.no_grad():
        ref = model(images, texts, image_index=index).mask_logits
        assert enable_fast_prompter(model) == 1
        fast = model(images, texts, image_index=index).mask_logits
    assert float(ref.abs().max()) > 1e-2
    assert float((fast - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
