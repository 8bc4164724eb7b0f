"""The ``rsrefseg`` command: thin argument parsing around the library.

Every sub-command lives in its own module with an ``add_parser(subparsers)`` function. User
errors (:class:`rsrefseg.errors.RSRefSegError`) print one ``error: ...`` line and exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

#: Modules that register sub-commands (imported lazily so `rsrefseg --help` stays fast).
COMMAND_MODULES = [
    "rsrefseg.cli.model_cli",
    "rsrefseg.cli.data_cli",
    "rsrefseg.cli.train_cli",
    "rsrefseg.cli.eval_cli",
    "rsrefseg.cli.predict_cli",
    "rsrefseg.cli.encode_cli",
    "rsrefseg.cli.serve_cli",
    "rsrefseg.cli.bench_cli",
]


def build_parser() -> argparse.ArgumentParser:
    from rsrefseg import __version__

    parser = argparse.ArgumentParser(
        prog="rsrefseg",
        description="Referring remote-sensing image segmentation (SigLIP/CLIP + SAM + LoRA).",
    )
    parser.add_argument("--version", action="version", version=f"rsrefseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not shipped in this build
                continue
            raise
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)
        elif hasattr(module, "add_data_parser"):
            module.add_data_parser(subparsers)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    _quiet_libraries()
    from rsrefseg.allocator import retain_freed_memory

    retain_freed_memory()  # large tensors reuse freed memory instead of page-faulting (see the module)
    from rsrefseg.errors import RSRefSegError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RSRefSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
