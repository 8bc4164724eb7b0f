"""``rsrefseg bench``: the benchmark suite (roofline, FLOPs and time per stage, pipelines, memory)."""

from __future__ import annotations

import argparse
from typing import Any


def _bench(args: argparse.Namespace) -> int:
    from rsrefseg.bench.suite import agreement_args, run_suite, train_options

    agreement = agreement_args(args)
    train = train_options(args)
    # The command as parsed (sys.argv is another program's when called in-process, e.g. by tests).
    command = ["rsrefseg", "bench", "--preset", str(args.preset), "--reps", str(args.reps), "--out", str(args.out)]
    command += ["--smoke"] if args.smoke else []
    if agreement is not None:
        command += ["--agreement", agreement[0], "--agreement-data", agreement[1], "--agreement-images", agreement[2]]
    if train is not None:
        command += ["--train-only" if train["only"] else "--train", "--train-presets", ",".join(train["presets"]),
                    "--train-reps", str(train["reps"]), "--train-budget", f"{train['budget_min']:g}"]
        command += ["--train-trace-cache", train["trace_cache"]] if train["trace_cache"] else []
    run_suite(args.preset, args.reps, args.out, args.smoke, args.threads, args.bf16, args.memory, argv=command,
              agreement=agreement, train=train)
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
