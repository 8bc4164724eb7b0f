"""``rsrefseg data ...`` subcommands: inspect, from-coco, convert-rrsisd.

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
    return data
