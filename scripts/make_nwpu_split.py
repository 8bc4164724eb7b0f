"""Write ``src/rsrefseg/assets/nwpu_vhr10_split.json`` from a reference copy of NWPU VHR-10.

The asset fixes the 520 / 130 train/val split that ``rsrefseg data download nwpu-vhr10``
reproduces: for each split, the images in the reference file's order as ``[file_name, image_id,
number of annotations]``, the split's annotation count, and the SHA-256 of the reference
``instances_<split>.json`` (a download that reproduces it exactly reports so).

    python scripts/make_nwpu_split.py [REFERENCE_ROOT]   # default: rsrefseg.paths.nwpu_root()
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

from rsrefseg.paths import nwpu_root, repo_root


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else nwpu_root()
    splits = {}
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}.json"
        raw = path.read_bytes()
        data = json.loads(raw)
        counts = Counter(a["image_id"] for a in data["annotations"])
        splits[split] = {
            "num_images": len(data["images"]),
            "num_annotations": len(data["annotations"]),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "images": [[im["file_name"], im["id"], counts[im["id"]]] for im in data["images"]],
        }
    header = {
        "dataset": "NWPU VHR-10 positive image set with the COCO instance masks of chaozhong2010/VHR-10_dataset_coco",
        "reference": "the train/val split of the copy this project was developed with (instances_{train,val}.json)",
        "image_entry": ["file_name", "image_id", "num_annotations"],
    }
    # One image per line: small diffs, readable.
    lines = ["{"]
    for key, value in header.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    lines.append('  "splits": {')
    for i, (split, spec) in enumerate(splits.items()):
        lines.append(f"    {json.dumps(split)}: {{")
        for key in ("num_images", "num_annotations", "sha256"):
            lines.append(f"      {json.dumps(key)}: {json.dumps(spec[key])},")
        lines.append('      "images": [')
        rows = [f"        {json.dumps(entry)}" for entry in spec["images"]]
        lines.append(",\n".join(rows))
        lines.append("      ]")
        lines.append("    }" + ("," if i == 0 else ""))
    lines.append("  }")
    lines.append("}")
    out = repo_root() / "src" / "rsrefseg" / "assets" / "nwpu_vhr10_split.json"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    json.loads(out.read_text(encoding="utf-8"))  # well-formed
    print(f"wrote {out} ({splits['train']['num_images']} / {splits['val']['num_images']} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
