"""Referring records (one image + one expression + one target mask), JSONL I/O and mask codecs.

A record is one line of a JSONL file, e.g. (RRSIS-D)::

    {"split": "test", "image_id": 3600, "sent": "The gray small windmill", "file_name": "03600.jpg",
     "category_id": 19, "category_name": "windmill", "ann_id": 3600, "bbox": [...],
     "segmentation": [{"size": [800, 800], "counts": "Pbi8110..."}], "area": 273329}

Required fields: ``image_id``, ``sent``, ``file_name``, ``segmentation``. Unknown fields (``area``,
``sam3``, ``rule_params``...) are kept in :attr:`RefRecord.extra` and written back unchanged.

Masks are ``np.ndarray[bool]`` of shape ``H x W``. A segmentation is one of

- an RLE dict ``{"size": [H, W], "counts": str}`` (COCO compressed) or ``counts: list[int]``
  (uncompressed, column-major run lengths starting with a run of zeros);
- a list of RLE dicts (RRSIS-D stores a list holding one; several are merged by union);
- COCO polygons: a list of flat ``[x0, y0, x1, y1, ...]`` lists (needs the image height/width).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rsrefseg.errors import DataError
from rsrefseg.utils import atomic_open

#: Most pixels an RLE may cover: COCO RLE (pycocotools) stores sizes and run lengths as uint32.
MAX_RLE_PIXELS = 2**32 - 1
#: Fields every record must have.
REQUIRED_FIELDS = ("image_id", "sent", "file_name", "segmentation")
#: Fields mapped onto :class:`RefRecord` attributes (everything else goes to ``extra``).
KNOWN_FIELDS = (
    *REQUIRED_FIELDS,
    "split",
    "bbox",
    "category_name",
    "category_id",
    "ann_id",
    "rule",
    "referred_ann_ids",
)


@dataclass
class RefRecord:
    """One referring sample: an image, an expression and the segmentation of the referred object(s)."""

    image_id: int | str
    sent: str
    file_name: str
    segmentation: Any
    split: str | None = None
    bbox: list[float] | None = None
    category_name: str | None = None
    category_id: int | None = None
    ann_id: int | str | None = None
    #: Generation rule for rule-generated records (``only``, ``extreme``, ``size``, ``group``), else None.
    rule: str | None = None
    #: Annotation ids whose union is the target (rule-generated records); empty otherwise.
    referred_ann_ids: list[int | str] = field(default_factory=list)
    #: Unknown JSON fields, kept verbatim and written back by :func:`write_jsonl`.
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``"file:line"`` the record came from (used in error messages; not written).
    source: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> RefRecord:
        """Build a record from a JSON object; raises :class:`DataError` naming ``source`` if invalid."""
        where = source or "record"
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
        for name in REQUIRED_FIELDS:
            if name not in data:
                raise DataError(f"{where}: missing required field '{name}'")
        if not isinstance(data["sent"], str):
            raise DataError(f"{where}: field 'sent' must be a string")
        if not isinstance(data["file_name"], str) or not data["file_name"]:
            raise DataError(f"{where}: field 'file_name' must be a non-empty string")
        if not isinstance(data["image_id"], (int, str)) or isinstance(data["image_id"], bool):
            raise DataError(f"{where}: field 'image_id' must be an integer or a string")
        referred = data.get("referred_ann_ids") or []
        if not isinstance(referred, list):
            raise DataError(f"{where}: field 'referred_ann_ids' must be a list")
        extra = {k: v for k, v in data.items() if k not in KNOWN_FIELDS}
        return cls(
            image_id=data["image_id"],
            sent=data["sent"],
            file_name=data["file_name"],
            segmentation=data["segmentation"],
            split=data.get("split"),
            bbox=data.get("bbox"),
            category_name=data.get("category_name"),
            category_id=data.get("category_id"),
            ann_id=data.get("ann_id"),
            rule=data.get("rule"),
            referred_ann_ids=list(referred),
            extra=extra,
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON object of this record: known fields that are set, then the unknown fields."""
        out: dict[str, Any] = {}
        for name in KNOWN_FIELDS:
            value = getattr(self, name)
            if name in REQUIRED_FIELDS or (value is not None and value != []):
                out[name] = value
        out.update(self.extra)
        return out

    @property
    def sample_id(self) -> str:
        """Stable id of the sample: ``"<file name>:<line>"`` of its source, or '' if not from a file."""
        if not self.source:
            return ""
        path, _, line = self.source.rpartition(":")
        return f"{Path(path).name}:{line}" if path else self.source

    def mask_size(self) -> tuple[int, int] | None:
        """``(H, W)`` stored in the RLE segmentation, or None for polygons (size comes from the image)."""
        return segmentation_size(self.segmentation, self.source)

    def decode(self, height: int | None = None, width: int | None = None) -> np.ndarray:
        """Decoded target mask (bool ``H x W``); errors name this record's source."""
        return decode_mask(self.segmentation, height, width, source=self.source)


