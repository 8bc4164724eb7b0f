"""Trained-part checkpoints: safetensors of the trainable parameters + ``config.json``.

A checkpoint directory holds

- ``model.safetensors``: only the parameters training changes (LoRA, prompter, SAM prompt
  encoder and mask decoder; everything for ``finetune="full"``), with the preset and base-model
  ids in the safetensors metadata;
- ``config.json``: ``{"model": RSRefSegConfig, "format": ..., "base": {...}}``.

Loading rebuilds the model from the config (base weights from their ids) and checks the file's
keys and shapes against the model's trainable parameters exactly; any difference raises
:class:`CheckpointMismatchError` listing the offending keys.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from rsrefseg.config import RANDOM_PREFIX, RSRefSegConfig
from rsrefseg.errors import CheckpointMismatchError, RSRefSegError, WeightsError
from rsrefseg.utils import atomic_path, atomic_write_json, write_error

FORMAT = "rsrefseg-trained-v1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _metadata(config: RSRefSegConfig) -> dict[str, str]:
    return {
        "format": FORMAT,
        "preset": config.preset,
        "clip_model": config.clip_model,
        "clip_revision": config.clip_revision or "",
        "sam_model": config.sam_model,
        "sam_revision": config.sam_revision or "",
        "finetune": config.finetune,
    }


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` into ``path`` atomically; a failed write (disk full, I/O
    error: safetensors reports them as ``SafetensorError``) raises :class:`OutputError` naming
    ``path``, and any previous file there is left unchanged."""
    import safetensors.torch

    with atomic_path(path) as tmp:
        try:
            safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as exc:
            found = re.search(r"os error (\d+)", str(exc))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code)) from exc


def save_checkpoint(model: Any, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the trained part of ``model`` and its config into ``directory`` (atomically, file by file)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(directory, exc) from None
    state = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    meta = _metadata(model.config)
    save_safetensors(state, directory / WEIGHTS_NAME, meta)
    payload = {"format": FORMAT, "model": model.config.to_dict(), "base": meta, **(extra or {})}
    atomic_write_json(directory / CONFIG_NAME, payload)
    return directory


def read_trained_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read ``model.safetensors`` (tensors, metadata); unreadable files raise WeightsError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    return tensors, meta


def _listed(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_trained_state(model: Any, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``state`` into the model's trainable parameters after an exact key and shape check."""
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_listed(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} with another shape: {_listed(shapes)}")
        preset = getattr(model.config, "preset", "?")
        raise CheckpointMismatchError(
            f"{source} does not fit preset {preset!r}: " + "; ".join(parts),
            missing=missing, unexpected=unexpected, shape_mismatch=shapes,
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value.to(params[key].dtype))


#: Largest config.json read (a real one is ~2 KB).
MAX_CONFIG_BYTES = 1 << 20


def read_checkpoint_config(config_path: Path) -> RSRefSegConfig:
    """The validated model config of a checkpoint's ``config.json`` (one-line errors naming it)."""
    try:
        if config_path.stat().st_size > MAX_CONFIG_BYTES:
            raise WeightsError(f"{config_path}: larger than {MAX_CONFIG_BYTES} bytes, not a checkpoint config")
        payload = json.loads(config_path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{config_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise WeightsError(f"{config_path}: cannot read ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model", {}), dict):
        raise WeightsError(f"{config_path}: expected a JSON object with a \"model\" object")
    return RSRefSegConfig.from_dict(payload.get("model", {}), source=str(config_path))


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_model_size(config: RSRefSegConfig, source: str) -> None:
    """Refuse a config whose ``arch_overrides`` make a random-initialised model larger than this
    machine's available memory (built on the meta device first: no memory is used)."""
    random_clip, random_sam = (config.clip_model.startswith(RANDOM_PREFIX),
                               config.sam_model.startswith(RANDOM_PREFIX))
    if not (config.arch_overrides and (random_clip or random_sam)):
        return
    from rsrefseg.build import load_clip, load_sam

    try:
        parts = ([load_clip(config, "meta")[0]] if random_clip else []) + (
            [load_sam(config, "meta")] if random_sam else [])
    except RSRefSegError:
        raise
    except Exception as exc:  # transformers/huggingface_hub validation errors of many classes
        message = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise WeightsError(f"{source}: the model it describes cannot be built ({message})") from None
    needed = sum(p.numel() * 4 for part in parts for p in part.parameters())  # fp32 weights alone
    available = _available_memory()
    if available is not None and needed > available:
        raise WeightsError(f"{source}: arch_overrides describe a model of {needed / 2**30:.1f} GiB of weights, "
                           f"more than the {available / 2**30:.1f} GiB of memory available")


def load_checkpoint(
    directory: str | Path,
    device: str | torch.device | None = None,
    clip: str | None = None,
    sam: str | None = None,
) -> Any:
    """Rebuild the model of a checkpoint directory and load its trained part.

    ``clip`` / ``sam`` replace the recorded base-model ids (e.g. a local copy of the hub weights).
    """
    from rsrefseg.build import build_model

    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise WeightsError(f"{directory}: not a checkpoint directory (no {CONFIG_NAME})")
    config = read_checkpoint_config(config_path)
    if clip is not None:
        config.clip_model = clip
    if sam is not None:
        config.sam_model = sam
    state, _ = read_trained_state(directory / WEIGHTS_NAME)
    check_model_size(config, str(config_path))
    try:
        model = build_model(config)
    except RSRefSegError:
        raise
    except Exception as exc:  # e.g. arch_overrides of the wrong kind (transformers' own validation errors)
        message = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise WeightsError(f"{config_path}: the model it describes cannot be built ({message})") from None
    load_trained_state(model, state, source=str(directory / WEIGHTS_NAME))
    if device is not None:
        model.to(device)
    return model


def load_into(model: Any, directory: str | Path) -> None:
    """Load a checkpoint's trained part into an existing model (strict), e.g. to check compatibility."""
    state, _ = read_trained_state(Path(directory) / WEIGHTS_NAME)
    load_trained_state(model, state, source=str(Path(directory) / WEIGHTS_NAME))
