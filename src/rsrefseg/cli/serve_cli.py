"""``rsrefseg serve``: the Gradio web demo (upload an image, type expressions, download masks).

The checkpoint is loaded once at startup; every request reuses it. Requests beyond
``--concurrency`` wait in a queue (at most ``--max-queue``). Uploads larger than
``--max-upload-mb`` or with more than ``--max-pixels`` pixels are refused with a one-line message.
The page never contacts the internet: Gradio analytics are off and no share link is created.
Needs the ``app`` extra (``pip install 'rsrefseg[app]'``).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import threading
from typing import Any

from rsrefseg.cli.args import add_model_args, parse_pixels, positive
from rsrefseg.demo_service import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_TILE_CACHE_MB,
    DEFAULT_TILE_THRESHOLD,
)
from rsrefseg.errors import ConfigError


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {port}")
    return port


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler: stop like Ctrl+C, so the server closes and temporary outputs are removed."""
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint, build the page and serve it until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError("the web demo needs gradio: pip install 'rsrefseg[app]'") from None
    from rsrefseg.app import build_app

    demo = build_app(
        args.checkpoint,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        concurrency=args.concurrency,
        max_queue=args.max_queue,
        device=args.device,
        precision=args.precision,
        tile_threshold=args.tile_threshold,
        tile_cache_mb=args.tile_cache_mb,
    )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    print(f"rsrefseg serve: http://{args.host}:{args.port} (Ctrl+C to stop)", flush=True)
    try:
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            inbrowser=False,
            ssr_mode=False,
            # Gradio's own cap (checked in the browser before uploading: "File(s) exceed the maximum
            # allowed size of 50.0 Mb: "name.tif""); the app checks it again for API clients.
            max_file_size=math.floor(args.max_upload_mb * 2**20),
        )
    except OSError as exc:
        raise ConfigError(f"cannot serve on {args.host}:{args.port} ({' '.join(str(exc).split())})") from None
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``rsrefseg serve``."""
    p = subparsers.add_parser(
        "serve", help="web demo: upload an image, type expressions, see and download masks (Gradio)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p, "torch device (default: CUDA when available, else CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    p.add_argument("--max-upload-mb", type=positive(float), default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                   help=f"largest accepted upload in MB of 2**20 bytes (default {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--max-pixels", type=parse_pixels, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="largest accepted image, as a pixel count N or HxW (default 4096x4096)")
    p.add_argument("--tile-threshold", type=parse_pixels, default=DEFAULT_TILE_THRESHOLD, metavar="N",
                   help="images with more pixels are segmented tile by tile at native resolution (default 2048x2048)")
    p.add_argument("--tile-cache-mb", type=positive(float, zero=True), default=DEFAULT_TILE_CACHE_MB, metavar="MB",
                   help="encoded windows of the current tiled upload kept for the next run, so new expressions "
                        f"only decode (default {DEFAULT_TILE_CACHE_MB:g}; 0 re-encodes every run)")
    p.add_argument("--concurrency", type=positive(int), default=1,
                   help="requests processed at once; others wait in the queue (default 1)")
    p.add_argument("--max-queue", type=positive(int), default=32, metavar="N",
                   help="requests allowed to wait; more are refused (default 32)")
    p.set_defaults(func=run)
