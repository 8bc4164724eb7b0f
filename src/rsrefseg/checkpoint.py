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
from pathlib import Path
from typing import Any

import torch

from rsrefseg.config import RSRefSegConfig
from rsrefseg.errors import CheckpointMismatchError, WeightsError
from rsrefseg.utils import atomic_path, atomic_write_json

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


def save_checkpoint(model: Any, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the trained part of ``model`` and its config into ``directory`` (atomically, file by file)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    meta = _metadata(model.config)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata=meta)
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
    try:
        payload = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{config_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    config = RSRefSegConfig.from_dict(payload.get("model", {}), source=str(config_path))
    if clip is not None:
        config.clip_model = clip
    if sam is not None:
        config.sam_model = sam
    state, _ = read_trained_state(directory / WEIGHTS_NAME)
    model = build_model(config)
    load_trained_state(model, state, source=str(directory / WEIGHTS_NAME))
    if device is not None:
        model.to(device)
    return model


def load_into(model: Any, directory: str | Path) -> None:
    """Load a checkpoint's trained part into an existing model (strict), e.g. to check compatibility."""
    state, _ = read_trained_state(Path(directory) / WEIGHTS_NAME)
    load_trained_state(model, state, source=str(Path(directory) / WEIGHTS_NAME))
