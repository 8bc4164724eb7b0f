"""``rsrefseg serve``: the Gradio web demo (upload an image, type expressions, download masks).

The checkpoint is loaded once at startup; every request reuses it. Requests beyond
``--concurrency`` wait in a queue (at most ``--max-queue``). Uploads larger than
``--max-upload-mb`` or with more than ``--max-pixels`` pixels are refused with a one-line message.
The page never contacts the internet: Gradio analytics are off and no share link is created.

Uploads, previews and results are kept in a folder of the server's own, ``rsrefseg-serve-XXXXXXXX``
(mode 0700) in ``--workdir`` (default: the system temp folder), never in Gradio's shared
``/tmp/gradio``. A browser session's files are deleted when its tab is closed (or after an hour
without a request); the whole folder is deleted when the server stops (Ctrl+C, SIGTERM, SIGHUP),
and one left by a killed server is deleted by the next start in the same ``--workdir``.
Needs the ``app`` extra (``pip install 'rsrefseg[app]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from rsrefseg.cli.args import add_model_args, parse_pixels, positive
from rsrefseg.demo_service import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_TILE_CACHE_MB,
    DEFAULT_TILE_THRESHOLD,
)
from rsrefseg.errors import ConfigError

#: Signals that stop the server cleanly (a second one interrupts at once).
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
#: Seconds to wait for requests in progress when stopping, before their files are deleted anyway.
STOP_WAIT_S = 30.0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {port}")
    return port


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """While inside, SIGINT / SIGTERM / SIGHUP set ``stop`` (a second one raises KeyboardInterrupt);
    previous handlers are restored afterwards. Does nothing outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {}
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint, build the page and serve it until stopped; then delete every upload and result."""
    from rsrefseg.demo_storage import PrivateFolder, SessionFiles

    if args.features_root is not None and not os.path.isdir(args.features_root):
        raise ConfigError(f"{args.features_root}: --features-root is not a folder")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    storage = PrivateFolder(args.workdir)
    gradio_temp_dir = os.environ.get("GRADIO_TEMP_DIR")
    storage.use_for_gradio()  # before gradio is imported: some of its modules read it at import
    sessions = SessionFiles(storage.path)
    stop = threading.Event()
    demo = None
    old_umask = os.umask(0o077)  # what the server writes is for its own user only
    try:
        try:
            import gradio  # noqa: F401
        except ModuleNotFoundError:
            raise ConfigError("the web demo needs gradio: pip install 'rsrefseg[app]'") from None
        from rsrefseg.app import build_app

        with _stop_on_signals(stop):
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
                sessions=sessions,
                features_root=args.features_root,
            )
            if stop.is_set():
                return 0
            try:
                demo.launch(
                    server_name=args.host,
                    server_port=args.port,
                    share=False,
                    inbrowser=False,
                    ssr_mode=False,
                    prevent_thread_lock=True,
                    quiet=True,
                    # Gradio's own cap (checked in the browser before uploading: "File(s) exceed the maximum
                    # allowed size of 50.0 Mb: "name.tif""); the app checks it again for API clients.
                    max_file_size=math.floor(args.max_upload_mb * 2**20),
                )
            except OSError as exc:
                raise ConfigError(f"cannot serve on {args.host}:{args.port} ({' '.join(str(exc).split())})") from None
            print(f"rsrefseg serve: http://{args.host}:{args.port} (Ctrl+C to stop); uploads and results in "
                  f"{storage.path} (deleted when it stops)", flush=True)
            while not stop.wait(0.5):
                pass
            print("rsrefseg serve: stopping; deleting uploads and results", flush=True)
    finally:
        if demo is not None:
            demo.close(verbose=False)
        sessions.close(STOP_WAIT_S)
        storage.close()
        os.umask(old_umask)
        if gradio_temp_dir is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = gradio_temp_dir
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
    p.add_argument("--features-root", default=None, metavar="DIR",
                   help="offer the feature folders under DIR (written by `rsrefseg encode SCENE... --out DIR`) in "
                        "a list: a chosen scene is segmented by decoding only, never read or encoded; only "
                        "folders under DIR are listed (links leading out of DIR are ignored)")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="where the server's own folder for uploads and results is made (mode 0700, deleted when "
                        "the server stops; default: the system temp folder, $TMPDIR or /tmp)")
    p.set_defaults(func=run)
