"""Meta's original SAM checkpoints -> Hugging Face :class:`transformers.SamModel`.

Meta released SAM as plain ``torch.save``-d state dicts of the ``segment_anything`` ``Sam`` module
(``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``). This module renames
their keys to the Hugging Face layout, so such a file can be used wherever a ``facebook/sam-vit-*``
hub model would be, with the same numbers (checked against ``segment_anything`` in the tests).

The renaming is a list of prefix rules (``{n}`` is a block index) that works in both directions,
so a missing key can be reported under the name the user's file should have had. Meta's
``pixel_mean``/``pixel_std`` buffers are dropped: the RSRefSeg model normalises its input itself.
Meta's single positional-encoding matrix fills both ``shared_image_embedding.positional_embedding``
and the tied ``prompt_encoder.shared_embedding.positional_embedding``.

Nothing is loaded or built at import time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from rsrefseg.errors import CheckpointMismatchError, ConfigError, WeightsError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import SamConfig, SamModel

__all__ = [
    "META_SAM_VARIANTS",
    "MetaSamVariant",
    "convert_meta_sam_state_dict",
    "infer_variant",
    "is_meta_sam_checkpoint",
    "load_meta_sam_checkpoint",
    "sam_config_for_variant",
]


class MetaSamVariant(NamedTuple):
    """Image-encoder shape of one released SAM model (everything else is shared)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]


META_SAM_VARIANTS: dict[str, MetaSamVariant] = {
    "vit_b": MetaSamVariant(768, 12, 12, (2, 5, 8, 11)),  # sam_vit_b_01ec64.pth ~ facebook/sam-vit-base
    "vit_l": MetaSamVariant(1024, 24, 16, (5, 11, 17, 23)),  # sam_vit_l_0b3195.pth ~ facebook/sam-vit-large
    "vit_h": MetaSamVariant(1280, 32, 16, (7, 15, 23, 31)),  # sam_vit_h_4b8939.pth ~ facebook/sam-vit-huge
}

_DROPPED = frozenset({"pixel_mean", "pixel_std"})
_META_PE = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_HF_PE = (
    "shared_image_embedding.positional_embedding",
    "prompt_encoder.shared_embedding.positional_embedding",
)
_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_BLOCK_RE = re.compile(r"^image_encoder\.blocks\.(\d+)\.")