def read_jsonl(path: str | os.PathLike[str]) -> list[RefRecord]:
    """Read a JSONL file of records (blank lines are skipped; a UTF-8 BOM at the start is ignored).

    Raises :class:`DataError` ``"<file>:<line>: ..."`` for a line that is not JSON, not an object, or
    lacks a required field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading BOM (Windows editors) is dropped
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read JSONL ({_one_line(exc)})") from None
    records: list[RefRecord] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        records.append(RefRecord.from_dict(data, source=source))
    return records


def unsafe_file_name(name: str) -> str | None:
    """Why ``name`` would leave the image folder it is relative to (an absolute path, a drive, a
    ``..`` component, a NUL byte), or None when it stays inside."""
    if "\x00" in name:
        return "contains a NUL byte"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "is an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "has a '..' component"
    return None


def expression_problem(sent: str) -> str | None:
    """Why ``sent`` cannot be used as a referring expression (empty, whitespace only, longer than
    ``MAX_EXPRESSION_CHARS``), or None."""
    from rsrefseg.inference.defaults import MAX_EXPRESSION_CHARS

    if not sent.strip():
        return "expression 'sent' is empty"
    if len(sent) > MAX_EXPRESSION_CHARS:
        return f"expression 'sent' has {len(sent)} characters; at most {MAX_EXPRESSION_CHARS} are accepted"
    return None


def record_problem(record: RefRecord) -> str | None:
    """The one-line reason (naming ``file:line``) a record cannot be used for training or
    evaluation before any file is opened: a ``file_name`` leaving the image folder (see
    :func:`unsafe_file_name`) or an unusable expression (see :func:`expression_problem`)."""
    where = record.source or "record"
    reason = unsafe_file_name(record.file_name)
    if reason is not None:
        return (f"{where}: file_name {record.file_name!r} {reason}; file names must be relative to the image "
                "folder and stay inside it")
    reason = expression_problem(record.sent)
    return None if reason is None else f"{where}: {reason}"


def check_records(records: list[RefRecord]) -> None:
    """Raise :class:`DataError` for the first record with a :func:`record_problem`."""
    for record in records:
        reason = record_problem(record)
        if reason is not None:
            raise DataError(reason)


def record_key(record: RefRecord) -> str:
    """What makes two records the same sample: image, expression and target mask."""
    return json.dumps([record.file_name, record.sent, record.segmentation], sort_keys=True, default=str)


def find_duplicates(records: list[RefRecord]) -> list[tuple[int, int]]:
    """``(index, index of its first occurrence)`` of every record equal to an earlier one (same
    ``file_name``, ``sent`` and ``segmentation``)."""
    first: dict[str, int] = {}
    found = []
    for index, record in enumerate(records):
        key = record_key(record)
        if key in first:
            found.append((index, first[key]))
        else:
            first[key] = index
    return found


def write_jsonl(records: list[RefRecord], path: str | os.PathLike[str]) -> None:
    """Write records as JSONL atomically (unknown fields round-trip; ``source`` is not written)."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _rle_string_counts(counts: str, where: str) -> np.ndarray:
    """Run lengths (int64) of a COCO compressed RLE string, decoded with numpy.

    The code of ``maskApi.c``: each value is a little-endian sequence of 5-bit chunks stored as
    ``chr(48 + chunk)``, bit 0x20 meaning "more chunks follow" and bit 0x10 of the last chunk the
    sign; values from the third on are deltas to the value two places before.
    """
    try:
        raw = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError:
        raise DataError(f"{where}: RLE counts string has an invalid (non-ASCII) character") from None
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    if raw.min() < 0 or raw.max() >= 64:
        raise DataError(f"{where}: RLE counts string has an invalid character")
    more = (raw & 0x20) > 0
    if more[-1]:
        raise DataError(f"{where}: RLE counts string is truncated")
    ends = np.flatnonzero(~more)  # last chunk of every value
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 12:  # more than 60 bits: not a pixel count
        raise DataError(f"{where}: RLE counts string has an out-of-range value")
    chunk_pos = np.arange(raw.size) - np.repeat(starts, lengths)  # index of each chunk in its value
    values = np.add.reduceat((raw & 0x1F) << (5 * chunk_pos), starts)
    negative = (raw[ends] & 0x10) > 0
    values[negative] -= np.int64(1) << (5 * lengths[negative])  # sign extension
    if np.abs(values).max() > MAX_RLE_PIXELS:  # keeps the sums below exact in int64 (and in pycocotools)
        raise DataError(f"{where}: RLE counts string has an out-of-range value")
    # Undo the delta coding: runs[m] = values[m] + runs[m - 2] for m > 2.
    runs = values.copy()
    runs[3::2] = np.cumsum(values[1::2])[1:]
    runs[4::2] = np.cumsum(values[2::2])[1:]
    return runs


