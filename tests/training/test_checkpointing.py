"""Gradient checkpointing of the SAM image encoder and both CLIP/SigLIP towers: same loss and
gradients (LoRA included, inputs without gradients, LoRA dropout replayed), layers recomputed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import MICRO_OVERRIDES, grad_mismatch, micro_config, nontrivial_weights

from rsrefseg.modeling.checkpointing import (
    checkpointed_layers,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
)
from rsrefseg.training.train import LossModule

TEXTS = ["the red square", "the circle on the right", "the largest blue thing"]


def _step(loss_module: LossModule, images: torch.Tensor, masks: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss_module.model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same LoRA dropout masks in both runs
    loss = loss_module(images, TEXTS, masks)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in loss_module.model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_checkpointing_gives_the_same_gradients_and_recomputes_the_encoders(finetune: str) -> None:
    from rsrefseg import RSRefSeg

    model = nontrivial_weights(RSRefSeg.from_preset("tiny", finetune=finetune, lora_dropout=0.1,
                                                    **MICRO_OVERRIDES)).train()
    loss_module = LossModule(model, bce_weight=5.0, dice_weight=1.0, activation_weight=2.0)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255  # no grad needed
    masks = (torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(2)) > 0.8).float()
    ref_loss, ref = _step(loss_module, images, masks)

    names = enable_gradient_checkpointing(model)
    assert names == ["clip.model", "sam.vision_encoder"]
    encoder_layers = [model.sam.vision_encoder.layers, model.clip.model.vision_model.encoder.layers,
                      model.clip.model.text_model.encoder.layers]
    assert checkpointed_layers(model) == sum(len(layers) for layers in encoder_layers)
    calls: list[str] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_, k=f"{i}.{j}": calls.append(k))  # inside the layer
             for i, layers in enumerate(encoder_layers) for j, layer in enumerate(layers)]
    loss, got = _step(loss_module, images, masks)
    for hook in hooks:
        hook.remove()
    # every encoder layer ran twice: the forward, and its recomputation in the backward pass (a pre-hook:
    # the recomputation stops as soon as it has every saved tensor, before post-forward hooks)
    assert sorted(calls) == sorted(2 * [f"{i}.{j}" for i, ls in enumerate(encoder_layers) for j in range(len(ls))])
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    assert got.keys() == ref.keys()
    lora_a = [n for n in ref if "lora_A" in n and n.startswith("sam.vision_encoder")]
    assert (finetune == "full") or (lora_a and all(float(ref[n].abs().max()) > 0 for n in lora_a))
    worst, where = grad_mismatch(got, ref)
    assert worst <= 1e-5, f"gradient of {where} differs by {worst:.2e} (relative)"

    assert disable_gradient_checkpointing(model) == names and checkpointed_layers(model) == 0


def test_train_config_switch_enables_checkpointing(synthetic: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from rsrefseg.training import train as train_module
    from rsrefseg.training.train_config import config_from_dict

    seen: list[int] = []
    cfg = micro_config(synthetic, tmp_path / "run", gradient_checkpointing=True, max_steps=1, report_overlays=0)
    cfg["data"]["max_val_samples"] = 2
    result = train_module.train(config_from_dict(cfg), step_callback=lambda s, net: seen.append(checkpointed_layers(net)))
    assert seen == [6] and result.state.global_step == 1  # tiny: 2 SAM + 2 vision + 2 text layers
