"""Does a lower precision give the same masks? A trained checkpoint evaluated twice on a dataset.

The checkpoint is loaded and optimised for inference (:func:`rsrefseg.modeling.optimize.
optimize_for_inference`) in fp32 and in the other precision; both are evaluated with
:func:`rsrefseg.evaluation.evaluate` (masks at the original resolution). Reported: each
precision's metrics against the ground truth and its time, and the agreement of the two masks of
every sample (IoU; both empty counts as 1).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

#: The issue's agreement target: bf16 masks vs fp32 masks, IoU on the NWPU val set.
AGREEMENT_TARGET = 0.98


def mask_agreement(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> dict[str, Any]:
    """Per-sample IoU of two sets of bool masks (same keys): mean, min, 5th percentile, overall.

    ``overall`` is total intersection over total union (pixels of all samples together).
    """
    if set(a) != set(b):
        raise ValueError("the two evaluations kept different samples")
    ious, inter_total, union_total, identical = [], 0, 0, 0
    for key in sorted(a):
        x, y = a[key], b[key]
        inter, union = int(np.logical_and(x, y).sum()), int(np.logical_or(x, y).sum())
        ious.append(1.0 if union == 0 else inter / union)
        inter_total += inter
        union_total += union
        identical += bool(np.array_equal(x, y))
    arr = np.asarray(ious)
    return {
        "n": len(ious),
        "mean_iou": float(arr.mean()) if len(arr) else 1.0,
        "min_iou": float(arr.min()) if len(arr) else 1.0,
        "p05_iou": float(np.percentile(arr, 5)) if len(arr) else 1.0,
        "overall_iou": inter_total / union_total if union_total else 1.0,
        "share_at_least_target": float((arr >= AGREEMENT_TARGET).mean()) if len(arr) else 1.0,
        "identical_masks": identical,
    }


def precision_agreement(
    checkpoint: str,
    data: str,
    images: str,
    precision: str = "bf16",
    batch_size: int = 16,
    limit: int | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``data`` in fp32 and in ``precision``; compare the masks.

    Returns:
        ``{"checkpoint", "data", "n", "fp32": {...}, precision: {...}, "agreement": {...},
        "speedup": fp32 seconds / precision seconds}``; each precision entry has ``seconds``,
        ``mIoU``, ``oIoU`` and ``Pr@0.5`` against the ground truth.
    """
    from rsrefseg.checkpoint import load_checkpoint
    from rsrefseg.evaluation import evaluate
    from rsrefseg.modeling.optimize import optimize_for_inference
    from rsrefseg.training.setup import load_base

    masks: dict[str, dict[int, np.ndarray]] = {}
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "data": str(data), "batch_size": batch_size}
    dataset = None
    for name in ("fp32", precision):
        model = load_checkpoint(checkpoint, device="cpu")
        # the real bf16 numerics even where the library would keep fp32 (a CPU without bf16 kernels)
        optimize_for_inference(model, name, fallback=False)
        if dataset is None:
            dataset = load_base(data, images, None, limit, "agreement", model.config.sam_image_size,
                                model.config.resize_mode, False, ("--agreement-data", "--agreement-images"))
            result["n"] = len(dataset)
        log(f"[agreement] {name}: evaluating {len(dataset)} samples")
        start = time.perf_counter()
        out = evaluate(model, dataset, batch_size, keep=range(len(dataset)))
        seconds = time.perf_counter() - start
        masks[name] = out.predictions
        result[name] = {"seconds": seconds, **{k: out.metrics[k] for k in ("mIoU", "oIoU", "Pr@0.5")}}
        del model
    result["agreement"] = mask_agreement(masks["fp32"], masks[precision])
    result["speedup"] = result["fp32"]["seconds"] / result[precision]["seconds"]
    return result
