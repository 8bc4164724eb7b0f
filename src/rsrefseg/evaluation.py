"""Evaluate a model (or a trivial baseline) on a referring dataset, single- or multi-process.

Every number is computed per sample at the **original image resolution**: the model's ``S x S``
logits are brought back with :func:`rsrefseg.data.transforms.logits_to_original` (crop padding,
bilinear resize), thresholded at 0, and compared with the original-size target.

Samples of a batch that share an image (the records of an image follow each other in the usual
files) share one image encoding: each distinct image is encoded once and decoded for each of its
expressions (:func:`rsrefseg.data.grouping.unique_images`). ``rsrefseg eval`` and the validation
inside training both go through :func:`evaluate`, with the same fast kernels.

Distributed runs (``accelerate launch``): the batches of the natural order are dealt to the
processes round-robin (batch ``b`` goes to process ``b % world_size``), so every sample is computed
in exactly the same batch as in a single-process run; processes with fewer batches repeat a batch.
Rows are gathered, de-duplicated by dataset index and summarised in index order, so 1-process and
N-process numbers are identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rsrefseg.data.datasets import collate_fn
from rsrefseg.data.grouping import unique_images
from rsrefseg.data.records import decode_mask
from rsrefseg.data.transforms import logits_to_original
from rsrefseg.metrics import DEFAULT_THRESHOLDS, RefSegMetrics, SampleStats, pixel_counts


@dataclass(frozen=True, kw_only=True)
class EvalRow(SampleStats):
    """One evaluated sample: its :class:`SampleStats` (pixel counts at original resolution, IoU)
    plus its dataset index and expression."""

    index: int
    text: str


@dataclass
class EvalResult:
    """Output of :func:`evaluate`.

    Attributes:
        metrics: :meth:`RefSegMetrics.compute` (``n``, ``oIoU``, ``mIoU``, ``Pr@t``, breakdowns).
        rows: per-sample rows sorted by dataset index (every process gets all of them).
        predictions: bool ``H x W`` predicted masks of the requested ``keep`` indices.
    """

    metrics: dict[str, Any]
    rows: list[EvalRow] = field(default_factory=list)
    predictions: dict[int, np.ndarray] = field(default_factory=dict)


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Batches (lists of dataset indices) of process ``rank``: natural-order batches dealt round-robin.

    Every process gets the same number of batches; the short ones repeat batch 0 (dropped later).
    """
    batches = [list(range(lo, min(lo + batch_size, n))) for lo in range(0, n, batch_size)]
    per_rank = -(-len(batches) // world_size) if batches else 0
    mine = [batches[b] for b in range(rank, len(batches), world_size)]
    while len(mine) < per_rank:
        mine.append(batches[0])
    return mine


def summarize_rows(
    rows: Sequence[EvalRow], thresholds: Sequence[float] = DEFAULT_THRESHOLDS, strict: bool = False
) -> tuple[dict[str, Any], list[EvalRow]]:
    """De-duplicate rows by index, sort them, and compute the metrics in index order."""
    unique: dict[int, EvalRow] = {}
    for row in rows:
        unique.setdefault(row.index, row)
    ordered = [unique[i] for i in sorted(unique)]
    metrics = RefSegMetrics(thresholds, strict)
    for row in ordered:
        metrics.add(row if row.sample_id else replace(row, sample_id=f"#{row.index}"))
    return metrics.compute(), ordered


def _gather(obj: list[Any], accelerator: Any | None) -> list[Any]:
    """Concatenate a list over processes (identity without an accelerator or with one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return obj
    from accelerate.utils import gather_object

    return list(gather_object(obj))


@torch.no_grad()
def evaluate(
    model: Any,
    dataset: Dataset[dict[str, Any]],
    batch_size: int = 8,
    accelerator: Any | None = None,
    num_workers: int = 0,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    strict: bool = False,
    progress: bool = False,
    keep: Sequence[int] = (),
    desc: str = "eval",
) -> EvalResult:
    """Per-sample IoU at original resolution over ``dataset`` and the summary metrics.

    Args:
        model: an ``RSRefSeg`` (possibly wrapped by ``accelerator.prepare``); switched to eval mode
            and back.
        dataset: items with ``pixel_values`` (``3 x S x S``), ``text``, ``meta``, ``target``
            (bool ``H x W``), ``index``, ``sample_id``, ``category``, ``rule`` (a ReferringDataset).
        accelerator: shard over its processes and gather the rows; None = this process only.
        strict: ``Pr@t`` counts IoU > t (reference code) instead of IoU >= t.
        keep: dataset indices whose predicted masks are returned (overlays).
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    net = accelerator.unwrap_model(model) if accelerator is not None else model
    device = accelerator.device if accelerator is not None else net.device
    loader = DataLoader(
        dataset,
        batch_sampler=shard_batches(len(dataset), batch_size, rank, world),  # type: ignore[arg-type]
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator(),  # never draw from the global RNG (resumable training)
    )
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    keep_set = set(keep)
    rows: list[EvalRow] = []
    kept: list[tuple[int, np.ndarray]] = []
    was_training = net.training
    net.eval()
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(loader), desc=desc, unit="batch", leave=False, dynamic_ncols=True)
    try:
        for batch in loader:
            # each distinct image of the batch encoded once, decoded for each of its expressions
            images, image_index = unique_images(batch["pixel_values"])
            with autocast():
                out = net(images.to(device), batch["text"], image_index.to(device))
            logits = out.mask_logits.float().cpu()  # B x 1 x S x S
            for i, meta in enumerate(batch["meta"]):
                pred = (logits_to_original(logits[i, 0], meta) > 0).numpy()  # S x S -> H x W bool
                target = batch["target"][i]
                inter, union, pred_area, target_area = pixel_counts(pred, target)
                index = int(batch["index"][i])
                rows.append(EvalRow(str(batch["sample_id"][i]), inter, union, pred_area, target_area,
                                    batch["category"][i], batch["rule"][i], index=index, text=batch["text"][i]))
                if index in keep_set:
                    kept.append((index, pred))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        net.train(was_training)
    all_rows = [EvalRow(**r) for r in _gather([asdict(r) for r in rows], accelerator)]
    metrics, ordered = summarize_rows(all_rows, thresholds, strict)
    predictions = dict(_gather(kept, accelerator))
    return EvalResult(metrics, ordered, predictions)


