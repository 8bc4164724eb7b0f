"""Resumable training state: checkpoint folders written atomically, RNG capture, keep-last-k, best.

Layout of ``<work_dir>/checkpoints``::

    step-00000120/           resumable: model.safetensors + config.json (trained part only),
                             optimizer.pt (or optimizer-<rank>.pt when the optimizer state is
                             sharded: DeepSpeed ZeRO, FSDP), scheduler.pt, [scaler.pt],
                             rng-<rank>.pt, trainer_state.json
    best/                    model.safetensors + config.json of the best validation mIoU

A folder is written as ``.tmp-<name>`` and renamed when complete (an atomic ``rename``), so a
crash (even SIGKILL) leaves either the previous checkpoints or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsrefseg.checkpoint import read_trained_state, save_checkpoint
from rsrefseg.errors import ConfigError
from rsrefseg.utils import atomic_path, atomic_write_json

STATE_NAME = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where training stands (JSON-serialisable).

    ``epoch`` and ``batch_in_epoch`` give the exact data position: the next micro-batch to train on
    is batch ``batch_in_epoch`` of epoch ``epoch`` (0-based) of this process's shard.
    """

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    best_miou: float = -1.0
    best_step: int = -1
    best_epoch: int = -1
    #: Validation results: dicts with epoch, step and the summary metrics.
    history: list[dict[str, Any]] = field(default_factory=list)
    #: Training seconds spent over all sessions of the run.
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        return cls(**data)


def capture_rng() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and every CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`capture_rng`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def step_dir_name(step: int) -> str:
    """Folder name of the resumable checkpoint after optimizer step ``step``."""
    return f"step-{step:08d}"


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete resumable checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_NAME).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_resume(value: str, work_dir: str | os.PathLike[str]) -> Path | None:
    """``auto`` -> the newest checkpoint of ``work_dir`` (None if there is none); else that folder."""
    if value == "auto":
        found = list_checkpoints(Path(work_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(value)
    if (path / STATE_NAME).is_file():
        return path
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if found:
        return found[-1]
    raise ConfigError(f"--resume {value}: not a resumable checkpoint (no {STATE_NAME}) nor a work dir holding one")


def optimizer_sharded(accelerator: Any) -> bool:
    """Whether each process holds a different part of the optimizer state (DeepSpeed ZeRO, FSDP)."""
    kind = str(getattr(accelerator, "distributed_type", "")).upper()
    return "DEEPSPEED" in kind or "FSDP" in kind


def optimizer_file(accelerator: Any) -> str:
    """``optimizer-<rank>.pt`` for sharded optimizer states, else ``optimizer.pt`` (rank 0 writes it)."""
    return f"optimizer-{accelerator.process_index}.pt" if optimizer_sharded(accelerator) else "optimizer.pt"


def save_resumable(
    root: Path,
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: TrainerState,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/step-<global_step>`` atomically from every process (collective: call on all ranks).

    The main process writes the trained part, optimizer, scheduler and scaler; every process writes
    its own RNG states (and its optimizer shard when the state is sharded). The folder appears (by
    rename) only when all files are complete.
    """
    name = step_dir_name(state.global_step)
    final = root / name
    tmp = root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _torch_save(capture_rng(), tmp / f"rng-{accelerator.process_index}.pt")
    sharded = optimizer_sharded(accelerator)
    if sharded:  # every process holds its own shard (collective state_dict calls included)
        _torch_save(optimizer.state_dict(), tmp / optimizer_file(accelerator))
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(model), tmp, extra={"training": extra or {}})
        if not sharded:
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        if getattr(accelerator, "scaler", None) is not None:
            _torch_save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        atomic_write_json(tmp / STATE_NAME, {**state.to_dict(), "num_processes": accelerator.num_processes})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved earlier (e.g. mid-epoch, then at the epoch end)
            old = root / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_resumable(
    directory: Path, accelerator: Any, model: Any, optimizer: Any, scheduler: Any
) -> TrainerState:
    """Restore a folder written by :func:`save_resumable` (model trained part, optimizer, scheduler,
    scaler, this process's RNG states) and return the trainer state. Call on every process."""
    from rsrefseg.checkpoint import load_trained_state

    meta = json.loads((directory / STATE_NAME).read_text(encoding="utf-8"))
    saved_world = int(meta.pop("num_processes", 1))
    if saved_world != accelerator.num_processes:
        raise ConfigError(
            f"{directory} was written by {saved_world} process(es); resume it with the same number "
            f"(now {accelerator.num_processes}) so the data order continues exactly"
        )
    tensors, _ = read_trained_state(directory / "model.safetensors")
    load_trained_state(accelerator.unwrap_model(model), tensors, source=str(directory / "model.safetensors"))
    opt_file = directory / optimizer_file(accelerator)
    if not opt_file.is_file():
        raise ConfigError(f"{directory}: no {opt_file.name}; it was saved with another distributed setup "
                          "(DeepSpeed/FSDP shard the optimizer state per process, DDP does not)")
    optimizer.load_state_dict(torch.load(opt_file, map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", map_location="cpu", weights_only=False))
    if (directory / "scaler.pt").is_file() and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(torch.load(directory / "scaler.pt", weights_only=False))
    rng_file = directory / f"rng-{accelerator.process_index}.pt"
    if rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=False))
    return TrainerState.from_dict(meta)


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` resumable checkpoints (and stale temp folders)."""
    removed = []
    for path in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for stale in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    return removed


def save_best(root: Path, model: Any, info: dict[str, Any]) -> Path:
    """Replace ``root/best`` with the current trained part (new folder first, then a swap of renames)."""
    final, tmp, old = root / "best", root / ".tmp-best", root / ".old-best"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tmp, extra={"best": info})
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
