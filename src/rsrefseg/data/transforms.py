"""Bring images/masks to the square model input ``S x S`` and logits back; flip augmentation.

Two resize modes:

- ``"stretch"`` (the reference RSRefSeg code): resize ``H x W`` straight to ``S x S`` (aspect ratio
  is not kept; RRSIS-D/RefSegRS/RISBench images are square anyway).
- ``"longest_side"`` (SAM): scale so the longest side is ``S``, then pad bottom/right with zeros.

Images use bilinear interpolation with antialiasing (so downscaling does not alias); masks use
nearest neighbour (``nearest-exact``, i.e. pixel centres). Logits go back with plain bilinear
interpolation after cropping the padding, as SAM's ``postprocess_masks`` does.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

ResizeMode = Literal["stretch", "longest_side"]
RESIZE_MODES: tuple[str, ...] = ("stretch", "longest_side")
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class ResizeMeta:
    """How an ``orig_h x orig_w`` image was mapped to ``size x size``."""

    orig_h: int
    orig_w: int
    size: int
    mode: str
    #: (scale_y, scale_x): resized = original * scale (equal for ``longest_side``).
    scale: tuple[float, float]
    #: (pad_bottom, pad_right) in pixels of the ``size x size`` input (0 for ``stretch``).
    pad: tuple[int, int]

    @property
    def content_hw(self) -> tuple[int, int]:
        """``(h, w)`` of the image content inside the ``size x size`` input (before padding)."""
        return self.size - self.pad[0], self.size - self.pad[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_meta(orig_h: int, orig_w: int, size: int, mode: str = "stretch") -> ResizeMeta:
    """The :class:`ResizeMeta` for an ``orig_h x orig_w`` image at input size ``size``."""
    if orig_h <= 0 or orig_w <= 0 or size <= 0:
        raise ValueError(f"sizes must be positive, got {orig_h}x{orig_w} -> {size}")
    if mode == "stretch":
        return ResizeMeta(orig_h, orig_w, size, mode, (size / orig_h, size / orig_w), (0, 0))
    if mode == "longest_side":
        scale = size / max(orig_h, orig_w)
        new_h, new_w = int(orig_h * scale + 0.5), int(orig_w * scale + 0.5)  # as SAM's ResizeLongestSide
        return ResizeMeta(orig_h, orig_w, size, mode, (scale, scale), (size - new_h, size - new_w))
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def resize_image(rgb: np.ndarray, size: int, mode: str = "stretch") -> tuple[torch.Tensor, ResizeMeta]:
    """Resize an ``H x W x 3`` uint8 image to the model input.

    Returns:
        ``3 x S x S`` uint8 tensor (padding is 0) and the :class:`ResizeMeta` to undo it.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"resize_image expects an H x W x 3 array, got shape {rgb.shape}")
    meta = make_meta(rgb.shape[0], rgb.shape[1], size, mode)
    new_h, new_w = meta.content_hw
    # H x W x 3 -> 1 x 3 x H x W for interpolate.
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)
    if (new_h, new_w) != (meta.orig_h, meta.orig_w):
        resized = F.interpolate(
            image.float(), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )
        image = resized.round().clamp(0, 255).to(torch.uint8)
    image = F.pad(image[0], (0, meta.pad[1], 0, meta.pad[0]))  # pad (left, right, top, bottom) of W, H
    return image.contiguous(), meta


def resize_mask(mask: np.ndarray | torch.Tensor, meta: ResizeMeta) -> torch.Tensor:
    """Nearest-neighbour resize of a bool ``H x W`` mask to the bool ``S x S`` model grid."""
    mask_t = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if tuple(mask_t.shape) != (meta.orig_h, meta.orig_w):
        raise ValueError(f"mask shape {tuple(mask_t.shape)} != image {meta.orig_h}x{meta.orig_w}")
    new_h, new_w = meta.content_hw
    grid = mask_t.to(torch.uint8)[None, None]  # H x W -> 1 x 1 x H x W
    if (new_h, new_w) != (meta.orig_h, meta.orig_w):
        grid = F.interpolate(grid.float(), size=(new_h, new_w), mode="nearest-exact")
    out = F.pad(grid[0, 0] > 0.5, (0, meta.pad[1], 0, meta.pad[0]))  # S x S bool, padding False
    return out


def logits_to_original(logits: torch.Tensor, meta: ResizeMeta) -> torch.Tensor:
    """Crop the padding and resize ``... x S x S`` logits back to ``... x H x W`` (bilinear).

    Leading dimensions (e.g. ``B x 1``) are kept; the result is float (the input dtype if floating).
    When the image filled the input at its own size (no padding, no resize) the floating input
    itself comes back: a bilinear resize to the same size is the identity (weights 1 and 0).
    """
    if tuple(logits.shape[-2:]) != (meta.size, meta.size):
        raise ValueError(f"logits end in {tuple(logits.shape[-2:])}, expected {meta.size}x{meta.size}")
    new_h, new_w = meta.content_hw
    if (new_h, new_w) == (meta.orig_h, meta.orig_w) == (meta.size, meta.size) and logits.is_floating_point():
        return logits
    leading = logits.shape[:-2]
    cropped = logits[..., :new_h, :new_w]
    flat = cropped.reshape(-1, 1, new_h, new_w).float()  # (... ) x h x w -> N x 1 x h x w
    out = F.interpolate(flat, size=(meta.orig_h, meta.orig_w), mode="bilinear", align_corners=False)
    out = out.reshape(*leading, meta.orig_h, meta.orig_w)  # N x 1 x H x W -> ... x H x W
    return out.to(logits.dtype) if logits.is_floating_point() else out


