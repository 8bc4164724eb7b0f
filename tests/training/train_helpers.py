"""Helpers of the training/evaluation tests: a synthetic referring dataset and a micro model config.

The synthetic set has small RGB images with a red square and a blue disc on noise; expressions
("the red square", "the blue circle", "the square on the left"...) refer to one shape each. The
micro model is the ``tiny`` preset at a 64-pixel input, so a training step takes a few ms.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: ``tiny`` at a 64 x 64 input (SAM grid 4, CLIP grid 4): the fastest model the classes allow.
MICRO_OVERRIDES: dict[str, Any] = {
    "sam_image_size": 64,
    "clip_image_size": 64,
    "arch_overrides": {"sam": {"vision_config": {"image_size": 64, "window_size": 4}},
                       "clip": {"vision_config": {"image_size": 64}}},
}


def make_synthetic(root: Path, n_train: int = 24, n_val: int = 10, seed: int = 0) -> dict[str, Path]:
    """Write ``images/*.png``, ``train.jsonl`` and ``val.jsonl`` (two records per image) under ``root``."""
    from PIL import Image

    from rsrefseg.data.records import RefRecord, encode_mask, write_jsonl

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[RefRecord]] = {"train": [], "val": []}
    for k in range(n_train + n_val):
        split = "train" if k < n_train else "val"
        h, w = int(rng.integers(40, 72)), int(rng.integers(40, 72))
        image = rng.integers(0, 90, size=(h, w, 3)).astype(np.uint8)
        yy, xx = np.mgrid[0:h, 0:w]
        s = int(rng.integers(8, 14))
        sy, sx = int(rng.integers(0, h - s)), int(rng.integers(0, w // 2 - s // 2))
        square = (yy >= sy) & (yy < sy + s) & (xx >= sx) & (xx < sx + s)
        r = int(rng.integers(4, 8))
        cy, cx = int(rng.integers(r, h - r)), int(rng.integers(w // 2 + r // 2, w - r))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[square] = (220, 30, 30)
        image[disc] = (30, 60, 230)
        name = f"{k:03d}.png"
        Image.fromarray(image).save(root / "images" / name)
        for sent, mask, cat in (("the red square", square, "square"), ("the blue circle", disc, "circle")):
            if rng.random() < 0.3:
                sent = "the square on the left" if cat == "square" else "the circle on the right"
            splits[split].append(RefRecord(image_id=k, sent=sent, file_name=name, segmentation=encode_mask(mask),
                                           split=split, category_name=cat, rule="only"))
    paths = {"root": root, "images": root / "images"}
    for split, records in splits.items():
        write_jsonl(records, root / f"{split}.jsonl")
        paths[split] = root / f"{split}.jsonl"
    return paths


def micro_config(data: dict[str, Path], work_dir: Path, **top: Any) -> dict[str, Any]:
    """A training config dict for the micro model on the synthetic set; ``top`` overrides keys."""
    config: dict[str, Any] = {
        "model": {"preset": "tiny", "random_init": True, "overrides": dict(MICRO_OVERRIDES)},
        "data": {"train_jsonl": str(data["train"]), "train_images": str(data["images"]),
                 "val_jsonl": str(data["val"]), "val_images": str(data["images"]), "cache": False},
        "optim": {"lr": 1e-3},
        "schedule": {"epochs": 2, "warmup_steps": 3},
        "loss": {"bce_weight": 5.0, "dice_weight": 1.0},
        "work_dir": str(work_dir),
        "batch_size": 4,
        "tensorboard": False,
        "progress": False,
        "report_overlays": 1,
        "num_threads": 1,
    }
    for key, value in top.items():
        section, _, name = key.partition("__")
        if name:
            config[section][name] = value
        else:
            config[key] = value
    return config


def write_yaml(config: dict[str, Any], path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def cli_env() -> dict[str, str]:
    """Environment of CLI subprocesses: one thread each (reproducible numerics), quiet libraries."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    return env


def rsrefseg_cmd(*args: str) -> list[str]:
    """``python -m rsrefseg ARGS`` with this interpreter."""
    return [sys.executable, "-m", "rsrefseg", *args]


def free_port() -> int:
    """A TCP port that is free right now (rendezvous of the launched processes)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accelerate_cmd(n: int, *args: str) -> tuple[list[str], dict[str, str]]:
    """``(command, env)`` launching ``n`` CPU processes with ``accelerate launch``.

    ``accelerate launch --cpu --num_processes N`` starts ONE process unless an MPI hostfile is given
    (accelerate 1.x uses its simple launcher for --cpu); ``--multi_gpu`` with ``ACCELERATE_USE_CPU=1``
    starts N processes through torchrun that join a gloo (MULTI_CPU) group.
    """
    env = cli_env()
    env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *args]
    return cmd, env


def nontrivial_weights(model: Any, seed: int = 0) -> Any:
    """Make a random-init model's outputs and gradients non-trivial, in place (gradient tests).

    The mask hypernetworks' last layers are scaled by 1000 (logits of O(0.1) instead of O(1e-4),
    as ``tests/inference/conftest.py``), and LoRA ``B`` matrices (zero at init, which leaves every
    LoRA ``A`` without gradient) get small random values.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "output_hypernetworks_mlps" in name and ".proj_out." in name:
                param.mul_(1000.0)
            elif ".lora_B." in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=g))
    return model


def grad_mismatch(a: dict[str, Any], b: dict[str, Any], floor: float = 1e-4) -> tuple[float, str]:
    """Worst relative difference between the gradients of two ``{name: grad}`` dicts, and its name.

    Per tensor ``max|a - b| / max(max|b|, floor * G)`` with ``G`` the largest gradient entry of all
    tensors: a tensor's own scale, except for gradients that are ~0 in exact arithmetic (e.g. the
    key biases of softmax attention, 1e-12 here), which are held to ``floor * G`` instead of to
    their own rounding noise.
    """
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    top = max(float(g.abs().max()) for g in b.values())
    worst, where = 0.0, ""
    for name, grad in b.items():
        err = float((a[name] - grad).abs().max()) / max(float(grad.abs().max()), floor * top, 1e-30)
        if err > worst:
            worst, where = err, name
    return worst, where
