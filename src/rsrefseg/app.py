"""Gradio web demo: upload an image, type referring expressions, see and download the masks.

:func:`build_app` returns a ``gradio.Blocks`` (``rsrefseg serve`` launches it): an upload, a band
choice, the expressions and a threshold; overlays, heatmaps, downloads and a summary table. The
work is done by :class:`rsrefseg.demo_service.DemoService`, which has no Gradio dependency (model
loaded once, features cached per upload, tiled large scenes, limits, per-run output folders);
every failure is shown as a one-line ``gr.Error`` and requests queue instead of failing.

Uploads, previews and results live in a folder of the server's own (:mod:`rsrefseg.demo_storage`:
mode 0700, Gradio's ``GRADIO_TEMP_DIR`` points there), one sub-folder of results per browser
session; a session's files are deleted when its tab is closed (Gradio's ``unload`` event) or after
an hour without a request, and the whole folder when the server stops.

Nothing happens at import: gradio, torch and the model code are imported inside functions.
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from rsrefseg.demo_service import (
    DEFAULT_MAX_EXPRESSIONS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_TILE_CACHE_MB,
    DEFAULT_TILE_THRESHOLD,
    MAX_BANDS_CHARS,
    UPLOAD_TYPES,
    DemoService,
    Limits,
    max_text_chars,
)
from rsrefseg.demo_storage import SESSION_IDLE_S, PrivateFolder, SessionFiles
from rsrefseg.errors import ConfigError, RSRefSegError

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    import gradio
    import numpy as np

    from rsrefseg.inference.predictor import Predictor

__all__ = ["Handlers", "build_app", "make_feature_handler", "make_handlers"]

log = logging.getLogger(__name__)

#: Longest message shown in the page (the rest is cut; the server log has it all).
MAX_MESSAGE_CHARS = 500


def _user_error(exc: BaseException) -> Exception:
    """A ``gr.Error`` with a one-line message for ``exc`` (user errors as is, others prefixed)."""
    import gradio as gr

    if isinstance(exc, RSRefSegError):
        message = " ".join(str(exc).split())
    else:
        log.exception("rsrefseg demo: unexpected error")
        message = f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return gr.Error(message, print_exception=False)


def _save_preview(preview: np.ndarray, folder: Path) -> str:
    """Write the ``h x w x 3`` preview as a PNG with a new name in ``folder`` (the previous one is
    deleted); return its path."""
    from PIL import Image

    for old in folder.glob("preview-*.png"):
        old.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix="preview-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            Image.fromarray(preview).save(handle, format="PNG")
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return name


def _threshold(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"the mask threshold must be a number in (0, 1), got {str(value)[:40]!r}") from None


def _refuse_urls(block: Any) -> None:
    """Make the file input ``block`` refuse a URL in place of an upload. Gradio would download it on the
    server (any public address, any size) before our checks run; the demo takes uploads only."""
    import gradio as gr
    from gradio_client.utils import is_http_url_like

    def check(path: Any) -> None:
        if path is not None and is_http_url_like(str(path)):
            raise gr.Error("upload the image file; URLs are not fetched", print_exception=False)

    move_async, move = block.async_move_resource_to_block_cache, block.move_resource_to_block_cache

    async def guarded_async(path: Any) -> Any:
        check(path)
        return await move_async(path)

    def guarded(path: Any) -> Any:
        check(path)
        return move(path)

    block.async_move_resource_to_block_cache = guarded_async
    block.move_resource_to_block_cache = guarded


class Handlers(NamedTuple):
    """The Gradio callbacks of the page (every failure becomes a one-line ``gr.Error``).

    ``upload(file, bands, request) -> preview``, ``run(file, text, threshold, bands, request, features)
    -> (overlays, heatmaps, downloads, summary)`` (``features``: the chosen encoded scene, used instead
    of ``file``) and ``end(request)`` (the session is over: delete its files). ``request`` is Gradio's
    ``gr.Request`` (its ``session_hash`` names the session) or None.
    """

    upload: Callable[..., Any]
    run: Callable[..., tuple[Any, ...]]
    end: Callable[..., None]


def make_handlers(service: DemoService, sessions: SessionFiles | None = None) -> Handlers:
    """The page's callbacks on ``service``. With ``sessions``, each request's outputs (and the upload's
    preview, as a PNG) go to its session's folder, and ``end`` deletes them; without, outputs go to the
    service's ``workdir`` and the preview is returned as an array."""

    def session_of(request: Any) -> str | None:
        return getattr(request, "session_hash", None)

    def on_upload(file: str | None, bands: str | None = None, request: Any = None) -> Any:
        if not file:
            return None
        try:
            if sessions is None:
                return service.load(file, bands)
            with sessions.request(session_of(request), file) as folder:
                return _save_preview(service.load(file, bands), folder)
        except Exception as exc:
            raise _user_error(exc) from None
        finally:
            if sessions is not None:
                sessions.sweep()

    def on_run(file: str | None, text: str, threshold: float, bands: str | None = None,
               request: Any = None, features: str | None = None) -> tuple[Any, ...]:
        try:
            if features:  # an encoded scene chosen in the list: the upload is not used
                file = None
            elif not file:
                raise ConfigError("upload an image first")
            if sessions is None:
                result = service.run(file, text, _threshold(threshold), bands, features=features or None)
            else:
                with sessions.request(session_of(request), file) as folder:
                    result = service.run(file, text, _threshold(threshold), bands, out_dir=folder,
                                         features=features or None)
        except Exception as exc:
            raise _user_error(exc) from None
        finally:
            if sessions is not None:
                sessions.sweep()
        return result.overlays, result.heatmaps, result.downloads, result.summary

    def on_end(request: Any = None) -> None:
        if sessions is not None:
            for upload in sessions.end(session_of(request)):
                service.release(upload)

    return Handlers(on_upload, on_run, on_end)


