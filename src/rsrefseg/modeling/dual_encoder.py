"""The CLIP-family dual encoder (SigLIP or CLIP) seen through one interface.

It returns, in the joint image-text space of width ``D``:

- patch features of the image, ``B x D x h x w`` (for SigLIP so400m at 384: 1152 x 27 x 27);
- per-token text features ``B x L x D``, a mask of the real (non-padding) tokens ``B x L``, and the
  pooled text embedding ``B x D``;
- the model's logit scale (``exp(logit_scale)``) and bias (SigLIP's ``logit_bias``, or a learnable
  scalar for CLIP, which has none).

Text is always tokenised to exactly ``max_length`` tokens (``padding="max_length"``), so that a
sample's features never depend on what else is in its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, SiglipModel

#: Normalisation constants of the image processors, on images scaled to [0, 1].
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DualEncoder(nn.Module):
    """Wraps a ``SiglipModel`` or ``CLIPModel`` and its tokenizer."""

    def __init__(
        self,
        model: SiglipModel | CLIPModel,
        tokenizer: object,
        image_size: int,
        max_length: int,
        bias_init: float = -10.0,
    ) -> None:
        super().__init__()
        if not isinstance(model, (SiglipModel, CLIPModel)):
            raise TypeError(f"expected SiglipModel or CLIPModel, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.family = "siglip" if isinstance(model, SiglipModel) else "clip"
        self.image_size = image_size
        self.max_length = max_length
        mean, std = (SIGLIP_MEAN, SIGLIP_STD) if self.family == "siglip" else (CLIP_MEAN, CLIP_STD)
        # 1 x 3 x 1 x 1 constants, on the [0, 255] pixel scale.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        if self.family == "clip":
            # CLIP has no logit bias; the activation needs one, so it is learned.
            self.logit_bias = nn.Parameter(torch.tensor([bias_init]))
        vcfg = model.config.vision_config
        self.patch_size: int = vcfg.patch_size
        self.grid: int = image_size // vcfg.patch_size
        if self.family == "siglip":
            self.embed_dim: int = vcfg.hidden_size
        else:
            self.embed_dim = model.config.projection_dim

    # ------------------------------------------------------------------ image
    def preprocess_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` RGB in [0, 255] -> ``B x 3 x s x s`` normalised (antialiased resize)."""
        size = (self.image_size, self.image_size)
        x = pixel_values.float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.pixel_mean) / self.pixel_std

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features in the joint space.

        Args:
            pixel_values: ``B x 3 x H x W`` RGB in [0, 255] (any H, W; resized to ``image_size``).

        Returns:
            ``B x D x h x w`` with ``h = w = image_size // patch_size``.
        """
        vision = self.model.vision_model
        x = self.preprocess_image(pixel_values).to(next(vision.parameters()).dtype)
        if self.family == "siglip":
            # last_hidden_state already has post_layernorm applied: B x N x D, N = h * w.
            tokens = vision(pixel_values=x).last_hidden_state
        else:
            hidden = vision(pixel_values=x).last_hidden_state[:, 1:]  # drop CLS: B x N x Cv
            # CLIP applies post_layernorm + projection only to CLS; do the same for every patch.
            tokens = self.model.visual_projection(vision.post_layernorm(hidden))  # B x N x D
        b, _, d = tokens.shape
        # B x N x D -> B x D x N -> B x D x h x w (row-major patch order).
        return tokens.transpose(1, 2).reshape(b, d, self.grid, self.grid)

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Tokenise to exactly ``max_length`` tokens: ``input_ids`` and ``attention_mask``, ``B x L``.

        Characters that are not valid Unicode (lone surrogates: undecodable bytes, or a ``"\\ud800"``
        escape in a JSON file) become U+FFFD: the tokenizers cannot encode them.
        """
        clean = [t.encode("utf-8", "replace").decode("utf-8") if not t.isascii() else t for t in texts]
        enc = self.tokenizer(  # type: ignore[operator]
            clean,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token features, real-token mask and pooled embedding.

        Args:
            input_ids: ``B x L`` token ids (fixed-length padded).
            attention_mask: ``B x L``, 1 for real tokens (EOS included), 0 for padding.

        Returns:
            tokens ``B x L x D``, mask ``B x L`` (bool), pooled ``B x D``.
        """
        text = self.model.text_model
        if self.family == "siglip":
            # SigLIP was trained without an attention mask on fixed-length (64) padded text, and
            # pools the last position; pass no mask, exactly as in pre-training.
            out = text(input_ids=input_ids)
            tokens, pooled = out.last_hidden_state, out.pooler_output
        else:
            out = text(input_ids=input_ids, attention_mask=attention_mask)
            tokens = self.model.text_projection(out.last_hidden_state)  # B x L x D
            pooled = self.model.text_projection(out.pooler_output)  # B x D
        return tokens, attention_mask.bool(), pooled

    # ------------------------------------------------------------------ scale/bias
    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp(logit_scale), logit_bias)``, each a 1-element tensor."""
        scale = self.model.logit_scale.exp()
        bias = self.model.logit_bias if self.family == "siglip" else self.logit_bias
        return scale, bias
