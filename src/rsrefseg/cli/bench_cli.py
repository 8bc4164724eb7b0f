"""``rsrefseg bench``: the benchmark suite (roofline, FLOPs and time per stage, pipelines, memory)."""

from __future__ import annotations

import argparse
from typing import Any


def _bench(args: argparse.Namespace) -> int:
    import sys

    from rsrefseg.bench.suite import run_suite

    run_suite(args.preset, args.reps, args.out, args.smoke, args.threads, args.bf16, args.memory,
              argv=["rsrefseg", *sys.argv[1:]])
    return 0


def add_parser(subparsers: Any) -> None:
    from rsrefseg.bench.suite import add_arguments

    p = subparsers.add_parser(
        "bench",
        help="benchmark suite: matmul roofline, FLOPs and time per stage, first/further expressions, memory",
        description="Runs every measurement in one process (min and median over --reps after a warm-up), "
        "writes a JSON report atomically and prints a table.",
    )
    add_arguments(p)
    p.set_defaults(func=_bench)
