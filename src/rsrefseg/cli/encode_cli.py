"""``rsrefseg encode``: encode scenes once into feature folders; decode new expressions later in milliseconds.

Every scene gets the folder ``OUT/<scene-stem>/`` (stems made unique in input order as ``rsrefseg
predict`` does: ``x``, ``x-2``, ...), also for a single scene, holding ``index.json``,
``preview.png`` and ``windows/*.safetensors`` (SAM embeddings and CLIP patch features of each
window; see docs/features.md). Inputs are files, folders or glob patterns, as for ``predict``.

Rerunning the same command resumes an interrupted run: windows already written are kept (each is
written atomically). A folder holding features made with other settings (checkpoint, scene file,
tiling, bands, dtype, precision) is refused unless ``--overwrite``. Decode with the Python API
(``rsrefseg.inference.features.open_features`` / ``predict_from_features``) or
``rsrefseg predict --features OUT/<scene-stem>``.

Exit status: 0; 1 when some scenes failed (each failure is one ``error:`` line); 2 when all failed
or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rsrefseg.cli.args import add_model_args, parse_bands_arg
from rsrefseg.cli.progress import add_progress_args, emit, progress, progress_style
from rsrefseg.errors import ConfigError, RSRefSegError

#: Feature dtypes on disk (``rsrefseg.inference.feature_files.FEATURE_DTYPES``, kept free of torch; tested equal).
DTYPE_NAMES = ("float32", "float16")


def _error_line(exc: Exception) -> str:
    if isinstance(exc, RSRefSegError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def run(args: argparse.Namespace) -> int:
    """Body of ``rsrefseg encode``; returns the exit status."""
    if args.tile is not None and args.tile < 16:
        raise ConfigError(f"--tile must be >= 16 pixels, got {args.tile}")
    if args.overlap is not None and not 0 <= args.overlap < (args.tile or 1 << 30):
        raise ConfigError(f"--overlap must be in [0, tile), got {args.overlap}")
    if not 16 <= args.preview_max_side <= 4096:
        raise ConfigError(f"--preview-max-side must be in [16, 4096], got {args.preview_max_side}")
    from rsrefseg.inference.jobs import expand_inputs

    scenes = expand_inputs(args.scenes)  # the same inputs as predict: files, folders, globs, @lists, STAC
    out = Path(args.out)

    from rsrefseg.inference.features import encode_scene
    from rsrefseg.inference.outputs import unique_names
    from rsrefseg.inference.predictor import Predictor

    predictor = Predictor.from_pretrained(args.checkpoint, device=args.device, precision=args.precision)
    style = progress_style(args)
    # Folder names as predict names its image folders (STAC item id or file stem, made unique).
    names = unique_names([scene.name for scene in scenes])
    done: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for i in progress(range(len(scenes)), style, total=len(scenes), desc="encode", unit="scene"):
        path, folder = scenes[i].path, out / names[i]
        try:
            result = encode_scene(
                predictor, path, folder, tile=args.tile, overlap=args.overlap, dtype=args.dtype,
                progress=lambda it, n: progress(it, style, total=n, desc="windows", leave=False),
                bands=args.bands, checkpoint=args.checkpoint, overwrite=args.overwrite,
                preview_max_side=args.preview_max_side,
            )
        except Exception as exc:  # one failing scene never stops the others
            line = _error_line(exc)
            print(f"error: {line}", file=sys.stderr)
            failures.append({"source": str(path), "error": line})
            continue
        done.append({"source": str(path), "folder": str(folder), "windows": result.windows,
                     "encoded": result.encoded, "reused": result.reused, "empty": result.empty,
                     "bytes": result.bytes, "seconds": round(result.seconds, 3)})
        print(f"{path} -> {folder}: {result.windows} windows ({result.encoded} encoded, {result.reused} already "
              f"there, {result.empty} without valid pixels), {result.bytes / 2**20:.1f} MiB in {result.seconds:.1f} s")
    if style == "json":
        emit("done", scenes=done, failures=failures, time=time.time())
    if not failures:
        return 0
    return 2 if not done else 1


def add_parser(subparsers: Any) -> None:
    """Register ``rsrefseg encode``."""
    p = subparsers.add_parser(
        "encode", help="encode scenes once into feature folders (decode new expressions later without the image)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenes", nargs="+", metavar="SCENE", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder; each scene goes to DIR/<scene-stem>/")
    p.add_argument("--bands", type=parse_bands_arg, metavar="R,G,B", help="1-based source bands, e.g. 4,3,2 (or one band)")
    add_model_args(p, "torch device (default: CUDA if available)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                   help="features on disk: float32 (default; decoding gives exactly the masks of the image) or "
                        "float16 (half the size, masks agree to IoU >= 0.99)")
    p.add_argument("--tile", type=int, metavar="PX", help="window side at native resolution (default: model input size)")
    p.add_argument("--overlap", type=int, metavar="PX", help="window overlap (default: tile/8)")
    p.add_argument("--preview-max-side", type=int, default=2048, metavar="PX",
                   help="longest side of the stored preview.png used for overlays (default 2048)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a feature folder made with other settings instead of refusing it")
    add_progress_args(p)
    p.set_defaults(func=run)
