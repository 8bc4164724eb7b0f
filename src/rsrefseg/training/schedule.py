"""Per-step learning-rate schedule: linear warm-up from ``start_factor`` then cosine to ``min_factor``.

The paper's schedule (mmengine ``LinearLR`` for 5 epochs from 0.01, then ``CosineAnnealingLR`` to
0.001 x the base rate, both converted to per-iteration updates) expressed as one multiplicative
factor of the optimizer step, used through ``torch.optim.lr_scheduler.LambdaLR`` so its state is a
plain step counter (resumable exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WarmupCosine:
    """``factor(step)`` of the base learning rate.

    Attributes:
        total_steps: optimizer steps of the whole run.
        warmup_steps: steps of the linear warm-up (``factor`` goes ``start_factor -> 1``).
        start_factor: factor at step 0.
        min_factor: factor reached at ``total_steps`` by the cosine.
    """

    total_steps: int
    warmup_steps: int
    start_factor: float = 0.01
    min_factor: float = 0.001

    def __call__(self, step: int) -> float:
        """Factor applied during optimizer step ``step`` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch of ``batches_per_epoch`` micro-batches (a partial group still steps)."""
    return max(1, math.ceil(batches_per_epoch / grad_accum))


def make_schedule(
    epochs: int,
    steps_in_epoch: int,
    warmup_epochs: float,
    warmup_steps: int | None = None,
    start_factor: float = 0.01,
    min_factor: float = 0.001,
) -> WarmupCosine:
    """The schedule of a run; ``warmup_steps`` (if set) overrides ``warmup_epochs``."""
    total = epochs * steps_in_epoch
    warm = warmup_steps if warmup_steps is not None else round(warmup_epochs * steps_in_epoch)
    return WarmupCosine(total, min(max(0, int(warm)), total), start_factor, min_factor)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: WarmupCosine) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``schedule`` (call ``.step()`` after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