# ---------------------------------------------------------------------- does the model read the text?
class SwappedTextView(Dataset[dict[str, Any]]):
    """Samples of ``dataset`` whose expression is replaced by another expression of the SAME image
    that refers to a different target; the target stays the original one.

    A model that reads the expression scores much lower here than on the true expressions; a model
    that ignores the text (it segments whatever is salient) scores the same. Samples whose image has
    no expression with another target are left out.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        by_image: dict[str, list[int]] = {}
        for index, record in enumerate(dataset.records):
            by_image.setdefault(record.file_name, []).append(index)
        self.pairs: list[tuple[int, int]] = []  # (sample, index whose expression it gets)
        for indices in by_image.values():
            for index in indices:
                target = _segmentation_key(dataset.records[index])
                other = next((j for j in indices[indices.index(index) + 1 :] + indices
                              if _segmentation_key(dataset.records[j]) != target), None)
                if other is not None:
                    self.pairs.append((index, other))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index, other = self.pairs[position]
        item = dict(self.dataset[index])
        item["text"] = self.dataset.records[other].sent
        return item


def swap_control(
    model: Any,
    swapped: SwappedTextView,
    true_rows: Sequence[EvalRow],
    batch_size: int = 8,
    accelerator: Any | None = None,
    num_workers: int = 0,
    strict: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Does the model read the text? Its metrics with swapped expressions next to the true ones.

    Args:
        swapped: :class:`SwappedTextView` of the evaluated dataset.
        true_rows: The rows of the same model on the true expressions (:attr:`EvalResult.rows`).

    Returns:
        ``{"true_expressions": ..., "swapped_expressions": ...}``: metrics over the swappable samples
        only, with their own expressions and with the swapped ones.
    """
    control = evaluate(model, swapped, batch_size, accelerator, num_workers, strict=strict, progress=progress,
                       desc="swapped")
    subset = {index for index, _ in swapped.pairs}
    same = summarize_rows([r for r in true_rows if r.index in subset], strict=strict)[0]
    return {"true_expressions": same, "swapped_expressions": control.metrics}


def _segmentation_key(record: Any) -> str:
    import json

    return json.dumps(record.segmentation, sort_keys=True)


# ---------------------------------------------------------------------- baselines
def target_mask(dataset: Any, index: int) -> np.ndarray:
    """The original-resolution bool target ``H x W`` of sample ``index`` (no image decode for RLE)."""
    record = dataset.records[index]
    size = record.mask_size()
    if size is None:  # polygons are rasterised at the image size
        return dataset.load(index)[1]
    return decode_mask(record.segmentation, *size, source=record.source)


