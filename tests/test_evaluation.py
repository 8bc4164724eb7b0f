"""``rsrefseg.evaluation``: per-sample IoU at original resolution, sharding, baselines, and the
``rsrefseg eval`` command with 1 and 2 processes giving identical numbers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).with_name("training")))  # shared helpers of the training tests
from train_helpers import MICRO_OVERRIDES, accelerate_cmd, make_synthetic

from rsrefseg.data.datasets import ReferringDataset, load_split
from rsrefseg.data.transforms import logits_to_original
from rsrefseg.evaluation import (
    EvalRow,
    SwappedTextView,
    box_mask,
    evaluate,
    evaluate_baselines,
    fit_fixed_box,
    shard_batches,
    summarize_rows,
    target_mask,
)
from rsrefseg.metrics import iou


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_synthetic(tmp_path_factory.mktemp("eval-synthetic"), n_train=12, n_val=10)


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rsrefseg import RSRefSeg
    from rsrefseg.checkpoint import save_checkpoint

    model = RSRefSeg.from_preset("tiny", finetune="full", **MICRO_OVERRIDES)
    with torch.no_grad():  # move the decoder away from its init so predictions are not trivial
        g = torch.Generator().manual_seed(3)
        for p in model.sam.mask_decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("n,bs", [(1, 4), (7, 3), (10, 2), (20, 8)])
def test_shard_batches_keep_the_single_process_batches(n: int, bs: int) -> None:
    single = shard_batches(n, bs)
    assert sorted(i for b in single for i in b) == list(range(n))
    for world in (2, 3):
        shards = [shard_batches(n, bs, r, world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # every process runs the same number of batches
        assert all(b in single for s in shards for b in s)  # each batch is a batch of the 1-process run
        assert sorted({i for s in shards for b in s for i in b}) == list(range(n))


def test_summarize_rows_deduplicates_and_orders() -> None:
    a = EvalRow("a", 1, 2, 1, 2, index=0, text="t")
    b = EvalRow("b", 0, 4, 4, 0, index=1, text="t")
    metrics, rows = summarize_rows([b, a, b])
    assert [r.index for r in rows] == [0, 1] and metrics["n"] == 2
    assert metrics["mIoU"] == pytest.approx(0.25) and metrics["oIoU"] == pytest.approx(1 / 6)


def test_evaluate_scores_at_original_resolution(data: dict[str, Path], micro_checkpoint: Path) -> None:
    from rsrefseg import RSRefSeg

    model = RSRefSeg.from_pretrained(micro_checkpoint)
    ds = load_split(data["val"], data["images"], image_size=64)
    result = evaluate(model, ds, batch_size=3, keep=[0, 5])
    assert result.metrics["n"] == len(ds) == 20 and [r.index for r in result.rows] == list(range(20))
    for index in (0, 5):
        item = ds[index]
        with torch.no_grad():
            logits = model(item["pixel_values"][None].float(), [item["text"]]).mask_logits[0, 0]
        pred = (logits_to_original(logits, item["meta"]) > 0).numpy()
        assert pred.shape == item["target"].shape != (64, 64)  # original size, not the model's
        assert np.array_equal(pred, result.predictions[index])
        assert result.rows[index].iou == pytest.approx(iou(pred, item["target"]), abs=1e-12)
    assert model.training is False


def test_swapped_text_view_keeps_targets_and_swaps_expressions(data: dict[str, Path]) -> None:
    ds = load_split(data["val"], data["images"], image_size=64)
    view = SwappedTextView(ds)
    assert len(view) == len(ds)  # every synthetic image has two expressions with different targets
    for position in (0, 3):
        index, other = view.pairs[position]
        item, original = view[position], ds[index]
        assert ds.records[other].file_name == ds.records[index].file_name and other != index
        assert item["text"] == ds.records[other].sent != original["text"]
        assert np.array_equal(item["target"], original["target"]) and item["index"] == index


def test_baselines_and_fixed_box(data: dict[str, Path]) -> None:
    train = load_split(data["train"], data["images"], image_size=64)
    val = load_split(data["val"], data["images"], image_size=64)
    out = evaluate_baselines(val, train, grid=8)
    assert out["empty"]["mIoU"] == 0.0 and out["empty"]["n"] == 20
    fractions = [target_mask(val, i).mean() for i in range(len(val))]
    assert out["full_image"]["mIoU"] == pytest.approx(float(np.mean(fractions)))
    assert out["fixed_box"]["n"] == 20 and len(out["fixed_box_coords"]) == 4
    # The lattice search is exact: it matches brute force over the same lattice on a small set.
    small = ReferringDataset(train.records[:6], data["images"], 64)
    box, score = fit_fixed_box(small, grid=4)
    assert all(0.0 <= v <= 1.0 for v in box) and box[0] < box[2] and box[1] < box[3]
    best = 0.0
    lattice = [k / 4 for k in range(5)]
    for x0 in lattice:
        for x1 in (v for v in lattice if v > x0):
            for y0 in lattice:
                for y1 in (v for v in lattice if v > y0):
                    ious = [iou(box_mask(*target_mask(small, i).shape, (x0, y0, x1, y1)), target_mask(small, i))
                            for i in range(len(small))]
                    best = max(best, float(np.mean(ious)))
    assert score == pytest.approx(best, abs=1e-12)


@pytest.mark.slow
def test_eval_cli_one_and_two_processes_identical(data: dict[str, Path], micro_checkpoint: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", "--checkpoint", str(micro_checkpoint), "--data", str(data["val"]), "--images",
            str(data["images"]), "--batch-size", "3", "--overlays", "2", "--baselines", "--swap-control"]
    from rsrefseg.cli.main import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1): the same kernels
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one_out = capsys.readouterr().out
    cmd, env = accelerate_cmd(2, "-m", "rsrefseg", *args, "--out", str(tmp_path / "two"))
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (m1.pop("num_processes"), m2.pop("num_processes")) == (1, 2)
    assert m1["swap_control"]["swapped_expressions"]["n"] == 20
    assert m1 == m2 and m1["n"] == 20  # 7 batches over 2 processes: the padding batch is not counted
    assert 0.0 < m1["mIoU"] < 1.0
    rows1 = (tmp_path / "one" / "per_sample.csv").read_text()
    assert rows1 == (tmp_path / "two" / "per_sample.csv").read_text()
    header = next(csv.reader(rows1.splitlines()))
    assert header[:6] == ["index", "id", "expression", "iou", "pred_area", "target_area"]
    assert len(list((tmp_path / "one" / "overlays").glob("*.png"))) == 2
    assert "overall" in one_out and "baseline: full image" in one_out


def test_eval_cli_missing_data_is_one_line(micro_checkpoint: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from rsrefseg.cli.main import main

    code = main(["eval", "--checkpoint", str(micro_checkpoint), "--data", str(tmp_path / "no.jsonl"),
                 "--images", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --data: no such file") and len(err.strip().splitlines()) == 1
