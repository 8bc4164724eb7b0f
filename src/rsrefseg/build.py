"""Presets (plain builder functions in a dict) and base-weight loading.

Base weights come from a Hugging Face hub id or a local directory in the same layout
(``save_pretrained``) through one code path; SAM also accepts Meta's original ``sam_vit_*.pth``
files. ``random:<preset>`` ids build the preset's architecture with a seeded random initialisation
(``tiny`` from scratch, benchmarks, parameter counts on the ``meta`` device).
"""

from __future__ import annotations

import copy
import os
import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rsrefseg.config import RANDOM_PREFIX, RSRefSegConfig
from rsrefseg.errors import ConfigError, WeightsError
from rsrefseg.modeling.dual_encoder import DualEncoder
from rsrefseg.modeling.lora import apply_lora
from rsrefseg.modeling.prompter import Prompter
from rsrefseg.modeling.rsrefseg import RSRefSeg

SIGLIP_SO400M = "google/siglip-so400m-patch14-384"
CLIP_B16 = "openai/clip-vit-base-patch16"
SAM_IDS = {"vit_b": "facebook/sam-vit-base", "vit_l": "facebook/sam-vit-large", "vit_h": "facebook/sam-vit-huge"}
#: Seed of the random initialisation behind "random:" ids (reproducible bases for the tiny preset).
RANDOM_SEED = 0


# ---------------------------------------------------------------------- presets
def rsrefseg_b() -> RSRefSegConfig:
    """SigLIP so400m-384 + SAM ViT-B (the paper's RSRefSeg-b)."""
    return RSRefSegConfig(preset="rsrefseg-b", clip_model=SIGLIP_SO400M, sam_model=SAM_IDS["vit_b"])


def rsrefseg_l() -> RSRefSegConfig:
    """SigLIP so400m-384 + SAM ViT-L (the paper's RSRefSeg-l, about 1.2B parameters)."""
    return RSRefSegConfig(preset="rsrefseg-l", clip_model=SIGLIP_SO400M, sam_model=SAM_IDS["vit_l"])


def rsrefseg_h() -> RSRefSegConfig:
    """SigLIP so400m-384 + SAM ViT-H."""
    return RSRefSegConfig(preset="rsrefseg-h", clip_model=SIGLIP_SO400M, sam_model=SAM_IDS["vit_h"])


def clip_b16() -> RSRefSegConfig:
    """CLIP ViT-B/16 (224, 77 tokens) + SAM ViT-B: a lighter model."""
    return RSRefSegConfig(
        preset="clip-b16", clip_model=CLIP_B16, sam_model=SAM_IDS["vit_b"], clip_image_size=224, max_text_length=77
    )


def tiny() -> RSRefSegConfig:
    """The same classes with small widths and depths: tests and training from scratch on a CPU."""
    return RSRefSegConfig(
        preset="tiny",
        clip_model=RANDOM_PREFIX + "tiny",
        sam_model=RANDOM_PREFIX + "tiny",
        sam_image_size=256,
        clip_image_size=128,
        max_text_length=24,
        down_spatial_times=1,
        lora_r=4,
        lora_alpha=4,
    )


PRESETS: dict[str, Callable[[], RSRefSegConfig]] = {
    "rsrefseg-b": rsrefseg_b,
    "rsrefseg-l": rsrefseg_l,
    "rsrefseg-h": rsrefseg_h,
    "clip-b16": clip_b16,
    "tiny": tiny,
}

# ---------------------------------------------------------------------- architectures
_SO400M_TOWER = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16}
#: Official Hugging Face configs of the dual encoders (random initialisation / parameter counts).
CLIP_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "siglip-so400m-384": (
        "siglip",
        {
            "vision_config": {**_SO400M_TOWER, "image_size": 384, "patch_size": 14},
            "text_config": {**_SO400M_TOWER, "vocab_size": 32000, "max_position_embeddings": 64},
        },
    ),
    "clip-b16": (
        "clip",
        {
            "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                              "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
            "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                            "num_attention_heads": 8, "max_position_embeddings": 77, "vocab_size": 49408},
            "projection_dim": 512,
        },
    ),
    "tiny": (
        "siglip",
        {
            "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "image_size": 128, "patch_size": 16},
            "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "vocab_size": 512, "max_position_embeddings": 24,
                            "pad_token_id": 1, "bos_token_id": 1, "eos_token_id": 1},
        },
    ),
}
_TINY_SAM = {
    "vision_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "global_attn_indexes": [1],
                      "image_size": 256, "window_size": 8, "output_channels": 64, "num_pos_feats": 32,
                      "mlp_ratio": 2.0},
    "prompt_encoder_config": {"hidden_size": 64, "image_size": 256, "mask_input_channels": 16},
    "mask_decoder_config": {"hidden_size": 64, "mlp_dim": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "iou_head_hidden_dim": 64},
}
#: Which architectures a preset's "random:" ids build: (dual-encoder arch, SAM variant or dict).
PRESET_ARCHS: dict[str, tuple[str, str | dict[str, Any]]] = {
    "rsrefseg-b": ("siglip-so400m-384", "vit_b"),
    "rsrefseg-l": ("siglip-so400m-384", "vit_l"),
    "rsrefseg-h": ("siglip-so400m-384", "vit_h"),
    "clip-b16": ("clip-b16", "vit_b"),
    "tiny": ("tiny", _TINY_SAM),
}


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _arch_of(model_id: str) -> str:
    arch = model_id[len(RANDOM_PREFIX):]
    if arch not in PRESET_ARCHS:
        raise ConfigError(f"unknown random architecture {model_id!r}; expected random:<preset> with one of {', '.join(PRESET_ARCHS)}")
    return arch


