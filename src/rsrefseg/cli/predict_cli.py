"""``rsrefseg predict``: masks, overlays, GeoTIFFs and GeoJSON for images x expressions.

Inputs are files, folders (their images, not recursive) or glob patterns. Problems with the
arguments (an empty expression, no matching input, a bad checkpoint) stop the command before any
work with one ``error:`` line and exit status 2. A failing image (corrupt file, unsupported band
count) is reported, listed under ``failures`` in ``summary.json`` and does not stop the others:
the exit status is 1 when some images failed, 2 when all of them did, 0 otherwise.

Under a multi-process launch (``WORLD_SIZE > 1``) rank ``r`` of ``world`` processes takes inputs
``r::world``, writes its own outputs and a ``summary.rank<r>.json``; after a barrier the main process
merges them into ``summary.json`` (and removes the per-rank files). Launch it with::

    accelerate launch --num_processes 4 -m rsrefseg predict ...            # GPUs (one per process)
    accelerate launch --multi_gpu --num_processes 2 -m rsrefseg predict ... # CPU-only machine: gloo
    torchrun --nproc_per_node 2 $(which rsrefseg) predict ...               # the same without accelerate

(``accelerate launch --cpu`` starts a single process unless MPI is configured, so it does not shard.)
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rsrefseg.cli.args import add_model_args, parse_pixels
from rsrefseg.cli.progress import add_progress_args, progress, progress_style
from rsrefseg.errors import ConfigError, DataError, RSRefSegError
from rsrefseg.inference.defaults import DEFAULT_TILE_THRESHOLD, check_expression_length

#: Suffixes taken from a folder given as input.
IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".jpg", ".jpeg", ".png", ".bmp", ".jp2", ".img", ".vrt"})


def _parse_bands(text: str) -> tuple[int, ...]:
    from rsrefseg.data.imageio import parse_bands

    try:
        bands = parse_bands(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if bands is None:
        raise argparse.ArgumentTypeError("bands must name 1 or 3 bands (1-based), got an empty value")
    return bands


def collect_expressions(texts: list[str], texts_file: str | None) -> list[str]:
    """``--text`` values then the lines of ``--texts-file`` (blank lines and ``#`` comments skipped).

    Raises:
        ConfigError: an empty ``--text``, or no expression at all.
        DataError: the texts file cannot be read.
    """
    expressions = []
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            raise ConfigError(f"--text #{number} is empty; every expression must contain text")
        expressions.append(check_expression_length(" ".join(text.split()), f"--text #{number}"))
    if texts_file is not None:
        try:
            lines = Path(texts_file).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{texts_file}: cannot read the texts file ({exc.__class__.__name__})") from None
        expressions += [check_expression_length(" ".join(line.split()), f"{texts_file}:{number}")
                        for number, line in enumerate(lines, start=1)
                        if line.strip() and not line.lstrip().startswith("#")]
    if not expressions:
        raise ConfigError("no expression given; use --text or --texts-file")
    return expressions


def expand_inputs(items: list[str]) -> list[Path]:
    """Files, folders (images inside, sorted) and glob patterns -> unique files in order.

    Raises:
        DataError: an item matches nothing (missing file, empty folder, glob without match).
    """
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"{item}: folder contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif path.is_file():
            files = [path]
        elif glob.has_magic(item):
            files = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not files:
                raise DataError(f"{item}: no file matches this pattern")
        else:
            raise DataError(f"{item}: no such image file or folder")
        found += files
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _dist_state() -> Any:
    """accelerate's ``PartialState`` under a multi-process launch (``WORLD_SIZE > 1``), else None.

    Without CUDA (or with ``ACCELERATE_USE_CPU``) the processes talk over gloo on the CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=use_cpu or not torch.cuda.is_available())
    return state if state.num_processes > 1 else None


