"""Checks of a resumable state read from disk before it is loaded into the optimizer, scheduler,
grad scaler or RNGs.

``load_state_dict`` of torch's optimizers and schedulers trusts its input: a wrong-shaped moment
tensor is accepted and fails only at the next optimizer step (a traceback in the middle of a run),
and a scheduler state may set any attribute (``step = 5`` would shadow the method). These checks
compare what was read with the state of the objects built for this run and raise
:class:`~rsrefseg.errors.WeightsError` naming the file; what they accept loads and trains.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rsrefseg.errors import WeightsError

_NUMBER = (bool, int, float)


def _bad(where: str, message: str) -> WeightsError:
    return WeightsError(f"{where}: does not fit this run ({message})"[:400])


def check_like(reference: Any, loaded: Any, where: str, path: str = "") -> None:
    """``loaded`` has the types of ``reference`` wherever both have a value (None matches anything)."""
    label = path or "the state"
    if reference is None or loaded is None:
        return
    if isinstance(reference, dict):
        if not isinstance(loaded, dict):
            raise _bad(where, f"{label} must be a mapping")
        for key in reference.keys() & loaded.keys():
            check_like(reference[key], loaded[key], where, f"{path}[{key!r}]")
    elif isinstance(reference, (list, tuple)):
        if not isinstance(loaded, (list, tuple)):
            raise _bad(where, f"{label} must be a list")
        if len(reference) == len(loaded):
            for i, (a, b) in enumerate(zip(reference, loaded)):
                check_like(a, b, where, f"{path}[{i}]")
    elif isinstance(reference, torch.Tensor):
        if not isinstance(loaded, torch.Tensor):
            raise _bad(where, f"{label} must be a tensor")
        if tuple(loaded.shape) != tuple(reference.shape) or loaded.is_floating_point() != reference.is_floating_point():
            raise _bad(where, f"{label} is a {tuple(loaded.shape)} {loaded.dtype} tensor, expected "
                              f"{tuple(reference.shape)} {reference.dtype}")
    elif isinstance(reference, _NUMBER):
        if not isinstance(loaded, _NUMBER):
            raise _bad(where, f"{label} must be a number, got {type(loaded).__name__}")
    elif isinstance(reference, str) and not isinstance(loaded, str):
        raise _bad(where, f"{label} must be a string, got {type(loaded).__name__}")


def _params_by_index(optimizer: Any, groups: list[Any], where: str) -> dict[int, torch.Tensor]:
    """Saved parameter index -> parameter of this run (the pairing ``load_state_dict`` makes)."""
    current = optimizer.param_groups
    if len(groups) != len(current):
        raise _bad(where, f"{len(groups)} parameter group(s), this run has {len(current)}")
    mapping: dict[int, torch.Tensor] = {}
    for i, (saved, group) in enumerate(zip(groups, current)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise _bad(where, f"param_groups[{i}] has no list of params")
        ids = saved["params"]
        if len(ids) != len(group["params"]) or not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
            raise _bad(where, f"param_groups[{i}] holds {len(ids)} parameter(s), this run {len(group['params'])}")
        mapping.update(zip(ids, group["params"]))
    return mapping


def check_optimizer_state(optimizer: Any, loaded: Any, where: str) -> None:
    """A torch optimizer state (``{"state": {index: {...}}, "param_groups": [...]}``) that fits
    ``optimizer``: same groups and parameter counts, hyper-parameters of the same types, and every
    per-parameter tensor either a scalar (``step``) or a floating tensor of its parameter's shape."""
    reference = optimizer.state_dict()
    plain = isinstance(reference, dict) and isinstance(reference.get("param_groups"), list)
    if not plain:  # another optimizer layout (e.g. a DeepSpeed wrapper): types only
        check_like(reference, loaded, where)
        return
    if not isinstance(loaded, dict) or not isinstance(loaded.get("state"), dict) or not isinstance(
            loaded.get("param_groups"), list):
        raise _bad(where, "expected an optimizer state with 'state' and 'param_groups'")
    check_like(reference["param_groups"], loaded["param_groups"], where, "param_groups")
    params = _params_by_index(optimizer, loaded["param_groups"], where)
    for index, entry in loaded["state"].items():
        if index not in params:
            raise _bad(where, f"state of unknown parameter index {index!r}")
        if not isinstance(entry, dict):
            raise _bad(where, f"state[{index}] must be a mapping")
        shape = tuple(params[index].shape)
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                if value.dim() and (tuple(value.shape) != shape or not value.is_floating_point()):
                    raise _bad(where, f"state[{index}][{key!r}] is a {tuple(value.shape)} {value.dtype} tensor, "
                                      f"its parameter is {shape}")
            elif value is not None and not isinstance(value, _NUMBER):
                raise _bad(where, f"state[{index}][{key!r}] must be a tensor or a number")


def check_scheduler_state(scheduler: Any, loaded: Any, where: str) -> None:
    """A learning-rate scheduler state with only the keys and types this run's scheduler has.

    Extra keys are dropped from ``loaded`` (in place): ``load_state_dict`` would set them as
    attributes. ``lr_lambdas`` entries must be None or plain values for this run's lambda objects.
    """
    reference = scheduler.state_dict()
    if not isinstance(loaded, dict):
        raise _bad(where, "expected a mapping")
    for key in set(loaded) - set(reference):
        del loaded[key]
    lambdas = loaded.get("lr_lambdas")
    if "lr_lambdas" in reference:
        ref_lambdas = reference["lr_lambdas"]
        if not isinstance(lambdas, list) or len(lambdas) != len(ref_lambdas):
            raise _bad(where, f"lr_lambdas must be a list of {len(ref_lambdas)}")
        for i, (ref, got) in enumerate(zip(ref_lambdas, lambdas)):
            if got is None:
                continue
            if ref is None or not isinstance(got, dict) or not set(got) <= set(ref):
                raise _bad(where, f"lr_lambdas[{i}] does not describe this run's schedule")
            check_like(ref, got, where, f"lr_lambdas[{i}]")
    check_like({k: v for k, v in reference.items() if k != "lr_lambdas"}, loaded, where)


def check_rng_state(state: Any, where: str) -> None:
    """The dict of :func:`rsrefseg.training.state.capture_rng`: python, numpy and torch states."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise _bad(where, "expected the python, numpy and torch RNG states")
    python, numpy_state, torch_state = state["python"], state["numpy"], state["torch"]
    if not (isinstance(python, tuple) and len(python) == 3 and isinstance(python[1], tuple)
            and all(isinstance(v, int) for v in python[1])):
        raise _bad(where, "python RNG state is malformed")
    if not (isinstance(numpy_state, tuple) and len(numpy_state) == 5 and isinstance(numpy_state[1], np.ndarray)):
        raise _bad(where, "numpy RNG state is malformed")
    cuda = state.get("cuda", [])
    if not isinstance(cuda, (list, tuple)):
        raise _bad(where, "CUDA RNG states must be a list")
    tensors = [torch_state, *cuda]
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in tensors):
        raise _bad(where, "torch RNG state must be 1-D uint8 tensors")
