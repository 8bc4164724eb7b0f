"""The one-shot GPU check behind ``scripts/gpu-check.sh`` (issue 12): everything a GPU must confirm.

On one CUDA GPU, in this order (each phase timed; a failing phase is recorded and the next runs):

1. ``environment``: torch/CUDA versions, the device, its memory, bf16 support;
2. ``data``: the NWPU VHR-10 referring set with ``rsrefseg data from-coco`` (as ``scripts/demo.sh``);
3. ``bench_gpu``: the benchmark suite's GPU section (:func:`rsrefseg.bench.gpu.bench_gpu`);
4. ``train`` and ``train_checkpointing``: ``--steps`` steps of ``rsrefseg train`` (the library's
   :func:`rsrefseg.training.train.train`, ``configs/rrsisd-b.yaml`` on the NWPU set, random init,
   bf16 mixed precision) without and with gradient checkpointing: step time (median and min of the
   steps after the first 5), peak ``torch.cuda.max_memory_allocated`` over the steps, and MFU =
   the model FLOPs of a step (traced, :mod:`rsrefseg.bench.train_trace`; without the forward that
   checkpointing recomputes) / step time / the bf16 matmul peak measured on this GPU;
5. ``eval``: ``rsrefseg eval`` of the checkpointed run's best checkpoint on NWPU val (bf16);
6. ``predict``: ``rsrefseg predict`` of a shared sample GeoTIFF on the GPU.

Writes ``<out>/gpu-check.json`` (after every phase, atomically) and prints a summary. Without CUDA it
stops at once with one ``error:`` line (exit 2). ``--cpu-dry-run`` (or ``RSREFSEG_GPU_CHECK_DRY_RUN=1``)
runs the same phases with ``tiny`` on the CPU on a small part of the data, in well under a minute,
so that the script cannot rot untested.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DRY_RUN_ENV = "RSREFSEG_GPU_CHECK_DRY_RUN"
#: Steps at the start of a training run left out of the step time (CUDA/cuDNN warm-up, first batches).
SKIP_STEPS = 5
#: Sample GeoTIFF of the predict phase (3 bands, custom Albers CRS, 512 x 512) and its expressions.
GEOTIFF = "albers_3band_int16.tif"
EXPRESSIONS = ["the buildings", "the road in the middle"]


#: Traced FLOPs, shared by both training runs.
_CACHE: dict[tuple[str, str, int], dict[str, Any]] = {}


class CheckError(Exception):
    """A phase failed in a way that is recorded, not raised further."""


def _options(dry: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Preset, data subset and run sizes of a real check or of the CPU dry run."""
    if dry:
        return {"preset": "tiny", "device": "cpu", "precision": "fp32", "mixed_precision": "no", "train_images": 24,
                "val_images": 8, "val_samples": 8, "batch_size": args.batch_size or 2, "steps": args.steps or 30,
                "num_workers": 0}
    return {"preset": args.preset, "device": "cuda", "precision": "bf16", "mixed_precision": "bf16",
            "train_images": None, "val_images": None, "val_samples": 32, "batch_size": args.batch_size or 2,
            "steps": args.steps or 30, "num_workers": 4}


def _reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so each phase makes its own ``Accelerator``."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        reset = getattr(state, "_reset_state", None)
        if reset is not None:
            reset(True) if state is AcceleratorState else reset()


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _cli(argv: list[str]) -> int:
    """Run an ``rsrefseg`` command in this process; its exit status (errors are CheckErrors)."""
    from rsrefseg.cli.main import main

    _reset_accelerate()
    code = main(argv)
    if code != 0:
        raise CheckError(f"rsrefseg {argv[0]} exited with status {code}")
    return code


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "cuda_build": torch.version.cuda, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    bf16=torch.cuda.is_bf16_supported(), devices=torch.cuda.device_count())
    return info


def _subset(src: Path, dst: Path, n: int | None) -> Path:
    """The COCO instances file ``src``, cut to its first ``n`` images (None: ``src`` itself)."""
    if n is None:
        return src
    data = json.loads(src.read_text(encoding="utf-8"))
    images = data["images"][:n]
    keep = {im["id"] for im in images}
    data["images"], data["annotations"] = images, [a for a in data["annotations"] if a["image_id"] in keep]
    from rsrefseg.utils import atomic_write_json

    atomic_write_json(dst, data)
    return dst