def _rle_parts(segmentation: Any, where: str) -> list[dict[str, Any]] | None:
    """The RLE dicts of a segmentation, or None if it is a polygon list."""
    if isinstance(segmentation, dict):
        return [segmentation]
    if isinstance(segmentation, list) and segmentation and all(isinstance(s, dict) for s in segmentation):
        return list(segmentation)
    if isinstance(segmentation, list) and segmentation and all(isinstance(s, list) for s in segmentation):
        return None
    raise DataError(f"{where}: segmentation must be an RLE dict, a list of RLE dicts or a list of polygons")


def _validated_rle(rle: dict[str, Any], where: str) -> tuple[dict[str, Any], np.ndarray]:
    """Check an RLE dict (``counts`` str, bytes or list) and return it in pycocotools form (bytes
    counts) with its run lengths."""
    size = rle.get("size")
    counts = rle.get("counts")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in size)
    ):
        raise DataError(f"{where}: RLE 'size' must be [height, width], got {size!r}")
    height, width = int(size[0]), int(size[1])
    if height * width > MAX_RLE_PIXELS:
        raise DataError(f"{where}: RLE size {height}x{width} is larger than COCO RLE can hold "
                        f"({MAX_RLE_PIXELS} pixels)")
    if isinstance(counts, bytes):  # in-memory pycocotools RLE
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        runs = _rle_string_counts(counts, where)
    elif isinstance(counts, list) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                          for v in counts):
        if any(not 0 <= v <= MAX_RLE_PIXELS for v in counts):  # before numpy: no overflow on huge ints
            raise DataError(f"{where}: RLE counts hold a value outside [0, {MAX_RLE_PIXELS}]")
        runs = np.asarray(counts, dtype=np.int64)
    else:
        raise DataError(f"{where}: RLE 'counts' must be a string or a list of integers")
    if runs.size and (runs.min() < 0 or runs.max() > MAX_RLE_PIXELS):
        raise DataError(f"{where}: RLE counts hold a value outside [0, {MAX_RLE_PIXELS}]")
    total = int(runs.sum())
    if total != height * width:
        raise DataError(
            f"{where}: RLE counts do not cover its size {height}x{width} (sum {total} != {height * width})"
        )
    if isinstance(counts, str):
        return {"size": [height, width], "counts": counts.encode("ascii")}, runs
    # Uncompressed counts -> compressed RLE understood by pycocotools.
    uncompressed = {"size": [height, width], "counts": [int(v) for v in runs]}
    return mask_utils.frPyObjects(uncompressed, height, width), runs


