"""The model itself: shapes, what trains, batch-composition invariance, LoRA merging."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_images

from rsrefseg import RSRefSeg
from rsrefseg.modeling.prompter import Prompter


def test_output_shapes(tiny_model: RSRefSeg) -> None:
    with torch.no_grad():
        out = tiny_model(tiny_images(2), ["the storage tank on the far left", "all the ships"])
    s, m, g = tiny_model.image_size, tiny_model.mask_input_size, tiny_model.clip.grid
    assert out.mask_logits.shape == (2, 1, s, s)
    assert out.low_res_logits.shape == (2, 1, m, m)
    assert out.iou_scores.shape == (2, 1)
    assert out.global_activation.shape == (2, 1, g, g)
    assert out.local_activation.shape == (2, 1, g, g)
    assert torch.isfinite(out.mask_logits).all()


def test_sparse_token_count_matches_paper() -> None:
    # SigLIP so400m at 384: 27 x 27 patches; two stride-2 downsamplings -> 7 x 7 = 49 tokens.
    assert Prompter.num_tokens(27, 2) == 49
    p = Prompter(in_channels=8, prompt_dim=16, down_spatial_times=2)
    from transformers import SamVisionConfig
    from transformers.models.sam.modeling_sam import SamPositionalEmbedding

    pe = SamPositionalEmbedding(SamVisionConfig(num_pos_feats=8))
    x = torch.randn(1, 8, 27, 27)
    assert p(x, x, x, pe).shape == (1, 49, 16)


def _intended_trainable(name: str) -> bool:
    return ".lora_" in name or name.startswith(
        ("prompter.", "sam.prompt_encoder.", "sam.mask_decoder.", "clip.logit_bias")
    )


def test_one_step_changes_exactly_the_intended_parameters(tiny_model: RSRefSeg) -> None:
    model = tiny_model
    model.train()
    # LoRA B matrices start at zero, so A gets no gradient in the first step; start B non-zero.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if _intended_trainable(n)}
    assert any(".lora_" in n and n.startswith("sam.vision_encoder") for n in trainable)
    assert any(".lora_" in n and "vision_model" in n for n in trainable)
    assert any(".lora_" in n and "text_model" in n for n in trainable)
    assert any("text_model.head.lora_" in n for n in trainable)
    assert any("neck.conv2.lora_" in n for n in trainable)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(tiny_images(2), ["the ship closest to the top", "the largest airplane"])
    target = torch.zeros_like(out.mask_logits)
    target[..., 64:128, 64:128] = 1
    loss = 5 * torch.nn.functional.binary_cross_entropy_with_logits(out.mask_logits, target)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    has_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    frozen = set(before) - trainable
    assert not (changed & frozen), f"frozen parameters changed: {sorted(changed & frozen)[:5]}"
    for n in frozen:
        assert after[n].grad is None
        assert torch.equal(before[n], after[n].detach())  # bitwise unchanged
    # Gradients reach only trainable parameters; all with a non-zero gradient change. (Zero-gradient
    # ones, e.g. SAM's unused multimask heads, still move by AdamW's decoupled weight decay.)
    assert grads <= has_grad <= trainable
    assert grads <= changed <= has_grad
    assert len(grads) > 0.8 * len(trainable)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| relative to max |ref| (which must be well above float noise for this to bite)."""
    scale = ref.abs().max().item()
    assert scale > 1e-3, f"reference too small for a relative tolerance ({scale})"
    return (got - ref).abs().max().item() / scale


#: Outputs compared by the invariance and merge tests, each relative to its own magnitude.
COMPARED = ("mask_logits", "low_res_logits", "global_activation", "local_activation")


def test_batch_composition_invariance(sharp_tiny_model: RSRefSeg) -> None:
    model = sharp_tiny_model
    images = tiny_images(4, seed=3)
    texts = [
        "the storage tank on the far left",
        "a",
        "all the tennis courts in the upper right part of the image next to the large gray building",
        "the ship",
    ]
    with torch.no_grad():
        alone = model(images[:1], texts[:1])
        batched = model(images, texts)
        shuffled = model(images[[2, 0, 3, 1]], [texts[i] for i in (2, 0, 3, 1)])
    assert alone.mask_logits.abs().max().item() > 0.1  # sharpened: a 2e-5 relative bound is ~1e-5 absolute
    for field in COMPARED:
        ref = getattr(alone, field)[0]
        for got in (getattr(batched, field)[0], getattr(shuffled, field)[1]):
            assert _rel_err(got, ref) <= 2e-5, field


