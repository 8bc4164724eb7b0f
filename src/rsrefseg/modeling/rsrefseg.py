"""The RSRefSeg model: CLIP-family activation -> prompter -> SAM mask decoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamModel

from rsrefseg.config import RSRefSegConfig
from rsrefseg.modeling.activation import TextActivation
from rsrefseg.modeling.dual_encoder import DualEncoder
from rsrefseg.modeling.prompter import Prompter

#: SAM's normalisation constants on the [0, 255] pixel scale.
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


@dataclass
class ImageFeatures:
    """Cached per-image features.

    Attributes:
        sam: ``B x C x g x g`` SAM image embeddings (256 x 64 x 64 for the official models).
        clip: ``B x D x h x w`` CLIP patch features in the joint space.
    """

    sam: torch.Tensor
    clip: torch.Tensor


@dataclass
class TextFeatures:
    """Per-expression text features: tokens ``T x L x D``, mask ``T x L`` (bool), pooled ``T x D``."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


@dataclass
class RSRefSegOutput:
    """Model outputs for ``T`` expressions.

    Attributes:
        mask_logits: ``T x 1 x S x S`` mask logits at the model input size.
        low_res_logits: ``T x 1 x m x m`` SAM decoder logits (m = 4 x embedding grid, 256).
        iou_scores: ``T x 1`` SAM's predicted IoU.
        global_activation: ``T x 1 x h x w`` global activation logits (sigmoid -> heatmap).
        local_activation: ``T x 1 x h x w`` mean local activation over real tokens, in [0, 1].
    """

    mask_logits: torch.Tensor
    low_res_logits: torch.Tensor
    iou_scores: torch.Tensor
    global_activation: torch.Tensor
    local_activation: torch.Tensor


