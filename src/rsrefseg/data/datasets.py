"""``ReferringDataset``: JSONL records + an image folder -> model-ready samples.

Image/mask size mismatch (known in RRSIS-D, e.g. an 800 x 801 image with an 800 x 800 mask): the
**mask size is authoritative**. When every side differs by at most ``size_tolerance`` pixels, the
image is cropped (or zero-padded, with ``valid`` False) at the bottom/right to the mask size, and
the record is counted in :attr:`ValidationReport.size_mismatch`. A larger disagreement is a
:class:`DataError` (or, with ``skip_bad=True``, a skipped record). Polygon segmentations are always
rasterised at the image size.

Bad records (missing image, undecodable mask, size disagreement, a ``file_name`` leaving the image
folder: absolute or with ``..``, an empty or over-long expression) raise :class:`DataError` naming the record's ``file:line``. With ``skip_bad=True`` a validation pass at construction (image headers
only, masks decoded) drops them and lists them in :attr:`ReferringDataset.skipped`; a sample is
never silently replaced by another one.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from rsrefseg.data.imageio import MAX_IMAGE_PIXELS, check_pixels, read_image
from rsrefseg.data.imageio import image_size as header_size
from rsrefseg.data.records import (
    RefRecord,
    check_records,
    decode_mask,
    read_jsonl,
    record_problem,
    segmentation_size,
)
from rsrefseg.data.transforms import RESIZE_MODES, resize_image, resize_mask
from rsrefseg.errors import DataError

#: Signature of an augmentation: (rgb H x W x 3, mask H x W, text) -> same.
Augment = Callable[[np.ndarray, np.ndarray, str], tuple[np.ndarray, np.ndarray, str]]


@dataclass(frozen=True)
class DatasetPreset:
    """Facts about a dataset family: where files are, what the images look like."""

    name: str
    image_ext: str
    #: Native (H, W) of every image, or None when sizes vary.
    image_hw: tuple[int, int] | None
    #: Image folder relative to the dataset root.
    image_subdir: str = "images"
    #: JSONL name relative to the dataset root, ``{split}`` replaced by the split name.
    jsonl_pattern: str = "{split}.jsonl"
    splits: tuple[str, ...] = ("train", "val", "test")
    description: str = ""


DATASETS: dict[str, DatasetPreset] = {
    "rrsisd": DatasetPreset(
        "rrsisd",
        ".jpg",
        (800, 800),
        description="RRSIS-D: 17,402 triplets on DIOR images (12,181/1,740/3,481)",
    ),
    "refsegrs": DatasetPreset("refsegrs", ".tif", (512, 512), description="RefSegRS: 512x512 .tif tiles"),
    "risbench": DatasetPreset("risbench", ".png", (512, 512), description="RISBench: 512x512 .png tiles"),
    "nwpu": DatasetPreset(
        "nwpu", ".jpg", None, splits=("train", "val"), description="NWPU VHR-10, rule-generated expressions"
    ),
}


@dataclass
class ValidationReport:
    """Result of :meth:`ReferringDataset.validate`."""

    n_ok: int = 0
    #: (record source, reason) of every record that cannot be used.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Sources of records whose image was cropped/padded to the mask size.
    size_mismatch: list[str] = field(default_factory=list)

    def reasons(self) -> Counter[str]:
        """Skipped records counted by kind ("unsafe file name", "bad expression", "missing image",
        "unreadable image", "bad mask", "size mismatch")."""
        return Counter(reason.split(":")[0] for _, reason in self.skipped)


def fit_to_mask(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop or zero-pad an ``H x W (x C)`` array at the bottom/right to ``height x width``."""
    out = array[:height, :width]
    pad_h, pad_w = height - out.shape[0], width - out.shape[1]
    if pad_h or pad_w:
        pads = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
        out = np.pad(out, pads)
    return np.ascontiguousarray(out)


