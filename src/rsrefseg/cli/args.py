"""Argument types and groups shared by the inference commands (``predict``, ``serve``, ``eval``)."""

from __future__ import annotations

import argparse
import math
from typing import Any

#: ``rsrefseg.modeling.optimize.PRECISIONS`` by name (kept free of the torch import; tested equal).
PRECISION_NAMES = ("fp32", "bf16")


def parse_pixels(text: str) -> int:
    """``N`` pixels or ``HxW``."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel count N or HxW, got {text!r}") from None
    if len(parts) > 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive pixel count N or HxW, got {text!r}")
    return math.prod(parts)


def parse_bands_arg(text: str) -> tuple[int, ...]:
    """``--bands R,G,B`` (or one band), 1-based, for argparse's ``type=``."""
    from rsrefseg.data.imageio import parse_bands

    try:
        bands = parse_bands(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if bands is None:
        raise argparse.ArgumentTypeError("bands must name 1 or 3 bands (1-based), got an empty value")
    return bands


def positive(kind: type, zero: bool = False) -> Any:
    """An argparse type: ``kind(text)`` that must be > 0 (>= 0 with ``zero=True``)."""
    wanted = "a number >= 0" if zero else "a positive number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not (value >= 0 if zero else value > 0):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


def add_model_args(p: argparse.ArgumentParser, device_help: str) -> None:
    """``--checkpoint``, ``--device`` and ``--precision`` (inference on the optimised model)."""
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="trained checkpoint directory")
    p.add_argument("--device", help=device_help)
    add_precision_arg(p)


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    """``--precision fp32|bf16`` of the model prepared by ``optimize_for_inference``."""
    p.add_argument("--precision", choices=PRECISION_NAMES, default="fp32",
                   help="weights and activations: fp32 (default) or bf16 (faster on CPUs with AVX-512 BF16/AMX "
                        "and on GPUs; see the README for measured speed and agreement)")
