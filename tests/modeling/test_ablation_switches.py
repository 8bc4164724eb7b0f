"""The paper's ablation switches: activation branches, prompt structure, where LoRA goes.

Each switch is checked for what it claims (which inputs reach SAM, which parameters train), and the
defaults for being today's model: a config.json without the new keys loads and gives the same masks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import tiny_images

from rsrefseg import RSRefSeg
from rsrefseg.config import RSRefSegConfig
from rsrefseg.errors import ConfigError
from rsrefseg.modeling.prompter import Prompter

#: The tiny preset at 64 px (fast; same classes).
MICRO: dict[str, Any] = {
    "sam_image_size": 64,
    "clip_image_size": 64,
    "arch_overrides": {"sam": {"vision_config": {"image_size": 64, "window_size": 4}},
                       "clip": {"vision_config": {"image_size": 64}}},
}
NEW_FIELDS = ("use_sparse_prompt", "use_global_activation", "use_local_activation")
TEXTS = ["the red square on the left", "all the blue circles"]


def _micro(**overrides: Any) -> RSRefSeg:
    return RSRefSeg.from_preset("tiny", **MICRO, **overrides)


def _prompter_inputs(model: RSRefSeg, texts: list[str]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The prompter's input maps (after branch selection) and the sparse prompt handed to SAM."""
    seen: dict[str, Any] = {}
    hooks = [
        model.prompter.input_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0].detach())),
        model.sam.mask_decoder.register_forward_hook(
            lambda m, a, kw, o: seen.__setitem__("sparse", kw["sparse_prompt_embeddings"]), with_kwargs=True
        ),
    ]
    try:
        with torch.no_grad():
            model(tiny_images(len(texts), size=64, seed=3), texts)
    finally:
        for h in hooks:
            h.remove()
    return seen.get("x"), seen["sparse"]  # type: ignore[return-value]


def test_defaults_are_the_paper_model() -> None:
    config = RSRefSegConfig()
    assert all(getattr(config, name) is True for name in NEW_FIELDS) and config.use_dense_prompt
    assert config.prompter_branches() == ("local", "global", "visual")
    assert Prompter(8, 16).branches == ("local", "global", "visual")


def test_both_prompts_off_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="use_sparse_prompt and use_dense_prompt"):
        RSRefSegConfig(use_sparse_prompt=False, use_dense_prompt=False).validate()
    with pytest.raises(ConfigError, match="unknown model config key"):
        RSRefSegConfig.from_dict({"use_sparse_prompts": False})
    with pytest.raises(ValueError, match="branches"):
        Prompter(8, 16, branches=("global", "global"))
    with pytest.raises(ValueError, match="branches"):
        Prompter(8, 16, branches=())


@pytest.mark.parametrize(
    ("overrides", "branches"),
    [
        ({}, ("local", "global", "visual")),
        ({"use_global_activation": False}, ("local", "visual")),
        ({"use_local_activation": False}, ("global", "visual")),
        ({"use_global_activation": False, "use_local_activation": False}, ("visual",)),
    ],
)
def test_activation_branches_reach_the_prompter(overrides: dict[str, bool], branches: tuple[str, ...]) -> None:
    model = _micro(**overrides)
    d = model.clip.embed_dim
    assert model.prompter.branches == branches
    assert model.prompter.input_proj[0].in_channels == len(branches) * d
    x, sparse = _prompter_inputs(model, TEXTS)
    assert x.shape[1] == len(branches) * d and sparse is not None
    # Recompute the three maps and check that exactly the chosen ones, in order, were concatenated.
    with torch.no_grad():
        feats = model.encode_image(tiny_images(2, size=64, seed=3))
        text = model.encode_text(TEXTS)
        scale, bias = model.clip.scale_and_bias()
        act = model.activation(feats.clip, text.tokens, text.mask, text.pooled, scale, bias)
    maps = {"local": act.local, "global": act.global_, "visual": act.visual}
    expected = torch.cat([maps[b] for b in branches], dim=1)
    assert torch.allclose(x, expected, atol=1e-6)
    if branches == ("visual",):  # plain visual features: the sparse prompts no longer read the text
        x_other, sparse_other = _prompter_inputs(model, ["the harbor", "a tennis court at the top"])
        assert torch.equal(x, x_other) and torch.equal(sparse, sparse_other)
    else:
        x_other, _ = _prompter_inputs(model, ["the harbor", "a tennis court at the top"])
        assert not torch.allclose(x, x_other)


