"""Several expressions of one image in a batch: encode the image once, decode every expression.

The image encoders (SAM image encoder, CLIP/SigLIP vision tower) are almost all of the compute;
the text encoder, activation, prompter and mask decoder are light. A batch that holds several
expressions of the same image therefore only needs that image encoded once:
:func:`unique_images` finds the identical images of a batch (exact comparison, so it never merges
two different inputs, e.g. the same file flipped differently), and :func:`collate_grouped` builds
batches with ``U`` unique images and ``T`` expressions plus the ``T`` image indices that
``RSRefSeg.forward(..., image_index=)`` / ``RSRefSeg.decode(..., image_index=)`` take.

Training groups expressions of an image on purpose (``data.expressions_per_image``,
:class:`rsrefseg.training.data.EpochBatchSampler`); evaluation gets the same saving from its
natural order, where the records of an image follow each other.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from rsrefseg.data.datasets import collate_fn

#: Every n-th value of an image goes into its lookup key (candidates are then compared in full).
KEY_STRIDE = 61


def _digest(image: torch.Tensor) -> bytes:
    """A cheap lookup key of one image tensor: a hash of a strided sample of its values (dtype and
    shape included). Equal images have equal keys; :func:`unique_images` confirms with ``torch.equal``."""
    sample = np.ascontiguousarray(image.detach().reshape(-1)[::KEY_STRIDE].cpu().numpy())
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.dtype}|{tuple(image.shape)}|".encode())
    digest.update(sample.data)
    return digest.digest()


def unique_images(pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct images of a batch and, for every sample, the index of its image.

    Args:
        pixel_values: ``T x 3 x S x S`` (any dtype).

    Returns:
        ``(U x 3 x S x S, T)``: the distinct images in order of first appearance, and ``image_index``
        (long) with ``pixel_values[i]`` equal to ``unique[image_index[i]]``. Images are compared
        exactly (a key from a sample of the values, confirmed with ``torch.equal``).
    """
    first: dict[bytes, list[int]] = {}  # hash -> positions of distinct images with that hash
    keep: list[int] = []  # position in pixel_values of each distinct image
    index: list[int] = []
    for i in range(pixel_values.shape[0]):
        candidates = first.setdefault(_digest(pixel_values[i]), [])
        match = next((u for u in candidates if torch.equal(pixel_values[keep[u]], pixel_values[i])), None)
        if match is None:
            match = len(keep)
            keep.append(i)
            candidates.append(match)
        index.append(match)
    if len(keep) == pixel_values.shape[0]:
        return pixel_values, torch.arange(len(keep))
    return pixel_values[keep], torch.tensor(index, dtype=torch.long)


def collate_grouped(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`rsrefseg.data.datasets.collate_fn` with the images de-duplicated.

    Returns the same keys, except that ``pixel_values`` is ``U x 3 x S x S`` (the distinct images)
    and ``image_index`` (``T``, long) maps each of the ``T`` samples to its image; ``mask``, ``text``
    and the rest stay per sample.
    """
    out = collate_fn(batch)
    out["pixel_values"], out["image_index"] = unique_images(out["pixel_values"])
    return out
