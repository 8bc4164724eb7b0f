"""``rsrefseg train --config C.yaml [--section.key VALUE ...] [--resume [DIR|auto]]``.

Any config field can be overridden with a dotted option: ``--optim.lr 3e-4 --batch_size 4
--model.overrides.finetune full``. Unknown keys are errors naming the key.
Multi-GPU / multi-node: ``accelerate launch -m rsrefseg train --config C.yaml``. Several CPU
processes: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m rsrefseg train
...`` (``accelerate launch --cpu`` starts a single process unless MPI is configured).
"""

from __future__ import annotations

import argparse
from typing import Any


def _train(args: argparse.Namespace) -> int:
    from rsrefseg.training.train_config import dump_config, load_config, parse_overrides

    config = load_config(args.config, parse_overrides(args.overrides))
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    from rsrefseg.training.train import train

    result = train(config, resume=args.resume)
    if result.report:
        print(f"stopped by: {result.stopped_by}; best checkpoint: {result.best_checkpoint}; "
              f"report: {result.report['dir']}")
    return 0


class _OverridesParser(argparse.ArgumentParser):
    """A sub-command parser that keeps unknown ``--dotted.key value`` pairs in ``args.overrides``
    (the main parser would otherwise reject them)."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        parsed.overrides = list(getattr(parsed, "overrides", []) or []) + rest
        return parsed, []


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a YAML config (accelerate: single process or `accelerate launch`)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.__class__ = _OverridesParser  # same parser, plus override collection
    p.add_argument("--config", default=None, help="YAML config (see configs/); defaults apply without one")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="DIR|auto",
                   help="continue from a checkpoint folder, or the newest one of work_dir (auto, the default)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_train, overrides=[])
