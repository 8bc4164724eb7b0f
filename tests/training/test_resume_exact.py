"""A run SIGKILLed mid-epoch and resumed continues exactly like an uninterrupted run.

LoRA dropout (global torch RNG), seeded flips, gradient accumulation and mid-epoch checkpoints are
all on, so the test fails if any RNG state or the data position were not restored; once with records
one by one and once with grouped expressions (``data.expressions_per_image: 2``).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import cli_env, micro_config, rsrefseg_cmd, write_yaml

# The interrupted run goes through the library with a slow step callback so the kill lands mid-run
# reliably; the callback only sleeps (numerics untouched).
SLOW_DRIVER = """
import sys, time
from rsrefseg.training.train import train
from rsrefseg.training.train_config import load_config
train(load_config(sys.argv[1]), step_callback=lambda state, model: time.sleep(0.15))
"""


def _losses(path: Path) -> list[tuple[int, int, float, float]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return [(int(r["step"]), int(r["epoch"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(handle)]


def _rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text(encoding="utf-8").splitlines()) - 1)
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("per_image", [1, 2], ids=["records", "grouped"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(synthetic: dict[str, Path], tmp_path: Path,
                                                             per_image: int) -> None:
    env = cli_env()
    common = dict(batch_size=2, grad_accum=2, checkpoint_every_steps=5, keep_last=2, report_overlays=0,
                  schedule__epochs=2, data__flip_h=0.5, data__flip_v=0.5, data__cache=True,
                  data__expressions_per_image=per_image)
    # 48 records / 2 = 24 micro-batches = 12 optimizer steps per epoch; LoRA with dropout 0.1.
    lora = {"finetune": "lora", "lora_dropout": 0.1}

    def config(name: str) -> Path:
        cfg = micro_config(synthetic, tmp_path / name, **common)
        cfg["model"]["overrides"].update(lora)
        cfg["data"]["cache_dir"] = str(tmp_path / "cache")
        return write_yaml(cfg, tmp_path / f"{name}.yaml")

    ref_cfg, run_cfg = config("ref"), config("run")
    ref = subprocess.Popen(rsrefseg_cmd("train", "--config", str(ref_cfg)), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver = tmp_path / "slow_driver.py"
    driver.write_text(SLOW_DRIVER, encoding="utf-8")
    victim = subprocess.Popen([sys.executable, str(driver), str(run_cfg)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loss_csv = tmp_path / "run" / "logs" / "losses.csv"
    deadline = time.monotonic() + 120
    while _rows(loss_csv) < 8 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = _rows(loss_csv)
    assert 8 <= killed_at < 24, f"the run was not killed mid-run (rows: {killed_at})"
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts and all((tmp_path / "run" / "checkpoints" / c / "trainer_state.json").is_file() for c in ckpts)
    state = json.loads((tmp_path / "run" / "checkpoints" / ckpts[-1] / "trainer_state.json").read_text())
    assert state["batch_in_epoch"] > 0, "the newest checkpoint should be a mid-epoch one"

    resumed = subprocess.run(rsrefseg_cmd("train", "--config", str(run_cfg), "--resume", "auto"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-2000:]

    expected, got = _losses(tmp_path / "ref" / "logs" / "losses.csv"), _losses(loss_csv)
    assert [r[:2] for r in got] == [r[:2] for r in expected] and len(expected) == 24
    worst = max(abs(a[2] - b[2]) for a, b in zip(expected, got))
    assert worst <= 1e-6, f"per-step losses differ by up to {worst}"
    assert all(abs(a[3] - b[3]) <= 1e-12 for a, b in zip(expected, got))
    ref_best = json.loads((tmp_path / "ref" / "report" / "metrics.json").read_text())["history"]
    run_best = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())["history"]
    assert [h["mIoU"] for h in ref_best] == pytest.approx([h["mIoU"] for h in run_best], abs=1e-9)
