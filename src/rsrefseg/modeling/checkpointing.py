"""Gradient (activation) checkpointing of the heavy encoders, through transformers' own support.

The SAM image encoder (``SamVisionEncoder``) and the CLIP/SigLIP towers hold almost all of the
activations a training step keeps for the backward pass. Their layers are transformers
``GradientCheckpointingLayer`` s; :func:`enable_gradient_checkpointing` switches them to recompute
their forward during the backward pass (``torch.utils.checkpoint`` with ``use_reentrant=False``),
so only each layer's input is kept. The non-reentrant variant gives LoRA adapters and other
parameters inside a layer their gradients even when the layer's input needs none (pixels, token
embeddings of a frozen tower): no ``enable_input_require_grads`` is needed. RNG states are replayed
on recomputation, so dropout (LoRA dropout) draws the same masks; the gradients equal those of a
run without checkpointing (tested). It trades memory for one more forward of each encoder.

The light head (activation, prompter, SAM prompt encoder and mask decoder) is not checkpointed.
Layers swapped to the fast inference classes (:mod:`rsrefseg.modeling.fast_sam`) keep the setting.
"""

from __future__ import annotations

from torch import nn

#: Keyword arguments of ``torch.utils.checkpoint.checkpoint`` used for every layer.
CHECKPOINT_KWARGS = {"use_reentrant": False}


def _encoders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the SAM image encoders and CLIP/SigLIP models inside ``model``."""
    from transformers import CLIPModel, SiglipModel
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, (SamVisionEncoder, CLIPModel, SiglipModel)):
            if not any(name.startswith(outer + ".") for outer, _ in found):
                found.append((name, module))
    return found


def enable_gradient_checkpointing(model: nn.Module) -> list[str]:
    """Checkpoint every transformer layer of the SAM image encoder and both CLIP/SigLIP towers.

    Works on an ``RSRefSeg`` (or any module holding those Hugging Face models), LoRA-injected or
    not, in place. Returns the names of the encoders switched (empty when there is none).
    """
    names = []
    for name, module in _encoders(model):
        enable = getattr(module, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.x
            enable(activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
        else:  # pragma: no cover - older transformers
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))  # type: ignore[operator]
        # transformers also hooks the text embeddings to require grad (needed by the reentrant variant
        # only); without that hook a frozen tower is not back-propagated through for nothing.
        drop_hook = getattr(module, "disable_input_require_grads", None)
        if drop_hook is not None:
            drop_hook()
        names.append(name)
    return names


def disable_gradient_checkpointing(model: nn.Module) -> list[str]:
    """Undo :func:`enable_gradient_checkpointing`; returns the names of the encoders switched back."""
    names = []
    for name, module in _encoders(model):
        disable = getattr(module, "activation_checkpointing_disable", None) or module.gradient_checkpointing_disable
        disable()  # type: ignore[operator]
        names.append(name)
    return names


def checkpointed_layers(model: nn.Module) -> int:
    """Number of transformer layers in ``model`` that recompute their forward in the backward pass."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing)
