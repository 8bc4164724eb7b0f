"""Config loading, overrides, schedule, losses and the sampler (in-process, fast)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rsrefseg.errors import ConfigError
from rsrefseg.training.data import EpochBatchSampler
from rsrefseg.training.losses import activation_loss, dice_loss, segmentation_loss
from rsrefseg.training.schedule import make_schedule
from rsrefseg.training.train_config import (
    TrainConfig,
    config_from_dict,
    dump_config,
    expand_env,
    load_config,
    parse_overrides,
)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_paper() -> None:
    c = TrainConfig()
    assert (c.optim.lr, c.optim.weight_decay, c.schedule.epochs) == (1e-4, 0.05, 200)
    assert (c.schedule.warmup_epochs, c.schedule.start_factor, c.schedule.min_factor) == (5.0, 0.01, 0.001)
    assert (c.loss.bce_weight, c.loss.dice_weight) == (5.0, 0.0)
    assert c.data.flip_h == c.data.flip_v == 0.0


def test_unknown_key_names_the_dotted_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'"):
        config_from_dict({"optim": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        config_from_dict({"bogus": 1})


def test_overrides_types_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RSREFSEG_TEST_ROOT", "/data/x")
    monkeypatch.delenv("RSREFSEG_TEST_UNSET", raising=False)
    assert expand_env("${RSREFSEG_TEST_UNSET:-${RSREFSEG_TEST_ROOT}}/a") == "/data/x/a"
    assert expand_env("${RSREFSEG_TEST_UNSET}/a") == "${RSREFSEG_TEST_UNSET}/a"
    over = parse_overrides(["--optim.lr", "3e-4", "--batch_size=4", "--optim.betas", "[0.9, 0.99]",
                            "--data.train_jsonl", "${RSREFSEG_TEST_ROOT}/t.jsonl", "--grad_clip", "null"])
    path = tmp_path / "c.yaml"
    path.write_text("schedule:\n  epochs: 3\n", encoding="utf-8")
    c = load_config(path, over)
    assert c.optim.lr == pytest.approx(3e-4) and c.batch_size == 4 and c.optim.betas == (0.9, 0.99)
    assert c.data.train_jsonl == "/data/x/t.jsonl" and c.grad_clip is None and c.schedule.epochs == 3
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(c), encoding="utf-8")
    assert load_config(dumped) == c  # the saved config.yaml reproduces the run
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, {"batch_size": "many"})


def test_shipped_configs_load() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_schedule_warmup_then_cosine() -> None:
    s = make_schedule(epochs=10, steps_in_epoch=10, warmup_epochs=2)
    assert s.warmup_steps == 20 and s.total_steps == 100
    assert s(0) == pytest.approx(0.01) and s(10) == pytest.approx(0.01 + 0.99 * 0.5)
    assert s(20) == pytest.approx(1.0) and s(100) == pytest.approx(0.001)
    assert s(60) == pytest.approx(0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(s(i) >= s(i + 1) for i in range(20, 100))
    assert make_schedule(10, 10, 2, warmup_steps=5).warmup_steps == 5


def test_losses() -> None:
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    perfect = (target * 2 - 1) * 50  # logits far on the right side
    loss, parts = segmentation_loss(perfect, target, 5.0, 5.0)
    assert loss.item() < 1e-3 and set(parts) == {"bce", "dice"}
    low = torch.zeros(2, 1, 4, 4)  # upsampled to the 8 x 8 label size
    loss, parts = segmentation_loss(low, target, 5.0, 0.0)
    assert loss.item() == pytest.approx(5 * math.log(2), rel=1e-5) and "dice" not in parts
    assert dice_loss(torch.full((1, 1, 4, 4), -50.0), torch.zeros(1, 1, 4, 4)).item() < 1e-6
    # Activation loss: a one-pixel object marks its whole patch of the 2 x 2 grid.
    dot = torch.zeros(1, 1, 8, 8)
    dot[0, 0, 1, 6] = 1
    marked = torch.full((1, 1, 2, 2), -50.0)
    marked[0, 0, 0, 1] = 50.0
    assert activation_loss(marked, dot).item() < 1e-3 < activation_loss(-marked, dot).item()


def test_sampler_is_seeded_resumable_and_sharded() -> None:
    full = EpochBatchSampler(10, 3, seed=1)
    full.set_epoch(2)
    batches = list(full)
    assert len(batches) == 4 and sorted(i for b in batches for i, _ in b) == list(range(10))
    again = EpochBatchSampler(10, 3, seed=1)
    again.set_epoch(2, start_batch=2)
    assert list(again) == batches[2:]
    other = EpochBatchSampler(10, 3, seed=1)
    other.set_epoch(3)
    assert list(other) != batches
    shards = [EpochBatchSampler(10, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    seen = []
    for sh in shards:
        sh.set_epoch(0)
        seen += [i for b in sh for i, _ in b]
        assert len(sh) == 2
    assert len(seen) == 12 and set(seen) == set(range(10))  # padded by repeating the first indices
    assert np.unique([s for b in batches for _, s in b]).size == 10