def clip_hf_config(arch: str, overrides: dict[str, Any] | None = None) -> Any:
    """Hugging Face SiglipConfig/CLIPConfig of a preset's dual encoder (+ overrides)."""
    from transformers import CLIPConfig, SiglipConfig

    family, spec = CLIP_ARCHS[PRESET_ARCHS[arch][0]]
    spec = _deep_merge(spec, overrides or {})
    return (SiglipConfig if family == "siglip" else CLIPConfig)(**spec)


def sam_hf_config(arch: str, overrides: dict[str, Any] | None = None) -> Any:
    """Hugging Face SamConfig of a preset's SAM (+ overrides; vision image_size drives the prompt encoder)."""
    from transformers import SamConfig

    from rsrefseg.modeling.sam_convert import sam_config_for_variant

    sam = PRESET_ARCHS[arch][1]
    if isinstance(sam, str):
        full = sam_config_for_variant(sam).to_dict()
        keys = ("vision_config", "prompt_encoder_config", "mask_decoder_config")
        spec = {k: {kk: vv for kk, vv in full[k].items() if not kk.startswith(("_", "transformers"))} for k in keys}
    else:
        spec = copy.deepcopy(sam)
    spec = _deep_merge(spec, overrides or {})
    size = spec["vision_config"].get("image_size")
    if size is not None:
        spec["prompt_encoder_config"]["image_size"] = size
    return SamConfig(**spec)


# ---------------------------------------------------------------------- loading
def _hub_endpoint_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urllib.parse.urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _resolve(model_id: str, what: str, flag: str) -> str:
    """Check a local path or hub id before loading; raise a one-line WeightsError when impossible."""
    path = Path(model_id).expanduser()
    if path.exists():
        return str(path)
    looks_local = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or "\\" in model_id
    if looks_local:
        raise WeightsError(f"{what} weights: no such file or directory: {model_id}")
    try:  # already in the local Hugging Face cache?
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json")
        if isinstance(cached, str):
            return model_id
    except Exception:  # pragma: no cover - cache layout errors fall through to the hub check
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_endpoint_reachable():
        raise WeightsError(
            f"cannot fetch {what} weights '{model_id}': the Hugging Face hub is unreachable and they are not cached;"
            f" download them elsewhere (huggingface-cli download {model_id} --local-dir DIR) and pass {flag} DIR"
        )
    return model_id


def _seeded(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return factory()


def load_clip(config: RSRefSegConfig, device: str | torch.device | None = None) -> tuple[Any, Any]:
    """The dual encoder model and its tokenizer for ``config.clip_model``."""
    from transformers import AutoConfig, AutoTokenizer, CLIPModel, SiglipModel

    model_id = config.clip_model
    if model_id.startswith(RANDOM_PREFIX):
        arch = _arch_of(model_id)
        hf_config = clip_hf_config(arch, config.arch_overrides.get("clip"))
        cls = SiglipModel if hf_config.model_type == "siglip" else CLIPModel
        if device is not None and torch.device(device).type == "meta":
            with torch.device("meta"):
                return cls(hf_config), None
        from rsrefseg.tokenizer import offline_tokenizer

        model = _seeded(lambda: cls(hf_config))
        return model, offline_tokenizer(max_length=config.max_text_length)
    source = _resolve(model_id, "CLIP/SigLIP", "--clip")
    try:
        hf_config = AutoConfig.from_pretrained(source, revision=config.clip_revision)
        classes = {"siglip": SiglipModel, "clip": CLIPModel}
        if hf_config.model_type not in classes:
            raise WeightsError(f"{model_id}: model type {hf_config.model_type!r} is not SigLIP or CLIP")
        model = classes[hf_config.model_type].from_pretrained(source, revision=config.clip_revision)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=config.clip_revision)
    except WeightsError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError with long messages
        raise WeightsError(f"cannot load CLIP/SigLIP weights from {model_id}: {str(exc).splitlines()[0]}") from None
    return model, tokenizer


