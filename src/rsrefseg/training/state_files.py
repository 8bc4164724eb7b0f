"""Resumable-state files that load without running code: tensors in safetensors, the rest as JSON.

An optimizer, scheduler, grad-scaler or RNG state is a tree of dicts, lists, tuples, numbers,
strings, tensors and numpy arrays. :func:`save_tree` writes the tensors (and numpy arrays) into one
``.safetensors`` file and the tree, with each tensor replaced by a reference, as JSON in that file's
metadata (``"rsrefseg_tree"``). Every container is tagged (``{"list": [...]}``, ``{"tuple": [...]}``,
``{"dict": [[key, value], ...]}``, ``{"tensor": "t3"}``, ``{"ndarray": "t4", "dtype": "uint32"}``)
so types round-trip exactly (dict keys may be ints: the optimizer's parameter indices).

Saving refuses anything else (a function, an object): what is written never needs code to be
rebuilt. Loading reads the safetensors header (bounded by the format), JSON-decodes the tree with a
depth limit and rebuilds plain Python values; it never unpickles. Every failure is a
:class:`~rsrefseg.errors.WeightsError` naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsrefseg.errors import WeightsError

#: ``format`` value in the metadata of the files written here.
STATE_FORMAT = "rsrefseg-state-v1"
#: Metadata key holding the JSON tree.
TREE_KEY = "rsrefseg_tree"
#: Deepest nesting accepted when decoding (the states we write are at most ~5 levels deep).
MAX_DEPTH = 32
#: numpy dtypes allowed for arrays (numpy's RNG key is uint32).
_NUMPY_DTYPES = ("uint8", "uint32", "int32", "int64", "uint64", "float32", "float64", "bool")


class _Encoder:
    """Turns a state tree into (JSON-able tree, tensors by reference name)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _ref(self, tensor: torch.Tensor) -> str:
        name = f"t{len(self.tensors)}"
        self.tensors[name] = tensor.detach().cpu().contiguous().clone()  # own storage: no shared memory
        return name

    def encode(self, obj: Any, where: str) -> Any:
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, torch.Tensor):
            return {"tensor": self._ref(obj)}
        if isinstance(obj, np.ndarray):
            if obj.dtype.name not in _NUMPY_DTYPES:
                raise TypeError(f"{where}: numpy dtype {obj.dtype} is not supported")
            # Stored as an int64/float64/bool tensor (torch lacks some unsigned types); the dtype is restored.
            wide = obj.astype(np.float64 if obj.dtype.kind == "f" else bool if obj.dtype.kind == "b" else np.int64)
            return {"ndarray": self._ref(torch.from_numpy(np.ascontiguousarray(wide))), "dtype": obj.dtype.name}
        if isinstance(obj, np.generic):
            return self.encode(obj.item(), where)
        if isinstance(obj, tuple):
            return {"tuple": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return {"list": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, dict):
            items = []
            for key, value in obj.items():
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise TypeError(f"{where}: dict key {key!r} is not a string or an integer")
                items.append([key, self.encode(value, f"{where}[{key!r}]")])
            return {"dict": items}
        raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored without pickle")


def check_storable(obj: Any, what: str) -> None:
    """Raise a :class:`~rsrefseg.errors.ConfigError` when ``obj`` could not be saved by :func:`save_tree`.

    Run before training starts, so that an optimizer whose state holds Python objects (DeepSpeed
    ZeRO keeps its loss scaler and parameter mappings as objects) is refused at once, not at the
    first checkpoint hours later.
    """
    from rsrefseg.errors import ConfigError

    try:
        _Encoder().encode(obj, what)
    except TypeError as exc:
        raise ConfigError(f"{exc}; resumable checkpoints store plain data only (never pickle), so this "
                          "optimizer cannot be checkpointed: use one process or DDP "
                          "(configs/accelerate/multi-gpu.yaml)") from None


def save_tree(obj: Any, path: str | os.PathLike[str], what: str = "state") -> None:
    """Write ``obj`` (a tree of plain values, tensors and numpy arrays) to ``path`` atomically."""
    from rsrefseg.checkpoint import save_safetensors

    encoder = _Encoder()
    tree = encoder.encode(obj, what)
    meta = {"format": STATE_FORMAT, TREE_KEY: json.dumps(tree, allow_nan=True, separators=(",", ":"))}
    save_safetensors(encoder.tensors, path, meta)


class _Decoder:
    """Rebuilds a tree written by :class:`_Encoder`, reading referenced tensors from an open file."""

    def __init__(self, handle: Any, path: Path) -> None:
        self.handle, self.path = handle, path
        self.names = set(handle.keys())

    def _bad(self, message: str) -> WeightsError:
        return WeightsError(f"{self.path}: not a valid resumable-state file ({message})")

    def _tensor(self, node: dict[str, Any]) -> torch.Tensor:
        name = node.get("tensor", node.get("ndarray"))
        if not isinstance(name, str) or name not in self.names:
            raise self._bad(f"reference to a missing tensor {name!r}")
        return self.handle.get_tensor(name)

    def decode(self, node: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise self._bad(f"nested deeper than {MAX_DEPTH} levels")
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if not isinstance(node, dict) or len(node) not in (1, 2):
            raise self._bad(f"unexpected node {str(node)[:60]!r}")
        if set(node) == {"tensor"}:
            return self._tensor(node)
        if set(node) == {"ndarray", "dtype"}:
            dtype = node["dtype"]
            if dtype not in _NUMPY_DTYPES:
                raise self._bad(f"numpy dtype {dtype!r} not allowed")
            return self._tensor(node).numpy().astype(dtype)
        kind, value = next(iter(node.items())) if len(node) == 1 else (None, None)
        if kind in ("list", "tuple") and isinstance(value, list):
            items = [self.decode(v, depth + 1) for v in value]
            return tuple(items) if kind == "tuple" else items
        if kind == "dict" and isinstance(value, list):
            out: dict[Any, Any] = {}
            for pair in value:
                if (not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], (str, int))
                        or isinstance(pair[0], bool)):
                    raise self._bad("a dict entry is not a [key, value] pair")
                out[pair[0]] = self.decode(pair[1], depth + 1)
            return out
        raise self._bad(f"unexpected node {str(node)[:60]!r}")


def load_tree(path: str | os.PathLike[str]) -> Any:
    """Read a file written by :func:`save_tree`; nothing in it is executed. Bad files raise WeightsError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != STATE_FORMAT or TREE_KEY not in meta:
                raise WeightsError(f"{path}: not a resumable-state file of this version (format "
                                   f"{meta.get('format')!r}, expected {STATE_FORMAT!r})")
            try:
                tree = json.loads(meta[TREE_KEY])
            except (json.JSONDecodeError, RecursionError) as exc:
                raise WeightsError(f"{path}: the state tree is not valid JSON ({type(exc).__name__})") from None
            return _Decoder(handle, path).decode(tree)
    except WeightsError:
        raise
    except Exception as exc:  # safetensors' header/offset checks, truncated data, I/O errors
        message = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise WeightsError(f"{path}: not a readable safetensors file ({message})") from None
