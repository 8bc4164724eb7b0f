"""Pieces of a training run around the loop: accelerator, datasets, optimizer, final report."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsrefseg.config import RSRefSegConfig
from rsrefseg.data.datasets import ReferringDataset, filter_split
from rsrefseg.data.records import find_duplicates, read_jsonl
from rsrefseg.errors import ConfigError, DataError
from rsrefseg.training.train_config import TrainConfig


def make_accelerator(config: TrainConfig) -> Any:
    """An ``Accelerator`` for the run: mixed precision resolved ("auto" = bf16 on a capable GPU)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # Frozen or unused parameters (e.g. SigLIP's pooling head) get no gradient: let DDP allow that.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(mixed_precision=precision, kwargs_handlers=[ddp], step_scheduler_with_optimizer=False)


# accelerate's distributed types that shard the model or optimizer state across processes.
SHARDING_KINDS = ("DEEPSPEED", "FSDP", "MEGATRON_LM")


def check_distributed(accelerator: Any) -> None:
    """Refuse, before anything is built, the sharding setups this trainer does not support.

    One process and data-parallel (DDP on GPUs, gloo on CPUs) are supported and tested. DeepSpeed
    ZeRO keeps Python objects in its optimizer state (resumable checkpoints never pickle) and FSDP
    would need every process to gather the weights at each checkpoint; neither pays off here, as
    LoRA training keeps ~2 % of the parameters trainable (20.5 M for rsrefseg-l: ~0.25 GB of AdamW
    state), so the memory levers are gradient checkpointing and grouped expressions instead.
    """
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind in SHARDING_KINDS:
        raise ConfigError(f"accelerate distributed_type {kind} is not supported by rsrefseg train: use one process "
                          "or data-parallel (configs/accelerate/multi-gpu.yaml); for memory, set "
                          "gradient_checkpointing: true and data.expressions_per_image")


def model_config(config: TrainConfig) -> RSRefSegConfig:
    """The model config the run will build (input size, resize mode) without loading any weights."""
    from rsrefseg.build import preset_config

    return preset_config(config.model.preset, **config.model.overrides)


def _hint(path: str) -> str:
    return " (an environment variable in it is not set)" if "${" in path else ""


def load_base(jsonl: str, images: str, split: str | None, limit: int | None, what: str, size: int, mode: str,
              skip_bad: bool, keys: tuple[str, str] | None = None) -> ReferringDataset:
    """Read one split's records into a :class:`ReferringDataset`; one-line DataErrors for bad paths.

    ``keys`` names the JSONL and image-folder settings in messages (default ``data.<what>_jsonl``...).
    """
    key_jsonl, key_images = keys or (f"data.{what}_jsonl", f"data.{what}_images")
    if not jsonl:
        raise DataError(f"{key_jsonl} is not set")
    if not Path(jsonl).is_file():
        raise DataError(f"{key_jsonl}: no such file: {jsonl}{_hint(jsonl)}")
    if not images or not Path(images).is_dir():
        raise DataError(f"{key_images}: no such folder: {images or '(not set)'}{_hint(images)}")
    records = filter_split(read_jsonl(jsonl), split, jsonl)
    if limit is not None:
        records = records[:limit]
    if what != "train":  # a duplicated sample would count twice in the metrics: keep the first one
        duplicates = find_duplicates(records)
        if duplicates:
            dropped = {i for i, _ in duplicates}
            first, earlier = duplicates[0]
            print(f"warning: {jsonl}: {len(dropped)} duplicate record(s) counted once (same image, expression "
                  f"and mask as an earlier line, e.g. {records[first].source} = line "
                  f"{records[earlier].source.rpartition(':')[2]})", file=sys.stderr)
            records = [r for i, r in enumerate(records) if i not in dropped]
    if not records:
        raise DataError(f"{jsonl}: the {what} set is empty (no records)")
    dataset = ReferringDataset(records, images, size, mode, skip_bad=skip_bad)
    if dataset.skipped:
        print(f"warning: {what}: skipped {len(dataset.skipped)} unusable record(s), e.g. {dataset.skipped[0][1]}")
    if len(dataset) == 0:
        raise DataError(f"{jsonl}: the {what} set is empty (every record was skipped)")
    return dataset


