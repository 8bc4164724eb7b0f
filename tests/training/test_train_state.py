"""Resumable checkpoint folders: atomic layout, RNG round trip, keep-last-k, best, resume lookup."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from train_helpers import MICRO_OVERRIDES

from rsrefseg.errors import ConfigError
from rsrefseg.training.state import (
    TrainerState,
    list_checkpoints,
    load_resumable,
    prune_checkpoints,
    resolve_resume,
    save_best,
    save_resumable,
)


def _accelerator(world: int = 1, kind: str = "NO") -> Any:
    return SimpleNamespace(is_main_process=True, process_index=0, num_processes=world, scaler=None,
                           wait_for_everyone=lambda: None, unwrap_model=lambda m: m, distributed_type=kind)


def test_save_load_prune_and_resume_lookup(tmp_path: Path) -> None:
    from rsrefseg import RSRefSeg

    model = RSRefSeg.from_preset("tiny", finetune="lora", **MICRO_OVERRIDES)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    scheduler.step()
    root = tmp_path / "run" / "checkpoints"
    acc = _accelerator()

    def seed_all() -> None:
        random.seed(1)
        np.random.seed(1)
        torch.manual_seed(1)

    seed_all()
    state = TrainerState(epoch=2, batch_in_epoch=5, global_step=17, history=[{"step": 10, "mIoU": 0.5}])
    first = save_resumable(root, acc, model, optimizer, scheduler, state)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    assert first.name == "step-00000017"
    assert sorted(p.name for p in first.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "rng-0.safetensors", "scheduler.safetensors",
        "trainer_state.json"]
    save_resumable(root, acc, model, optimizer, scheduler, state)  # the same step again replaces it
    for step in (20, 30):
        state.global_step = step
        seed_all()  # every checkpoint holds the RNG states that produced `expected`
        save_resumable(root, acc, model, optimizer, scheduler, state)
    (root / ".tmp-step-00000040").mkdir()  # what a crash mid-save leaves: ignored, then cleaned
    assert [p.name for p in list_checkpoints(root)] == ["step-00000017", "step-00000020", "step-00000030"]
    assert resolve_resume("auto", tmp_path / "run").name == "step-00000030"
    assert resolve_resume(str(tmp_path / "run"), tmp_path / "x").name == "step-00000030"
    assert resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(ConfigError, match="not a resumable checkpoint"):
        resolve_resume(str(tmp_path / "nothing"), tmp_path / "run")
    prune_checkpoints(root, keep_last=2)
    assert [p.name for p in list_checkpoints(root)] == ["step-00000020", "step-00000030"]
    assert not (root / ".tmp-step-00000040").exists()

    fresh = RSRefSeg.from_preset("tiny", finetune="lora", **MICRO_OVERRIDES)
    fresh_params = [p for p in fresh.parameters() if p.requires_grad]
    opt2 = torch.optim.AdamW(fresh_params, lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 1.0 / (1 + step))
    torch.manual_seed(123)
    loaded = load_resumable(first.with_name("step-00000020"), acc, fresh, opt2, sched2)
    assert (loaded.epoch, loaded.batch_in_epoch, loaded.global_step) == (2, 5, 20)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert torch.equal(fresh_params[0], params[0]) and sched2.last_epoch == 1
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ConfigError, match="same number"):
        load_resumable(first.with_name("step-00000020"), _accelerator(world=2), fresh, opt2, sched2)

    best = save_best(root, model, {"step": 30, "mIoU": 0.7})
    best = save_best(root, model, {"step": 40, "mIoU": 0.8})
    assert sorted(p.name for p in best.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in root.iterdir()) == ["best", "step-00000020", "step-00000030"]


def test_sharded_optimizer_state_is_saved_per_process(tmp_path: Path) -> None:
    """DeepSpeed ZeRO / FSDP: each process saves and restores its own optimizer shard."""
    from rsrefseg import RSRefSeg
    from rsrefseg.training.state import optimizer_file, optimizer_sharded

    assert not optimizer_sharded(_accelerator(kind="MULTI_GPU"))
    assert optimizer_sharded(_accelerator(kind="DistributedType.DEEPSPEED")) and optimizer_sharded(_accelerator(kind="FSDP"))
    model = RSRefSeg.from_preset("tiny", finetune="lora", **MICRO_OVERRIDES)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    acc = _accelerator(kind="DEEPSPEED")
    saved = save_resumable(tmp_path, acc, model, optimizer, scheduler, TrainerState(global_step=3))
    assert optimizer_file(acc) == "optimizer-0.safetensors"
    assert (saved / "optimizer-0.safetensors").is_file() and not (saved / "optimizer.safetensors").exists()
    opt2 = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    load_resumable(saved, acc, model, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 1.0))
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ConfigError, match="another distributed setup"):  # a DDP run cannot resume it
        load_resumable(saved, _accelerator(), model, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0))


@pytest.mark.parametrize("kind", ["DistributedType.DEEPSPEED", "DistributedType.FSDP"])
def test_sharding_setups_are_refused_before_training(kind: str) -> None:
    """DeepSpeed ZeRO / FSDP: one error pointing to DDP, before any model is built."""
    from rsrefseg.training.setup import check_distributed

    with pytest.raises(ConfigError, match=r"distributed_type (DEEPSPEED|FSDP) is not supported.*multi-gpu.yaml"):
        check_distributed(SimpleNamespace(distributed_type=kind))
    check_distributed(SimpleNamespace(distributed_type="DistributedType.MULTI_GPU"))  # DDP is fine
    check_distributed(SimpleNamespace(distributed_type="DistributedType.NO"))
