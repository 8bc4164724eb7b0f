"""Validation inside training runs the kernels and the image-once decoding of ``rsrefseg eval``:
its numbers for the best checkpoint equal ``rsrefseg eval`` of that checkpoint, and the training
kernels are back after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import MICRO_OVERRIDES, micro_config, nontrivial_weights

from rsrefseg.cli.main import main
from rsrefseg.modeling.fast_sam import FastLinear, FastSamVisionAttention
from rsrefseg.modeling.optimize import fast_kernels, optimize_for_inference


def _kernels(model: torch.nn.Module) -> tuple[list[type], list[str]]:
    from rsrefseg.modeling.fast_attention import _towers

    return [type(m) for m in model.modules()], [t.config._attn_implementation for t in _towers(model)]


def test_fast_kernels_switch_on_for_the_block_and_back_after() -> None:
    from rsrefseg import RSRefSeg

    model = nontrivial_weights(RSRefSeg.from_preset("tiny", **MICRO_OVERRIDES)).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    texts = ["the red square", "the circle on the right"]
    before = _kernels(model)
    with torch.no_grad():
        ref = model(images, texts).mask_logits
        with fast_kernels(model) as info:
            assert info["fast_sam_layers"] == 2 and info["fast_attention_models"] == 1
            assert any(isinstance(m, FastSamVisionAttention) for m in model.modules())
            assert any(type(m) is FastLinear for m in model.modules())
            fast = model(images, texts).mask_logits
    assert _kernels(model) == before  # the training kernels are back
    assert ref.abs().max() > 1e-2 and (fast - ref).abs().max() <= 1e-4 * float(ref.abs().max())

    optimize_for_inference(model)  # an inference model: its fast layers stay fast after a block
    prepared = _kernels(model)
    with fast_kernels(model):
        pass
    assert _kernels(model) == prepared


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_validation_in_training_equals_rsrefseg_eval_of_the_best_checkpoint(
    synthetic: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], finetune: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rsrefseg.build
    from rsrefseg.training.train import train
    from rsrefseg.training.train_config import config_from_dict

    build = rsrefseg.build.build_from_preset
    # a few steps from random weights predict empty masks; start from weights with non-trivial masks
    monkeypatch.setattr(rsrefseg.build, "build_from_preset", lambda *a, **k: nontrivial_weights(build(*a, **k)))
    cfg = micro_config(synthetic, tmp_path / "run", report_overlays=0, val_batch_size=4, batch_size=8,
                       schedule__epochs=2, optim__lr=1e-5)
    cfg["model"]["overrides"]["finetune"] = finetune
    result = train(config_from_dict(cfg))
    best = next(h for h in result.state.history if h["step"] == result.state.best_step)
    assert best["mIoU"] > 1e-3, "the test needs non-trivial predictions"

    code = main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best"), "--data",
                 str(synthetic["val"]), "--images", str(synthetic["images"]), "--out", str(tmp_path / "eval"),
                 "--batch-size", "4", "--overlays", "0"])
    capsys.readouterr()
    assert code == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["n"] == best["n"] == 20
    for key in ("mIoU", "oIoU", "Pr@0.5", "Pr@0.7", "Pr@0.9"):
        assert evaluated[key] == pytest.approx(best[key], abs=1e-6), key