def box_mask(height: int, width: int, box: Sequence[float]) -> np.ndarray:
    """Bool ``H x W`` mask of a box ``(x0, y0, x1, y1)`` in normalised [0, 1] coordinates."""
    x0, y0, x1, y1 = box
    r0, r1 = round(y0 * height), round(y1 * height)
    c0, c1 = round(x0 * width), round(x1 * width)
    mask = np.zeros((height, width), dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def _corner_counts(mask: np.ndarray, rows_at: np.ndarray, cols_at: np.ndarray) -> np.ndarray:
    """``T[i, j]`` = foreground pixels of ``mask[:rows_at[i], :cols_at[j]]`` (bool ``H x W`` mask)."""
    table = np.zeros((len(rows_at), len(cols_at)), dtype=np.int64)
    for i in range(1, len(rows_at)):
        band = np.count_nonzero(mask[rows_at[i - 1] : rows_at[i]], axis=0)  # W pixels per column of the band
        cum = np.concatenate([[0], np.cumsum(band)])  # W + 1 prefix sums along the columns
        table[i] = table[i - 1] + cum[cols_at]
    return table


def fit_fixed_box(dataset: Any, grid: int = 16) -> tuple[tuple[float, float, float, float], float]:
    """The single box (on a ``grid`` lattice of normalised coordinates) maximising mIoU on ``dataset``.

    Exact per-sample pixel counts via a summed-area table sampled at the lattice lines
    ``round(k / grid * H)``. Returns ``((x0, y0, x1, y1), mIoU)``.
    """
    lines = np.linspace(0.0, 1.0, grid + 1)
    pairs = [(a, b) for a in range(grid + 1) for b in range(a + 1, grid + 1)]
    lo = np.array([a for a, _ in pairs])
    hi = np.array([b for _, b in pairs])
    n = len(dataset)
    score = np.zeros((len(pairs), len(pairs)))  # [y pair, x pair] sum of IoUs
    for index in range(n):
        mask = target_mask(dataset, index)
        h, w = mask.shape
        rows_at = np.rint(lines * h).astype(int)
        cols_at = np.rint(lines * w).astype(int)
        table = _corner_counts(mask, rows_at, cols_at)  # (grid+1) x (grid+1) counts of top-left rectangles
        # inter[py, px] = T[y1, x1] - T[y0, x1] - T[y1, x0] + T[y0, x0] over every pair of lines.
        inter = (table[hi][:, hi] - table[lo][:, hi] - table[hi][:, lo] + table[lo][:, lo]).astype(float)
        box_area = np.outer(rows_at[hi] - rows_at[lo], cols_at[hi] - cols_at[lo]).astype(float)
        union = box_area + mask.sum() - inter
        score += np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    best = np.unravel_index(int(np.argmax(score)), score.shape)
    (y0, y1), (x0, x1) = pairs[best[0]], pairs[best[1]]
    box = (float(lines[x0]), float(lines[y0]), float(lines[x1]), float(lines[y1]))
    return box, float(score[best] / max(n, 1))


def evaluate_baselines(
    dataset: Any,
    train_dataset: Any | None = None,
    grid: int = 16,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    strict: bool = False,
) -> dict[str, Any]:
    """Trivial predictions scored by the same metrics: empty mask, full image and the best fixed box.

    The box is fitted on ``train_dataset`` (never on ``dataset``); without it the box is skipped.
    Returns ``{"empty": metrics, "full_image": metrics, "fixed_box": metrics, "fixed_box_coords":
    [x0, y0, x1, y1], "fixed_box_train_mIoU": float}``.
    """
    box = None
    out: dict[str, Any] = {}
    if train_dataset is not None and len(train_dataset) > 0:
        box, train_miou = fit_fixed_box(train_dataset, grid)
        out["fixed_box_coords"], out["fixed_box_train_mIoU"] = list(box), train_miou
    names = ["empty", "full_image"] + (["fixed_box"] if box is not None else [])
    rows: dict[str, list[EvalRow]] = {name: [] for name in names}
    for index in range(len(dataset)):
        target = target_mask(dataset, index)
        h, w = target.shape
        record = dataset.records[index]
        preds = {"empty": np.zeros((h, w), bool), "full_image": np.ones((h, w), bool)}
        if box is not None:
            preds["fixed_box"] = box_mask(h, w, box)
        for name in names:
            inter, union, pa, ta = pixel_counts(preds[name], target)
            rows[name].append(EvalRow(record.sample_id or f"#{index}", inter, union, pa, ta, record.category_name,
                                      record.rule, index=index, text=record.sent))
    for name in names:
        out[name] = summarize_rows(rows[name], thresholds, strict)[0]
    return out
