"""The report folder of a run: metrics table (markdown + JSON), curves and overlays (matplotlib Agg).

Figures are drawn with ``matplotlib.figure.Figure`` + the Agg canvas, so nothing here touches
pyplot's global state or needs a display.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rsrefseg.utils import atomic_write_json, atomic_write_text

PRED_COLOR = np.array([255, 64, 32], dtype=np.float32)
TARGET_COLOR = np.array([32, 224, 64], dtype=np.float32)
METRIC_COLUMNS = ("n", "mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def blend(rgb: np.ndarray, mask: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``H x W x 3`` uint8 image with ``mask`` (bool ``H x W``) tinted by ``color``, its outline opaque."""
    out = rgb.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * color
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    out[edge] = color
    return out.clip(0, 255).astype(np.uint8)


def save_overlay(
    path: str | Path, rgb: np.ndarray, text: str, pred: np.ndarray, target: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """One PNG: image, prediction (red) and, if given, ground truth (green) with the expression."""
    panels = [("image", rgb), ("prediction", blend(rgb, pred, PRED_COLOR))]
    if target is not None:
        panels.append(("ground truth", blend(rgb, target, TARGET_COLOR)))
    aspect = rgb.shape[0] / max(1, rgb.shape[1])
    fig = _figure(3.6 * len(panels), 3.6 * aspect + 0.9)
    for k, (name, image) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.imshow(image)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"\"{text}\"" + (f"  ({title})" if title else ""), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def save_multi_overlay(path: str | Path, rgb: np.ndarray, texts: Sequence[str], preds: Sequence[np.ndarray]) -> Path:
    """One PNG with the image and one prediction panel per expression."""
    aspect = rgb.shape[0] / max(1, rgb.shape[1])
    fig = _figure(3.6 * (len(texts) + 1), 3.6 * aspect + 0.8)
    ax = fig.add_subplot(1, len(texts) + 1, 1)
    ax.imshow(rgb)
    ax.set_title("image", fontsize=9)
    ax.axis("off")
    for k, (text, pred) in enumerate(zip(texts, preds)):
        ax = fig.add_subplot(1, len(texts) + 1, k + 2)
        ax.imshow(blend(rgb, pred, PRED_COLOR))
        ax.set_title(f"\"{text}\"", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def read_loss_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of the per-step CSV (``step, epoch, loss, lr``) as float arrays."""
    cols: dict[str, list[float]] = {"step": [], "epoch": [], "loss": [], "lr": []}
    path = Path(path)
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                for key in cols:
                    cols[key].append(float(row[key]))
    return {k: np.asarray(v) for k, v in cols.items()}


def plot_loss(loss_csv: str | Path, out: str | Path) -> Path:
    """Training loss (raw and moving average) and learning rate against the optimizer step."""
    data = read_loss_csv(loss_csv)
    fig = _figure(7.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    if len(data["step"]):
        ax.plot(data["step"], data["loss"], color="0.75", linewidth=0.7, label="loss")
        k = max(1, min(50, len(data["loss"]) // 10))
        smooth = np.convolve(data["loss"], np.ones(k) / k, mode="valid")  # moving average of k steps
        ax.plot(data["step"][k - 1 :], smooth, color="C0", label=f"loss (mean of {k})")
        lr_ax = ax.twinx()
        lr_ax.plot(data["step"], data["lr"], color="C1", linewidth=1.0, label="lr")
        lr_ax.set_ylabel("learning rate", color="C1")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    return Path(out)


def plot_val(history: Sequence[dict[str, Any]], out: str | Path, baselines: dict[str, Any] | None = None) -> Path:
    """Validation mIoU / oIoU / Pr@0.5 against the epoch, with baseline mIoUs as dashed lines."""
    fig = _figure(7.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    epochs = [h["epoch"] for h in history]  # epochs completed (fractional for a mid-epoch stop)
    for key, color in (("mIoU", "C0"), ("oIoU", "C2"), ("Pr@0.5", "C3")):
        ax.plot(epochs, [100 * h.get(key, math.nan) for h in history], marker="o", color=color, label=f"val {key}")
    for k, (name, metrics) in enumerate((baselines or {}).items()):
        if isinstance(metrics, dict) and "mIoU" in metrics:
            ax.axhline(100 * metrics["mIoU"], linestyle="--", color=f"C{4 + k}", linewidth=1,
                       label=f"{name} mIoU")
    ax.set_xlabel("epochs completed")
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    return Path(out)


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table (percentages) with one row per named metrics dict."""
    head = "| | " + " | ".join(METRIC_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(METRIC_COLUMNS) + 1)]
    for name, m in rows.items():
        cells = [str(m.get("n", ""))] + [
            f"{100 * m[c]:.2f}" if isinstance(m.get(c), float) else "" for c in METRIC_COLUMNS[1:]
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    report_dir: str | Path,
    rows: dict[str, dict[str, Any]],
    info: dict[str, Any],
    loss_csv: str | Path | None = None,
    history: Sequence[dict[str, Any]] = (),
    baselines: dict[str, Any] | None = None,
    details: str = "",
) -> Path:
    """Write ``metrics.md``, ``metrics.json``, ``loss.png`` and ``val_miou.png`` into ``report_dir``.

    ``details`` (e.g. the per-category/per-rule table) is added to ``metrics.md`` as a text block.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report_dir / "metrics.json", {"rows": rows, "info": info, "history": list(history)})
    text = ["# Training report", ""]
    text += [f"- {k}: {v}" for k, v in info.items()]
    text += ["", "Validation metrics (%; per-sample IoU at original resolution):", "", markdown_table(rows), ""]
    if details:
        text += ["```", details, "```", ""]
    if loss_csv is not None:
        plot_loss(loss_csv, report_dir / "loss.png")
        text += ["![loss](loss.png)", ""]
    if history:
        plot_val(history, report_dir / "val_miou.png", baselines)
        text += ["![val](val_miou.png)", ""]
    overlays = sorted((report_dir / "overlays").glob("*.png")) if (report_dir / "overlays").is_dir() else []
    text += [f"![{p.stem}](overlays/{p.name})" for p in overlays]
    atomic_write_text(report_dir / "metrics.md", "\n".join(text) + "\n")
    return report_dir