_HYPER = "mask_decoder.output_hypernetworks_mlps.{n}."
_IOU = "mask_decoder.iou_prediction_head."
_DEC = "mask_decoder.transformer."
# (Meta prefix, Hugging Face prefix); the first rule whose prefix starts a key applies.
_RULES: tuple[tuple[str, str], ...] = (
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.blocks.{n}.norm1.", "vision_encoder.layers.{n}.layer_norm1."),
    ("image_encoder.blocks.{n}.norm2.", "vision_encoder.layers.{n}.layer_norm2."),
    ("image_encoder.blocks.{n}.attn.", "vision_encoder.layers.{n}.attn."),  # qkv, proj, rel_pos_h/w
    ("image_encoder.blocks.{n}.mlp.", "vision_encoder.layers.{n}.mlp."),  # lin1, lin2
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("prompt_encoder.point_embeddings.{n}.", "prompt_encoder.point_embed.{n}."),
    ("prompt_encoder.not_a_point_embed.", "prompt_encoder.not_a_point_embed."),
    ("prompt_encoder.no_mask_embed.", "prompt_encoder.no_mask_embed."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.iou_token.", "mask_decoder.iou_token."),
    ("mask_decoder.mask_tokens.", "mask_decoder.mask_tokens."),
    (_DEC + "layers.{n}.norm", _DEC + "layers.{n}.layer_norm"),  # norm1..4
    (_DEC + "layers.{n}.self_attn.", _DEC + "layers.{n}.self_attn."),
    (_DEC + "layers.{n}.cross_attn_token_to_image.", _DEC + "layers.{n}.cross_attn_token_to_image."),
    (_DEC + "layers.{n}.cross_attn_image_to_token.", _DEC + "layers.{n}.cross_attn_image_to_token."),
    (_DEC + "layers.{n}.mlp.", _DEC + "layers.{n}.mlp."),
    (_DEC + "final_attn_token_to_image.", _DEC + "final_attn_token_to_image."),
    (_DEC + "norm_final_attn.", _DEC + "layer_norm_final_attn."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    # Meta's 3-layer MLP(layers.0/1/2) is Hugging Face's SamFeedForward(proj_in, layers.0, proj_out).
    (_HYPER + "layers.0.", _HYPER + "proj_in."),
    (_HYPER + "layers.1.", _HYPER + "layers.0."),
    (_HYPER + "layers.2.", _HYPER + "proj_out."),
    (_IOU + "layers.0.", _IOU + "proj_in."),
    (_IOU + "layers.1.", _IOU + "layers.0."),
    (_IOU + "layers.2.", _IOU + "proj_out."),
)


def _compile(prefix: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(prefix).replace(re.escape("{n}"), r"(\d+)"))


_FORWARD = tuple((_compile(meta), hf) for meta, hf in _RULES)
_BACKWARD = tuple((_compile(hf), meta) for meta, hf in _RULES)


def _rename(key: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    """Rename ``key`` by the first matching rule; ``None`` when no rule applies."""
    for pattern, target in rules:
        match = pattern.match(key)
        if match:
            head = target.replace("{n}", match.group(1)) if match.groups() else target
            return head + key[match.end() :]
    return None


def _meta_name(hf_key: str) -> str:
    """The Meta key that converts to ``hf_key`` (for error messages)."""
    if hf_key in _HF_PE:
        return _META_PE
    return _rename(hf_key, _BACKWARD) or hf_key


def convert_meta_sam_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Meta ``segment_anything`` state dict to :class:`transformers.SamModel` keys.

    Tensors are not copied or changed (all layouts agree), only renamed: e.g.
    ``image_encoder.blocks.3.attn.qkv.weight`` (3C x C) -> ``vision_encoder.layers.3.attn.qkv.weight``.
    ``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`` (2 x 128) becomes both
    positional-embedding keys of ``SamModel.state_dict()``; ``pixel_mean``/``pixel_std`` are dropped.
    A key no rule knows is kept under its own name, so a strict load reports it as unexpected.
    A complete Meta checkpoint gives exactly the keys of ``SamModel(config).state_dict()``.
    """
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in _DROPPED:
            continue
        if key == _META_PE:
            for hf_key in _HF_PE:
                converted[hf_key] = tensor
            continue
        converted[_rename(key, _FORWARD) or key] = tensor
    return converted


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name in :data:`META_SAM_VARIANTS` of a Meta SAM state dict, from its image-encoder shape.

    Reads the patch-embedding width (``image_encoder.patch_embed.proj.weight``: C x 3 x 16 x 16) and
    the number of ``image_encoder.blocks.*``; tensors may live on the ``meta`` device.
    Raises :class:`WeightsError` when they match no released model.
    """
    weight = state_dict.get(_PATCH_KEY)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
        raise WeightsError(f"not a Meta SAM state dict: no 4-d {_PATCH_KEY}")
    indexes = [int(m.group(1)) for m in map(_BLOCK_RE.match, state_dict) if m]
    depth = max(indexes) + 1 if indexes else 0
    embed_dim = int(weight.shape[0])
    for name, variant in META_SAM_VARIANTS.items():
        if (variant.embed_dim, variant.depth) == (embed_dim, depth):
            return name
    known = ", ".join(f"{n} ({v.embed_dim}-d, {v.depth} blocks)" for n, v in META_SAM_VARIANTS.items())
    raise WeightsError(f"unrecognised SAM image encoder ({embed_dim}-d, {depth} blocks); known: {known}")


def _variant_name(variant: str) -> str:
    name = variant.strip().lower().replace("-", "_").removeprefix("sam_")
    if name not in META_SAM_VARIANTS:
        raise ConfigError(f"unknown SAM variant {variant!r}; expected one of {', '.join(META_SAM_VARIANTS)}")
    return name


def sam_config_for_variant(
    variant: str,
    *,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    num_attention_heads: int | None = None,
    global_attn_indexes: list[int] | tuple[int, ...] | None = None,
    image_size: int | None = None,
    window_size: int | None = None,
    mask_decoder_layer_norm_eps: float | None = None,
    attn_implementation: str | None = None,
) -> SamConfig:
    """The :class:`transformers.SamConfig` of ``facebook/sam-vit-{base,large,huge}`` for a variant.

    ``variant`` is ``vit_b``, ``vit_l`` or ``vit_h``. Image 1024 x 1024, patch 16 (64 x 64 embedding
    grid), 256 output channels, window 14, MLP ratio 4, qkv bias, absolute and relative positions,
    2-layer 256-d two-way decoder with 3 multimask outputs. The keyword overrides exist for small
    test models; ``image_size`` changes the vision and prompt encoders together.
    ``mask_decoder_layer_norm_eps``: the hub configs use 1e-6 for the decoder's ``layer_norm1..4``,
    where Meta's code uses PyTorch's default 1e-5 (mask logits then differ by ~1e-5 relative); pass
    1e-5 to reproduce Meta's numbers exactly, keep the default to equal the hub models.
    """
    from transformers import SamConfig

    spec = META_SAM_VARIANTS[_variant_name(variant)]
    size = 1024 if image_size is None else image_size
    vision = {
        "hidden_size": spec.embed_dim if hidden_size is None else hidden_size,
        "num_hidden_layers": spec.depth if num_hidden_layers is None else num_hidden_layers,
        "num_attention_heads": spec.num_heads if num_attention_heads is None else num_attention_heads,
        "global_attn_indexes": list(
            spec.global_attn_indexes if global_attn_indexes is None else global_attn_indexes
        ),
        "image_size": size,
        "patch_size": 16,
        "num_channels": 3,
        "output_channels": 256,
        "window_size": 14 if window_size is None else window_size,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "use_abs_pos": True,
        "use_rel_pos": True,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "num_pos_feats": 128,
    }
    prompt = {"hidden_size": 256, "image_size": size, "patch_size": 16, "mask_input_channels": 16}
    decoder = {
        "hidden_size": 256,
        "mlp_dim": 2048,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "attention_downsample_rate": 2,
        "num_multimask_outputs": 3,
        "iou_head_depth": 3,
        "iou_head_hidden_dim": 256,
        "layer_norm_eps": 1e-6 if mask_decoder_layer_norm_eps is None else mask_decoder_layer_norm_eps,
    }
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder, **extra)


def is_meta_sam_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an existing ``.pth``/``.pt`` file, i.e. should go to :func:`load_meta_sam_checkpoint`.

    A cheap check by name only; the contents are validated when loading.
    """
    target = Path(path)
    return target.suffix.lower() in {".pth", ".pt"} and target.is_file()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a Meta SAM state dict (tensors on the CPU); :class:`WeightsError` naming the file otherwise."""
    if not path.is_file():
        raise WeightsError(f"{path}: SAM checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file (pickle, zip, EOF, runtime)
        raise WeightsError(f"{path}: cannot read SAM checkpoint ({_one_line(error)})") from None
    if isinstance(obj, Mapping) and _PATCH_KEY not in obj:
        for wrapper in ("model", "state_dict"):  # a fine-tuning script's {"model": state_dict}
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise WeightsError(f"{path}: not a SAM checkpoint (expected a state dict of named tensors)")
    if _PATCH_KEY not in obj or not any(k.startswith("mask_decoder.") for k in obj):
        raise WeightsError(
            f"{path}: not a Meta SAM checkpoint (no image_encoder.* / mask_decoder.* keys of segment_anything)"
        )
    return dict(obj)


def _listed(keys: list[str], limit: int = 8) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_meta_sam_checkpoint(
    path: str | os.PathLike[str],
    variant: str | None = None,
    *,
    attn_implementation: str = "sdpa",
    **overrides: Any,
) -> SamModel:
    """Build a :class:`transformers.SamModel` (eval mode) from a Meta ``sam_vit_*.pth`` file.

    ``variant`` (``vit_b``/``vit_l``/``vit_h``) is inferred from the tensor shapes when ``None``; a
    given one must agree with the file. ``overrides`` go to :func:`sam_config_for_variant` (small
    test models; then the variant is only the base of the config). The model is built on the
    ``meta`` device and takes the file's tensors as they are (dtype kept, no copy).

    Raises :class:`WeightsError` (one line naming the file) for a missing, unreadable or foreign
    file, and :class:`CheckpointMismatchError` listing the missing, unexpected or wrongly shaped
    keys (under Meta's names) when the file does not fit the configured model.
    """
    from transformers import SamModel

    file = Path(path)
    state_dict = _read_state_dict(file)
    try:
        found: str | None = infer_variant(state_dict)
        reason = ""
    except WeightsError as error:
        found, reason = None, str(error)
    if variant is None:
        if found is None:
            raise WeightsError(f"{file}: {reason}; pass variant= to load it")
        variant = found
    name = _variant_name(variant)
    if found is not None and found != name and not overrides:
        raise CheckpointMismatchError(f"{file}: holds a SAM {found} checkpoint, not the requested {name}")
    config = sam_config_for_variant(name, attn_implementation=attn_implementation, **overrides)

    converted = convert_meta_sam_state_dict(state_dict)
    with torch.device("meta"):
        model = SamModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted({_meta_name(k) for k in expected if k not in converted})
    unexpected = sorted({_meta_name(k) for k in converted if k not in expected})
    wrong = sorted(
        {
            f"{_meta_name(k)} {tuple(t.shape)} vs {expected[k]}"
            for k, t in converted.items()
            if k in expected and tuple(t.shape) != expected[k]
        }
    )
    if missing or unexpected or wrong:
        parts = [
            f"{label} {len(keys)} key(s): {_listed(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch (file vs model) in", wrong),
            )
            if keys
        ]
        raise CheckpointMismatchError(
            f"{file}: does not fit the SAM {name} model: " + "; ".join(parts),
            missing=missing,
            unexpected=unexpected,
            shape_mismatch=wrong,
        )
    model.load_state_dict(converted, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the tied positional embedding by two equal tensors
    return model.eval()
