"""``rsrefseg data ...`` subcommands: inspect, from-coco, convert-rrsisd, download.

Wire-up (in ``cli/main.py``)::

    data_parser = add_data_parser(subparsers)
    args = parser.parse_args(); return args.func(args)

Handlers return an exit status and let :class:`rsrefseg.errors.RSRefSegError` propagate, so the
main command prints ``error: <one line>`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print statistics of a JSONL file (``--json`` for machine-readable output); exit 1 when it
    flags problems, 0 when clean (2, through the main command, for an unusable file)."""
    from rsrefseg.data.inspect import format_report, has_problems, inspect_jsonl

    report = inspect_jsonl(args.file, image_dir=args.images)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if has_problems(report) else 0


def cmd_from_coco(args: argparse.Namespace) -> int:
    """Generate rule-based referring records from COCO instances and write them as JSONL."""
    from rsrefseg.data.from_coco import RuleConfig, format_stats, from_coco_file
    from rsrefseg.data.records import write_jsonl

    skip = tuple(name for name in args.skip_classes.split(",") if name.strip())
    rules = tuple(name.strip() for name in args.rules.split(",") if name.strip())
    config = RuleConfig(margin_frac=args.margin, size_ratio=args.size_ratio, skip_classes=skip, rules=rules)
    records, stats = from_coco_file(
        args.annotations, image_dir=args.images, seed=args.seed, split=args.split, config=config
    )
    write_jsonl(records, args.out)
    print(format_stats(stats))
    print(f"wrote {len(records)} records to {args.out}")
    return 0


def cmd_convert_rrsisd(args: argparse.Namespace) -> int:
    """Convert the raw RRSIS-D release to ``<out>/<split>.jsonl``."""
    from rsrefseg.data.rrsisd import convert_rrsisd

    counts = convert_rrsisd(args.refs, args.instances, args.out)
    for split, n in counts.items():
        print(f"{split}: {n} records -> {args.out}/{split}.jsonl")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """Download a public dataset, verify it and lay it out (``data download nwpu-vhr10``)."""
    from rsrefseg.cli.progress import progress_style
    from rsrefseg.data.nwpu_vhr10 import download_nwpu
    from rsrefseg.paths import nwpu_download_root

    out = args.out or str(nwpu_download_root())
    reporter = _DownloadProgress(progress_style(args))
    try:
        result = download_nwpu(out, mirror=args.mirror, images_md5=args.images_md5,
                               annotations_md5=args.annotations_md5, keep_downloads=args.keep_downloads,
                               on_progress=reporter)
    finally:
        reporter.close()
    if result.skipped:
        print(f"{result.out}: already downloaded and verified; nothing to do")
        return 0
    counts = ", ".join(f"{split} {n} objects" for split, n in result.annotations.items())
    same = all(result.identical.values())
    print(f"{result.out}: {result.images} images, {counts}; split "
          + ("byte-identical to the reference copy" if same else "as the shipped split list (bytes differ from the "
             "reference copy's)"))
    return 0


class _DownloadProgress:
    """``(stage, done, total)`` callback drawing a tqdm bar per stage, JSON lines, or nothing."""

    def __init__(self, style: str) -> None:
        self.style, self.stage, self.bar = style, None, None

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self.style == "json":
            from rsrefseg.cli.progress import emit

            emit("progress", stage=stage, done=done, total=total,
                 fraction=None if not total else round(min(1.0, done / total), 6), message="")
        elif self.style == "bar":
            if stage != self.stage:
                from tqdm.auto import tqdm

                self.close()
                unit = "file" if stage == "extract" else "B"
                self.stage = stage
                self.bar = tqdm(total=total, desc=stage, unit=unit, unit_scale=unit == "B", dynamic_ncols=True)
            if self.bar is not None:
                self.bar.total = total
                self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``data`` and its subcommands on an ``add_subparsers()`` object; returns the parser."""
    data = subparsers.add_parser("data", help="prepare and inspect referring datasets")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect", help="statistics and problems of a referring JSONL file (exit 1 if problems are found)",
        description="Statistics of a referring JSONL file. Exit status: 0 clean, 1 problems found (bad masks or "
                    "bboxes, duplicates, file names leaving the image folder, missing images, size mismatches), "
                    "2 unusable input.")
    inspect.add_argument("file", help="JSONL file of records")
    inspect.add_argument("--images", default=None, help="image folder: also check images and sizes")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=cmd_inspect)

    coco = commands.add_parser("from-coco", help="rule-generated referring records from COCO instances")
    coco.add_argument("--annotations", required=True, help="COCO instances JSON (e.g. instances_train.json)")
    coco.add_argument("--images", default=None, help="image folder: check every image exists with its size")
    coco.add_argument("--out", required=True, help="output JSONL")
    coco.add_argument("--seed", type=int, default=0, help="seed of the phrasing choice (default 0)")
    coco.add_argument("--split", default=None, help="split name (default: from instances_<split>.json)")
    coco.add_argument("--margin", type=float, default=0.10, help="extreme rule margin, fraction of the side")
    coco.add_argument("--size-ratio", type=float, default=1.5, help="size rule ratio to the runner-up")
    coco.add_argument(
        "--skip-classes",
        default="vehicle",
        help="comma-separated COCO class names to skip (default: vehicle, not exhaustively labelled "
        "in NWPU); '' keeps all",
    )
    coco.add_argument("--rules", default="only,extreme,size,group", help="comma-separated rules to use")
    coco.set_defaults(func=cmd_from_coco)

    rrsisd = commands.add_parser("convert-rrsisd", help="raw RRSIS-D (refs(unc).p + instances.json) -> JSONL")
    rrsisd.add_argument("--refs", required=True, help="refs(unc).p pickle")
    rrsisd.add_argument("--instances", required=True, help="instances.json (COCO)")
    rrsisd.add_argument("--out", required=True, help="output folder for <split>.jsonl")
    rrsisd.set_defaults(func=cmd_convert_rrsisd)

    from rsrefseg.cli.progress import add_progress_args

    download = commands.add_parser(
        "download", help="download a public dataset (NWPU VHR-10), verify its checksums and lay it out",
        description="Download NWPU VHR-10 (images + COCO instance masks, the sources torchgeo documents), "
        "verify the published MD5s, extract into a temporary folder renamed when complete, and write "
        "annotations/instances_{train,val}.json with the shipped 520 / 130 split. An interrupted download "
        "is resumed by the next run; a finished folder is left alone.",
    )
    download.add_argument("dataset", choices=["nwpu-vhr10"], help="dataset to download")
    download.add_argument("--out", default=None,
                          help="output folder (default: .cache/nwpu-vhr10 in a source checkout, else "
                          "~/.cache/rsrefseg/nwpu-vhr10); rsrefseg finds it there when ../shared/data is absent")
    download.add_argument("--mirror", default=None, metavar="URL",
                          help="base URL holding 'NWPU VHR-10 dataset.zip' and annotations.json instead of the "
                          "public sources (env RSREFSEG_NWPU_MIRROR)")
    download.add_argument("--images-md5", default=None, help="expected MD5 of the image archive "
                          "(env RSREFSEG_NWPU_IMAGES_MD5; default: the published one)")
    download.add_argument("--annotations-md5", default=None, help="expected MD5 of annotations.json "
                          "(env RSREFSEG_NWPU_ANNOTATIONS_MD5; default: the published one)")
    download.add_argument("--keep-downloads", action="store_true",
                          help="keep the downloaded archive and annotations next to the output folder")
    add_progress_args(download)
    download.set_defaults(func=cmd_download)
    return data
