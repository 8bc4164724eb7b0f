"""Run by ``accelerate launch`` in test_accelerate_ddp.py: train a few steps and write, from every
process, a hash of its weights after each optimizer step (``<out>/hash-<rank>.txt``)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import torch

from rsrefseg.training.train import train
from rsrefseg.training.train_config import load_config


def main() -> None:
    config, out = load_config(sys.argv[1]), Path(sys.argv[2])
    lines: list[str] = []

    def record(state: Any, model: torch.nn.Module) -> None:
        digest = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        lines.append(f"{state.global_step} {state.epoch} {state.batch_in_epoch} {digest.hexdigest()}")

    result = train(config, step_callback=record)
    from accelerate import PartialState

    rank = PartialState().process_index
    (out / f"hash-{rank}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"rank {rank}: {len(lines)} steps, stopped by {result.stopped_by}")


if __name__ == "__main__":
    main()
