"""``rsrefseg eval --checkpoint CKPT --data FILE.jsonl --images DIR [--out DIR]``.

Per-sample IoU at original resolution; prints the table (overall, per category, per rule) and
writes ``metrics.json``, ``per_sample.csv`` and a few overlay PNGs. Several processes:
``accelerate launch --num_processes N -m rsrefseg eval ...`` (GPUs; on a CPU-only machine
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...``, since ``--cpu`` starts
one process without MPI) gives numbers identical to a single process.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np

from rsrefseg.cli.args import add_precision_arg


def _dataset(jsonl: str, images: str, split: str | None, size: int, mode: str, skip_bad: bool,
             keys: tuple[str, str] = ("--data", "--images")) -> Any:
    from rsrefseg.training.setup import load_base

    return load_base(jsonl, images, split, None, "evaluation", size, mode, skip_bad, keys)


def _write_csv(path: Path, rows: list[Any]) -> None:
    from rsrefseg.utils import atomic_open

    with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(["index", "id", "expression", "iou", "pred_area", "target_area", "intersection", "union",
                      "category", "rule"])
        for r in rows:
            out.writerow([r.index, r.sample_id, r.text, f"{r.iou:.6f}", r.pred_area, r.target_area, r.inter,
                          r.union, r.category or "", r.rule or ""])


def _eval(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from rsrefseg.checkpoint import CONFIG_NAME, load_checkpoint, read_checkpoint_config
    from rsrefseg.errors import WeightsError
    from rsrefseg.evaluation import evaluate, evaluate_baselines
    from rsrefseg.metrics import format_table
    from rsrefseg.modeling.optimize import optimize_for_inference
    from rsrefseg.training.report import markdown_table, save_overlay
    from rsrefseg.utils import atomic_write_json, check_output_dir, remove_stale_temp_files, write_error

    # Everything a user can get wrong is checked before the model is loaded and before anything is written.
    if args.out:
        check_output_dir(args.out, "--out")
    config_path = Path(args.checkpoint) / CONFIG_NAME
    if not config_path.is_file():
        raise WeightsError(f"{args.checkpoint}: not a checkpoint directory (no {CONFIG_NAME})")
    config = read_checkpoint_config(config_path)
    mode = args.resize_mode or config.resize_mode
    dataset = _dataset(args.data, args.images, args.split, config.sam_image_size, mode, args.skip_bad)
    train_ds = None
    if args.train_data:  # the training set of the fixed-box baseline
        train_ds = _dataset(args.train_data, args.train_images or args.images, None, config.sam_image_size, mode,
                            args.skip_bad, ("--train-data", "--train-images"))
    accelerator = Accelerator()
    if args.out and accelerator.is_main_process:
        remove_stale_temp_files(args.out, recursive=True)  # what a killed earlier run left (our names only)
    model = load_checkpoint(args.checkpoint, clip=args.clip, sam=args.sam).to(accelerator.device)
    optimize_for_inference(model, args.precision)  # LoRA merged, fast kernels; bf16 on request
    if args.cache_dir:
        from rsrefseg.training.data import CachedDataset

        with accelerator.main_process_first():
            dataset = CachedDataset.build(dataset, args.cache_dir, with_target=True)
    n_overlays = min(args.overlays, len(dataset))
    keep = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, num=n_overlays)}) if n_overlays else []
    result = evaluate(model, dataset, args.batch_size, accelerator, args.num_workers, strict=args.strict_pr,
                      progress=True, keep=keep, desc="eval")
    control = None
    if args.swap_control:
        from rsrefseg.evaluation import SwappedTextView, swap_control

        control = swap_control(model, SwappedTextView(dataset), result.rows, args.batch_size, accelerator,
                               args.num_workers, strict=args.strict_pr, progress=True)
    if not accelerator.is_main_process:
        return 0
    payload: dict[str, Any] = {"checkpoint": str(args.checkpoint), "precision": args.precision, "data": str(args.data),
                               "num_processes": accelerator.num_processes, **result.metrics}
    print(format_table(result.metrics))
    if args.baselines or args.train_data:
        baselines = evaluate_baselines(dataset, train_ds, strict=args.strict_pr)
        payload["baselines"] = baselines
        table = {"model": result.metrics, "baseline: empty mask": baselines["empty"],
                 "baseline: full image": baselines["full_image"]}
        if "fixed_box" in baselines:
            table["baseline: best fixed box (fit on train)"] = baselines["fixed_box"]
        print("\n" + markdown_table(table))
    if control is not None:
        payload["swap_control"] = control
        print("\n" + markdown_table({"true expressions (swappable samples)": control["true_expressions"],
                                     "expression swapped within the image": control["swapped_expressions"]}))
    if args.out:
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(out, exc) from None
        atomic_write_json(out / "metrics.json", payload)
        _write_csv(out / "per_sample.csv", result.rows)
        by_index = {r.index: r for r in result.rows}
        for index in keep:
            rgb, target, _ = dataset.load(index)
            row = by_index[index]
            save_overlay(out / "overlays" / f"{index:05d}.png", rgb, row.text, result.predictions[index], target,
                         f"IoU {100 * row.iou:.1f}%")
        print(f"wrote {out}/metrics.json, per_sample.csv and {len(keep)} overlay(s)")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on a referring JSONL (mIoU, oIoU, Pr@t)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="JSONL of records to evaluate (e.g. the test split)")
    p.add_argument("--images", required=True, help="image folder of the records")
    p.add_argument("--split", default=None, help="keep only records of this split")
    p.add_argument("--out", default=None, help="folder for metrics.json, per_sample.csv and overlays")
    p.add_argument("--batch-size", type=int, default=8, help="batch size per process (default 8)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--strict-pr", action="store_true", help="Pr@t counts IoU > t (reference code) not >= t")
    p.add_argument("--resize-mode", choices=["stretch", "longest_side"], default=None,
                   help="override the checkpoint's resize mode")
    p.add_argument("--overlays", type=int, default=4, help="overlay PNGs to write with --out (default 4)")
    p.add_argument("--baselines", action="store_true", help="also score the empty-mask and full-image baselines")
    p.add_argument("--train-data", default=None, help="training JSONL: fit the best fixed box baseline on it")
    p.add_argument("--train-images", default=None, help="image folder of --train-data (default: --images)")
    p.add_argument("--cache-dir", default=None,
                   help="pre-resized image cache (e.g. <work_dir>/cache of the training run): same numbers, faster")
    p.add_argument("--swap-control", action="store_true",
                   help="also score each sample with another expression of its image (does the model read the text?)")
    p.add_argument("--skip-bad", action="store_true", help="skip unusable records instead of failing")
    p.add_argument("--clip", default=None, help="replace the checkpoint's CLIP/SigLIP base id (local copy)")
    p.add_argument("--sam", default=None, help="replace the checkpoint's SAM base id (local copy)")
    add_precision_arg(p)
    p.set_defaults(func=_eval)
