"""Convert the raw RRSIS-D release (RefCOCO style) to JSONL records, one per sentence.

Input:

- ``refs(unc).p``: a pickle of a list of refs ``{"ref_id", "image_id", "ann_id", "split",
  "category_id", "sentences": [{"sent", "raw", "sent_id", ...}], ...}``;
- ``instances.json``: COCO ``images`` / ``annotations`` / ``categories``.

Output: ``<out>/<split>.jsonl`` for each split. The pickle is read with a restricted unpickler that
only accepts plain containers (no classes), so a malicious file cannot run code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from rsrefseg.data.records import RefRecord, segmentation_size, write_jsonl
from rsrefseg.errors import DataError


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: only lists, dicts, strings and numbers load."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def load_refs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Load the refs pickle (Python 2 pickles are read with ``latin1`` strings)."""
    path = Path(path)
    try:
        data = _PlainUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # any unpickling failure is a bad user file
        raise DataError(f"{path}: cannot read refs pickle ({' '.join(str(exc).split())})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: refs pickle must hold a list of dicts")
    return data


def load_coco(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a COCO instances file, checking it has ``images`` and ``annotations`` lists."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM (Windows editors) is dropped
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read COCO JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations")
    ):
        raise DataError(f"{path}: not a COCO instances file (needs 'images' and 'annotations' lists)")
    return data


def to_compressed_rle(segmentation: Any, height: int, width: int, where: str) -> dict[str, Any]:
    """Any COCO segmentation -> one compressed RLE ``{"size", "counts": str}``.

    RLEs keep their own size (the mask is authoritative, see ``datasets``); polygons are rasterised
    at the image size.
    """
    if isinstance(segmentation, list) and len(segmentation) == 1 and isinstance(segmentation[0], dict):
        segmentation = segmentation[0]
    size = segmentation_size(segmentation, where)
    if size is None:
        if not isinstance(segmentation, list) or not segmentation:
            raise DataError(f"{where}: empty segmentation")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation["counts"], str):
        return {"size": [int(size[0]), int(size[1])], "counts": segmentation["counts"]}
    elif isinstance(segmentation, dict):  # uncompressed counts
        rle = mask_utils.frPyObjects(segmentation, size[0], size[1])
    else:  # several RLE parts -> union
        parts = [
            {"size": p["size"], "counts": p["counts"].encode("ascii")}
            if isinstance(p["counts"], str)
            else mask_utils.frPyObjects(p, size[0], size[1])
            for p in segmentation
        ]
        rle = mask_utils.merge(parts)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def convert_rrsisd(
    refs_path: str | os.PathLike[str],
    instances_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
) -> dict[str, int]:
    """Write ``<out_dir>/<split>.jsonl`` (one record per sentence); return records per split."""
    refs_path, instances_path, out_dir = Path(refs_path), Path(instances_path), Path(out_dir)
    refs = load_refs(refs_path)
    coco = load_coco(instances_path)
    images = {img["id"]: img for img in coco["images"]}
    anns = {ann["id"]: ann for ann in coco["annotations"]}
    categories = {cat["id"]: cat.get("name") for cat in coco.get("categories", [])}

    by_split: dict[str, list[RefRecord]] = defaultdict(list)
    for position, ref in enumerate(refs):
        where = f"{refs_path}: ref {ref.get('ref_id', f'#{position}')}"
        for key in ("image_id", "ann_id", "split", "sentences"):
            if key not in ref:
                raise DataError(f"{where}: missing field '{key}'")
        image = images.get(ref["image_id"])
        if image is None:
            raise DataError(f"{where}: image_id {ref['image_id']} not in {instances_path}")
        ann = anns.get(ref["ann_id"])
        if ann is None:
            raise DataError(f"{where}: ann_id {ref['ann_id']} not in {instances_path}")
        rle = to_compressed_rle(ann.get("segmentation"), int(image["height"]), int(image["width"]), where)
        category_id = ref.get("category_id", ann.get("category_id"))
        for sentence in ref["sentences"]:
            text = (sentence.get("sent") or sentence.get("raw")) if isinstance(sentence, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{where}: a sentence has no 'sent' text")
            extra = {"ref_id": ref.get("ref_id")}
            if isinstance(sentence, dict) and "sent_id" in sentence:
                extra["sent_id"] = sentence["sent_id"]
            by_split[str(ref["split"])].append(
                RefRecord(
                    image_id=ref["image_id"],
                    sent=text,
                    file_name=str(image["file_name"]),
                    segmentation=rle,
                    split=str(ref["split"]),
                    bbox=ann.get("bbox"),
                    category_name=categories.get(category_id),
                    category_id=category_id,
                    ann_id=ref["ann_id"],
                    extra=extra,
                )
            )
    counts = Counter({split: len(records) for split, records in by_split.items()})
    for split, records in sorted(by_split.items()):
        write_jsonl(records, out_dir / f"{split}.jsonl")
    return dict(sorted(counts.items()))
