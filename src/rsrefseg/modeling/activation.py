"""Text-guided activation of patch features (the paper's global and local semantic filters)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Activated:
    """The activation maps, and the three branches fed to the prompter (computed when asked for).

    Attributes:
        visual: ``B x D x h x w``, the patch features V themselves.
        global_logits: ``B x 1 x h x w``, scale * cos(V, pooled) + bias (A_g = sigmoid of it).
        local_map: ``B x 1 x h x w``, the mean over real tokens of A_t.

    Properties ``local`` (``B x D x h x w``, (V + mean over real tokens of A_t * V) / 2) and
    ``global_`` (``B x D x h x w``, A_g * V) are per-pixel multiples of V: a prompter that projects
    V once per image (:mod:`rsrefseg.modeling.fast_prompter`) never builds them.
    """

    visual: torch.Tensor
    global_logits: torch.Tensor
    local_map: torch.Tensor

    @property
    def local(self) -> torch.Tensor:
        v = self.visual.float()
        return ((v + self.local_map * v) / 2.0).to(self.visual.dtype)  # mean_t(A_t * V) == mean_t(A_t) * V

    @property
    def global_(self) -> torch.Tensor:
        return (torch.sigmoid(self.global_logits) * self.visual.float()).to(self.visual.dtype)

    def scales(self) -> dict[str, torch.Tensor | None]:
        """Branch name -> ``B x 1 x h x w`` factor of V in that branch (``None``: 1, V itself)."""
        return {"local": (1.0 + self.local_map) / 2.0, "global": torch.sigmoid(self.global_logits), "visual": None}


class TextActivation(nn.Module):
    """Activate patch features with the expression's global (pooled) and local (per-token) embeddings.

    With V the patch features and t a text embedding, A = sigmoid(scale * cos(V, t) + bias), using
    the dual encoder's own (frozen or LoRA-adapted) logit scale and bias. Padding tokens never
    contribute: the local average runs over real tokens only, so the result of a sample does not
    depend on the other samples of its batch.
    """

    def forward(
        self,
        visual: torch.Tensor,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        pooled: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
    ) -> Activated:
        """Args:
            visual: ``B x D x h x w`` patch features.
            tokens: ``B x L x D`` per-token text features.
            token_mask: ``B x L`` bool, True for real (non-padding) tokens.
            pooled: ``B x D`` pooled text embedding.
            scale: 1-element logit scale (already exponentiated).
            bias: 1-element logit bias.
        """
        v_norm = F.normalize(visual.float(), dim=1)  # B x D x h x w
        t_norm = F.normalize(tokens.float(), dim=-1)  # B x L x D
        p_norm = F.normalize(pooled.float(), dim=-1)  # B x D
        scale, bias = scale.float(), bias.float()

        # Local: per-token cosine maps B x L x h x w, sigmoid, averaged over real tokens.
        local_logits = scale * torch.einsum("bdhw,bld->blhw", v_norm, t_norm) + bias
        weights = token_mask.float()  # B x L
        n_real = weights.sum(dim=1).clamp(min=1.0)  # B
        # sum_t m_t * sigmoid(.) / n_real -> B x h x w, then B x 1 x h x w.
        local_map = (torch.sigmoid(local_logits) * weights[:, :, None, None]).sum(1) / n_real[:, None, None]
        local_map = local_map.unsqueeze(1)

        # Global: one cosine map with the pooled embedding, B x 1 x h x w.
        global_logits = scale * torch.einsum("bdhw,bd->bhw", v_norm, p_norm).unsqueeze(1) + bias

        return Activated(visual=visual, global_logits=global_logits, local_map=local_map)
