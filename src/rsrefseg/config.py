"""The model configuration: one dataclass, saved as ``config.json`` next to every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsrefseg.errors import ConfigError
from rsrefseg.utils import atomic_write_json

#: Prefix of a base-model id that means "random initialisation from the preset's own config".
RANDOM_PREFIX = "random:"
#: Names of the presets (the keys of ``rsrefseg.build.PRESETS``, sorted, kept here free of torch so
#: the command line can offer them without importing the model code; a test keeps them equal).
PRESET_NAMES = ("clip-b16", "rsrefseg-b", "rsrefseg-h", "rsrefseg-l", "tiny")


#: Largest image side / text length a config may ask for (the full presets use 1024 / 384 / 64).
MAX_SIDE = 8192


def _has_type(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (from JSON) has the annotated type: bool is not an int, an int is a float."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if origin is dict or annotation is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return True


def _type_name(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(annotation, "a mapping" if typing.get_origin(annotation) is dict else str(annotation))


@dataclass
class RSRefSegConfig:
    """Everything needed to rebuild an RSRefSeg model (the trained part comes from the checkpoint)."""

    # Name of the preset the model was built from (a key of ``rsrefseg.build.PRESETS``).
    preset: str = "rsrefseg-b"
    # CLIP-family dual encoder: Hugging Face hub id, local directory (save_pretrained layout),
    # or "random:<preset>" for a seeded random initialisation of the preset's architecture.
    clip_model: str = "google/siglip-so400m-patch14-384"
    # Hub revision (commit or tag) of ``clip_model``; None = the hub default branch.
    clip_revision: str | None = None
    # SAM: hub id, local directory, a Meta ``sam_vit_*.pth`` file, or "random:<preset>".
    sam_model: str = "facebook/sam-vit-base"
    # Hub revision of ``sam_model``.
    sam_revision: str | None = None
    # Side of the square SAM input (pixels); SAM's image encoder was trained at 1024.
    sam_image_size: int = 1024
    # Side of the square CLIP/SigLIP input (pixels); 384 for SigLIP so400m-patch14-384.
    clip_image_size: int = 384
    # Fixed text length (tokens): text is padded to exactly this length (SigLIP was trained at 64).
    max_text_length: int = 64
    # How an image of any size becomes S x S: "stretch" (reference code) or "longest_side" (SAM).
    resize_mode: str = "stretch"
    # Number of [3x3 stride-2 conv + norm + GELU] blocks in the prompter (paper default 2).
    down_spatial_times: int = 2
    # Feed the global activation logits to SAM's prompt encoder as a dense mask prompt (paper: on).
    # Off = the "sparse prompts only" ablation: SAM's learned "no mask" embedding instead.
    use_dense_prompt: bool = True
    # Feed the prompter's sparse prompt tokens to SAM's mask decoder (paper: on). Off = the "dense
    # prompt only" ablation: the decoder sees its own output tokens and the dense prompt only (the
    # prompter is then unused and frozen).
    use_sparse_prompt: bool = True
    # Feed the global activation branch sigmoid(scale * cos(V, pooled) + bias) * V to the prompter
    # (paper: on). Off = the "no global activation" ablation (the global logits still make the
    # dense prompt when use_dense_prompt is on).
    use_global_activation: bool = True
    # Feed the local activation branch (V + mean over real tokens of A_t * V) / 2 to the prompter
    # (paper: on). With both activation branches off the prompter sees the plain visual features V
    # only (the "no activation" ablation).
    use_local_activation: bool = True
    # "lora": LoRA on the encoders + prompter + SAM prompt encoder/decoder trainable (paper);
    # "full": every parameter trainable (used to train the tiny preset from scratch).
    finetune: str = "lora"
    # LoRA rank (paper: 16).
    lora_r: int = 16
    # LoRA alpha (paper: 16).
    lora_alpha: int = 16
    # LoRA dropout (paper: 0.1).
    lora_dropout: float = 0.1
    # Apply LoRA to SAM's image encoder (attention qkv/proj, MLP lin1/lin2, neck convs).
    lora_sam: bool = True
    # Apply LoRA to the CLIP vision tower (q/k/v/out projections).
    lora_vision: bool = True
    # Apply LoRA to the text tower (q/k/v/out projections and the text head).
    lora_text: bool = True
    # Initial value of the learnable bias for CLIP models, which have no ``logit_bias``.
    clip_bias_init: float = -10.0
    # Architecture overrides for random initialisation ("random:" ids): nested dicts merged into the
    # preset's Hugging Face configs, e.g. {"sam": {"vision_config": {"num_hidden_layers": 2}}}.
    arch_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> RSRefSegConfig:
        """Raise :class:`ConfigError` for an impossible combination of values."""
        if self.preset not in PRESET_NAMES:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESET_NAMES)}")
        if self.resize_mode not in ("stretch", "longest_side"):
            raise ConfigError(f"resize_mode must be 'stretch' or 'longest_side', got {self.resize_mode!r}")
        if self.finetune not in ("lora", "full"):
            raise ConfigError(f"finetune must be 'lora' or 'full', got {self.finetune!r}")
        if self.down_spatial_times < 0:
            raise ConfigError(f"down_spatial_times must be >= 0, got {self.down_spatial_times}")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0, got {self.lora_r}")
        if not (self.use_sparse_prompt or self.use_dense_prompt):
            raise ConfigError("use_sparse_prompt and use_dense_prompt are both false: SAM needs at least one prompt")
        for name in ("sam_image_size", "clip_image_size", "max_text_length"):
            if not 1 <= getattr(self, name) <= MAX_SIDE:
                raise ConfigError(f"{name} must be in [1, {MAX_SIDE}], got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        return self

    def prompter_branches(self) -> tuple[str, ...]:
        """The feature maps the prompter concatenates, in order: ``local``, ``global``, ``visual``."""
        flags = (("local", self.use_local_activation), ("global", self.use_global_activation), ("visual", True))
        return tuple(name for name, on in flags if on)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> RSRefSegConfig:
        """Build from a dict; unknown keys, values of the wrong type (``lora_r: "abc"``, checked
        against the field annotations: no conversion) and impossible values raise
        :class:`ConfigError` naming ``source`` and the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the model config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names, key=str)
        if unknown:
            raise ConfigError(f"{source}: unknown model config key(s): {', '.join(map(str, unknown))}")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            if not _has_type(value, hints[name]):
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
                raise ConfigError(f"{source}: model config key {name!r} must be {_type_name(hints[name])}, "
                                  f"got {shown}")
        try:
            return cls(**data).validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def save(self, path: str | Path) -> None:
        """Write ``config.json`` atomically."""
        atomic_write_json(path, {"model": self.to_dict()})

    @classmethod
    def load(cls, path: str | Path) -> RSRefSegConfig:
        """Read a ``config.json`` written by :meth:`save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data.get("model", data), source=str(path))
