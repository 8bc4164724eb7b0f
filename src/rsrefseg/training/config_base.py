"""Training-config files that build on another one: a top-level ``base:`` key.

A config such as ``configs/ablations/prompt-dense-only.yaml`` holds only what it changes::

    base: ../rrsisd-b.yaml          # relative to this file; ${VAR} expanded
    model: {overrides: {use_sparse_prompt: false}}
    work_dir: work_dirs/ablations/prompt-dense-only

The base is read first (it may have a base of its own), then this file is merged over it: mappings
merge key by key, anything else (scalars, lists) replaces the base's value. The ``base`` key itself
never reaches :class:`~rsrefseg.training.train_config.TrainConfig`, and the trainer's saved
``config.yaml`` is the fully resolved config.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from rsrefseg.errors import ConfigError

#: Name of the top-level key naming the base config.
BASE_KEY = "base"
#: Longest chain of bases followed (a longer one is almost surely a mistake).
MAX_DEPTH = 8


def merge_config(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged over ``base``: nested mappings key by key, other values replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_mapping(path: Path) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return loaded or {}


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a YAML config file with its ``base:`` chain resolved and merged.

    Raises:
        ConfigError: a missing or invalid file (named), a ``base`` that is not a string, a cycle of
            bases, or a chain longer than :data:`MAX_DEPTH`.
    """
    from rsrefseg.training.train_config import expand_env

    path = Path(path)
    key = path.resolve()
    if key in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, key))
        raise ConfigError(f"{path}: config bases form a cycle ({cycle})")
    if len(_chain) >= MAX_DEPTH:
        raise ConfigError(f"{path}: more than {MAX_DEPTH} nested config bases")
    data = _read_mapping(path)
    if BASE_KEY not in data:
        return data
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: 'base' must be the path of another config file, got {base!r}")
    base_path = Path(expand_env(base)).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    if not base_path.is_file():
        raise ConfigError(f"{path}: its base config {base_path} does not exist")
    return merge_config(read_config_file(base_path, (*_chain, key)), data)