def load_sam(config: RSRefSegConfig, device: str | torch.device | None = None) -> Any:
    """The Hugging Face ``SamModel`` for ``config.sam_model`` (hub id, directory, Meta .pth, random:)."""
    from transformers import SamModel

    model_id = config.sam_model
    if model_id.startswith(RANDOM_PREFIX):
        hf_config = sam_hf_config(_arch_of(model_id), config.arch_overrides.get("sam"))
        if device is not None and torch.device(device).type == "meta":
            with torch.device("meta"):
                return SamModel(hf_config)
        return _seeded(lambda: SamModel(hf_config))
    from rsrefseg.modeling.sam_convert import is_meta_sam_checkpoint, load_meta_sam_checkpoint

    if is_meta_sam_checkpoint(model_id):
        return load_meta_sam_checkpoint(model_id)
    source = _resolve(model_id, "SAM", "--sam")
    try:
        return SamModel.from_pretrained(source, revision=config.sam_revision)
    except Exception as exc:
        raise WeightsError(f"cannot load SAM weights from {model_id}: {str(exc).splitlines()[0]}") from None


def build_model(config: RSRefSegConfig, device: str | torch.device | None = None) -> RSRefSeg:
    """Build the full model for ``config`` (base weights loaded, LoRA injected, trainable set)."""
    config.validate()
    clip_model, tokenizer = load_clip(config, device)
    sam = load_sam(config, device)
    sam_size = sam.config.vision_config.image_size
    if sam_size != config.sam_image_size:
        raise ConfigError(f"sam_image_size is {config.sam_image_size} but {config.sam_model} takes {sam_size}")
    dual = DualEncoder(clip_model, tokenizer, config.clip_image_size, config.max_text_length, config.clip_bias_init)
    prompt_dim = sam.config.prompt_encoder_config.hidden_size
    branches = config.prompter_branches()  # ablations may drop activation branches
    meta = device is not None and torch.device(device).type == "meta"
    if meta:
        with torch.device("meta"):
            prompter = Prompter(dual.embed_dim, prompt_dim, config.down_spatial_times, branches)
    else:
        prompter = _seeded(lambda: Prompter(dual.embed_dim, prompt_dim, config.down_spatial_times, branches))
    model = RSRefSeg(config, dual, sam, prompter)  # type: ignore[arg-type]
    # Seeded, so that two builds of one config start from identical LoRA weights too.
    _seeded(lambda: apply_lora(model, config) or model)
    model.eval()
    if device is not None and not meta:
        model.to(device)
    return model


def preset_config(name: str, **overrides: Any) -> RSRefSegConfig:
    """The config of preset ``name`` with field overrides applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[name]()
    data = config.to_dict()
    data.update(overrides)
    return RSRefSegConfig.from_dict(data, source=f"preset {name}")


def build_from_preset(
    name: str,
    base: str | Path | None = None,
    clip: str | None = None,
    sam: str | None = None,
    random_init: bool = False,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> RSRefSeg:
    """Build preset ``name``.

    Args:
        base: a directory written by ``rsrefseg init-base`` (``clip/`` and ``sam/`` inside).
        clip, sam: hub ids, local directories (or a Meta .pth for SAM) replacing the preset's.
        random_init: seeded random weights of the preset's architecture (no download).
        device: where to build; ``"meta"`` builds shapes only (parameter counts).
        overrides: config fields (e.g. ``down_spatial_times=1``, ``finetune="full"``).
    """
    config = preset_config(name, **overrides)
    if random_init or (device is not None and torch.device(device).type == "meta"):
        config.clip_model = config.sam_model = RANDOM_PREFIX + name
    if base is not None:
        config.clip_model, config.sam_model = str(Path(base) / "clip"), str(Path(base) / "sam")
    if clip is not None:
        config.clip_model = clip
    if sam is not None:
        config.sam_model = sam
    return build_model(config, device=device)


def write_base(name: str, directory: str | Path, arch_overrides: dict[str, Any] | None = None) -> Path:
    """Write the preset's architecture with seeded random weights as Hugging Face directories.

    ``directory/clip`` (model + offline tokenizer) and ``directory/sam`` load through exactly the
    same code path as hub ids: ``from_preset(name, base=directory)``.
    """
    from rsrefseg.tokenizer import save_offline_tokenizer

    config = preset_config(name, arch_overrides=arch_overrides or {})
    config.clip_model = config.sam_model = RANDOM_PREFIX + name
    directory = Path(directory)
    clip_model, _ = load_clip(config)
    clip_model.save_pretrained(directory / "clip")
    save_offline_tokenizer(directory / "clip", max_length=config.max_text_length)
    del clip_model
    load_sam(config).save_pretrained(directory / "sam")
    return directory
