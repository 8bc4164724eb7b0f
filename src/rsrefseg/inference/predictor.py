"""Cached-feature inference: encode an image once, segment any number of expressions on it.

:class:`Predictor` works like SAM's predictor. :meth:`Predictor.set_image` brings an image of any
size to the ``S x S`` model input (``model.config.resize_mode``, ``S = config.sam_image_size``)
and runs the two image encoders (SAM ViT and the CLIP/SigLIP vision tower) **once**, caching
:class:`~rsrefseg.modeling.rsrefseg.ImageFeatures`. :meth:`Predictor.predict` then costs only the
text encoder, the activation/prompter and SAM's prompt encoder + mask decoder per expression, and
returns every result at the **original** resolution.

Definitions of the returned values (:class:`Prediction`):

- ``logits``: ``H x W`` float32 mask logits (the model's ``S x S`` logits with the padding cropped
  and resized back bilinearly, see :func:`rsrefseg.data.transforms.logits_to_original`).
- ``mask``: ``logits > threshold`` (``threshold=0.0`` is probability 0.5) and **False on every
  nodata pixel** of the image.
- ``score``: the mean mask probability ``sigmoid(logits)`` over the mask pixels (0.0 for an empty
  mask): how sure the model is about the pixels it selected. It is comparable across expressions
  and images, and also defined for stitched large scenes.
- ``predicted_iou``: SAM's IoU-head estimate for the mask, reported alongside; it is only
  meaningful for a model whose IoU head was trained (the reference training leaves it untrained).
- ``heatmap``: ``H x W`` float32 in [0, 1], the sigmoid of the global text activation logits
  (coarse, on the CLIP patch grid) after bilinear upsampling to the original image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rsrefseg.data.imageio import RasterImage, read_image
from rsrefseg.data.transforms import ResizeMeta, logits_to_original, resize_image
from rsrefseg.errors import ConfigError
from rsrefseg.inference.defaults import check_expression_length
from rsrefseg.modeling.rsrefseg import ImageFeatures, RSRefSeg, TextFeatures

__all__ = ["BatchLogits", "EncodedImage", "ImageInput", "Prediction", "Predictor", "as_raster_image",
           "check_expressions", "mask_score"]

#: What :meth:`Predictor.set_image` accepts: a file path, a read image, or an ``H x W x 3`` uint8 array.
ImageInput = str | os.PathLike[str] | RasterImage | np.ndarray


@dataclass
class Prediction:
    """The result for one expression on one image (see the module docstring for definitions).

    Attributes:
        expression: The referring expression (stripped).
        mask: ``H x W`` bool, False on nodata.
        score: Mean probability over the mask pixels, in [0, 1].
        logits: ``H x W`` float32 mask logits at the original resolution.
        heatmap: ``H x W`` float32 global-activation probability, or None when not requested.
        predicted_iou: SAM's predicted IoU of the mask.
    """

    expression: str
    mask: np.ndarray
    score: float
    logits: np.ndarray
    heatmap: np.ndarray | None
    predicted_iou: float

    @property
    def area_pixels(self) -> int:
        """Number of mask pixels."""
        return int(self.mask.sum())


@dataclass(frozen=True)
class EncodedImage:
    """What decoding an image needs: its cached encoder features, how it was resized, its validity.

    Attributes:
        features: ``1 x ...`` :class:`ImageFeatures` on the model's device.
        meta: How the ``H x W`` image was brought to the ``S x S`` model input.
        valid: ``H x W`` bool validity (False on nodata).
    """

    features: ImageFeatures
    meta: ResizeMeta
    valid: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes held: the two feature maps and the validity mask."""
        return int(self.features.sam.nbytes + self.features.clip.nbytes + self.valid.nbytes)


@dataclass
class BatchLogits:
    """Raw outputs of one batch of ``t`` expressions at the original ``H x W`` resolution (CPU).

    Attributes:
        start: Index of the batch's first expression in the full list.
        logits: ``t x H x W`` float32 mask logits.
        iou: ``t`` SAM predicted IoU.
        heat_logits: ``t x H x W`` float32 global activation logits, or None.
    """

    start: int
    logits: torch.Tensor
    iou: torch.Tensor
    heat_logits: torch.Tensor | None


def check_expressions(expressions: Sequence[str]) -> list[str]:
    """Strip and validate referring expressions.

    Raises:
        TypeError: a single string was passed instead of a list of strings.
        ConfigError: the list is empty, an expression is empty / whitespace only, or longer than
            ``MAX_EXPRESSION_CHARS`` (:mod:`rsrefseg.inference.defaults`) characters.
    """
    if isinstance(expressions, str):
        raise TypeError("expressions must be a list of strings, not one string")
    cleaned = []
    for number, text in enumerate(expressions, start=1):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"expression {number} is empty; every expression must contain text")
        cleaned.append(check_expression_length(" ".join(text.split()), f"expression {number}"))
    if not cleaned:
        raise ConfigError("no expression given")
    return cleaned


