"""Gradio web demo: upload an image, type referring expressions, see and download the masks.

:func:`build_app` returns a ``gradio.Blocks`` (``rsrefseg serve`` launches it): an upload, a band
choice, the expressions and a threshold; overlays, heatmaps, downloads and a summary table. The
work is done by :class:`rsrefseg.demo_service.DemoService`, which has no Gradio dependency (model
loaded once, features cached per upload, tiled large scenes, limits, per-run output folders);
every failure is shown as a one-line ``gr.Error`` and requests queue instead of failing.

Nothing happens at import: gradio, torch and the model code are imported inside functions.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from rsrefseg.demo_service import (
    DEFAULT_MAX_EXPRESSIONS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_TILE_CACHE_MB,
    DEFAULT_TILE_THRESHOLD,
    UPLOAD_TYPES,
    DemoService,
    Limits,
)
from rsrefseg.errors import ConfigError, RSRefSegError

if TYPE_CHECKING:  # pragma: no cover
    import gradio
    import numpy as np

    from rsrefseg.inference.predictor import Predictor

__all__ = ["build_app", "make_handlers"]

log = logging.getLogger(__name__)


def _user_error(exc: BaseException) -> Exception:
    """A ``gr.Error`` with a one-line message for ``exc`` (user errors as is, others prefixed)."""
    import gradio as gr

    if isinstance(exc, RSRefSegError):
        message = " ".join(str(exc).split())
    else:
        log.exception("rsrefseg demo: unexpected error")
        message = f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
    return gr.Error(message, print_exception=False)


def make_handlers(service: DemoService) -> tuple[Any, Any]:
    """The Gradio callbacks ``(on_upload(file, bands) -> preview, on_run(file, text, threshold, bands) -> outputs)``;
    every failure becomes a one-line ``gr.Error``."""

    def on_upload(file: str | None, bands: str | None = None) -> np.ndarray | None:
        if not file:
            return None
        try:
            return service.load(file, bands)
        except Exception as exc:
            raise _user_error(exc) from None

    def on_run(file: str | None, text: str, threshold: float, bands: str | None = None) -> tuple[Any, ...]:
        if not file:
            raise _user_error(ConfigError("upload an image first"))
        try:
            result = service.run(file, text, float(threshold), bands)
        except Exception as exc:
            raise _user_error(exc) from None
        return result.overlays, result.heatmaps, result.downloads, result.summary

    return on_upload, on_run


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

    Returns:
        The ``gradio.Blocks``, queue configured; call ``.launch()`` on it.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from rsrefseg.inference.predictor import Predictor

    if concurrency < 1 or max_queue < 1 or max_upload_mb <= 0 or max_pixels < 1 or tile_threshold < 1:
        raise ConfigError("concurrency, max_queue, max_upload_mb, max_pixels and tile_threshold must be positive")
    if tile_cache_mb < 0:
        raise ConfigError(f"tile_cache_mb must be >= 0, got {tile_cache_mb:g}")
    if isinstance(predictor_or_checkpoint, Predictor):
        predictor = predictor_or_checkpoint
    else:
        predictor = Predictor.from_pretrained(predictor_or_checkpoint, device=device, precision=precision)
    service = DemoService(predictor, Limits(max_upload_mb, max_pixels, max_expressions, tile_threshold, tile_cache_mb))
    on_upload, on_run = make_handlers(service)

    limits_text = (
        f"Limits: {max_upload_mb:g} MB per upload, {max_pixels / 1e6:.3g} megapixels, "
        f"{max_expressions} expressions per run; images above {tile_threshold / 1e6:.3g} megapixels are "
        "segmented tile by tile."
    )
    with gr.Blocks(title="RSRefSeg demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "## RSRefSeg: referring remote-sensing segmentation\n"
            "Upload an image (JPEG, PNG or GeoTIFF), type one referring expression per line and press "
            f"**Segment**. {limits_text}"
        )
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image (JPEG / PNG / GeoTIFF)", file_types=UPLOAD_TYPES,
                                 type="filepath", elem_id="rsrefseg-upload")
                preview = gr.Image(label="Uploaded image", interactive=False, type="numpy",
                                   elem_id="rsrefseg-preview", height=320)
                bands = gr.Textbox(label="Bands as R,G,B (1-based, e.g. 4,3,2 for multispectral; empty = automatic)",
                                   placeholder="automatic", max_lines=1, elem_id="rsrefseg-bands")
                text = gr.Textbox(label="Referring expressions (one per line)", lines=4,
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
        upload.upload(on_upload, inputs=[upload, bands], outputs=preview, concurrency_id="model")
        bands.submit(on_upload, inputs=[upload, bands], outputs=preview, concurrency_id="model")
        upload.clear(lambda: None, outputs=preview, queue=False)
        run.click(on_run, inputs=[upload, text, threshold, bands], outputs=[overlays, heatmaps, downloads, summary],
                  concurrency_id="model")
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    return demo
