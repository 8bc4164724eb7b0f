"""Metric conventions: hand-computed cases, both Pr@t conventions, empty masks, merging, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rsrefseg.metrics import RefSegMetrics, SampleStats, format_table, iou, pixel_counts


def _mask(shape: tuple[int, int], *pixels: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for y, x in pixels:
        mask[y, x] = True
    return mask


def _hand_metrics(strict: bool = False) -> RefSegMetrics:
    metrics = RefSegMetrics(strict=strict)
    shape = (4, 4)
    # A: 4 vs 4 px overlapping in 2 -> 2 / 6
    metrics.update(
        _mask(shape, (0, 0), (0, 1), (1, 0), (1, 1)),
        _mask(shape, (0, 1), (1, 1), (0, 2), (1, 2)),
        "A",
        "ship",
        "extreme",
    )
    # B: perfect, 10 px
    full = np.zeros((5, 2), dtype=bool)
    metrics.update(~full, ~full, "B", "ship", "only")
    # C: empty prediction of an empty target -> IoU 1, adds 0 / 0
    metrics.update(np.zeros(shape, bool), np.zeros(shape, bool), "C", "plane", "only")
    # D: empty prediction, 5 px target -> 0 / 5
    metrics.update(np.zeros(shape, bool), _mask(shape, (0, 0), (1, 0), (2, 0), (3, 0), (3, 3)), "D", "plane")
    # E: IoU exactly 0.5 (1 / 2)
    metrics.update(_mask(shape, (2, 2), (2, 3)), _mask(shape, (2, 2)), "E", "plane", "size")
    return metrics


def test_hand_computed_overall_numbers() -> None:
    result = _hand_metrics().compute()
    assert result["n"] == 5
    assert result["oIoU"] == pytest.approx((2 + 10 + 0 + 0 + 1) / (6 + 10 + 0 + 5 + 2))
    assert result["mIoU"] == pytest.approx((1 / 3 + 1 + 1 + 0 + 0.5) / 5)
    assert result["Pr@0.5"] == pytest.approx(3 / 5)  # B, C and E (IoU 0.5 counts with >=)
    for t in ("Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"):
        assert result[t] == pytest.approx(2 / 5)
    assert result["pr_convention"] == "iou >= t"
    assert not any(isinstance(v, float) and math.isnan(v) for v in result.values())


def test_strict_precision_convention() -> None:
    result = _hand_metrics(strict=True).compute()
    assert result["Pr@0.5"] == pytest.approx(2 / 5)  # E (exactly 0.5) no longer counts
    assert result["Pr@0.9"] == pytest.approx(2 / 5)
    assert result["oIoU"] == _hand_metrics().compute()["oIoU"]  # only Pr@t changes
    assert result["pr_convention"] == "iou > t"
    # exact boundary cases for every threshold: IoU 3/5, 7/10, 4/5, 9/10
    for numerator, denominator, key in (
        (3, 5, "Pr@0.6"),
        (7, 10, "Pr@0.7"),
        (4, 5, "Pr@0.8"),
        (9, 10, "Pr@0.9"),
    ):
        loose, strict = RefSegMetrics(), RefSegMetrics(strict=True)
        row = SampleStats("s", numerator, denominator, denominator, numerator)
        loose.add(row)
        strict.add(row)
        assert loose.compute()[key] == 1.0 and strict.compute()[key] == 0.0


def test_breakdowns_by_category_and_rule() -> None:
    result = _hand_metrics().compute()
    ship, plane = result["per_category"]["ship"], result["per_category"]["plane"]
    assert (
        ship["n"] == 2
        and ship["oIoU"] == pytest.approx(12 / 16)
        and ship["mIoU"] == pytest.approx((1 / 3 + 1) / 2)
    )
    assert (
        plane["n"] == 3 and plane["oIoU"] == pytest.approx(1 / 7) and plane["Pr@0.5"] == pytest.approx(2 / 3)
    )
    assert set(result["per_rule"]) == {"extreme", "only", "size"}  # D has no rule
    assert result["per_rule"]["only"]["n"] == 2 and result["per_rule"]["only"]["oIoU"] == 1.0
    table = format_table(result)
    assert "overall" in table and "  ship" in table and "by rule:" in table and "iou >= t" in table
    assert f"{100 * 13 / 23:9.2f}" in table.splitlines()[2]


def test_empty_cases_never_nan() -> None:
    empty = np.zeros((3, 3), dtype=bool)
    assert iou(empty, empty) == 1.0 and pixel_counts(empty, empty) == (0, 0, 0, 0)
    only_empty = RefSegMetrics()
    only_empty.update(empty, empty, "x")
    assert only_empty.compute()["oIoU"] == 1.0 and only_empty.compute()["mIoU"] == 1.0
    nothing = RefSegMetrics().compute()
    assert nothing["n"] == 0 and nothing["oIoU"] == 0.0 and nothing["per_category"] == {}
    with pytest.raises(ValueError, match="threshold the logits"):
        iou(np.zeros((2, 2), dtype=np.float32), empty[:2, :2])
    with pytest.raises(ValueError, match="shape"):
        iou(empty, np.zeros((3, 4), dtype=bool))
    assert iou(torch.ones(2, 2, dtype=torch.bool), np.ones((2, 2), dtype=np.uint8)) == 1.0


def test_distributed_merge_deduplicates_padding() -> None:
    shape = (2, 2)
    rank0, rank1 = RefSegMetrics(), RefSegMetrics()
    rank0.update(np.ones(shape, bool), np.ones(shape, bool), "s1", "ship")
    rank0.update(np.zeros(shape, bool), np.ones(shape, bool), "s2", "ship")
    rank1.update(_mask(shape, (0, 0)), np.ones(shape, bool), "s3", "plane")
    rank1.update(np.ones(shape, bool), np.ones(shape, bool), "s1", "ship")  # sampler padding repeat
    merged = RefSegMetrics.from_state_dicts([rank0.state_dict(), rank1.state_dict()])
    assert len(merged) == 3 and merged.n_duplicates == 1
    assert merged.compute()["oIoU"] == pytest.approx((4 + 0 + 1) / 12)
    again = RefSegMetrics()
    again.merge(rank0)
    again.merge(rank1.state_dict()["rows"])
    assert again.compute() == merged.compute()
    rank0.update(np.ones(shape, bool), np.ones(shape, bool), "s1")  # duplicate within a process too
    assert len(rank0) == 2 and rank0.n_duplicates == 1


masks = st.integers(1, 6).flatmap(
    lambda h: st.integers(1, 6).flatmap(lambda w: st.tuples(arrays(bool, (h, w)), arrays(bool, (h, w))))
)


@settings(max_examples=60, deadline=None)
@given(st.lists(masks, min_size=1, max_size=8), st.booleans())
def test_properties(pairs: list[tuple[np.ndarray, np.ndarray]], strict: bool) -> None:
    metrics, perfect = RefSegMetrics(strict=strict), RefSegMetrics(strict=strict)
    for i, (pred, target) in enumerate(pairs):
        metrics.update(pred, target, f"s{i}")
        perfect.update(target, target, f"s{i}")
    result = metrics.compute()
    values = [result["oIoU"], result["mIoU"]] + [result[f"Pr@{t}"] for t in (0.5, 0.6, 0.7, 0.8, 0.9)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert result["Pr@0.5"] >= result["Pr@0.6"] >= result["Pr@0.7"] >= result["Pr@0.8"] >= result["Pr@0.9"]
    best = perfect.compute()
    assert all(best[k] == 1.0 for k in ("oIoU", "mIoU", "Pr@0.5", "Pr@0.9"))
    # oIoU is the union-weighted mean of the per-sample IoUs (big objects weigh more)
    rows = metrics.rows
    total_union = sum(r.union for r in rows)
    if total_union:
        weighted = sum(r.iou * r.union for r in rows) / total_union
        assert result["oIoU"] == pytest.approx(weighted)
        ious = [r.iou for r in rows if r.union]
        assert min(ious) - 1e-12 <= result["oIoU"] <= max(ious) + 1e-12
    assert result["mIoU"] == pytest.approx(np.mean([iou(p, t) for p, t in pairs]))


def test_oiou_weights_by_area() -> None:
    metrics = RefSegMetrics()
    big = np.ones((30, 30), dtype=bool)
    metrics.update(big, big, "big")  # IoU 1 on 900 px
    metrics.update(np.zeros((3, 3), bool), _mask((3, 3), (1, 1)), "small")  # IoU 0 on 1 px
    result = metrics.compute()
    assert result["mIoU"] == 0.5 and result["oIoU"] == pytest.approx(900 / 901)
