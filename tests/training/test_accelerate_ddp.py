"""``accelerate launch --cpu --num_processes 2``: gradients are synchronised (identical weights on
both processes after every step), the data is sharded, validation is gathered, the run saves."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from train_helpers import accelerate_cmd, micro_config, write_yaml

PROBE = Path(__file__).with_name("ddp_probe.py")


@pytest.mark.slow
def test_two_processes_hold_identical_weights(synthetic: dict[str, Path], tmp_path: Path) -> None:
    cfg = micro_config(synthetic, tmp_path / "run", max_steps=3, checkpoint_every_steps=2, batch_size=3,
                       data__max_val_samples=7)
    cfg["model"]["overrides"]["finetune"] = "full"
    path = write_yaml(cfg, tmp_path / "ddp.yaml")
    cmd, env = accelerate_cmd(2, str(PROBE), str(path), str(tmp_path))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rank0 = (tmp_path / "hash-0.txt").read_text().split("\n")
    rank1 = (tmp_path / "hash-1.txt").read_text().split("\n")
    assert len([r for r in rank0 if r]) == 3
    assert rank0 == rank1, "weights differ between processes: gradients were not synchronised"
    hashes = [line.split()[-1] for line in rank0 if line]
    assert len(set(hashes)) == 3, "every optimizer step should change the weights"
    # 48 records, 2 processes x batch 3 -> 8 batches per process and epoch; 3 steps = 3 batches each.
    assert rank0[0].split()[:3] == ["1", "0", "1"]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000002", "step-00000003"]
    for rank in (0, 1):
        assert (tmp_path / "run" / "checkpoints" / "step-00000003" / f"rng-{rank}.safetensors").is_file()
    assert (tmp_path / "run" / "report" / "metrics.json").is_file()
    assert "stopped by max_steps" in done.stdout