def build_datasets(config: TrainConfig, mcfg: RSRefSegConfig, accelerator: Any) -> tuple[Any, Any, Any, Any]:
    """``(train, val, train_base, val_base)``: the datasets the loop reads (cached if configured) and
    the underlying :class:`ReferringDataset` s (original files, for baselines and overlays)."""
    from rsrefseg.training.data import CachedDataset

    d = config.data
    size, mode = mcfg.sam_image_size, d.resize_mode or mcfg.resize_mode
    train_base = load_base(d.train_jsonl, d.train_images, d.train_split, d.max_train_samples, "train", size,
                           mode, d.skip_bad)
    val_base = load_base(d.val_jsonl, d.val_images, d.val_split, d.max_val_samples, "val", size, mode, d.skip_bad)
    if not d.cache:
        return train_base, val_base, train_base, val_base
    root = Path(d.cache_dir) if d.cache_dir else Path(config.work_dir) / "cache"
    with accelerator.main_process_first():
        show = accelerator.is_main_process and config.progress
        train = CachedDataset.build(train_base, root, with_target=False, progress=show)
        val = CachedDataset.build(val_base, root, with_target=True, progress=show)
    return train, val, train_base, val_base


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; 1-D ones (biases, norms) without weight decay if configured."""
    o = config.optim
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if o.no_decay_1d and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # fused: one kernel for the whole update (CPU and CUDA); tiny on a CPU: 4 ms a step against
    # 10-14 ms for foreach (and ~0.1 s for the per-tensor loop). foreach where fused is unsupported.
    try:
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, foreach=True)


def oom_message(config: TrainConfig, mcfg: RSRefSegConfig) -> str:
    """What to lower when a batch does not fit in memory."""
    effective = config.batch_size * config.grad_accum
    return (
        f"out of memory with batch_size {config.batch_size} at image size {mcfg.sam_image_size}: lower "
        f"--batch_size and raise --grad_accum to keep the effective batch ({effective}), lower the image "
        "size (--model.overrides.sam_image_size, only for random-init models), or use --mixed_precision bf16"
    )


def _overlays(net: Any, val_base: ReferringDataset, out_dir: Path, n: int, device: Any) -> list[Path]:
    """Overlay PNGs (image, prediction, ground truth) of ``n`` evenly spaced validation samples."""
    from rsrefseg.data.transforms import logits_to_original
    from rsrefseg.metrics import iou
    from rsrefseg.training.report import save_overlay

    paths = []
    picks = sorted({int(i) for i in np.linspace(0, len(val_base) - 1, num=min(n, len(val_base)))})
    net.eval()
    with torch.no_grad():
        for index in picks:
            item = val_base[index]
            out = net(item["pixel_values"][None].to(device).float(), [item["text"]])  # 3xSxS -> 1x3xSxS
            pred = (logits_to_original(out.mask_logits[0, 0].float().cpu(), item["meta"]) > 0).numpy()
            rgb, target, _ = val_base.load(index)
            title = f"IoU {100 * iou(pred, target):.1f}%"
            paths.append(save_overlay(out_dir / f"val_{index:05d}.png", rgb, item["text"], pred, target, title))
    return paths


def write_final_report(config: TrainConfig, net: Any, accelerator: Any, state: Any, last_metrics: dict[str, Any],
                       train_base: Any, val_base: Any, val_ds: Any, ckpt_root: Path) -> dict[str, Any]:
    """``<work_dir>/report``: metrics table with baselines, curves, overlays (best weights). Main process."""
    from rsrefseg.checkpoint import load_into
    from rsrefseg.evaluation import SwappedTextView, evaluate, evaluate_baselines, swap_control
    from rsrefseg.metrics import format_table
    from rsrefseg.modeling.optimize import fast_kernels
    from rsrefseg.training.report import markdown_table, write_report

    report_dir = Path(config.work_dir) / "report"
    started = time.monotonic()
    baselines = evaluate_baselines(val_base, train_base)
    best = next((h for h in state.history if h["step"] == state.best_step), None)
    rows: dict[str, dict[str, Any]] = {}
    if best is not None:
        rows[f"RSRefSeg {config.model.preset} (best: step {state.best_step})"] = best
    if state.history:
        rows[f"RSRefSeg {config.model.preset} (last: step {state.history[-1]['step']})"] = state.history[-1]
    rows["baseline: empty mask"] = baselines["empty"]
    rows["baseline: full image"] = baselines["full_image"]
    if "fixed_box" in baselines:
        box = ", ".join(f"{v:.3f}" for v in baselines["fixed_box_coords"])
        rows[f"baseline: best fixed box ({box}), fit on train"] = baselines["fixed_box"]
    if (ckpt_root / "best").is_dir():
        load_into(net, ckpt_root / "best")
    swapped = SwappedTextView(val_ds)
    with fast_kernels(net):  # as `rsrefseg eval`
        if best is not None and len(swapped) > 0:
            # Control: each expression swapped for one of the same image that refers to another target.
            # The same numbers as with the true expressions = the model ignores the text.
            true_rows = evaluate(net, val_ds, config.val_batch_size).rows
            control = swap_control(net, swapped, true_rows, config.val_batch_size)
            rows["control: best, true expressions (swappable samples)"] = control["true_expressions"]
            rows["control: best, expression swapped within the image"] = control["swapped_expressions"]
        if config.report_overlays > 0:
            _overlays(net, val_base, report_dir / "overlays", config.report_overlays, accelerator.device)
    info = {
        "preset": config.model.preset,
        "work_dir": config.work_dir,
        "optimizer steps": state.global_step,
        "epochs (completed)": state.epoch,
        "training time (min)": round(state.elapsed_s / 60.0, 2),
        "best checkpoint": str(ckpt_root / "best"),
        "validation set": f"{config.data.val_jsonl} ({len(val_base)} samples)",
        "fixed box fitted on": f"{config.data.train_jsonl} ({len(train_base)} samples)",
    }
    details = f"last validation, by category and rule:\n{format_table(last_metrics)}" if last_metrics else ""
    write_report(report_dir, rows, info, Path(config.work_dir) / "logs" / "losses.csv", state.history,
                 {k: v for k, v in baselines.items() if k in ("empty", "full_image", "fixed_box")}, details)
    print("\n" + markdown_table(rows))
    if details:
        print("\n" + details)
    print(f"report written to {report_dir} ({time.monotonic() - started:.1f} s)")
    return {"rows": rows, "baselines": baselines, "dir": str(report_dir)}
