"""Resize to the model grid and back; flips that keep words and masks consistent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsrefseg.data.from_coco import Instance, extreme_target
from rsrefseg.data.records import encode_mask
from rsrefseg.data.transforms import (
    RandomFlip,
    flip_sample,
    flip_text,
    logits_to_original,
    make_meta,
    resize_image,
    resize_mask,
)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_stretch_resize_shapes_and_meta() -> None:
    rgb = np.full((801, 800, 3), 77, dtype=np.uint8)
    pixels, meta = resize_image(rgb, 1024, "stretch")
    assert pixels.shape == (3, 1024, 1024) and pixels.dtype == torch.uint8
    assert (pixels == 77).all()  # a constant image stays constant
    assert (meta.orig_h, meta.orig_w, meta.size, meta.mode) == (801, 800, 1024, "stretch")
    assert meta.pad == (0, 0) and meta.scale == pytest.approx((1024 / 801, 1024 / 800))


def test_longest_side_pads_bottom_right_with_zeros() -> None:
    rgb = np.full((600, 1200, 3), 200, dtype=np.uint8)
    pixels, meta = resize_image(rgb, 256, "longest_side")
    assert meta.content_hw == (128, 256) and meta.pad == (128, 0) and meta.scale == (256 / 1200,) * 2
    assert (pixels[:, :128] == 200).all() and (pixels[:, 128:] == 0).all()
    tall = make_meta(1000, 10, 100, "longest_side")
    assert tall.content_hw == (100, 1) and tall.pad == (0, 99)  # SAM rounding: int(x + 0.5)
    with pytest.raises(ValueError, match="resize mode"):
        make_meta(10, 10, 10, "crop")


def test_downscaling_is_antialiased() -> None:
    checker = ((np.indices((768, 768)).sum(axis=0) % 2) * 255).astype(np.uint8)
    rgb = np.repeat(checker[..., None], 3, axis=2)
    pixels, _ = resize_image(rgb, 256)
    inner = pixels[:, 4:-4, 4:-4].float()
    assert abs(inner.mean().item() - 127.5) < 2 and inner.std().item() < 20  # no aliasing pattern


@pytest.mark.parametrize("mode", ["stretch", "longest_side"])
@pytest.mark.parametrize("shape", [(800, 800), (801, 800), (300, 700)])
def test_mask_and_logits_round_trip(mode: str, shape: tuple[int, int]) -> None:
    mask = np.zeros(shape, dtype=bool)
    mask[shape[0] // 4 : shape[0] // 2, shape[1] // 3 : shape[1] // 2 + 40] = True
    meta = make_meta(*shape, 512, mode)
    small = resize_mask(mask, meta)
    assert small.shape == (512, 512) and small.dtype == torch.bool
    new_h, new_w = meta.content_hw
    assert not small[new_h:].any() and not small[:, new_w:].any()  # padding is background
    logits = torch.where(small, 10.0, -10.0)[None, None].repeat(2, 1, 1, 1)  # B x 1 x S x S
    back = logits_to_original(logits, meta)
    assert back.shape == (2, 1, *shape) and back.dtype == torch.float32
    assert _iou(back[1, 0].numpy() > 0, mask) > 0.97


@pytest.mark.parametrize("mode", ["stretch", "longest_side"])
def test_logits_of_an_image_at_the_input_size_come_back_unchanged(mode: str) -> None:
    meta = make_meta(64, 64, 64, mode)
    logits = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 20
    back = logits_to_original(logits, meta)
    # The shortcut returns the input; the bilinear resize it skips gives the same values bit for bit.
    resized = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    assert back is logits and torch.equal(resized, logits)
    assert logits_to_original(logits.double(), meta).dtype == torch.float64
    ints = logits_to_original((logits > 0).to(torch.uint8), meta)  # non-float input: resized as float
    assert ints.dtype == torch.float32 and torch.equal(ints, (logits > 0).float())


def test_nearest_mask_resize_keeps_area() -> None:
    mask = np.zeros((100, 100), dtype=bool)
    mask[10:30, 40:90] = True
    small = resize_mask(mask, make_meta(100, 100, 50))
    assert int(small.sum()) == 10 * 25


@pytest.mark.parametrize(
    ("text", "horizontal", "expected"),
    [
        ("the leftmost ship on the left", True, "the rightmost ship on the right"),
        ("Left of the RIGHT tank", True, "Right of the LEFT tank"),
        ("the car at the top left", True, "the car at the top right"),
        ("the car at the top left", False, "the car at the bottom left"),
        (
            "the plane far left, west of the eastern road",
            True,
            "the plane far right, east of the western road",
        ),
        ("the upper tank above the lower one", False, "the lower tank below the upper one"),
        ("the topmost ship, north of the bottommost", False, "the bottommost ship, south of the topmost"),
        ("the plane on the up side", False, "the plane on the down side"),
        ("the car at the up-left corner", False, "the car at the down-left corner"),
        ("the truck that picked up cargo, upside down", False, "the truck that picked up cargo, upside down"),
        ("leftover topics at the bottom-left", True, "leftover topics at the bottom-right"),
        ("the northwest building", True, "the northeast building"),
        ("the northwest building", False, "the southwest building"),
        ("left and right", True, "right and left"),
    ],
)
def test_flip_text(text: str, horizontal: bool, expected: str) -> None:
    assert flip_text(text, horizontal) == expected
    assert flip_text(expected, horizontal) == text  # swapping is an involution for these words


def test_flip_moves_mask_and_rewrites_words_consistently() -> None:
    """The rule 'leftmost' picks the same object before a flip as 'rightmost' after it."""
    height, width = 60, 100
    boxes = [(5, 20, 15, 30), (50, 10, 60, 20), (80, 40, 95, 55)]  # x0, y0, x1, y1
    masks = []
    for x0, y0, x1, y1 in boxes:
        mask = np.zeros((height, width), dtype=bool)
        mask[y0:y1, x0:x1] = True
        masks.append(mask)
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[masks[0]] = (255, 0, 0)
    for direction, flipped_direction, horizontal in (("left", "right", True), ("top", "bottom", False)):
        found = extreme_target(_instances(masks), direction, height, width, 0.1)
        assert found is not None
        target = masks[found[0].ann_id]
        text = f"the {direction}most storage tank"
        f_rgb, f_mask, f_text = flip_sample(rgb, target, text, horizontal=horizontal)
        assert f_text == f"the {flipped_direction}most storage tank"
        flipped_masks = [np.flip(m, axis=1 if horizontal else 0) for m in masks]
        again = extreme_target(_instances(flipped_masks), flipped_direction, height, width, 0.1)
        assert again is not None and again[0].ann_id == found[0].ann_id
        assert np.array_equal(f_mask, flipped_masks[found[0].ann_id])
        assert np.array_equal(f_rgb[f_mask], rgb[target])  # pixels travel with the mask
        # torch tensors (C x H x W) flip the same way
        t_rgb, t_mask, _ = flip_sample(
            torch.from_numpy(rgb).permute(2, 0, 1), torch.from_numpy(target), text, horizontal
        )
        assert np.array_equal(t_rgb.permute(1, 2, 0).numpy(), f_rgb) and np.array_equal(
            t_mask.numpy(), f_mask
        )


def _instances(masks: list[np.ndarray]) -> list[Instance]:
    out = []
    for index, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        out.append(Instance(index, encode_mask(mask), box, int(mask.sum())))
    return out


def test_random_flip_is_off_by_default_and_seeded() -> None:
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    mask = np.array([[True, False, False], [False, False, False]])
    off = RandomFlip()
    for _ in range(20):
        out = off(rgb, mask, "the left car")
        assert out[2] == "the left car" and np.array_equal(out[1], mask)
    always = RandomFlip(p_h=1.0)
    _, f_mask, f_text = always(rgb, mask, "the left car")
    assert f_text == "the right car" and f_mask[0, 2] and not f_mask[0, 0]
    draws = [
        RandomFlip(0.5, 0.5)(rgb, mask, "the top left car", torch.Generator().manual_seed(3))[2]
        for _ in range(3)
    ]
    assert len(set(draws)) == 1  # same generator seed, same flips
    with pytest.raises(ValueError):
        RandomFlip(p_h=1.5)