def _error_line(exc: Exception) -> str:
    if isinstance(exc, RSRefSegError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _process_image(predictor: Any, path: Path, folder: Path, expressions: list[str], names: list[str],
                   args: argparse.Namespace) -> dict[str, Any]:
    """Predict every expression on one image and write its files; return its summary record."""
    from rsrefseg.data.imageio import image_size
    from rsrefseg.inference.geo import read_georeference
    from rsrefseg.inference.outputs import write_prediction_outputs
    from rsrefseg.inference.scene import ArraySource, open_scene, predict_scene
    from rsrefseg.inference.tiling import should_tile

    start = time.perf_counter()
    height, width = image_size(path)
    georef = read_georeference(path)
    record: dict[str, Any] = {"source": str(path), "dir": folder.name, "height": height, "width": width,
                              "crs": None if georef is None or georef.crs is None else georef.crs.to_string(),
                              "georeferenced": georef is not None, "tiled": False}
    if should_tile(height, width, args.tile_threshold):
        with open_scene(path, bands=args.bands) as source:
            scene = predict_scene(
                predictor, source, expressions, tile=args.tile, overlap=args.overlap,
                batch_size=args.batch_size, threshold=args.threshold, heatmap=args.heatmaps,
                progress=lambda it, n: progress(it, progress_style(args), total=n, desc="tiles", leave=False),
            )
            preview, _ = source.preview(args.overlay_max_side)
        predictions = scene.predictions
        record.update(tiled=True, tile=scene.tile, overlap=scene.overlap, tiles=scene.tiles,
                      skipped_tiles=scene.skipped_tiles)
    else:
        predictor.set_image(path, bands=args.bands)
        predictions = predictor.predict(expressions, args.batch_size, args.threshold, heatmap=args.heatmaps)
        image = predictor.image
        preview = image.rgb
        if max(height, width) > args.overlay_max_side:
            preview, _ = ArraySource(image).preview(args.overlay_max_side)
        predictor.reset_image()
    outputs = []
    for name, prediction in zip(names, predictions):
        out = write_prediction_outputs(folder, name, prediction, preview, str(path), georef,
                                       simplify=args.simplify, min_area=args.min_area)
        for key in ("mask_png", "overlay_png", "heatmap_png", "mask_tif", "geojson"):
            if key in out:
                out[key] = f"{folder.name}/{out[key]}"  # relative to the output root
        outputs.append({"index": len(outputs) + 1, "name": name, **out})
    record["outputs"] = outputs
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _validate(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.tile is not None and args.tile < 16:
        raise ConfigError(f"--tile must be >= 16 pixels, got {args.tile}")
    if args.overlap is not None and not 0 <= args.overlap < (args.tile or 1 << 30):
        raise ConfigError(f"--overlap must be in [0, tile), got {args.overlap}")
    if args.simplify < 0 or args.min_area < 0:
        raise ConfigError("--simplify and --min-area must be >= 0")
    if not math.isfinite(args.threshold):
        raise ConfigError(f"--threshold must be a finite logit, got {args.threshold}")
    if args.overlay_max_side < 16:
        raise ConfigError(f"--overlay-max-side must be >= 16, got {args.overlay_max_side}")


def _exit_code(summary: dict[str, Any]) -> int:
    if not summary["failures"]:
        return 0
    return 2 if not summary["images"] else 1


def run(args: argparse.Namespace) -> int:
    """Body of ``rsrefseg predict``; returns the exit status."""
    expressions = collect_expressions(args.text, args.texts_file)
    _validate(args)
    inputs = expand_inputs(args.images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from rsrefseg import __version__
    from rsrefseg.inference.outputs import (
        expression_names,
        image_dir_names,
        merge_summaries,
        peak_rss_mb,
        write_summary,
    )
    from rsrefseg.inference.predictor import Predictor

    state = _dist_state()
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    device = args.device or (state.device if state is not None else None)
    predictor = Predictor.from_pretrained(args.checkpoint, device=device, precision=args.precision)
    names = expression_names(expressions)
    folders = image_dir_names(inputs)
    config = predictor.model.config
    summary: dict[str, Any] = {
        "command": "predict", "version": __version__, "checkpoint": str(args.checkpoint),
        "preset": config.preset, "expressions": expressions, "names": names,
        "settings": {"bands": args.bands, "tile_threshold": args.tile_threshold, "tile": args.tile or config.sam_image_size,
                     "overlap": args.overlap if args.overlap is not None else (args.tile or config.sam_image_size) // 8,
                     "threshold": args.threshold, "batch_size": args.batch_size,
                     "simplify_px": args.simplify, "min_area_px": args.min_area, "resize_mode": config.resize_mode,
                     "device": str(predictor.device), "precision": args.precision, "heatmaps": args.heatmaps,
                     "overlay_max_side": args.overlay_max_side},
        "world_size": world, "rank": rank, "inputs": len(inputs),
        "rss_after_model_mb": round(peak_rss_mb(), 1), "images": [], "failures": [],
    }
    part = out / ("summary.json" if world == 1 else f"summary.rank{rank}.json")
    shard: Iterator[int] = iter(range(rank, len(inputs), world))
    desc = "predict" if world == 1 else f"predict [rank {rank}]"
    for i in progress(shard, progress_style(args), total=len(range(rank, len(inputs), world)), desc=desc,
                      unit="image"):
        try:
            record = _process_image(predictor, inputs[i], out / folders[i], expressions, names, args)
            summary["images"].append({"input_index": i, **record})
        except Exception as exc:  # one failing image never stops the batch
            predictor.reset_image()
            line = _error_line(exc)
            print(f"error: {line}", file=sys.stderr)
            summary["failures"].append({"input_index": i, "source": str(inputs[i]), "error": line,
                                        "error_type": type(exc).__name__})
        summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
        summary["outputs"] = sum(len(r["outputs"]) for r in summary["images"])
        write_summary(part, summary)  # after every image: a crash still leaves a summary
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    summary["outputs"] = sum(len(r["outputs"]) for r in summary["images"])
    write_summary(part, summary)
    if state is not None:
        import json

        state.wait_for_everyone()
        if state.is_main_process:
            parts = [json.loads((out / f"summary.rank{r}.json").read_text(encoding="utf-8")) for r in range(world)]
            summary = merge_summaries(parts)
            write_summary(out / "summary.json", summary)
            for r in range(world):
                (out / f"summary.rank{r}.json").unlink()
        state.wait_for_everyone()
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    if rank == 0:
        print(f"{summary['outputs']} prediction(s) for {len(summary['images'])} image(s) written to {out};"
              f" {len(summary['failures'])} failed; peak memory {summary['peak_rss_mb']:.0f} MiB;"
              f" summary: {out / 'summary.json'}")
    return _exit_code(summary)


def add_parser(subparsers: Any) -> None:
    """Register ``rsrefseg predict``."""
    p = subparsers.add_parser(
        "predict", help="segment images with referring expressions (masks, overlays, GeoTIFF, GeoJSON)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders or glob patterns")
    p.add_argument("--text", action="append", default=[], metavar="TEXT", help="a referring expression (repeatable)")
    p.add_argument("--texts-file", metavar="F", help="one expression per line (blank lines and # comments skipped)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--bands", type=_parse_bands, metavar="R,G,B", help="1-based source bands, e.g. 4,3,2 (or one band)")
    p.add_argument("--tile-threshold", type=parse_pixels, default=DEFAULT_TILE_THRESHOLD, metavar="N",
                   help="tile images with more pixels than N (or HxW); default 2048x2048")
    p.add_argument("--tile", type=int, metavar="PX", help="tile side at native resolution (default: model input size)")
    p.add_argument("--overlap", type=int, metavar="PX", help="tile overlap (default: tile/8)")
    p.add_argument("--simplify", type=float, default=0.0, metavar="T",
                   help="polygon simplification tolerance in pixels (default 0: exact pixel edges)")
    p.add_argument("--min-area", type=float, default=0.0, metavar="A", help="drop polygons smaller than A pixels")
    p.add_argument("--threshold", type=float, default=0.0, help="mask logit threshold (0 = probability 0.5; write negative values as --threshold=-1)")
    p.add_argument("--batch-size", type=int, default=16, help="expressions decoded together")
    add_model_args(p, "torch device (default: the accelerate device, else CUDA if available)")
    p.add_argument("--overlay-max-side", type=int, default=2048, metavar="PX",
                   help="longest side of overlay PNGs (larger images get a downscaled preview)")
    p.add_argument("--heatmaps", action="store_true",
                   help="also write <nn>_<expression>.heatmap.png, the text-activation heatmap over the image "
                        "(stitched from the tiles for tiled scenes)")
    add_progress_args(p)
    p.set_defaults(func=run)
