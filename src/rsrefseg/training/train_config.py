"""Training configuration: dataclasses with one comment per field, YAML I/O and ``--dotted.key`` overrides.

A YAML file mirrors :class:`TrainConfig`::

    model: {preset: tiny, random_init: true, overrides: {finetune: full}}
    data: {train_jsonl: ${RSREFSEG_DATA}/rrsisd/train.jsonl, train_images: ...}
    optim: {lr: 1.0e-4}
    batch_size: 8

``${VAR}`` and ``${VAR:-default}`` are expanded from the environment in every string. Unknown keys
raise :class:`ConfigError` naming the key (``optim.lrr``). The resolved config is written as
``<work_dir>/config.yaml`` by the trainer, so a run can be repeated from it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from rsrefseg.errors import ConfigError


@dataclass
class ModelSection:
    """Which model to build (see ``RSRefSeg.from_preset``)."""

    # Preset name: tiny, rsrefseg-b, rsrefseg-l, rsrefseg-h, clip-b16.
    preset: str = "tiny"
    # Directory written by `rsrefseg init-base` (clip/ and sam/ inside); None = the preset's ids.
    base: str | None = None
    # CLIP/SigLIP hub id or local directory replacing the preset's.
    clip: str | None = None
    # SAM hub id, local directory or Meta sam_vit_*.pth replacing the preset's.
    sam: str | None = None
    # Seeded random weights of the preset's architecture (no download; the tiny demo trains from it).
    random_init: bool = False
    # RSRefSegConfig field overrides: finetune ("lora"|"full"), sam_image_size, lora_r, arch_overrides...
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """Where the referring records and images are, and how samples are prepared."""

    # Training JSONL (one RefRecord per line); ${RSREFSEG_DATA}-style variables are expanded.
    train_jsonl: str = ""
    # Image folder of the training records.
    train_images: str = ""
    # Keep only records whose "split" equals this (None = every record of the file).
    train_split: str | None = None
    # Validation JSONL (model selection uses this split only; never the test split).
    val_jsonl: str = ""
    # Image folder of the validation records.
    val_images: str = ""
    # Split filter of the validation file (None = every record).
    val_split: str | None = None
    # "stretch" | "longest_side"; None = the model config's resize_mode.
    resize_mode: str | None = None
    # Probability of a horizontal flip (with left<->right rewriting of the expression); off by default.
    flip_h: float = 0.0
    # Probability of a vertical flip (top<->bottom rewriting); off by default.
    flip_v: float = 0.0
    # Pre-resize images and masks once into a uint8 .npy cache (fast epochs on CPU).
    cache: bool = True
    # Cache folder; None = <work_dir>/cache. Entries are keyed by file contents and input size.
    cache_dir: str | None = None
    # Drop unusable records (missing image, bad mask) with a warning instead of failing.
    skip_bad: bool = False
    # Use only the first N training records (None = all): quick experiments and tests.
    max_train_samples: int | None = None
    # Use only the first N validation records (None = all).
    max_val_samples: int | None = None
    # Group up to K expressions of the same image in a batch: the image encoders run once per image
    # of the batch, the text encoder and the head once per expression (1 = off, records one by one).
    # batch_size still counts expressions and the loss is the same mean over them.
    expressions_per_image: int = 1


@dataclass
class OptimSection:
    """AdamW settings (paper: lr 1e-4, weight decay 0.05)."""

    # Peak learning rate (after warm-up).
    lr: float = 1e-4
    # Decoupled weight decay.
    weight_decay: float = 0.05
    # Adam betas.
    betas: tuple[float, float] = (0.9, 0.999)
    # Adam epsilon.
    eps: float = 1e-8
    # Do not decay 1-D parameters (biases, norms, LoRA-free scalars such as the logit bias).
    no_decay_1d: bool = True


@dataclass
class ScheduleSection:
    """Per-step learning-rate schedule: linear warm-up, then cosine decay."""

    # Number of training epochs (paper: 200).
    epochs: int = 200
    # Warm-up length in epochs (paper: 5), converted to optimizer steps.
    warmup_epochs: float = 5.0
    # Warm-up length in optimizer steps; overrides warmup_epochs when set (short runs).
    warmup_steps: int | None = None
    # Learning-rate factor at step 0 of the warm-up (paper: 0.01).
    start_factor: float = 0.01
    # Learning-rate factor at the end of the cosine (paper: 0.001).
    min_factor: float = 0.001


@dataclass
class LossSection:
    """Loss = bce_weight * BCE + dice_weight * Dice on mask logits upsampled to the label size."""

    # Weight of the per-pixel binary cross-entropy (paper: 5).
    bce_weight: float = 5.0
    # Weight of the soft Dice loss (paper: 0; the successor RSRefSeg 2 uses 5).
    dice_weight: float = 0.0
    # Auxiliary BCE on the global text-activation map against the target on the CLIP patch grid
    # (not in the paper, whose pretrained dual encoder is already aligned; training from scratch
    # needs it, else the model learns to ignore the expression). 0 = off.
    activation_weight: float = 0.0


@dataclass
class TrainConfig:
    """Everything ``rsrefseg train`` needs."""

    # Model to build and train.
    model: ModelSection = field(default_factory=ModelSection)
    # Training and validation data.
    data: DataSection = field(default_factory=DataSection)
    # Optimizer.
    optim: OptimSection = field(default_factory=OptimSection)
    # Learning-rate schedule (and the number of epochs).
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    # Loss weights.
    loss: LossSection = field(default_factory=LossSection)
    # Output folder: config.yaml, checkpoints/, logs/, report/.
    work_dir: str = "work_dirs/run"
    # Samples per batch on each process.
    batch_size: int = 8
    # Micro-batches accumulated per optimizer step (effective batch = batch_size x this x processes).
    grad_accum: int = 1
    # Clip the global gradient norm to this value (None or 0 = no clipping).
    grad_clip: float | None = 1.0
    # Recompute the SAM image encoder's and the CLIP/SigLIP towers' layers in the backward pass
    # instead of keeping their activations (less memory, one more encoder forward; same gradients).
    gradient_checkpointing: bool = False
    # "auto" (bf16 autocast on a GPU that supports it, else no), "no", "bf16" or "fp16".
    mixed_precision: str = "auto"
    # Seed of the model init, data order, augmentation and dropout (runs are reproducible).
    seed: int = 0
    # Validate every N epochs (and always after the last epoch).
    val_every: int = 1
    # Keep the last K resumable checkpoints (the best one is kept apart).
    keep_last: int = 2
    # Also save a resumable checkpoint every N optimizer steps (0 = only at epoch ends).
    checkpoint_every_steps: int = 0
    # DataLoader worker processes (0 = load in the main process).
    num_workers: int = 0
    # Torch intra-op CPU threads per process (None = torch's default). Small models on a shared CPU
    # often run fastest with 1 (threads of tiny ops spend their time waiting for each other).
    num_threads: int | None = None
    # Write a CSV/TensorBoard row every N optimizer steps (the CSV of per-step losses gets every step).
    log_every: int = 10
    # Wall-clock budget in minutes: stop cleanly (validate, save) once it is spent. None = no limit.
    max_minutes: float | None = None
    # Stop after this many optimizer steps (None = the full schedule); tests and smoke runs.
    max_steps: int | None = None
    # Batch size of validation.
    val_batch_size: int = 8
    # Number of validation samples drawn as overlays in the report.
    report_overlays: int = 6
    # Log to TensorBoard (<work_dir>/logs/tensorboard).
    tensorboard: bool = True
    # Show a tqdm progress bar.
    progress: bool = True

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` for impossible values."""
        checks = [
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.data.expressions_per_image >= 1,
             f"data.expressions_per_image must be >= 1, got {self.data.expressions_per_image}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.schedule.epochs >= 1, f"schedule.epochs must be >= 1, got {self.schedule.epochs}"),
            (self.val_every >= 1, f"val_every must be >= 1, got {self.val_every}"),
            (self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}"),
            (self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}"),
            (self.mixed_precision in ("auto", "no", "bf16", "fp16"),
             f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}"),
            (self.data.resize_mode in (None, "stretch", "longest_side"),
             f"data.resize_mode must be stretch or longest_side, got {self.data.resize_mode!r}"),
            (0.0 <= self.data.flip_h <= 1.0 and 0.0 <= self.data.flip_v <= 1.0,
             "data.flip_h and data.flip_v must be probabilities in [0, 1]"),
            (self.loss.bce_weight >= 0 and self.loss.dice_weight >= 0 and self.loss.activation_weight >= 0
             and self.loss.bce_weight + self.loss.dice_weight > 0,
             "loss weights must be >= 0, and bce_weight and dice_weight not both 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.model.overrides = _model_overrides(self.model.preset, self.model.overrides)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists) for YAML."""
        return _plain(dataclasses.asdict(self))


# ---------------------------------------------------------------------- building from dicts
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^${}]*))?\}")


