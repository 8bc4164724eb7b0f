"""Overlay titles are fitted in O(log n) measurements, whatever the expression length."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from rsrefseg.inference.outputs import _font, fit_text, overlay_image


def test_fit_text_is_the_longest_fitting_prefix() -> None:
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = _font(14)
    assert fit_text(draw, "short", font, 200) == "short"
    text = "the storage tank on the far left of the harbour next to the ships " * 3
    fitted = fit_text(draw, text, font, 200)
    assert fitted.endswith("…") and text.startswith(fitted[:-1])
    assert draw.textlength(fitted, font=font) <= 200
    longer = text[: len(fitted)] + "…"  # one more character no longer fits
    assert draw.textlength(longer, font=font) > 200


def test_huge_title_takes_logarithmically_many_measurements(monkeypatch) -> None:
    calls: list[int] = []
    measure = ImageDraw.ImageDraw.textlength

    def counting(self, text, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(text))
        return measure(self, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "textlength", counting)
    image = overlay_image(np.zeros((64, 300, 3), np.uint8), np.zeros((64, 300), bool), "x" * 200_000)
    # The one-character-at-a-time loop measured ~n/2 strings of ~n characters (16 s for 4,000).
    assert len(calls) <= 12 and max(calls) <= 300
    assert image.size == (300, 64 + int(12 * 1.6))