def make_feature_handler(service: DemoService, sessions: SessionFiles | None = None) -> Callable[..., Any]:
    """The callback of the encoded-scene list: ``choose(name, request) -> preview`` opens the feature
    folder ``name`` (one of ``service.feature_folders()``; never a path) and returns its preview as
    :func:`make_handlers`' ``upload`` does (None for no choice)."""

    def on_choose(name: str | None, request: Any = None) -> Any:
        if not name:
            return None
        try:
            if sessions is None:
                return service.load_features(name)
            with sessions.request(getattr(request, "session_hash", None)) as folder:
                return _save_preview(service.load_features(name), folder)
        except Exception as exc:
            raise _user_error(exc) from None
        finally:
            if sessions is not None:
                sessions.sweep()

    return on_choose


def build_app(
    predictor_or_checkpoint: Predictor | str | os.PathLike[str],
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    concurrency: int = 1,
    max_queue: int = 32,
    max_expressions: int = DEFAULT_MAX_EXPRESSIONS,
    device: str | None = None,
    precision: str = "fp32",
    tile_threshold: int = DEFAULT_TILE_THRESHOLD,
    tile_cache_mb: float = DEFAULT_TILE_CACHE_MB,
    sessions: SessionFiles | None = None,
    features_root: str | os.PathLike[str] | None = None,
) -> gradio.Blocks:
    """Build the demo page (the model is loaded here, once, when given a checkpoint directory).

    Args:
        predictor_or_checkpoint: A :class:`Predictor`, or a checkpoint directory to load one from.
        max_upload_mb: Largest accepted upload, in MB.
        max_pixels: Largest accepted ``H * W``.
        concurrency: Requests processed at once; further ones wait in the queue.
        max_queue: Requests allowed to wait (more are refused with "queue is full").
        max_expressions: Expressions accepted per run.
        device: Device for a checkpoint loaded here (``None``: CUDA when available).
        precision: ``"fp32"`` or ``"bf16"`` for a checkpoint loaded here.
        tile_threshold: Images with more pixels are segmented tile by tile at native resolution.
        tile_cache_mb: Encoded windows of the current tiled upload kept for the next run (MB).
        sessions: The per-session files in the server's own folder, whose ``root`` Gradio must already
            use (``PrivateFolder.use_for_gradio``; ``rsrefseg serve`` makes both and deletes them when
            it stops). Default: a new :class:`PrivateFolder` in the system temp folder, set as
            ``GRADIO_TEMP_DIR`` here and deleted when the page is garbage-collected or Python exits.
        features_root: A folder of feature folders (``rsrefseg encode`` outputs): the page lists them
            (only those under it) and segments a chosen one by decoding only; None: no list.

    Returns:
        The ``gradio.Blocks``, queue configured; call ``.launch()`` on it.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from rsrefseg.inference.predictor import Predictor

    if concurrency < 1 or max_queue < 1 or max_upload_mb <= 0 or max_pixels < 1 or tile_threshold < 1:
        raise ConfigError("concurrency, max_queue, max_upload_mb, max_pixels and tile_threshold must be positive")
    if tile_cache_mb < 0:
        raise ConfigError(f"tile_cache_mb must be >= 0, got {tile_cache_mb:g}")
    if features_root is not None and not Path(features_root).is_dir():
        raise ConfigError(f"{features_root}: --features-root is not a folder")
    if isinstance(predictor_or_checkpoint, Predictor):
        predictor = predictor_or_checkpoint
    else:
        predictor = Predictor.from_pretrained(predictor_or_checkpoint, device=device, precision=precision)
    storage = None
    if sessions is None:
        storage = PrivateFolder()
        storage.use_for_gradio()  # before the Blocks are made: each block reads it once
        sessions = SessionFiles(storage.path)
    import gradio as gr

    service = DemoService(predictor, Limits(max_upload_mb, max_pixels, max_expressions, tile_threshold, tile_cache_mb),
                          workdir=sessions.runs, features_root=features_root)
    scenes = service.feature_folders()
    handlers = make_handlers(service, sessions)
    choose = make_feature_handler(service, sessions)
    for handler in (*handlers, choose):  # how Gradio knows to pass its gr.Request (the session id) to the callbacks
        handler.__annotations__ = {"request": gr.Request}

    limits_text = (
        f"Limits: {max_upload_mb:g} MB per upload, {max_pixels / 1e6:.3g} megapixels, "
        f"{max_expressions} expressions per run; images above {tile_threshold / 1e6:.3g} megapixels are "
        "segmented tile by tile."
    )
    # delete_cache: Gradio's own sweep of the files it tracks (a backstop; sessions clean up themselves).
    with gr.Blocks(title="RSRefSeg demo", analytics_enabled=False,
                   delete_cache=(600, int(SESSION_IDLE_S))) as demo:
        gr.Markdown(
            "## RSRefSeg: referring remote-sensing segmentation\n"
            "Upload an image (JPEG, PNG or GeoTIFF), type one referring expression per line and press "
            f"**Segment**. {limits_text}"
        )
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image (JPEG / PNG / GeoTIFF)", file_types=UPLOAD_TYPES,
                                 type="filepath", elem_id="rsrefseg-upload")
                _refuse_urls(upload)
                scene_list = gr.Dropdown(choices=scenes, value=None, label="…or an encoded scene (used instead of "
                                         "the upload; decoded only, bands fixed when it was encoded)",
                                         visible=features_root is not None, elem_id="rsrefseg-features")
                preview = gr.Image(label="Uploaded image", interactive=False, type="filepath",
                                   elem_id="rsrefseg-preview", height=320)
                bands = gr.Textbox(label="Bands as R,G,B (1-based, e.g. 4,3,2 for multispectral; empty = automatic)",
                                   placeholder="automatic", max_lines=1, max_length=MAX_BANDS_CHARS,
                                   elem_id="rsrefseg-bands")
                # One character over the service's limit: a longer paste is cut by the browser to a
                # text the service still refuses, with its message, instead of being cut silently.
                text = gr.Textbox(label="Referring expressions (one per line)", lines=4, max_lines=16,
                                  max_length=max_text_chars(max_expressions) + 1,
                                  placeholder="the large white building\nthe ship on the left",
                                  elem_id="rsrefseg-expressions")
                threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Mask probability threshold",
                                      elem_id="rsrefseg-threshold")
                run = gr.Button("Segment", variant="primary", elem_id="rsrefseg-run")
            with gr.Column(scale=2):
                # Headings instead of gallery labels: a label would hide the overlays' title bars.
                gr.Markdown("**Overlays** (mask in red, outline in yellow; one per expression)")
                overlays = gr.Gallery(label="Overlays", show_label=False, columns=2, height=420,
                                      object_fit="contain", elem_id="rsrefseg-overlays")
                gr.Markdown("**Activation heatmaps** (text-image activation, dark = low, bright = high)")
                heatmaps = gr.Gallery(label="Activation heatmaps", show_label=False, columns=4, height=220,
                                      object_fit="contain", elem_id="rsrefseg-heatmaps")
                downloads = gr.File(label="Downloads (zip, mask PNGs, GeoJSON)", file_count="multiple",
                                    interactive=False, elem_id="rsrefseg-downloads")
                summary = gr.Markdown(elem_id="rsrefseg-summary")
        # Both events use the model: they share one concurrency limit (the rest waits in the queue).
        loaded = upload.upload(handlers.upload, inputs=[upload, bands], outputs=preview, concurrency_id="model",
                               api_name="load")
        if features_root is not None:  # an upload clears the chosen scene; new folders appear on reload
            loaded.then(lambda: None, outputs=scene_list, queue=False, api_visibility="private")
            scene_list.input(choose, inputs=scene_list, outputs=preview, concurrency_id="model",
                             api_name="load_features")
            demo.load(lambda: gr.Dropdown(choices=service.feature_folders()), outputs=scene_list, queue=False,
                      api_visibility="private")
        bands.submit(handlers.upload, inputs=[upload, bands], outputs=preview, concurrency_id="model",
                     api_visibility="private")
        upload.clear(lambda: None, outputs=preview, queue=False, api_visibility="private")
        # The encoded-scene list is a 5th input only with a features root: the API of a plain server is unchanged.
        run.click(handlers.run, inputs=[upload, text, threshold, bands] + ([scene_list] if features_root else []),
                  outputs=[overlays, heatmaps, downloads, summary],
                  concurrency_id="model", api_name="segment")
        demo.unload(handlers.end)  # the tab was closed or reloaded: its files go
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    if storage is not None:
        weakref.finalize(demo, storage.close)
    return demo