def test_dense_only_gives_sam_no_sparse_tokens_and_freezes_the_prompter() -> None:
    model = _micro(use_sparse_prompt=False)
    x, sparse = _prompter_inputs(model, TEXTS)
    assert x is None and sparse is None  # prompter never called; SAM sees its output tokens only
    assert not any(p.requires_grad for p in model.prompter.parameters())
    assert not any(k.startswith("prompter.") for k in model.trainable_state_dict())
    full = _micro(use_sparse_prompt=False, finetune="full")  # also in "full" mode: unused, so frozen
    assert not any(p.requires_grad for p in full.prompter.parameters())
    # The expression still decides the mask, through the dense prompt.
    with torch.no_grad():
        a = model(tiny_images(1, size=64, seed=3), TEXTS[:1]).low_res_logits
        b = model(tiny_images(1, size=64, seed=3), TEXTS[1:]).low_res_logits
    assert not torch.allclose(a, b)
    # One training step: loss is finite and the mask decoder gets gradients.
    model.train()
    out = model(tiny_images(2, size=64, seed=4), TEXTS)
    out.mask_logits.sigmoid().mean().backward()
    assert model.sam.mask_decoder.iou_token.weight.grad is not None


def test_sparse_only_uses_no_mask_embedding() -> None:
    model = _micro(use_dense_prompt=False)
    seen: dict[str, torch.Tensor] = {}
    hook = model.sam.mask_decoder.register_forward_hook(
        lambda m, a, kw, o: seen.__setitem__("dense", kw["dense_prompt_embeddings"]), with_kwargs=True
    )
    with torch.no_grad():
        model(tiny_images(2, size=64), TEXTS)
    hook.remove()
    no_mask = model.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    assert torch.equal(seen["dense"], no_mask.expand_as(seen["dense"]))


def _lora_towers(model: RSRefSeg) -> set[str]:
    towers = set()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad, name
            towers.add("sam" if name.startswith("sam.vision_encoder.") else
                       "vision" if ".vision_model." in name else "text" if ".text_model." in name else name)
    return towers


@pytest.mark.parametrize(
    ("flags", "towers"),
    [
        ({}, {"sam", "vision", "text"}),
        ({"lora_vision": False, "lora_text": False}, {"sam"}),
        ({"lora_sam": False}, {"vision", "text"}),
        ({"lora_sam": False, "lora_vision": False, "lora_text": False}, set()),
    ],
)
def test_lora_placement(flags: dict[str, bool], towers: set[str]) -> None:
    model = _micro(**flags)
    assert _lora_towers(model) == towers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # Encoders train only through LoRA; the head always trains.
    encoders = ("sam.vision_encoder.", "clip.model.")
    assert all(".lora_" in n for n in trainable if n.startswith(encoders))
    assert any(n.startswith("prompter.") for n in trainable)
    assert any(n.startswith("sam.mask_decoder.") for n in trainable)


def test_old_config_json_loads_unchanged(tmp_path: Path) -> None:
    """A checkpoint whose config.json predates the switches loads as the paper model, same masks."""
    model = _micro()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    payload = json.loads(config_path.read_text())
    assert all(payload["model"][name] is True for name in NEW_FIELDS)  # saved in config.json
    for name in NEW_FIELDS:
        del payload["model"][name]
    config_path.write_text(json.dumps(payload))
    loaded = RSRefSeg.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.prompter_branches() == ("local", "global", "visual") and loaded.config.use_sparse_prompt
    images = tiny_images(2, size=64, seed=5)
    with torch.no_grad():
        a, b = model.eval()(images, TEXTS).mask_logits, loaded.eval()(images, TEXTS).mask_logits
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("overrides", [{"use_sparse_prompt": False},
                                       {"use_global_activation": False, "use_local_activation": False}])
def test_ablated_checkpoint_round_trip(overrides: dict[str, bool], tmp_path: Path) -> None:
    model = _micro(**overrides)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = RSRefSeg.from_pretrained(tmp_path / "ckpt")
    for key, value in overrides.items():
        assert getattr(loaded.config, key) is value
    images = tiny_images(1, size=64, seed=6)
    with torch.no_grad():
        assert torch.allclose(model.eval()(images, TEXTS[:1]).mask_logits,
                              loaded.eval()(images, TEXTS[:1]).mask_logits, atol=1e-5)
