"""Resumable state without pickle: exact round trips, nothing callable stored, malformed files refused."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from train_helpers import cli_env, micro_config, rsrefseg_cmd, write_yaml

from rsrefseg.errors import WeightsError
from rsrefseg.training.schedule import WarmupCosine
from rsrefseg.training.state import capture_rng, restore_rng
from rsrefseg.training.state_check import check_optimizer_state, check_scheduler_state
from rsrefseg.training.state_files import STATE_FORMAT, TREE_KEY, load_tree, save_tree


def _same(a: Any, b: Any) -> bool:
    """Equal values AND equal types all the way down (tuples stay tuples, dtypes stay dtypes)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and np.isnan(a):
        return bool(np.isnan(b))
    return bool(a == b)


def _trained_optimizer() -> tuple[torch.optim.Optimizer, Any, list[torch.nn.Parameter]]:
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=WarmupCosine(100, 10))
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler, params


def test_every_state_round_trips_exactly(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.random(), np.random.randn(), torch.rand(2)  # mid-stream states, a cached gaussian in numpy
    optimizer, scheduler, _ = _trained_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))
    scaler.update(512.0)
    states = {"rng": capture_rng(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
              "scaler": scaler.state_dict(), "odd": {"nan": float("nan"), "inf": float("inf"), 7: (None, True, "s"),
                                                       "bf16": torch.ones(2, dtype=torch.bfloat16)}}
    assert isinstance(states["rng"]["python"], tuple) and isinstance(states["rng"]["numpy"][1], np.ndarray)
    assert isinstance(states["optimizer"]["state"][0]["step"], torch.Tensor)  # AdamW keeps step tensors
    assert states["scheduler"]["lr_lambdas"] == [{"total_steps": 100, "warmup_steps": 10, "start_factor": 0.01,
                                                  "min_factor": 0.001}] * 2  # per group: its fields, no callable
    for name, value in states.items():
        save_tree(value, tmp_path / f"{name}.safetensors", name)
        loaded = load_tree(tmp_path / f"{name}.safetensors")
        assert _same(value, loaded), name
    expected = (random.random(), np.random.randn(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng(load_tree(tmp_path / "rng.safetensors"))
    got = (random.random(), np.random.randn(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_callables_and_objects_are_never_stored(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot be stored without pickle"):
        save_tree({"lr_lambdas": [lambda step: 1.0]}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="WarmupCosine"):
        save_tree([WarmupCosine(1, 0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and list(tmp_path.iterdir()) == []  # nothing half-written


def _write_raw(path: Path, tree: Any, tensors: dict[str, torch.Tensor] | None = None,
               fmt: str = STATE_FORMAT) -> Path:
    from safetensors.torch import save_file

    save_file(tensors or {}, str(path), metadata={"format": fmt, TREE_KEY: json.dumps(tree)})
    return path


@pytest.mark.parametrize("case, match", [
    ("missing_ref", "missing tensor"),
    ("deep", "nested deeper"),
    ("bad_node", "unexpected node"),
    ("bad_dtype", "dtype 'object' not allowed"),
    ("bad_pair", "not a \\[key, value\\] pair"),
    ("other_format", "not a resumable-state file of this version"),
    ("bad_json", "not valid JSON"),
    ("zero_bytes", "not a readable safetensors file"),
    ("truncated", "not a readable safetensors file"),
    ("huge_header", "not a readable safetensors file"),
    ("pickle", "not a readable safetensors file"),
])
def test_malformed_state_files_are_refused(tmp_path: Path, case: str, match: str) -> None:
    path = tmp_path / "optimizer.safetensors"
    deep: Any = 1
    for _ in range(40):
        deep = {"list": [deep]}
    if case == "missing_ref":
        _write_raw(path, {"tensor": "t9"})
    elif case == "deep":
        _write_raw(path, deep)
    elif case == "bad_node":
        _write_raw(path, {"object": "os.system"})
    elif case == "bad_dtype":
        _write_raw(path, {"ndarray": "t0", "dtype": "object"}, {"t0": torch.zeros(2)})
    elif case == "bad_pair":
        _write_raw(path, {"dict": [["a"]]})
    elif case == "other_format":
        _write_raw(path, 1, fmt="rsrefseg-trained-v1")
    elif case == "bad_json":
        from safetensors.torch import save_file

        save_file({}, str(path), metadata={"format": STATE_FORMAT, TREE_KEY: "{not json"})
    elif case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "truncated":
        save_tree({"a": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:-100])
    elif case == "huge_header":  # header claims a 2**40-element tensor in a tiny file
        header = json.dumps({"t0": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    elif case == "pickle":
        torch.save({"state": {}}, path)
    with pytest.raises(WeightsError, match=match) as info:
        load_tree(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_states_that_do_not_fit_are_refused_before_loading() -> None:
    optimizer, scheduler, _ = _trained_optimizer()
    good = optimizer.state_dict()
    check_optimizer_state(optimizer, good, "opt")
    bad = optimizer.state_dict()
    bad["state"][0]["exp_avg"] = torch.zeros(5, 5)  # torch would accept it and fail at the next step
    with pytest.raises(WeightsError, match=r"opt: .*state\[0\]\['exp_avg'\] is a \(5, 5\)"):
        check_optimizer_state(optimizer, bad, "opt")
    bad = optimizer.state_dict()
    bad["param_groups"][0]["lr"] = "fast"
    with pytest.raises(WeightsError, match="must be a number"):
        check_optimizer_state(optimizer, bad, "opt")
    bad = optimizer.state_dict()
    bad["param_groups"][1]["params"] = [1, 2]
    with pytest.raises(WeightsError, match="holds 2 parameter"):
        check_optimizer_state(optimizer, bad, "opt")
    sched = scheduler.state_dict()
    sched["step"] = 5  # load_state_dict would shadow the method with an int
    sched["optimizer"] = None
    check_scheduler_state(scheduler, sched, "sched")
    assert "step" not in sched and "optimizer" not in sched
    scheduler.load_state_dict(sched)
    scheduler.step()  # still a method
    bad_lambda = scheduler.state_dict()
    bad_lambda["lr_lambdas"] = [{"__call__": 1}]
    with pytest.raises(WeightsError, match="lr_lambdas"):
        check_scheduler_state(scheduler, bad_lambda, "sched")


class _Marker:
    """Unpickling this creates a file: what a hostile checkpoint could do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_crafted_pickle_in_a_checkpoint_is_never_unpickled(synthetic: dict[str, Path], tmp_path: Path) -> None:
    """A folder of the old layout whose optimizer.pt runs code when unpickled: exit 2, one error line
    naming the file, and the code never ran (no marker file)."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"epoch": 0, "batch_in_epoch": 1, "global_step": 1,
                                                         "num_processes": 1}))
    torch.save({"state": {}, "param_groups": [_Marker(str(marker))]}, ckpt / "optimizer.pt")
    for name in ("scheduler.pt", "rng-0.pt"):
        torch.save({"x": _Marker(str(marker))}, ckpt / name)
    config = write_yaml(micro_config(synthetic, tmp_path / "run"), tmp_path / "c.yaml")
    done = subprocess.run(rsrefseg_cmd("train", "--config", str(config), "--resume", str(ckpt)),
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ckpt / 'optimizer.pt'}: ") and "pickle" in lines[0]
    assert "Traceback" not in done.stderr and not marker.exists()


def test_optimizer_states_holding_objects_are_refused_before_training() -> None:
    from rsrefseg.errors import ConfigError
    from rsrefseg.training.state_files import check_storable

    class LossScaler:  # what DeepSpeed ZeRO keeps in its optimizer state dict
        cur_scale = 65536.0

    adam = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    check_storable(adam.state_dict(), "optimizer state")  # plain: accepted
    zero_like = {"loss_scaler": LossScaler(), "base_optimizer_state": adam.state_dict()}
    with pytest.raises(ConfigError, match=r"optimizer state\['loss_scaler'\]: a LossScaler cannot be stored.*DDP"):
        check_storable(zero_like, "optimizer state")