# ---------------------------------------------------------------------------------------------
# Flips with consistent rewriting of spatial words.

_HORIZONTAL_PAIRS = [
    ("left", "right"),
    ("leftmost", "rightmost"),
    ("lefthand", "righthand"),
    ("west", "east"),
    ("western", "eastern"),
    ("westmost", "eastmost"),
    ("westernmost", "easternmost"),
    ("westward", "eastward"),
    ("westwards", "eastwards"),
    ("northwest", "northeast"),
    ("southwest", "southeast"),
    ("northwestern", "northeastern"),
    ("southwestern", "southeastern"),
]
_VERTICAL_PAIRS = [
    ("top", "bottom"),
    ("topmost", "bottommost"),
    ("upper", "lower"),
    ("uppermost", "lowermost"),
    ("above", "below"),
    ("up", "down"),  # only where spatial, see _UP_DOWN
    ("north", "south"),
    ("northern", "southern"),
    ("northmost", "southmost"),
    ("northernmost", "southernmost"),
    ("northward", "southward"),
    ("northwards", "southwards"),
    ("northwest", "southwest"),
    ("northeast", "southeast"),
    ("northwestern", "southwestern"),
    ("northeastern", "southeastern"),
]
# "up"/"down" are spatial after an article/preposition ("on the up side", "at the down left") or
# before a position noun ("up left corner"); never in "pick up", "upside down", "made up of".
_UP_DOWN = (
    r"(?:(?<=\bthe )|(?<=\bat )|(?<=\bon )|(?<=\bin )|(?<=\bto )|(?<=\btoward )|(?<=\btowards ))"
    r"(?:up|down)\b(?!-)"
    r"|\b(?:up|down)(?=[\s-]+(?:side|part|half|corner|edge|end|left|right|middle|center|centre)\b)"
)


def _build(pairs: list[tuple[str, str]]) -> tuple[re.Pattern[str], dict[str, str]]:
    mapping = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    words = sorted((w for w in mapping if w not in ("up", "down")), key=len, reverse=True)
    up_down = f"|(?P<ud>{_UP_DOWN})" if "up" in mapping else ""
    pattern = re.compile(rf"\b(?P<w>{'|'.join(words)})\b{up_down}", flags=re.IGNORECASE)
    return pattern, mapping


_PATTERNS = {True: _build(_HORIZONTAL_PAIRS), False: _build(_VERTICAL_PAIRS)}


def _match_case(source: str, word: str) -> str:
    if len(source) > 1 and source.isupper():
        return word.upper()
    if source[0].isupper():
        return word[0].upper() + word[1:]
    return word


def flip_text(text: str, horizontal: bool) -> str:
    """Swap spatial words for a horizontal (left<->right, west<->east) or vertical (top<->bottom,
    upper<->lower, above<->below, north<->south, spatial up<->down) flip.

    One regex pass over whole words, so a swapped word is never swapped back; case is kept.
    """
    pattern, mapping = _PATTERNS[bool(horizontal)]
    return pattern.sub(lambda m: _match_case(m.group(0), mapping[m.group(0).lower()]), text)


def flip_array(array: ArrayT, horizontal: bool, channels_last: bool | None = None) -> ArrayT:
    """Flip an image/mask. numpy arrays are ``H x W`` or ``H x W x C``; tensors are ``... x H x W``."""
    if isinstance(array, torch.Tensor):
        return torch.flip(array, dims=[-1 if horizontal else -2])
    if channels_last is None:
        channels_last = array.ndim == 3
    axis = (1 if horizontal else 0) if channels_last or array.ndim == 2 else (-1 if horizontal else -2)
    return np.ascontiguousarray(np.flip(array, axis=axis))


def flip_sample(
    image: ArrayT, mask: np.ndarray | torch.Tensor, text: str, horizontal: bool
) -> tuple[ArrayT, np.ndarray | torch.Tensor, str]:
    """Flip image (numpy ``H x W x 3`` or tensor ``3 x H x W``), mask (``H x W``) and text consistently."""
    return flip_array(image, horizontal), flip_array(mask, horizontal), flip_text(text, horizontal)


class RandomFlip:
    """Random horizontal/vertical flips with word rewriting. Off by default (``p_h = p_v = 0``).

    Randomness comes from torch's generator, so DataLoader workers (seeded per worker by torch)
    draw different flips and a seeded run is reproducible.
    """

    def __init__(self, p_h: float = 0.0, p_v: float = 0.0) -> None:
        if not (0.0 <= p_h <= 1.0 and 0.0 <= p_v <= 1.0):
            raise ValueError(f"flip probabilities must be in [0, 1], got p_h={p_h}, p_v={p_v}")
        self.p_h = p_h
        self.p_v = p_v

    def __call__(
        self,
        image: ArrayT,
        mask: np.ndarray | torch.Tensor,
        text: str,
        generator: torch.Generator | None = None,
    ) -> tuple[ArrayT, np.ndarray | torch.Tensor, str]:
        draws = torch.rand(2, generator=generator)
        if self.p_h > 0 and float(draws[0]) < self.p_h:
            image, mask, text = flip_sample(image, mask, text, horizontal=True)
        if self.p_v > 0 and float(draws[1]) < self.p_v:
            image, mask, text = flip_sample(image, mask, text, horizontal=False)
        return image, mask, text

    def __repr__(self) -> str:
        return f"RandomFlip(p_h={self.p_h}, p_v={self.p_v})"