def mask_score(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean probability ``sigmoid(logits)`` over the True pixels of ``mask`` (same ``H x W``); 0.0 if empty.

    The probabilities outside the mask are zeroed, each row is summed in float32 (PyTorch's
    pairwise summation: ~1e-7 relative) and the row sums in float64; no boolean indexing (its
    ``nonzero`` made this 2x slower on a 13-megapixel scene).
    """
    count = int(torch.count_nonzero(mask))
    if count == 0:
        return 0.0
    probs = torch.sigmoid(logits.float()).mul_(mask)  # H x W, 0 outside the mask
    rows = probs.sum(dim=-1) if probs.dim() > 1 else probs  # H float32 row sums
    return float(rows.sum(dtype=torch.float64) / count)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def as_raster_image(image: ImageInput, bands: tuple[int, ...] | None, valid: np.ndarray | None) -> RasterImage:
    """Normalise a path / RasterImage / ``H x W x 3`` (or ``H x W``) uint8 array to a RasterImage."""
    if isinstance(image, RasterImage):
        return image
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, bands=bands)
    if isinstance(image, np.ndarray):
        rgb = image
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[:, :, None], 3, axis=2)  # H x W grey -> H x W x 3
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"image arrays must be H x W x 3 uint8, got shape {image.shape} {image.dtype}")
        ok = np.ones(rgb.shape[:2], dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        if ok.shape != rgb.shape[:2]:
            raise ValueError(f"valid mask shape {ok.shape} does not match the image {rgb.shape[:2]}")
        return RasterImage(rgb=rgb, valid=ok, crs=None, transform=None, path=Path("<array>"),
                           band_indices=(1, 2, 3))
    raise TypeError(f"set_image takes a path, a RasterImage or a numpy array, got {type(image).__name__}")


class Predictor:
    """Encode an image once, then segment many expressions on the cached features.

    Example::

        predictor = Predictor.from_pretrained("runs/exp1/best")
        predictor.set_image("scene.tif")
        for p in predictor.predict(["the large white building", "the road on the left"]):
            print(p.expression, p.score, p.mask.sum())
    """

    def __init__(self, model: RSRefSeg) -> None:
        self.model = model.eval()
        self.size: int = int(model.config.sam_image_size)
        self.resize_mode: str = model.config.resize_mode
        self._encoded: EncodedImage | None = None
        self._image: RasterImage | None = None

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike[str],
        device: str | torch.device | None = None,
        precision: str = "fp32",
        optimize: bool = True,
        **kwargs: Any,
    ) -> Predictor:
        """Load a checkpoint directory (see :mod:`rsrefseg.checkpoint`) for inference.

        Args:
            checkpoint: Checkpoint folder (``config.json`` + ``model.safetensors``).
            device: Torch device; ``None`` picks CUDA when available.
            precision: ``"fp32"`` (default) or ``"bf16"`` weights and activations.
            optimize: Merge LoRA and use the fast kernels
                (:func:`rsrefseg.modeling.optimize.optimize_for_inference`); ``False`` keeps the
                model as trained (only ``"fp32"`` then).
            **kwargs: ``clip=``, ``sam=`` for ``load_checkpoint``.
        """
        from rsrefseg.checkpoint import load_checkpoint
        from rsrefseg.modeling.optimize import optimize_for_inference, parse_precision

        parse_precision(precision)
        if not optimize and precision != "fp32":
            raise ConfigError(f"precision {precision!r} needs optimize=True")
        model = load_checkpoint(checkpoint, device=_resolve_device(device), **kwargs)
        if optimize:
            optimize_for_inference(model, precision)
        return cls(model)

    # ------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        """Device of the model."""
        return self.model.device

    @property
    def is_image_set(self) -> bool:
        """Whether :meth:`set_image` has cached features."""
        return self._encoded is not None

    @property
    def image(self) -> RasterImage:
        """The current image (``rgb`` ``H x W x 3`` uint8, ``valid`` ``H x W`` bool, georeferencing)."""
        if self._image is None:
            raise RuntimeError("no image set; call set_image() first")
        return self._image

    @property
    def encoded(self) -> EncodedImage:
        """The current image's :class:`EncodedImage` (features, resize, validity)."""
        if self._encoded is None:
            raise RuntimeError("no image set; call set_image() first")
        return self._encoded

    @property
    def features(self) -> ImageFeatures:
        """The cached ``1 x ...`` image features of the current image."""
        return self.encoded.features

    def reset_image(self) -> None:
        """Drop the cached image and features."""
        self._encoded = self._image = None

    # ------------------------------------------------------------------ encoding
    @torch.inference_mode()
    def set_image(
        self,
        image: ImageInput,
        bands: tuple[int, ...] | None = None,
        valid: np.ndarray | None = None,
    ) -> None:
        """Read/resize an image and run the image encoders once, caching the features.

        Args:
            image: A file path (read with :func:`rsrefseg.data.imageio.read_image`), a
                :class:`RasterImage`, or an ``H x W x 3`` uint8 RGB array.
            bands: 1-based bands for R, G, B when ``image`` is a path (e.g. ``(4, 3, 2)``).
            valid: ``H x W`` bool validity for array inputs (default: all valid).
        """
        raster = as_raster_image(image, bands, valid)
        self._encoded = self.encode(raster)
        self._image = raster

    @torch.inference_mode()
    def encode(self, image: ImageInput, bands: tuple[int, ...] | None = None,
               valid: np.ndarray | None = None) -> EncodedImage:
        """Run the image encoders on an image without touching the current one (arguments as
        :meth:`set_image`); decode on the result with :meth:`iter_logits` (``encoded=``)."""
        raster = as_raster_image(image, bands, valid)
        pixels, meta = resize_image(raster.rgb, self.size, self.resize_mode)  # 3 x S x S uint8
        batch = pixels.unsqueeze(0).to(self.device, torch.float32)  # 3 x S x S -> 1 x 3 x S x S
        return EncodedImage(self.model.encode_image(batch), meta, raster.valid)

    @torch.inference_mode()
    def encode_expressions(self, expressions: Sequence[str], batch_size: int = 16) -> list[TextFeatures]:
        """Text features of ``expressions`` in batches of ``batch_size`` (image independent, so a
        list can be encoded once and reused on many images or tiles)."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        texts = check_expressions(expressions)
        return [self.model.encode_text(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]

    @torch.inference_mode()
    def iter_logits(self, text_batches: Sequence[TextFeatures], heatmap: bool = True,
                    encoded: EncodedImage | None = None) -> Iterator[BatchLogits]:
        """Decode each batch of text features on the cached image features (or on ``encoded``,
        from :meth:`encode`).

        Yields:
            :class:`BatchLogits` with ``t x H x W`` logits at the original resolution, on the CPU.
        """
        if encoded is None:
            encoded = self.encoded
        features, meta = encoded.features, encoded.meta
        start = 0
        for text in text_batches:
            t = int(text.tokens.shape[0])
            index = torch.zeros(t, dtype=torch.long, device=self.device)  # every expression on image 0
            out = self.model.decode(features, text, image_index=index)
            # t x 1 x S x S -> t x 1 x H x W -> t x H x W
            logits = logits_to_original(out.mask_logits.float(), meta)[:, 0].cpu()
            heat = None
            if heatmap:
                # t x 1 x h x w (CLIP patch grid, covers the S x S input) -> t x 1 x S x S -> t x H x W
                up = F.interpolate(out.global_activation.float(), size=(self.size, self.size),
                                   mode="bilinear", align_corners=False)
                heat = logits_to_original(up, meta)[:, 0].cpu()
            yield BatchLogits(start=start, logits=logits, iou=out.iou_scores[:, 0].float().cpu(), heat_logits=heat)
            start += t

    def predict(
        self,
        expressions: Sequence[str],
        batch_size: int = 16,
        threshold: float = 0.0,
        heatmap: bool = True,
    ) -> list[Prediction]:
        """Segment each expression on the current image (features from :meth:`set_image`).

        Args:
            expressions: Referring expressions (non-empty strings).
            batch_size: Expressions decoded together.
            threshold: Logit threshold of the mask (0.0 = probability 0.5).
            heatmap: Also return the global-activation heatmap.

        Returns:
            One :class:`Prediction` per expression, in order, at the original ``H x W``.
        """
        texts = check_expressions(expressions)
        text_batches = self.encode_expressions(texts, batch_size)
        valid = torch.from_numpy(np.ascontiguousarray(self.image.valid))  # H x W bool
        results: list[Prediction] = []
        with torch.inference_mode():
            for batch in self.iter_logits(text_batches, heatmap=heatmap):
                for j in range(batch.logits.shape[0]):
                    results.append(
                        self.make_prediction(
                            texts[batch.start + j],
                            batch.logits[j],
                            valid,
                            threshold,
                            float(batch.iou[j]),
                            None if batch.heat_logits is None else batch.heat_logits[j],
                        )
                    )
        return results

    @staticmethod
    def make_prediction(
        expression: str,
        logits: torch.Tensor,
        valid: torch.Tensor,
        threshold: float,
        predicted_iou: float,
        heat_logits: torch.Tensor | None = None,
    ) -> Prediction:
        """Threshold ``H x W`` logits into a :class:`Prediction` (mask False where ``valid`` is False)."""
        with torch.inference_mode():
            mask = logits > threshold
            mask &= valid  # nodata pixels are never part of a mask
            score = mask_score(logits, mask)
            heat = None if heat_logits is None else torch.sigmoid(heat_logits).numpy()
        return Prediction(
            expression=expression,
            mask=mask.numpy(),
            score=score,
            logits=logits.numpy(),
            heatmap=heat,
            predicted_iou=predicted_iou,
        )

    def predict_scene(
        self, image: ImageInput, expressions: Sequence[str], bands: tuple[int, ...] | None = None, **kwargs: Any
    ) -> Any:
        """Tiled prediction of a large scene (a file is read window by window); keyword arguments
        go to :func:`rsrefseg.inference.scene.predict_scene`, which returns a ``ScenePrediction``."""
        from rsrefseg.inference.scene import open_scene, predict_scene

        with open_scene(image, bands=bands) as source:
            return predict_scene(self, source, expressions, **kwargs)
