"""bf16 vs fp32 mask agreement of a checkpoint on a dataset (``rsrefseg bench --agreement``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))  # shared helpers of the training tests
from train_helpers import MICRO_OVERRIDES, make_synthetic

from rsrefseg.bench.agreement import mask_agreement, precision_agreement
from rsrefseg.cli.main import main


def test_mask_agreement_statistics() -> None:
    full, empty = np.ones((4, 4), bool), np.zeros((4, 4), bool)
    half = full.copy()
    half[:2] = False
    a = {0: full, 1: empty, 2: full}
    b = {0: full, 1: empty, 2: half}
    r = mask_agreement(a, b)
    assert r["n"] == 3 and r["identical_masks"] == 2
    assert r["mean_iou"] == pytest.approx((1 + 1 + 0.5) / 3)  # both empty counts as 1
    assert r["min_iou"] == 0.5 and r["overall_iou"] == pytest.approx(24 / 32)
    assert r["share_at_least_target"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="different samples"):
        mask_agreement(a, {0: full})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    from rsrefseg import RSRefSeg
    from rsrefseg.checkpoint import save_checkpoint

    data = make_synthetic(tmp_path_factory.mktemp("agree-data"), n_train=2, n_val=6)
    model = RSRefSeg.from_preset("tiny", finetune="full", **MICRO_OVERRIDES)
    with torch.no_grad():  # move the decoder away from its init so predictions are not trivial
        g = torch.Generator().manual_seed(3)
        for p in model.sam.mask_decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt")), data


def test_precision_agreement_runs_both(setup: tuple[Path, dict[str, Path]]) -> None:
    ckpt, data = setup
    r = precision_agreement(str(ckpt), str(data["val"]), str(data["images"]), batch_size=4, log=lambda _: None)
    assert r["n"] == r["agreement"]["n"] > 0
    for name in ("fp32", "bf16"):
        assert r[name]["seconds"] > 0 and 0.0 <= r[name]["mIoU"] <= 1.0
    assert 0.0 <= r["agreement"]["mean_iou"] <= 1.0 and r["speedup"] > 0


@pytest.mark.slow
def test_bench_cli_agreement_check(setup: tuple[Path, dict[str, Path]], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, data = setup
    out = tmp_path / "b.json"
    assert main(["bench", "--smoke", "--no-memory", "--no-bf16", "--out", str(out), "--agreement", str(ckpt),
                 "--agreement-data", str(data["val"]), "--agreement-images", str(data["images"])]) == 0
    report = json.loads(out.read_text())
    n = report["agreement"]["n"]
    assert n > 0
    assert report["targets"]["checks"][-1]["name"].startswith("bf16 vs fp32 masks")
    assert "--agreement" in report["meta"]["command"]
    assert f"bf16 vs fp32 on {n} samples" in capsys.readouterr().out
    assert main(["bench", "--smoke", "--out", str(out), "--agreement", str(ckpt)]) != 0
    assert "--agreement needs --agreement-data" in capsys.readouterr().err
