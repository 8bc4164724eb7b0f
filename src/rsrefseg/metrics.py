"""Referring segmentation metrics with pinned conventions.

All numbers are computed per sample at the **original image resolution** (``H x W`` bool masks):

- ``IoU`` = |pred ∩ target| / |pred ∪ target|; an empty prediction of an empty target scores
  **1.0** (never NaN) and adds 0 / 0 to the oIoU sums.
- ``oIoU`` (overall IoU, a.k.a. cIoU, cumulative IoU) = Σ intersections / Σ unions over all
  samples; large objects weigh more. 1.0 if every union is empty.
- ``mIoU`` (mean IoU, a.k.a. gIoU) = mean of the per-sample IoUs.
- ``Pr@t`` for t in 0.5 ... 0.9 = share of samples with IoU >= t (LAVT / RMSIN convention);
  ``strict=True`` uses IoU > t as the RSRefSeg reference code does.

Values are fractions in [0, 1]; :func:`format_table` prints percentages.

For distributed evaluation each process keeps per-sample rows (``sample_id``, intersection,
union, areas, category, rule); gather ``state_dict()`` from every process and :meth:`merge` them:
rows are de-duplicated by ``sample_id`` (the first one wins), so the padding duplicates added by a
distributed sampler are counted once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class SampleStats:
    """Pixel counts of one evaluated sample."""

    sample_id: str
    inter: int
    union: int
    pred_area: int
    target_area: int
    category: str | None = None
    rule: str | None = None

    @property
    def iou(self) -> float:
        """Per-sample IoU; 1.0 when prediction and target are both empty."""
        return 1.0 if self.union == 0 else self.inter / self.union


def _as_bool(mask: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.dtype != bool:
        if np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{name} must be a bool mask, got {array.dtype} (threshold the logits first)")
        array = array != 0
    return array


def pixel_counts(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor
) -> tuple[int, int, int, int]:
    """(intersection, union, pred area, target area) of two bool ``H x W`` masks of the same shape."""
    pred_b, target_b = _as_bool(pred, "pred"), _as_bool(target, "target")
    if pred_b.shape != target_b.shape:
        raise ValueError(
            f"pred shape {pred_b.shape} != target shape {target_b.shape} (compare at original size)"
        )
    inter = int(np.count_nonzero(pred_b & target_b))
    pred_area, target_area = int(np.count_nonzero(pred_b)), int(np.count_nonzero(target_b))
    return inter, pred_area + target_area - inter, pred_area, target_area


def iou(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    """IoU of two bool masks (1.0 when both are empty)."""
    inter, union, _, _ = pixel_counts(pred, target)
    return 1.0 if union == 0 else inter / union


def pr_key(threshold: float) -> str:
    """Name of a precision entry: ``Pr@0.5``."""
    return f"Pr@{threshold:g}"


def summarize(
    rows: Sequence[SampleStats], thresholds: Sequence[float] = DEFAULT_THRESHOLDS, strict: bool = False
) -> dict[str, Any]:
    """``n``, ``oIoU``, ``mIoU`` and ``Pr@t`` of a set of rows (all 0.0 when there are no rows)."""
    n = len(rows)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        out.update({"oIoU": 0.0, "mIoU": 0.0, **{pr_key(t): 0.0 for t in thresholds}})
        return out
    ious = np.array([row.iou for row in rows], dtype=np.float64)
    total_inter = sum(row.inter for row in rows)
    total_union = sum(row.union for row in rows)
    out["oIoU"] = 1.0 if total_union == 0 else total_inter / total_union
    out["mIoU"] = float(ious.mean())
    for t in thresholds:
        hits = ious > t if strict else ious >= t
        out[pr_key(t)] = float(hits.mean())
    return out


class RefSegMetrics:
    """Accumulates per-sample counts; :meth:`compute` gives overall, per-category and per-rule numbers."""

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, strict: bool = False) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        self.strict = bool(strict)
        self._rows: dict[str, SampleStats] = {}
        #: Rows ignored because their ``sample_id`` was already present.
        self.n_duplicates = 0

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> list[SampleStats]:
        return list(self._rows.values())

    def add(self, row: SampleStats) -> bool:
        """Add one row; returns False (and counts it) if its ``sample_id`` is already present."""
        if row.sample_id in self._rows:
            self.n_duplicates += 1
            return False
        self._rows[row.sample_id] = row
        return True

    def update(
        self,
        pred: np.ndarray | torch.Tensor,
        target: np.ndarray | torch.Tensor,
        sample_id: str,
        category: str | None = None,
        rule: str | None = None,
    ) -> SampleStats:
        """Score one bool ``H x W`` prediction against its target (same, original resolution)."""
        inter, union, pred_area, target_area = pixel_counts(pred, target)
        row = SampleStats(str(sample_id), inter, union, pred_area, target_area, category, rule)
        self.add(row)
        return row

    def merge(self, other: RefSegMetrics | dict[str, Any] | Iterable[SampleStats | dict[str, Any]]) -> None:
        """Add the rows of another accumulator, of a :meth:`state_dict`, or an iterable of rows."""
        if isinstance(other, RefSegMetrics):
            rows: Iterable[SampleStats | dict[str, Any]] = other.rows
        elif isinstance(other, dict):
            rows = other["rows"]
        else:
            rows = other
        for row in rows:
            self.add(row if isinstance(row, SampleStats) else SampleStats(**row))

    def state_dict(self) -> dict[str, Any]:
        """Plain, picklable state (for ``gather_object`` in distributed evaluation)."""
        return {
            "thresholds": list(self.thresholds),
            "strict": self.strict,
            "rows": [asdict(row) for row in self._rows.values()],
        }

    @classmethod
    def from_state_dicts(cls, states: Iterable[dict[str, Any]]) -> RefSegMetrics:
        """One accumulator from the state dicts of several processes (de-duplicated by sample id)."""
        states = list(states)
        if not states:
            return cls()
        merged = cls(states[0]["thresholds"], states[0]["strict"])
        for state in states:
            merged.merge(state)
        return merged

    def compute(self) -> dict[str, Any]:
        """Overall ``n``/``oIoU``/``mIoU``/``Pr@t``, plus ``per_category`` and ``per_rule`` dicts."""
        rows = self.rows
        out = summarize(rows, self.thresholds, self.strict)
        out["pr_convention"] = "iou > t" if self.strict else "iou >= t"
        for key, attr in (("per_category", "category"), ("per_rule", "rule")):
            groups: dict[str, list[SampleStats]] = {}
            for row in rows:
                value = getattr(row, attr)
                if value is not None:
                    groups.setdefault(str(value), []).append(row)
            out[key] = {
                name: summarize(group, self.thresholds, self.strict) for name, group in sorted(groups.items())
            }
        return out


def format_table(metrics: dict[str, Any]) -> str:
    """Text table (percentages) of a :meth:`RefSegMetrics.compute` result, with the breakdowns."""
    pr_names = [k for k in metrics if k.startswith("Pr@")]
    columns = ["n", "oIoU", "mIoU", *pr_names]
    header = f"{'':<22}" + "".join(f"{c:>9}" for c in columns)
    lines = [header, "-" * len(header)]

    def row(label: str, values: dict[str, Any]) -> str:
        cells = [f"{values['n']:>9d}"] + [f"{100.0 * values.get(c, 0.0):>9.2f}" for c in columns[1:]]
        return f"{label[:22]:<22}" + "".join(cells)

    lines.append(row("overall", metrics))
    for key, title in (("per_category", "category"), ("per_rule", "rule")):
        groups = metrics.get(key) or {}
        if groups:
            lines.append(f"by {title}:")
            lines += [row(f"  {name}", values) for name, values in groups.items()]
    if "pr_convention" in metrics:
        lines.append(f"Pr@t counts samples with {metrics['pr_convention']}; values in %")
    return "\n".join(lines)
