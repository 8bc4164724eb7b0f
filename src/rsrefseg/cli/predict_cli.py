"""``rsrefseg predict``: masks, overlays, GeoTIFFs and vector files for images x expressions.

Inputs are files, folders (their images, not recursive), glob patterns, ``@LIST`` / ``--inputs-file
LIST`` (one input per line) and local STAC Item / ItemCollection JSON files (``--stac-asset KEY``
chooses the raster asset). Problems with the arguments (an empty expression, no matching input, a
bad checkpoint, an ``--out`` that is a file or not writable) stop the command before any work with
one ``error:`` line and exit status 2. A failing image (corrupt file, unsupported band count, larger
than ``--max-pixels``, not enough disk space for its outputs) is reported, listed under
``failures`` in ``summary.json`` and does not stop the others: the exit status is 1 when some
images failed, 2 when all of them did, 0 otherwise (130 when interrupted).

``--features DIR`` (instead of images) decodes from feature folders written by ``rsrefseg encode``:
the same outputs as predicting the scene tiled with the folder's tiling, without reading or encoding
it; a folder made with another checkpoint, tiling or band choice stops the command (exit status 2).

Large images (above ``--tile-threshold``) are segmented tile by tile and their outputs written
window by window: memory does not depend on the scene size. Every finished scene is recorded in
``OUT/manifest.jsonl``; ``--resume`` skips the scenes it lists (same expressions and settings, files
intact) and redoes anything partial.

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
import contextlib
import math
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rsrefseg.cli.args import add_model_args, parse_bands_arg, parse_pixels
from rsrefseg.cli.progress import add_progress_args, progress_style
from rsrefseg.errors import ConfigError, DataError
from rsrefseg.inference.defaults import DEFAULT_TILE_THRESHOLD, check_expression_length
from rsrefseg.inference.jobs import IMAGE_SUFFIXES  # noqa: F401  (suffixes taken from folders; re-exported)

#: Vector formats of ``--vector-format`` (rsrefseg.inference.vector_io.VECTOR_FORMATS, torch-free here).
VECTOR_FORMATS = ("geojson", "gpkg", "fgb", "shp")


def collect_expressions(texts: list[str], texts_file: str | None) -> list[str]:
    """``--text`` values then the lines of ``--texts-file`` (blank lines and ``#`` comments skipped).

    Raises:
        ConfigError: an empty ``--text``, a too long expression, or no expression at all.
        DataError: the texts file cannot be read or is not UTF-8 text.
    """
    expressions = []
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            raise ConfigError(f"--text #{number} is empty; every expression must contain text")
        expressions.append(check_expression_length(" ".join(text.split()), f"--text #{number}"))
    if texts_file is not None:
        try:
            lines = Path(texts_file).read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"{texts_file}: the texts file is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                            f"at offset {exc.start})") from None
        except OSError as exc:
            raise DataError(f"{texts_file}: cannot read the texts file ({exc.strerror or exc})") from None
        expressions += [check_expression_length(" ".join(line.split()), f"{texts_file}:{number}")
                        for number, line in enumerate(lines, start=1)
                        if line.strip() and not line.lstrip().startswith("#")]
    if not expressions:
        raise ConfigError("no expression given; use --text or --texts-file")
    return expressions


def expand_inputs(items: list[str], stac_asset: str | None = None) -> list[Any]:
    """Command-line inputs -> unique scenes (:func:`rsrefseg.inference.jobs.expand_inputs`).

    Raises:
        DataError: an item matches nothing, a list or STAC file is invalid.
    """
    from rsrefseg.inference.jobs import expand_inputs as expand

    return expand(items, stac_asset=stac_asset)


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


def _validate(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.tile is not None and args.tile < 16:
        raise ConfigError(f"--tile must be >= 16 pixels, got {args.tile}")
    if args.overlap is not None and not 0 <= args.overlap < (args.tile or 1 << 30):
        raise ConfigError(f"--overlap must be in [0, tile), got {args.overlap}")
    if not (args.simplify >= 0 and args.min_area >= 0 and math.isfinite(args.simplify + args.min_area)):
        raise ConfigError("--simplify and --min-area must be finite and >= 0")
    if not math.isfinite(args.threshold):
        raise ConfigError(f"--threshold must be a finite logit, got {args.threshold}")
    if args.overlay_max_side < 16:
        raise ConfigError(f"--overlay-max-side must be >= 16, got {args.overlay_max_side}")
    if args.merge_crs is not None and args.merge is None:
        raise ConfigError("--merge-crs needs --merge FILE")
    if args.merge is not None:
        from rsrefseg.inference.vector_io import vector_format

        vector_format(args.merge)  # ConfigError for an unknown extension
        if Path(args.merge).is_dir():
            raise ConfigError(f"--merge {args.merge}: is a folder, expected a vector file")
    if args.merge_crs is not None:
        from rasterio.crs import CRS
        from rasterio.errors import CRSError

        try:
            CRS.from_user_input(args.merge_crs)
        except CRSError as exc:
            raise ConfigError(f"--merge-crs {args.merge_crs!r} is not a CRS ({exc})") from None


def _exit_code(summary: dict[str, Any]) -> int:
    if not summary["failures"]:
        return 0
    return 2 if not summary["images"] else 1


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while predicting, so that temporaries are removed and
    summary.json lists what is on disk (as on Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    """Body of ``rsrefseg predict``; returns the exit status."""
    expressions = collect_expressions(args.text, args.texts_file)
    _validate(args)
    items = list(args.images) + [f"@{f}" for f in args.inputs_file]
    if items and args.features:
        raise ConfigError("give images (IMAGES, @LIST, --inputs-file) or --features DIR, not both")
    if not items and not args.features:
        raise ConfigError("no input given; name images, folders, globs, @LIST, --inputs-file or --features DIR")
    if args.features:
        if args.stac_asset is not None:
            raise ConfigError("--stac-asset applies to STAC inputs, not to --features")
        from rsrefseg.inference.predict_features import feature_inputs

        scenes = feature_inputs(args.features)
    else:
        scenes = expand_inputs(items, args.stac_asset)

    from rsrefseg.inference.predict_batch import prepare_output_folder

    created = _first_missing(Path(args.out))
    out = prepare_output_folder(args.out)  # checked writable before the model is loaded
    with _removed_if_failing(out, created):  # a broken checkpoint or folder leaves no empty --out behind
        predictor, options, scenes = _load(args, scenes)
    return _predict(args, out, predictor, options, scenes, expressions)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, or None."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


@contextlib.contextmanager
def _removed_if_failing(out: Path, created: Path | None) -> Iterator[None]:
    """On an exception, remove the folders :func:`prepare_output_folder` created (only while empty)."""
    try:
        yield
    except BaseException:
        if created is not None:
            for folder in (out, *out.parents):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # fails, and stops nothing, on a folder that is not empty
                if folder == created:
                    break
        raise


def _load(args: argparse.Namespace, scenes: list[Any]) -> tuple[Any, Any, list[Any]]:
    """The predictor and the options of the run; feature folders checked against the model."""
    from rsrefseg.inference.predict_job import PredictOptions
    from rsrefseg.inference.predictor import Predictor

    state = _dist_state()
    device = args.device or (state.device if state is not None else None)
    predictor = Predictor.from_pretrained(args.checkpoint, device=device, precision=args.precision)
    options = PredictOptions(
        bands=args.bands, tile_threshold=args.tile_threshold, tile=args.tile, overlap=args.overlap,
        batch_size=args.batch_size, threshold=args.threshold, heatmaps=args.heatmaps, probability=args.probability,
        simplify=args.simplify, min_area=args.min_area, overlay_max_side=args.overlay_max_side,
        max_pixels=args.max_pixels, vector_format=args.vector_format, progress=progress_style(args),
        features=bool(args.features), checkpoint=str(args.checkpoint))
    if args.features:  # a folder made with another checkpoint, tiling or bands: stop before any output
        from rsrefseg.inference.predict_features import check_feature_inputs

        check_feature_inputs(predictor, scenes, options)
    return predictor, options, scenes


def _predict(args: argparse.Namespace, out: Path, predictor: Any, options: Any, scenes: list[Any],
             expressions: list[str]) -> int:
    """Predict every scene into ``out`` (model loaded, inputs checked); returns the exit status."""
    from rsrefseg import __version__
    from rsrefseg.inference.outputs import expression_names, peak_rss_mb, unique_names
    from rsrefseg.inference.predict_batch import BatchPlan, checkpoint_fingerprint, run_batch

    state = _dist_state()
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    config = predictor.model.config
    tile = args.tile or config.sam_image_size
    settings = {"bands": args.bands, "tile_threshold": args.tile_threshold, "tile": tile,
                "overlap": args.overlap if args.overlap is not None else tile // 8, "threshold": args.threshold,
                "simplify": args.simplify, "min_area": args.min_area, "polygon_units": "crs",
                "resize_mode": config.resize_mode, "precision": args.precision, "heatmaps": args.heatmaps,
                "probability": args.probability, "overlay_max_side": args.overlay_max_side,
                "vector_format": args.vector_format, "features": bool(args.features)}
    names = expression_names(expressions)
    plan = BatchPlan(out, scenes, unique_names([s.name for s in scenes]), expressions, names,
                     {**settings, "checkpoint": checkpoint_fingerprint(args.checkpoint)}, resume=args.resume,
                     merge=None if args.merge is None else Path(args.merge), merge_crs=args.merge_crs,
                     progress=progress_style(args))
    summary: dict[str, Any] = {
        "command": "predict", "version": __version__, "checkpoint": str(args.checkpoint), "preset": config.preset,
        "expressions": expressions, "names": names,
        "settings": {**settings, "batch_size": args.batch_size, "device": str(predictor.device),
                     "max_pixels": args.max_pixels, "resume": args.resume, "merge": args.merge,
                     "merge_crs": args.merge_crs},
        "world_size": world, "rank": rank, "inputs": len(scenes),
        "rss_after_model_mb": round(peak_rss_mb(), 1), "images": [], "failures": [],
    }
    with _sigterm_interrupts():
        summary = run_batch(predictor, plan, options, summary, rank, world).summary
        summary = _gather(state, out, summary, world)
    if rank == 0:
        print(f"{summary['outputs']} prediction(s) for {len(summary['images'])} image(s) written to {out};"
              f" {len(summary['failures'])} failed; peak memory {summary['peak_rss_mb']:.0f} MiB;"
              f" summary: {out / 'summary.json'}")
    return _exit_code(summary)


def _gather(state: Any, out: Path, summary: dict[str, Any], world: int) -> dict[str, Any]:
    """Merge the per-rank summaries (multi-process), then the vector files (``--merge``)."""
    import json

    from rsrefseg.inference.outputs import merge_summaries, write_summary
    from rsrefseg.inference.predict_batch import merge_scene_vectors

    main = state is None or state.is_main_process
    if state is not None:
        state.wait_for_everyone()
        if main:
            parts = [json.loads((out / f"summary.rank{r}.json").read_text(encoding="utf-8")) for r in range(world)]
            summary = merge_summaries(parts)
            write_summary(out / "summary.json", summary)
            for r in range(world):
                (out / f"summary.rank{r}.json").unlink()
    merge = summary.get("settings", {}).get("merge")
    if main and merge:
        summary["merge"] = merge_scene_vectors(summary, out, Path(merge), summary["settings"].get("merge_crs"))
        write_summary(out / "summary.json", summary)
    if state is not None:
        state.wait_for_everyone()
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return summary


def add_parser(subparsers: Any) -> None:
    """Register ``rsrefseg predict``."""
    p = subparsers.add_parser(
        "predict", help="segment images with referring expressions (masks, overlays, GeoTIFF, vector files)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="*", metavar="IMAGES",
                   help="image files, folders, glob patterns, @LIST files or local STAC Item/ItemCollection JSON")
    p.add_argument("--inputs-file", action="append", default=[], metavar="F",
                   help="a text file of inputs, one per line (same as @F; repeatable)")
    p.add_argument("--stac-asset", metavar="KEY", help="asset key of the raster in STAC inputs (default: the only raster)")
    p.add_argument("--features", action="append", default=[], metavar="DIR",
                   help="decode from feature folders written by `rsrefseg encode` instead of IMAGES (neither read "
                        "nor encoded): a scene's folder or the --out DIR of encode holding one per scene "
                        "(repeatable). Always window by window with the folder's tiling (--tile-threshold does "
                        "not apply); --checkpoint, and --bands/--tile/--overlap when given, must be those of the "
                        "folder.")
    p.add_argument("--text", action="append", default=[], metavar="TEXT", help="a referring expression (repeatable)")
    p.add_argument("--texts-file", metavar="F", help="one expression per line (blank lines and # comments skipped)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--bands", type=parse_bands_arg, metavar="R,G,B", help="1-based source bands, e.g. 4,3,2 (or one band)")
    p.add_argument("--tile-threshold", type=parse_pixels, default=DEFAULT_TILE_THRESHOLD, metavar="N",
                   help="tile (and stream) images with more pixels than N (or HxW); default 2048x2048")
    p.add_argument("--tile", type=int, metavar="PX", help="tile side at native resolution (default: model input size)")
    p.add_argument("--overlap", type=int, metavar="PX", help="tile overlap (default: tile/8)")
    p.add_argument("--max-pixels", type=parse_pixels, metavar="N",
                   help="refuse images with more pixels than N (or HxW); default: no limit (large scenes are "
                        "streamed; the free disk space is checked)")
    p.add_argument("--simplify", type=float, default=0.0, metavar="T",
                   help="polygon simplification tolerance in CRS units, e.g. metres (default 0: exact pixel edges)")
    p.add_argument("--min-area", type=float, default=0.0, metavar="A",
                   help="drop polygons smaller than A CRS units squared, e.g. m2 (default 0)")
    p.add_argument("--vector-format", choices=VECTOR_FORMATS, default="geojson",
                   help="format of the per-image vector file OUT/<image>/<image>.<ext> holding every expression's "
                        "polygons (layer 'rsrefseg'); default geojson")
    p.add_argument("--probability", action="store_true",
                   help="add a uint8 band 'probability' = round(255 * sigmoid(logit)) to the mask GeoTIFFs")
    p.add_argument("--threshold", type=float, default=0.0, help="mask logit threshold (0 = probability 0.5; write negative values as --threshold=-1)")
    p.add_argument("--batch-size", type=int, default=16, help="expressions decoded together")
    add_model_args(p, "torch device (default: the accelerate device, else CUDA if available)")
    p.add_argument("--overlay-max-side", type=int, default=2048, metavar="PX",
                   help="longest side of overlay PNGs (larger images get a downscaled preview)")
    p.add_argument("--heatmaps", action="store_true",
                   help="also write <nn>_<expression>.heatmap.png, the text-activation heatmap over the image "
                        "(stitched from the tiles for tiled scenes)")
    p.add_argument("--resume", action="store_true",
                   help="skip scenes that OUT/manifest.jsonl lists as finished with the same expressions and "
                        "settings (the manifest is always written)")
    p.add_argument("--merge", metavar="FILE",
                   help="also collect every scene's polygons into one layer of FILE (.gpkg, .fgb, .shp, .geojson)")
    p.add_argument("--merge-crs", metavar="CRS", help="CRS of --merge (e.g. EPSG:3857; default: the first scene's)")
    add_progress_args(p)
    p.set_defaults(func=run)