def segmentation_size(segmentation: Any, source: str = "") -> tuple[int, int] | None:
    """``(H, W)`` of an RLE segmentation, None for polygons. Several RLEs must agree in size."""
    where = source or "segmentation"
    parts = _rle_parts(segmentation, where)
    if parts is None:
        return None
    sizes = {tuple(_validated_rle(p, where)[0]["size"]) for p in parts}
    if len(sizes) != 1:
        raise DataError(f"{where}: RLE parts have different sizes {sorted(sizes)}")
    height, width = sizes.pop()
    return int(height), int(width)


def segmentation_area(segmentation: Any, source: str = "") -> int | None:
    """Foreground pixel count of a single-RLE segmentation without decoding it (None otherwise)."""
    where = source or "segmentation"
    parts = _rle_parts(segmentation, where)
    if parts is None or len(parts) != 1:
        return None
    _, runs = _validated_rle(parts[0], where)
    return int(runs[1::2].sum())  # odd runs are foreground


def decode_mask(
    segmentation: Any,
    height: int | None = None,
    width: int | None = None,
    source: str = "",
) -> np.ndarray:
    """Decode a segmentation to a bool mask of shape ``H x W``.

    ``height``/``width`` are required for polygons; for an RLE they are optional and, if given, must
    equal the RLE size (else :class:`DataError` naming ``source``). Several parts are merged by union.
    """
    rle = segmentation_to_rle(segmentation, height, width, source)
    return mask_utils.decode(rle).astype(bool)  # H x W uint8 -> bool


def segmentation_to_rle(
    segmentation: Any,
    height: int | None = None,
    width: int | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Validate a segmentation and return it as one pycocotools RLE (``counts`` as bytes).

    Same rules as :func:`decode_mask`, without decoding (use ``pycocotools.mask.area``/``toBbox``).
    """
    where = source or "segmentation"
    parts = _rle_parts(segmentation, where)
    if parts is None:
        if height is None or width is None:
            raise DataError(f"{where}: polygon segmentation needs the image height and width")
        polygons = []
        for poly in segmentation:
            if len(poly) < 6 or len(poly) % 2 or not all(isinstance(v, (int, float)) for v in poly):
                raise DataError(f"{where}: a polygon must be a flat list of at least 3 (x, y) pairs")
            polygons.append([float(v) for v in poly])
        rles = mask_utils.frPyObjects(polygons, int(height), int(width))
    else:
        rles = [_validated_rle(p, where)[0] for p in parts]
        sizes = {tuple(r["size"]) for r in rles}
        if len(sizes) != 1:
            raise DataError(f"{where}: RLE parts have different sizes {sorted(sizes)}")
        mask_h, mask_w = sizes.pop()
        if (height is not None and height != mask_h) or (width is not None and width != mask_w):
            raise DataError(
                f"{where}: RLE size {mask_h}x{mask_w} disagrees with the image size {height}x{width}"
            )
    return rles[0] if len(rles) == 1 else mask_utils.merge(rles, intersect=False)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode a bool ``H x W`` mask as COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_mask expects an H x W mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))  # column-major as COCO wants
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}
