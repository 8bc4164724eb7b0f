"""Segmentation losses: weighted BCE (paper: 5 x BCE) plus an optional soft Dice term."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def match_size(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bilinearly upsample (or downsample) ``B x 1 x h x w`` logits to the ``B x 1 x H x W`` label size."""
    if logits.shape[-2:] == target.shape[-2:]:
        return logits
    return F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel binary cross-entropy; ``logits`` and ``target`` are ``B x 1 x H x W``."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 - (2|p t| + s) / (|p| + |t| + s)`` per sample, averaged over the batch.

    ``logits``/``target``: ``B x 1 x H x W``; the smoothing term keeps empty targets well defined.
    """
    prob = torch.sigmoid(logits.float()).flatten(1)  # B x 1 x H x W -> B x HW
    tgt = target.float().flatten(1)  # B x 1 x H x W -> B x HW
    inter = (prob * tgt).sum(dim=1)
    denom = prob.sum(dim=1) + tgt.sum(dim=1)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def activation_loss(global_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice between the global text-activation logits and the target on the CLIP patch grid.

    A patch counts as positive when any pixel of the target falls in it (max pooling), so small
    objects still mark their patch; the Dice term keeps the map from settling on "all negative".

    Args:
        global_logits: ``B x 1 x h x w`` (``RSRefSegOutput.global_activation``).
        target: ``B x 1 x H x W`` labels in {0, 1}.
    """
    grid = F.adaptive_max_pool2d(target.float(), global_logits.shape[-2:])  # B x 1 x H x W -> B x 1 x h x w
    return F.binary_cross_entropy_with_logits(global_logits.float(), grid) + dice_loss(global_logits, grid)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    bce_weight: float = 5.0,
    dice_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``bce_weight * BCE + dice_weight * Dice`` after resizing ``logits`` to the label size.

    Args:
        logits: ``B x 1 x h x w`` mask logits.
        target: ``B x 1 x H x W`` labels in {0, 1}.

    Returns:
        The scalar loss and its detached parts ``{"bce": ..., "dice": ...}`` (unweighted).
    """
    logits = match_size(logits, target)
    parts: dict[str, float] = {}
    total = logits.new_zeros((), dtype=torch.float32)
    if bce_weight > 0:
        bce = bce_loss(logits, target)
        total = total + bce_weight * bce
        parts["bce"] = float(bce.detach())
    if dice_weight > 0:
        dice = dice_loss(logits, target)
        total = total + dice_weight * dice
        parts["dice"] = float(dice.detach())
    return total, parts