def make_data(out: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """``rsrefseg data from-coco`` for train and val into ``out/data``."""
    from rsrefseg.paths import nwpu_root

    root = nwpu_root()
    result: dict[str, Any] = {"nwpu": str(root)}
    for split, n in (("train", opts["train_images"]), ("val", opts["val_images"])):
        ann = _subset(root / "annotations" / f"instances_{split}.json", out / "data" / f"instances_{split}.json", n)
        jsonl = out / "data" / f"{split}.jsonl"
        _cli(["data", "from-coco", "--annotations", str(ann), "--images", str(root / "images"), "--out", str(jsonl),
              "--split", split])
        result[f"{split}_records"] = sum(1 for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip())
    return result


def matmul_peak(device: str) -> dict[str, Any]:
    """The matmul peak MFU is held against: bf16 on a GPU, fp32 on the CPU (dry run)."""
    from rsrefseg.bench.roofline import roofline

    if device == "cuda":
        return {"dtype": "bf16", "gflops": roofline([4096, 8192], 5, ("bf16",), device="cuda")["bf16"]["gflops"]}
    return {"dtype": "fp32", "gflops": roofline([512], 2, ("fp32",))["fp32"]["gflops"]}


def train_run(out: Path, opts: dict[str, Any], checkpointing: bool, peak_gflops: float) -> dict[str, Any]:
    """``opts["steps"]`` steps of the trainer on the NWPU set; step times, peak memory, MFU."""
    import torch

    from rsrefseg.bench.train_trace import trace_step
    from rsrefseg.paths import nwpu_root, repo_root
    from rsrefseg.training.train import train
    from rsrefseg.training.train_config import load_config

    name = "run-checkpointing" if checkpointing else "run"
    device = opts["device"]
    images = str(nwpu_root() / "images")
    overrides: dict[str, Any] = {
        "model.preset": opts["preset"], "model.random_init": True,
        "data.train_jsonl": str(out / "data" / "train.jsonl"), "data.train_images": images,
        "data.val_jsonl": str(out / "data" / "val.jsonl"), "data.val_images": images,
        "data.max_val_samples": opts["val_samples"], "data.cache": False,
        "batch_size": opts["batch_size"], "max_steps": opts["steps"],
        "mixed_precision": opts["mixed_precision"], "gradient_checkpointing": checkpointing,
        "work_dir": str(out / name), "num_workers": opts["num_workers"], "val_batch_size": 8,
        "report_overlays": 0, "tensorboard": False, "progress": False, "checkpoint_every_steps": 0,
        "num_threads": 1 if device == "cpu" else None,
    }
    if opts["preset"] == "tiny":  # tiny's recipe (the demo's): every parameter trains (as the traced step)
        overrides.update({"model.overrides.finetune": "full", "loss.dice_weight": 5.0, "loss.activation_weight": 20.0})
    config = load_config(str(repo_root() / "configs" / "rrsisd-b.yaml"), overrides)
    stamps: list[float] = []
    memory: list[int] = []

    def on_step(state: Any, model: Any) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
            memory.append(int(torch.cuda.max_memory_allocated()))
        stamps.append(time.perf_counter())

    shutil.rmtree(out / name, ignore_errors=True)  # this check's own run folder: a fresh run every time
    _free(device)
    _reset_accelerate()
    start = time.perf_counter()
    result = train(config, step_callback=on_step)
    wall = time.perf_counter() - start
    steps = [b - a for a, b in itertools.pairwise(stamps)][SKIP_STEPS - 1:]  # steps SKIP_STEPS + 1, ...
    if not steps:
        raise CheckError(f"only {len(stamps)} steps ran")
    # MFU counts the model's FLOPs (the step without checkpointing; its recomputed forward is not
    # useful work), traced once on fake tensors.
    key = ("trace", opts["preset"], opts["batch_size"])
    trace = _CACHE.get(key) or _CACHE.setdefault(key, trace_step(opts["preset"], opts["batch_size"], 1, False, "fp32"))
    median, fastest = statistics.median(steps), min(steps)
    out_row = {
        "steps": len(stamps), "timed_steps": len(steps), "batch_size": opts["batch_size"],
        "checkpointing": checkpointing, "mixed_precision": opts["mixed_precision"],
        "step_s_median": median, "step_s_min": fastest, "wall_s": wall, "stopped_by": result.stopped_by,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "val_mIoU": result.state.history[-1].get("mIoU") if result.state.history else None,
        "model_gflop_per_step": trace["gflop"],
        "mfu_at_median": trace["gflop"] / median / peak_gflops, "mfu_at_min": trace["gflop"] / fastest / peak_gflops,
    }
    if memory:
        out_row["max_memory_allocated_bytes"] = max(memory)
    return out_row


def evaluate(out: Path, opts: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    from rsrefseg.paths import nwpu_root

    shutil.rmtree(out / "eval", ignore_errors=True)
    start = time.perf_counter()
    _cli(["eval", "--checkpoint", checkpoint, "--data", str(out / "data" / "val.jsonl"), "--images",
          str(nwpu_root() / "images"), "--out", str(out / "eval"), "--batch-size", "8", "--overlays", "2",
          "--precision", opts["precision"]])
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "eval" / "metrics.json").read_text(encoding="utf-8"))
    flat = metrics.get("overall", metrics)
    n = flat.get("n") or 1
    return {"seconds": seconds, "n": flat.get("n"), "mIoU": flat.get("mIoU"), "seconds_per_sample": seconds / n}


