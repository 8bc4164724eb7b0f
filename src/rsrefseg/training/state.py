"""Resumable training state: checkpoint folders written atomically, RNG capture, keep-last-k, best.

Layout of ``<work_dir>/checkpoints``::

    step-00000120/           resumable: model.safetensors + config.json (trained part only),
                             optimizer.safetensors (or optimizer-<rank>.safetensors when the
                             optimizer state is sharded: DeepSpeed ZeRO, FSDP), scheduler.safetensors,
                             [scaler.safetensors], rng-<rank>.safetensors, trainer_state.json
    best/                    model.safetensors + config.json of the best validation mIoU

Optimizer, scheduler, scaler and RNG states are stored by :mod:`rsrefseg.training.state_files`
(tensors in safetensors, everything else as JSON): loading a checkpoint folder never runs code.
Folders of earlier versions (``*.pt`` pickles) are refused with an error naming the file.

A folder is written as ``.tmp-<name>`` and renamed when complete (an atomic ``rename``), so a
crash (even SIGKILL) leaves either the previous checkpoints or the new one, never half of one.
``best`` is replaced by an atomic exchange of the new and the old folder (``renameat2`` with
``RENAME_EXCHANGE`` on Linux); where that is missing, by two renames, and a crash between them is
repaired by :func:`prepare_checkpoint_root` at the start of the next run.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsrefseg.checkpoint import read_trained_state, save_checkpoint
from rsrefseg.errors import ConfigError, WeightsError
from rsrefseg.training.state_check import (
    check_like,
    check_optimizer_state,
    check_rng_state,
    check_scheduler_state,
)
from rsrefseg.training.state_files import load_tree, save_tree
from rsrefseg.utils import atomic_write_json, remove_stale_temp_files

STATE_NAME = "trainer_state.json"
#: Suffix of the state files (safetensors + JSON tree; see state_files).
STATE_SUFFIX = ".safetensors"
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
    def from_dict(cls, data: Any, source: str = STATE_NAME) -> TrainerState:
        """Build from the JSON of ``trainer_state.json``; wrong keys or types raise WeightsError."""
        if not isinstance(data, dict):
            raise WeightsError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise WeightsError(f"{source}: unknown key(s) {', '.join(unknown)}")
        for name, value in data.items():
            wanted = {"int": int, "float": (int, float), "list[dict[str, Any]]": list}[str(known[name])]
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise WeightsError(f"{source}: {name} must be {known[name]}, got {value!r}"[:300])
        if not all(isinstance(h, dict) for h in data.get("history", [])):
            raise WeightsError(f"{source}: history must be a list of objects")
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
    """``optimizer-<rank>.safetensors`` for sharded optimizer states, else ``optimizer.safetensors``
    (rank 0 writes it)."""
    rank = f"-{accelerator.process_index}" if optimizer_sharded(accelerator) else ""
    return f"optimizer{rank}{STATE_SUFFIX}"


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
    try:
        save_tree(capture_rng(), tmp / f"rng-{accelerator.process_index}{STATE_SUFFIX}", "rng")
        sharded = optimizer_sharded(accelerator)
        if sharded:  # every process holds its own shard (collective state_dict calls included)
            save_tree(optimizer.state_dict(), tmp / optimizer_file(accelerator), "optimizer")
        if accelerator.is_main_process:
            save_checkpoint(accelerator.unwrap_model(model), tmp, extra={"training": extra or {}})
            if not sharded:
                save_tree(optimizer.state_dict(), tmp / optimizer_file(accelerator), "optimizer")
            save_tree(scheduler.state_dict(), tmp / f"scheduler{STATE_SUFFIX}", "scheduler")
            if getattr(accelerator, "scaler", None) is not None:
                save_tree(accelerator.scaler.state_dict(), tmp / f"scaler{STATE_SUFFIX}", "scaler")
            atomic_write_json(tmp / STATE_NAME, {**state.to_dict(), "num_processes": accelerator.num_processes})
    except BaseException:  # disk full, I/O error...: the previous checkpoints stay, no half folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _swap_in(tmp, final, root / f".old-{name}")
    accelerator.wait_for_everyone()
    return final


@dataclass
class ResumableFiles:
    """The contents of a resumable folder, read and checked but not yet applied (see :func:`read_resumable`)."""

    directory: Path
    meta: TrainerState
    model: dict[str, torch.Tensor]
    optimizer: Any
    scheduler: Any
    scaler: Any | None
    rng: Any | None


#: File names of earlier versions, read with pickle: refused.
_LEGACY = ("optimizer.pt", "optimizer-{rank}.pt", "scheduler.pt", "scaler.pt", "rng-{rank}.pt")


def read_resumable(directory: Path, accelerator: Any) -> ResumableFiles:
    """Read (without applying) everything :func:`load_resumable` needs from ``directory``.

    Nothing is unpickled or executed; a folder of an earlier version (``*.pt`` files), a missing or
    malformed file raise :class:`WeightsError`/:class:`ConfigError` naming the file. Cheap to call
    before the model and the data are built, so a bad ``--resume`` fails at once.
    """
    directory = Path(directory)
    rank = accelerator.process_index
    legacy = [directory / n.format(rank=rank) for n in _LEGACY if (directory / n.format(rank=rank)).is_file()]
    if legacy:
        raise WeightsError(
            f"{legacy[0]}: resumable state in the pickle format of earlier rsrefseg versions is not loaded "
            "(unpickling a file can run code); start the run again (its model.safetensors still works with "
            "eval/predict) or resume from a checkpoint written by this version")
    state_path = directory / STATE_NAME
    try:
        raw = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{directory}: not a resumable checkpoint (no {STATE_NAME})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WeightsError(f"{state_path}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{state_path}: expected a JSON object, got {type(raw).__name__}")
    saved_world = raw.pop("num_processes", 1)
    if not isinstance(saved_world, int) or isinstance(saved_world, bool):
        raise WeightsError(f"{state_path}: num_processes must be an integer")
    if saved_world != accelerator.num_processes:
        raise ConfigError(
            f"{directory} was written by {saved_world} process(es); resume it with the same number "
            f"(now {accelerator.num_processes}) so the data order continues exactly"
        )
    meta = TrainerState.from_dict(raw, source=str(state_path))
    opt_file = directory / optimizer_file(accelerator)
    if not opt_file.is_file():
        raise ConfigError(f"{directory}: no {opt_file.name}; it was saved with another distributed setup "
                          "(DeepSpeed/FSDP shard the optimizer state per process, DDP does not)")
    tensors, _ = read_trained_state(directory / "model.safetensors")
    scaler_file, rng_file = directory / f"scaler{STATE_SUFFIX}", directory / f"rng-{rank}{STATE_SUFFIX}"
    return ResumableFiles(
        directory=directory,
        meta=meta,
        model=tensors,
        optimizer=load_tree(opt_file),
        scheduler=load_tree(directory / f"scheduler{STATE_SUFFIX}"),
        scaler=load_tree(scaler_file) if scaler_file.is_file() else None,
        rng=load_tree(rng_file) if rng_file.is_file() else None,
    )


def apply_resumable(files: ResumableFiles, accelerator: Any, model: Any, optimizer: Any,
                    scheduler: Any) -> TrainerState:
    """Load what :func:`read_resumable` read into the model, optimizer, scheduler, scaler and RNGs
    (RNG last) and return the trainer state. States that do not fit raise WeightsError naming the file."""
    from rsrefseg.checkpoint import load_trained_state

    directory = files.directory
    load_trained_state(accelerator.unwrap_model(model), files.model, source=str(directory / "model.safetensors"))
    opt_file = directory / optimizer_file(accelerator)
    check_optimizer_state(optimizer, files.optimizer, str(opt_file))
    _apply(optimizer.load_state_dict, files.optimizer, opt_file)
    sched_file = directory / f"scheduler{STATE_SUFFIX}"
    check_scheduler_state(scheduler, files.scheduler, str(sched_file))
    _apply(scheduler.load_state_dict, files.scheduler, sched_file)
    scaler = getattr(accelerator, "scaler", None)
    if files.scaler is not None and scaler is not None:
        scaler_file = directory / f"scaler{STATE_SUFFIX}"
        check_like(scaler.state_dict(), files.scaler, str(scaler_file))
        _apply(scaler.load_state_dict, files.scaler, scaler_file)
    if files.rng is not None:
        rng_file = directory / f"rng-{accelerator.process_index}{STATE_SUFFIX}"
        check_rng_state(files.rng, str(rng_file))
        _apply(restore_rng, files.rng, rng_file)
    return files.meta


def _apply(load: Any, value: Any, path: Path) -> None:
    """``load(value)``; what a malformed state makes torch/numpy/random raise becomes a WeightsError."""
    try:
        load(value)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, AttributeError) as exc:
        message = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise WeightsError(f"{path}: does not fit this run ({message})") from None


def load_resumable(
    directory: Path, accelerator: Any, model: Any, optimizer: Any, scheduler: Any
) -> TrainerState:
    """Restore a folder written by :func:`save_resumable` (model trained part, optimizer, scheduler,
    scaler, this process's RNG states) and return the trainer state. Call on every process."""
    return apply_resumable(read_resumable(directory, accelerator), accelerator, model, optimizer, scheduler)


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` resumable checkpoints (and stale temp folders)."""
    removed = []
    for path in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    remove_stale_temp_files(root)
    return removed


def prepare_checkpoint_root(root: Path) -> list[Path]:
    """At the start of a run: undo a swap a crash interrupted (``.old-<name>`` without ``<name>``:
    the old folder goes back), then remove the temporary folders and files a killed run left.
    Returns the removed paths."""
    if not root.is_dir():
        return []
    for old in sorted(root.glob(".old-*")):
        final = root / old.name[len(".old-"):]
        if old.is_dir() and not final.exists():
            os.replace(old, final)
    removed = remove_stale_temp_files(root)
    for old in sorted(root.glob(".old-*")):  # the swap had finished: the old copy is stale
        if old.is_dir() and (root / old.name[len(".old-"):]).is_dir():
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or file system lacks it (nothing was changed then)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(tmp: Path, final: Path, old: Path) -> None:
    """Make the complete folder ``tmp`` become ``final``; ``final`` always exists if it existed."""
    if not final.exists():
        os.replace(tmp, final)
        return
    if exchange_paths(tmp, final):  # one atomic step: final is the new folder, tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(old, ignore_errors=True)  # fallback: a crash between these renames is repaired
    os.replace(final, old)  # by prepare_checkpoint_root (old goes back)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_best(root: Path, model: Any, info: dict[str, Any]) -> Path:
    """Replace ``root/best`` with the current trained part (new folder first, then an atomic swap)."""
    final, tmp = root / "best", root / ".tmp-best"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_checkpoint(model, tmp, extra={"best": info})
    except BaseException:  # the previous best stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, final, root / ".old-best")
    return final