def expand_env(value: str) -> str:
    """Expand ``${VAR}`` / ``${VAR:-default}`` (defaults may nest: ``${A:-${B:-x}}``); an unset
    variable without default is left as written."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        return default if default is not None else match.group(0)

    for _ in range(8):  # innermost references first, then the ones holding them
        expanded = _ENV.sub(sub, value)
        if expanded == value:
            break
        value = expanded
    return value


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert one value against a field annotation (the ``from __future__`` string form)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if annotation is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if number != int(number):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return expand_env(str(value))
    return value


def _model_overrides(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """``model.overrides`` checked (and converted, as every config value) against the fields of
    :class:`~rsrefseg.config.RSRefSegConfig`; the preset name must be known."""
    from rsrefseg.config import PRESET_NAMES, RSRefSegConfig

    if preset not in PRESET_NAMES:
        raise ConfigError(f"model.preset: unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    hints = typing.get_type_hints(RSRefSegConfig)
    unknown = sorted(set(overrides) - set(hints), key=str)
    if unknown:
        raise ConfigError(f"unknown config key 'model.overrides.{unknown[0]}'; known keys here: "
                          f"{', '.join(sorted(hints))}")
    return {name: _coerce(value, hints[name], f"model.overrides.{name}") for name, value in overrides.items()}


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'" + (
            f" (and {', '.join(prefix + u for u in unknown[1:])})" if len(unknown) > 1 else ""
        ) + f"; known keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A validated :class:`TrainConfig` from a nested dict (unknown keys raise ConfigError)."""
    return _build(TrainConfig, data, "").validate()


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalar/list/mapping, with ``3e-4`` read as a float."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value) else value
        except ValueError:  # pragma: no cover - the regex only admits floats
            return value
    return value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 3e-4)`` -> ``d["optim"]["lr"] = 3e-4`` (creating mappings)."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``["--optim.lr", "3e-4", "--batch_size=4"]`` -> ``{"optim.lr": 3e-4, "batch_size": 4}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) < 3:
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --section.key VALUE")
        key = token[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ConfigError(f"override --{key} needs a value")
            text = tokens[i + 1]
            i += 2
        out[key.replace("-", "_")] = parse_value(text)
    return out


def load_config(path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (None = defaults; a top-level ``base:`` key builds on another file, see
    :mod:`rsrefseg.training.config_base`), apply dotted overrides and validate."""
    from rsrefseg.training.config_base import read_config_file

    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return config_from_dict(data)


def dump_config(config: TrainConfig) -> str:
    """The config as YAML text (keys in declaration order)."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)
