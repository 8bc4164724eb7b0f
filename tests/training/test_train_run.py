"""End-to-end training run in-process, and the one-line errors of ``rsrefseg train``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from train_helpers import micro_config, write_yaml

from rsrefseg.cli.main import main


def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_train_writes_checkpoints_logs_and_report(synthetic: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = micro_config(synthetic, tmp_path / "run", checkpoint_every_steps=5, keep_last=2, tensorboard=True,
                       data__cache=True)
    cfg["model"]["overrides"]["finetune"] = "full"
    cfg["loss"]["activation_weight"] = 1.0
    path = write_yaml(cfg, tmp_path / "c.yaml")
    code, out, err = _run_cli(capsys, "train", "--config", str(path), "--optim.lr", "2e-3")
    assert code == 0, err
    run = tmp_path / "run"
    saved = (run / "config.yaml").read_text()
    assert "lr: 0.002" in saved and "finetune: full" in saved  # the resolved config, overrides included
    with (run / "logs" / "losses.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, 25))  # 48 records / batch 4 x 2 epochs
    assert float(rows[0]["lr"]) == pytest.approx(2e-3 * 0.01)
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-5:]) < sum(losses[:5]), "the loss should go down"
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000020", "step-00000024"]  # keep_last 2
    assert sorted(p.name for p in (run / "checkpoints" / "best").iterdir()) == ["config.json", "model.safetensors"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    report = run / "report"
    for name in ("metrics.md", "metrics.json", "loss.png", "val_miou.png"):
        assert (report / name).is_file(), name
    assert len(list((report / "overlays").glob("*.png"))) == 1
    metrics = json.loads((report / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and "baseline: empty mask" in metrics["rows"]
    assert any(k.startswith("baseline: best fixed box") for k in metrics["rows"])
    assert "control: best, expression swapped within the image" in metrics["rows"]
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert "baseline: full image" in out

    from rsrefseg import RSRefSeg

    model = RSRefSeg.from_pretrained(run / "checkpoints" / "best")  # the best checkpoint loads on its own
    assert model.config.finetune == "full" and model.config.sam_image_size == 64

    code, _, err = _run_cli(capsys, "train", "--config", str(path))
    assert code == 2 and "--resume auto" in err and len(err.strip().splitlines()) == 1


def test_unknown_key_missing_data_and_empty_set_are_one_line_errors(
    synthetic: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_yaml(micro_config(synthetic, tmp_path / "run"), tmp_path / "c.yaml")
    code, _, err = _run_cli(capsys, "train", "--config", str(path), "--optim.lrr", "1e-3")
    assert code == 2 and err.strip() == err.strip().splitlines()[0]
    assert "unknown config key 'optim.lrr'" in err

    code, _, err = _run_cli(capsys, "train", "--config", str(path), "--data.train_jsonl", "${NO_SUCH_VAR}/t.jsonl")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "data.train_jsonl: no such file" in err and "environment variable" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    code, _, err = _run_cli(capsys, "train", "--config", str(path), "--data.train_jsonl", str(empty))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "train set is empty" in err

    code, _, err = _run_cli(capsys, "train", "--config", str(path), "--data.train_split", "nope")
    assert code == 2 and "no record with split 'nope'" in err

    code, _, err = _run_cli(capsys, "train", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "no such config file" in err


def test_out_of_memory_says_what_to_lower(synthetic: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from rsrefseg.training import train as train_module

    def boom(self: object, *args: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module.LossModule, "forward", boom)
    path = write_yaml(micro_config(synthetic, tmp_path / "run"), tmp_path / "c.yaml")
    code, _, err = _run_cli(capsys, "train", "--config", str(path), "--grad_accum", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "out of memory with batch_size 4" in err and "--grad_accum" in err and "effective batch (8)" in err