def test_padding_is_fixed_length(tiny_model: RSRefSeg) -> None:
    enc = tiny_model.clip.tokenize(["a", "the ship on the far left of the harbor"])
    assert enc["input_ids"].shape == (2, tiny_model.config.max_text_length)
    assert enc["attention_mask"][0].sum() < enc["attention_mask"][1].sum()


def test_decode_with_image_index_equals_forward(sharp_tiny_model: RSRefSeg) -> None:
    model = sharp_tiny_model
    images = tiny_images(2, seed=5)
    texts = ["the leftmost vehicle", "the bridge", "all the harbors"]
    with torch.no_grad():
        feats = model.encode_image(images)
        out = model.decode(feats, model.encode_text(texts), image_index=torch.tensor([1, 0, 1]))
        ref = model(images[[1, 0, 1]], texts)
    for field in COMPARED:
        assert _rel_err(getattr(out, field), getattr(ref, field)) <= 2e-5, field


def test_merged_lora_equals_unmerged(sharp_tiny_model: RSRefSeg) -> None:
    model = sharp_tiny_model
    images, texts = tiny_images(2, seed=7), ["the largest ship", "the ground track field"]
    with torch.no_grad():
        without = model(images, texts)  # LoRA B is zero-initialised: the adapters do nothing yet
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
        ref = model(images, texts)
        assert model.merge_lora() is model
        assert not any(".lora_" in n for n, _ in model.named_parameters())
        merged = model(images, texts)
    for field in COMPARED:  # the adapters change every output by 100x the tolerance or more...
        assert _rel_err(getattr(without, field), getattr(ref, field)) > 5e-3, field
        assert _rel_err(getattr(merged, field), getattr(ref, field)) <= 5e-5, field  # ...and merging keeps them


def test_dense_prompt_and_downsampling_are_options() -> None:
    model = RSRefSeg.from_preset("tiny", use_dense_prompt=False, down_spatial_times=2)
    with torch.no_grad():
        out = model(tiny_images(1), ["the ship"])
    assert out.mask_logits.shape[-1] == model.image_size


@pytest.mark.parametrize("family", ["clip"])
def test_clip_family_with_learnable_bias(family: str) -> None:
    """A CLIP dual encoder (different tower widths, no logit_bias) works with a learned bias."""
    from transformers import CLIPConfig, CLIPModel

    from rsrefseg.build import load_sam, preset_config
    from rsrefseg.modeling.dual_encoder import DualEncoder
    from rsrefseg.modeling.lora import apply_lora
    from rsrefseg.tokenizer import offline_tokenizer

    cfg = CLIPConfig(
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16},
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 512, "max_position_embeddings": 24, "eos_token_id": 1, "pad_token_id": 1},
        projection_dim=40,
    )
    config = preset_config("tiny", clip_image_size=64)
    dual = DualEncoder(CLIPModel(cfg), offline_tokenizer(max_length=24), 64, 24)
    sam = load_sam(config)
    model = RSRefSeg(config, dual, sam, Prompter(dual.embed_dim, 64, 1))
    apply_lora(model, config)
    assert "clip.logit_bias" in model.trainable_state_dict()
    with torch.no_grad():
        out = model(tiny_images(2), ["the ship", "the largest harbor"])
    assert out.global_activation.shape == (2, 1, 4, 4)
    assert dual.encode_image(tiny_images(1)).shape == (1, 40, 4, 4)
    from rsrefseg.modeling.optimize import optimize_for_inference

    info = optimize_for_inference(model, "bf16", fallback=False)  # CLIP towers and projections bf16, head and bias fp32
    assert "clip.model.visual_projection" in info["cast"] and model.clip.logit_bias.dtype is torch.float32
    with torch.inference_mode():
        low = model(tiny_images(2), ["the ship", "the largest harbor"])
    assert low.mask_logits.dtype is torch.float32 and low.global_activation.dtype is torch.float32
    assert torch.corrcoef(torch.stack([low.global_activation.flatten(), out.global_activation.flatten()]))[0, 1] > 0.9