class RSRefSeg(nn.Module):
    """Referring segmentation with a CLIP-family dual encoder and SAM.

    The model takes its built parts; use :meth:`from_preset` or :meth:`from_pretrained` to make one.
    Input images are ``B x 3 x S x S`` RGB in [0, 255] with ``S = config.sam_image_size``.
    """

    def __init__(
        self,
        config: RSRefSegConfig,
        clip: DualEncoder,
        sam: SamModel,
        prompter: Prompter,
        activation: TextActivation | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.clip = clip
        self.sam = sam
        self.prompter = prompter
        self.activation = activation if activation is not None else TextActivation()
        self.register_buffer("sam_mean", torch.tensor(SAM_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("sam_std", torch.tensor(SAM_STD).view(1, 3, 1, 1), persistent=False)
        self.image_size: int = sam.config.vision_config.image_size
        self.embed_grid: int = sam.config.prompt_encoder_config.image_embedding_size
        self.mask_input_size: int = 4 * self.embed_grid

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **kwargs: object) -> RSRefSeg:
        """Build a preset (see ``rsrefseg.build.PRESETS``); keyword arguments go to ``build_model``."""
        from rsrefseg.build import build_from_preset

        return build_from_preset(name, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, **kwargs: object) -> RSRefSeg:
        """Load a trained checkpoint directory (config.json + model.safetensors)."""
        from rsrefseg.checkpoint import load_checkpoint

        return load_checkpoint(checkpoint, **kwargs)  # type: ignore[arg-type]

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the trained part (safetensors) and config.json into ``directory``."""
        from rsrefseg.checkpoint import save_checkpoint

        save_checkpoint(self, directory)

    @property
    def device(self) -> torch.device:
        return self.sam_mean.device

    # ------------------------------------------------------------------ stages
    def encode_image(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """``B x 3 x S x S`` RGB in [0, 255] -> SAM embeddings and CLIP patch features."""
        x = pixel_values.float()
        size = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        encoder = self.sam.vision_encoder
        sam_in = ((x - self.sam_mean) / self.sam_std).to(next(encoder.parameters()).dtype)
        # Features in the dtype of the head (prompter + decoder), which may differ from the
        # encoders' (bf16 encoders with an fp32 head: rsrefseg.modeling.optimize).
        dtype = self.head_dtype
        sam_embeddings = encoder(sam_in).last_hidden_state.to(dtype)  # B x C x g x g
        clip_patches = self.clip.encode_image(pixel_values).to(dtype)  # B x D x h x w
        return ImageFeatures(sam=sam_embeddings, clip=clip_patches)

    def encode_text(self, texts: list[str]) -> TextFeatures:
        """Tokenise (fixed length) and encode ``T`` expressions."""
        enc = self.clip.tokenize(texts, device=self.device)
        tokens, mask, pooled = self.clip.encode_text(enc["input_ids"], enc["attention_mask"])
        return TextFeatures(tokens=tokens.to(self.head_dtype), mask=mask, pooled=pooled.to(self.head_dtype))

    @property
    def head_dtype(self) -> torch.dtype:
        """dtype of the prompter and SAM decoder side (image and text features are cast to it)."""
        return self.prompter.output_proj.weight.dtype

    def decode(
        self,
        image: ImageFeatures,
        text: TextFeatures,
        image_index: torch.Tensor | None = None,
    ) -> RSRefSegOutput:
        """Activation, prompter and SAM decoder for ``T`` expressions on cached image features.

        Args:
            image: features of ``B`` images.
            text: features of ``T`` expressions.
            image_index: ``T`` indices into the ``B`` images (default: expression i on image i).
        """
        sam_emb, clip_patches = image.sam, image.clip
        if image_index is not None:  # B images -> T (one per expression)
            sam_emb, clip_patches = sam_emb[image_index], clip_patches[image_index]
        t = text.tokens.shape[0]
        if sam_emb.shape[0] != t:
            raise ValueError(f"{sam_emb.shape[0]} images for {t} expressions; pass image_index")
        scale, bias = self.clip.scale_and_bias()
        act = self.activation(clip_patches, text.tokens, text.mask, text.pooled, scale, bias)
        dtype = sam_emb.dtype
        sparse: torch.Tensor | None = None
        if self.config.use_sparse_prompt:
            pe_layer = self.sam.shared_image_embedding
            tokens = self.prompter.prompt_tokens(act, pe_layer, image.clip, image_index)  # T x N x C
            sparse = tokens.to(dtype).unsqueeze(1)  # T x N x C -> T x 1 x N x C (one prompt set)
        if self.config.use_dense_prompt:
            size = (self.mask_input_size, self.mask_input_size)
            # T x 1 x h x w logits -> T x 1 x m x m, SAM's mask-input resolution.
            mask_prompt = F.interpolate(act.global_logits, size=size, mode="bilinear", align_corners=False)
            dense = self.sam.prompt_encoder.mask_embed(mask_prompt.to(dtype))  # T x C x g x g
        else:
            g = self.embed_grid
            # 1 x C embedding -> T x C x g x g, SAM's "no mask" prompt.
            dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(t, -1, g, g)
        pe = self.sam.get_image_wide_positional_embeddings().to(dtype).expand(t, -1, -1, -1)
        masks, iou = self.sam.mask_decoder(
            image_embeddings=sam_emb,
            image_positional_embeddings=pe,
            sparse_prompt_embeddings=sparse,  # None: SAM's output tokens only ("dense only" ablation)
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=False,
        )
        low_res = masks[:, 0].float()  # T x 1 x 1 x m x m -> T x 1 x m x m
        full = F.interpolate(low_res, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return RSRefSegOutput(
            mask_logits=full,
            low_res_logits=low_res,
            iou_scores=iou[:, 0].float(),  # T x 1 x 1 -> T x 1
            global_activation=act.global_logits,
            local_activation=act.local_map,
        )

    def forward(
        self, pixel_values: torch.Tensor, texts: list[str], image_index: torch.Tensor | None = None
    ) -> RSRefSegOutput:
        """``B x 3 x S x S`` images in [0, 255] and ``T`` expressions -> :class:`RSRefSegOutput`.

        Without ``image_index`` expression i is on image i (``T == B``); with it (``T`` indices into
        the ``B`` images) each image is encoded once and decoded for each of its expressions.
        """
        if image_index is None and len(texts) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {len(texts)} expressions")
        if image_index is not None and len(texts) != image_index.shape[0]:
            raise ValueError(f"{len(texts)} expressions but {image_index.shape[0]} image indices")
        image = self.encode_image(pixel_values)
        index = image_index.to(image.sam.device) if image_index is not None else None
        return self.decode(image, self.encode_text(texts), index)

    # ------------------------------------------------------------------ trained part
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that training changes (LoRA, prompter, SAM prompt encoder and decoder)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def merge_lora(self) -> RSRefSeg:
        """Fold LoRA weights into the base layers (faster inference; no longer trainable as LoRA)."""
        from rsrefseg.modeling.lora import merge_lora

        merge_lora(self)
        return self