class ReferringDataset(Dataset[dict[str, Any]]):
    """Referring segmentation samples.

    Each item is a dict:

    - ``pixel_values``: uint8 tensor ``3 x S x S`` (RGB, [0, 255]; see ``transforms``),
    - ``mask``: float tensor ``1 x S x S`` in {0, 1},
    - ``target``: bool numpy ``H x W``, the mask at original resolution (for metrics),
    - ``text``, ``index``, ``meta`` (:class:`ResizeMeta`), ``category``, ``rule``, ``sample_id``.
    """

    def __init__(
        self,
        records: Sequence[RefRecord],
        image_dir: str | os.PathLike[str],
        image_size: int,
        resize_mode: str = "stretch",
        augment: Augment | None = None,
        skip_bad: bool = False,
        size_tolerance: int = 2,
        bands: tuple[int, ...] | None = None,
    ) -> None:
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: image folder not found")
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.augment = augment
        self.size_tolerance = int(size_tolerance)
        self.bands = bands
        self.records: list[RefRecord] = list(records)
        self.report: ValidationReport | None = None
        if not skip_bad:
            check_records(self.records)  # names leaving the image folder, empty or over-long expressions
        if skip_bad:
            self.report = self.validate()
            bad = {source for source, _ in self.report.skipped}
            self.records = [r for i, r in enumerate(self.records) if self._where(r, i) not in bad]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(source, reason) of records dropped by ``skip_bad=True`` (empty otherwise)."""
        return list(self.report.skipped) if self.report else []

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, record: RefRecord) -> Path:
        return self.image_dir / record.file_name

    def _where(self, record: RefRecord, index: int) -> str:
        return record.source or f"record {index}"

    def _target_hw(self, record: RefRecord, where: str, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Mask size for this record, after checking it against the image size and the tolerance."""
        mask_hw = segmentation_size(record.segmentation, where) or image_hw
        if mask_hw != image_hw:
            diff = max(abs(mask_hw[0] - image_hw[0]), abs(mask_hw[1] - image_hw[1]))
            if diff > self.size_tolerance:
                raise DataError(
                    f"{where}: mask size {mask_hw[0]}x{mask_hw[1]} disagrees with image "
                    f"{self.image_path(record)} of size {image_hw[0]}x{image_hw[1]}"
                )
        return mask_hw

    def _check(
        self, record: RefRecord, where: str
    ) -> tuple[str, str] | tuple[tuple[int, int], tuple[int, int]]:
        """(kind, detail) of the first problem of a record, or its (image_hw, mask_hw) if usable."""
        problem = record_problem(record)
        if problem is not None:
            kind = "unsafe file name" if "file_name" in problem else "bad expression"
            return kind, problem
        path = self.image_path(record)
        if not path.is_file():
            return "missing image", str(path)
        try:
            image_hw = header_size(path)
            check_pixels(path, *image_hw, MAX_IMAGE_PIXELS)  # never decode a mask of a scene too large to read
        except DataError as exc:
            return "unreadable image", str(exc)
        try:
            mask_hw = self._target_hw(record, where, image_hw)
        except DataError as exc:
            kind = "size mismatch" if "disagrees with image" in str(exc) else "bad mask"
            return kind, str(exc)
        try:
            decode_mask(record.segmentation, *mask_hw, source=where)
        except DataError as exc:
            return "bad mask", str(exc)
        return image_hw, mask_hw

    def validate(self) -> ValidationReport:
        """Check every record (image exists and its header reads, mask decodes, sizes agree)."""
        report = ValidationReport()
        for index, record in enumerate(self.records):
            where = self._where(record, index)
            first, second = self._check(record, where)
            if isinstance(first, str):
                report.skipped.append((where, f"{first}: {second}"))
                continue
            report.n_ok += 1
            if first != second:
                report.size_mismatch.append(where)
        return report

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, RefRecord]:
        """Original-resolution ``(rgb H x W x 3 uint8, mask H x W bool, record)`` of one sample."""
        record = self.records[index]
        where = self._where(record, index)
        check_records([record])
        path = self.image_path(record)
        if not path.is_file():
            raise DataError(f"{where}: image not found: {path}")
        try:
            image = read_image(path, bands=self.bands)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        image_hw = (image.height, image.width)
        mask_hw = self._target_hw(record, where, image_hw)
        mask = decode_mask(record.segmentation, *mask_hw, source=where)
        rgb = image.rgb if mask_hw == image_hw else fit_to_mask(image.rgb, *mask_hw)
        return rgb, mask, record

    def __getitem__(self, index: int) -> dict[str, Any]:
        rgb, mask, record = self.load(index)
        text = record.sent
        if self.augment is not None:
            rgb, mask, text = self.augment(rgb, mask, text)
        pixel_values, meta = resize_image(rgb, self.image_size, self.resize_mode)
        mask_s = resize_mask(mask, meta).to(torch.float32).unsqueeze(0)  # S x S -> 1 x S x S
        return {
            "pixel_values": pixel_values,
            "mask": mask_s,
            "text": text,
            "index": index,
            "meta": meta,
            "target": np.asarray(mask, dtype=bool),
            "category": record.category_name,
            "rule": record.rule,
            "sample_id": record.sample_id or f"#{index}",
        }


def collate_fn(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``pixel_values`` (``B x 3 x S x S``), ``mask`` (``B x 1 x S x S``) and ``index`` (``B``);
    keep ``text``, ``meta``, ``target``, ``category``, ``rule``, ``sample_id`` as lists."""
    if not batch:
        raise ValueError("collate_fn got an empty batch")
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        **{
            key: [b[key] for b in batch]
            for key in ("text", "meta", "target", "category", "rule", "sample_id")
        },
    }


def filter_split(records: Sequence[RefRecord], split: str | None, source: str) -> list[RefRecord]:
    """Records of one split (all when ``split`` is None); DataError if none has that split."""
    if split is None:
        return list(records)
    chosen = [r for r in records if r.split == split]
    if not chosen:
        found = sorted({str(r.split) for r in records})
        raise DataError(f"{source}: no record with split '{split}' (splits present: {', '.join(found)})")
    return chosen


def load_split(
    jsonl: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    split: str | None = None,
    image_size: int = 1024,
    **kwargs: Any,
) -> ReferringDataset:
    """Read ``jsonl``, keep ``split`` (if given) and build a :class:`ReferringDataset`."""
    records = filter_split(read_jsonl(jsonl), split, str(jsonl))
    return ReferringDataset(records, image_dir, image_size, **kwargs)


def load_preset(
    name: str, root: str | os.PathLike[str], split: str, image_size: int = 1024, **kwargs: Any
) -> ReferringDataset:
    """Load ``<root>/<jsonl_pattern>`` with images in ``<root>/<image_subdir>`` for a :data:`DATASETS` family."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})")
    preset = DATASETS[name]
    root = Path(root)
    jsonl = root / preset.jsonl_pattern.format(split=split)
    return load_split(jsonl, root / preset.image_subdir, split=split, image_size=image_size, **kwargs)