def predict(out: Path, opts: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    from rsrefseg.paths import geotiff_root

    image = geotiff_root() / GEOTIFF
    texts = [x for t in EXPRESSIONS for x in ("--text", t)]
    shutil.rmtree(out / "predict", ignore_errors=True)
    start = time.perf_counter()
    _cli(["predict", str(image), *texts, "--checkpoint", checkpoint, "--out", str(out / "predict"), "--device",
          opts["device"], "--precision", opts["precision"], "--quiet"])
    seconds = time.perf_counter() - start
    summary = json.loads((out / "predict" / "summary.json").read_text(encoding="utf-8"))
    written = sorted(str(p.relative_to(out / "predict")) for p in (out / "predict").rglob("*") if p.is_file())
    return {"seconds": seconds, "image": str(image), "expressions": len(EXPRESSIONS),
            "failures": summary.get("failures", []), "files": written[:50]}


def run_check(out: Path, dry: bool, args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """All phases (see the module docstring); the report, also in ``out/gpu-check.json``."""
    from rsrefseg.utils import atomic_write_json

    opts = _options(dry, args)
    report: dict[str, Any] = {"dry_run": dry, "options": opts, "phases": {},
                              "gpu_measured": not dry,
                              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    state: dict[str, Any] = {}

    def phase(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        log(f"== {name}")
        t = time.perf_counter()
        try:
            result = {"status": "ok", **fn()}
        except Exception as exc:  # recorded; the next phases still run
            result = {"status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        result["phase_s"] = time.perf_counter() - t
        report["phases"][name] = result
        report["wall_s"] = time.perf_counter() - started
        atomic_write_json(out / "gpu-check.json", report)

    device = opts["device"]
    phase("environment", lambda: environment(device))
    phase("data", lambda: make_data(out, opts))
    if dry:
        report["phases"]["bench_gpu"] = {"status": "skipped (CPU dry run)"}
    else:
        from rsrefseg.bench.gpu import bench_gpu

        phase("bench_gpu", lambda: bench_gpu(opts["preset"], 3))
        _free(device)

    def peak() -> dict[str, Any]:
        state["peak"] = matmul_peak(device)
        return state["peak"]

    phase("matmul_peak", peak)
    gflops = state.get("peak", {}).get("gflops") or float("nan")
    phase("train", lambda: train_run(out, opts, False, gflops))
    phase("train_checkpointing", lambda: train_run(out, opts, True, gflops))
    _free(device)
    best = report["phases"]["train_checkpointing"].get("best_checkpoint") or report["phases"]["train"].get(
        "best_checkpoint")
    if best:
        phase("eval", lambda: evaluate(out, opts, best))
        _free(device)
        phase("predict", lambda: predict(out, opts, best))
    else:
        report["phases"]["eval"] = report["phases"]["predict"] = {"status": "skipped (no trained checkpoint)"}
    report["ok"] = all(p["status"] == "ok" or p["status"].startswith("skipped") for p in report["phases"].values())
    report["wall_s"] = time.perf_counter() - started
    atomic_write_json(out / "gpu-check.json", report)
    text = summary(report)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    log(text)
    return report


def summary(report: dict[str, Any]) -> str:
    """The printed summary of a report."""
    p = report["phases"]
    env = p.get("environment", {})
    gib = 2**30
    head = "CPU dry run (tiny): NOT a GPU measurement" if report["dry_run"] else \
        f"GPU check on {env.get('name')} ({(env.get('memory_bytes') or 0) / gib:.0f} GiB)"
    lines = [f"{head}; torch {env.get('torch')} CUDA {env.get('cuda_build')}; wall {report['wall_s']:.0f} s; "
             f"{'all phases ok' if report.get('ok') else 'SOME PHASES FAILED'}"]
    for name, r in p.items():
        lines.append(f"  {name:<20} {r['status']}" + (f" ({r['phase_s']:.0f} s)" if "phase_s" in r else ""))
    peak = p.get("matmul_peak", {})
    for name in ("train", "train_checkpointing"):
        r = p.get(name, {})
        if r.get("status") == "ok":
            mem = r.get("max_memory_allocated_bytes")
            lines.append(f"  {name}: {r['steps']} steps at batch {r['batch_size']} ({r['mixed_precision']}): step "
                         f"{r['step_s_median']:.3f} s median / {r['step_s_min']:.3f} s min; peak max_memory_allocated "
                         f"{'-' if mem is None else f'{mem / gib:.2f} GiB'}; MFU {100 * r['mfu_at_median']:.1f}% "
                         f"({r['model_gflop_per_step']:.0f} model GFLOP/step vs {peak.get('dtype')} matmul peak "
                         f"{peak.get('gflops', 0):.0f} GFLOP/s)")
    g = p.get("bench_gpu", {})
    if g.get("status") == "measured":
        lat, thr, tr = g["latency_batch1"], g["throughput"], g["training_step"]
        lines.append(f"  bench_gpu: latency batch 1 {lat['min_s'] * 1e3:.1f} ms, best {thr['images_per_s']:.1f} images/s "
                     f"at batch {thr['best_batch']}, training step {tr['min_s'] * 1e3:.1f} ms (batch {tr['batch']}), "
                     f"MFU {100 * tr['mfu_at_min']:.1f}%")
    for name in ("eval", "predict"):
        r = p.get(name, {})
        if r.get("status") == "ok":
            extra = (f"mIoU {100 * (r.get('mIoU') or 0):.2f} on {r.get('n')} samples, {r['seconds_per_sample']:.3f} s/sample"
                     if name == "eval" else f"{r['expressions']} expressions on {Path(r['image']).name}, "
                     f"{len(r['failures'])} failures")
            lines.append(f"  {name}: {r['seconds']:.1f} s; {extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: $OUT if set, else gpu-check/)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help=f"the same phases with tiny on the CPU (also: {DRY_RUN_ENV}=1)")
    parser.add_argument("--preset", default="rsrefseg-b", help="preset of the GPU run (default rsrefseg-b)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 30)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size (default 2)")
    args = parser.parse_args(argv)
    dry = args.cpu_dry_run or os.environ.get(DRY_RUN_ENV, "") not in ("", "0")
    out = Path(args.out or os.environ.get("OUT") or "gpu-check")
    import torch

    if not dry and not torch.cuda.is_available():
        print(f"error: gpu-check: no CUDA GPU available (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}); run it on a GPU machine, or pass --cpu-dry-run "
              f"({DRY_RUN_ENV}=1) to run the same steps with tiny on the CPU", file=sys.stderr)
        return 2
    if (args.steps is not None and args.steps <= SKIP_STEPS) or (args.batch_size is not None and args.batch_size < 1):
        print(f"error: gpu-check: --steps must be > {SKIP_STEPS} and --batch-size >= 1", file=sys.stderr)
        return 2
    if dry:  # tiny ops on several OpenMP threads of a shared CPU wait for each other (10-100x slower)
        torch.set_num_threads(1)
    from rsrefseg.paths import nwpu_root

    root = nwpu_root()
    missing = [p for p in (root / "images", root / "annotations" / "instances_train.json",
                           root / "annotations" / "instances_val.json") if not p.exists()]
    if missing:
        print(f"error: gpu-check: NWPU VHR-10 not found: no {missing[0]} (set RSREFSEG_NWPU to its folder or "
              "RSREFSEG_DATA to the shared data root)", file=sys.stderr)
        return 2
    report = run_check(out, dry, args)
    return 0 if report["ok"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
