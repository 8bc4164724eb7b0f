"""scripts/gpu-check.sh: fails fast without CUDA; its CPU dry run runs every phase (so it cannot rot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsrefseg.paths import repo_root

SCRIPT = repo_root() / "scripts" / "gpu-check.sh"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RSREFSEG_GPU_CHECK_DRY_RUN", None)
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_fails_fast_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=120,
                          env=_env(), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gpu-check: no CUDA GPU available")
    assert "--cpu-dry-run" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_cpu_dry_run_runs_every_phase(tmp_path: Path, shared_data: Path) -> None:
    if not (shared_data / "nwpu-vhr10" / "annotations").is_dir() or not (shared_data / "geotiff").is_dir():
        pytest.skip("NWPU VHR-10 or the sample GeoTIFFs are not in the shared data")
    out = tmp_path / "gc"
    # The environment switch, and $OUT as the output folder (as on the device machine).
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900,
                          env=_env(OUT=str(out), RSREFSEG_GPU_CHECK_DRY_RUN="1"), check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["dry_run"] is True and report["gpu_measured"] is False and report["ok"] is True
    phases = report["phases"]
    assert list(phases) == ["environment", "data", "bench_gpu", "matmul_peak", "train", "train_checkpointing",
                            "eval", "predict"]
    assert phases["bench_gpu"]["status"] == "skipped (CPU dry run)"
    assert phases["data"]["train_records"] > 0 and phases["data"]["val_records"] > 0
    for name, ckpt in (("train", False), ("train_checkpointing", True)):
        r = phases[name]
        assert r["status"] == "ok" and r["steps"] == 30 and r["timed_steps"] == 25 and r["checkpointing"] is ckpt
        assert 0 < r["step_s_min"] <= r["step_s_median"] and 0 < r["mfu_at_median"] < 1
        assert Path(r["best_checkpoint"], "config.json").is_file()
    assert phases["eval"]["n"] > 0 and phases["eval"]["mIoU"] is not None
    assert phases["predict"]["failures"] == [] and any(f.endswith(".geojson") for f in phases["predict"]["files"])
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("CPU dry run (tiny): NOT a GPU measurement") and "all phases ok" in summary
    assert summary in proc.stdout
    # A second run into the same folder starts fresh runs (no "already holds checkpoints").
    again = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run", "--steps", "6", "--out", str(out)],
                           capture_output=True, text=True, timeout=900, env=_env(), check=False)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert json.loads((out / "gpu-check.json").read_text())["phases"]["train"]["steps"] == 6


def test_dry_run_without_nwpu_fails_fast(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run", "--out", str(out)], capture_output=True, text=True,
                          timeout=120, env=_env(RSREFSEG_NWPU=str(tmp_path / "nowhere")), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: gpu-check: NWPU VHR-10 not found: no {tmp_path / 'nowhere' / 'images'} (set RSREFSEG_NWPU to its "
        "folder or RSREFSEG_DATA to the shared data root)"]
    assert not out.exists()
