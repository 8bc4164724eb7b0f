"""``rsrefseg info`` (parameter counts per component) and ``rsrefseg init-base`` (offline bases)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def parameter_table(model: Any) -> list[tuple[str, int, int]]:
    """Rows (component, total parameters, trainable parameters); LoRA counted on its own row."""

    def count(module: nn.Module, lora: bool | None = None) -> tuple[int, int]:
        total = trainable = 0
        for name, p in module.named_parameters():
            if lora is not None and (".lora_" in f".{name}") != lora:
                continue
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return total, trainable

    clip = model.clip.model
    rows: list[tuple[str, int, int]] = []
    vision = [clip.vision_model] + ([clip.visual_projection] if hasattr(clip, "visual_projection") else [])
    text = [clip.text_model] + ([clip.text_projection] if hasattr(clip, "text_projection") else [])
    for label, modules in (("clip.vision", vision), ("clip.text", text)):
        t = [count(m, lora=False) for m in modules]
        rows.append((label, sum(a for a, _ in t), sum(b for _, b in t)))
    scale = sum(p.numel() for n, p in clip.named_parameters() if n.startswith("logit_"))
    own_bias = sum(p.numel() for p in model.clip.parameters(recurse=False))
    rows.append(("clip.logit_scale/bias", scale + own_bias, own_bias))
    sam = model.sam
    rows.append(("sam.vision_encoder", *count(sam.vision_encoder, lora=False)))
    pe = sam.shared_image_embedding.positional_embedding.numel()
    pt, ptr = count(sam.prompt_encoder, lora=False)
    rows.append(("sam.prompt_encoder", pt, ptr))
    rows.append(("sam.mask_decoder", *count(sam.mask_decoder, lora=False)))
    del pe  # the shared positional embedding is tied to the prompt encoder's (counted once)
    rows.append(("prompter", *count(model.prompter)))
    rows.append(("lora", *count(model, lora=True)))
    return rows


def _info(args: argparse.Namespace) -> int:
    from rsrefseg.build import build_from_preset

    model = build_from_preset(args.preset, device="meta", finetune=args.finetune)
    rows = parameter_table(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.config
    print(f"preset {args.preset}: SAM input {cfg.sam_image_size}, "
          f"CLIP input {cfg.clip_image_size}, text {cfg.max_text_length} tokens, finetune={cfg.finetune}")
    from rsrefseg.build import PRESETS

    print(f"base ids: clip={PRESETS[args.preset]().clip_model} sam={PRESETS[args.preset]().sam_model}")
    print(f"{'component':<24}{'parameters':>16}{'trainable':>16}")
    for name, n, t in rows:
        print(f"{name:<24}{n:>16,}{t:>16,}")
    print(f"{'total':<24}{total:>16,}{trainable:>16,}")
    print(f"total {total / 1e9:.3f} B parameters, trainable {trainable / 1e6:.2f} M ({100 * trainable / total:.2f} %)")
    return 0


def _init_base(args: argparse.Namespace) -> int:
    from rsrefseg.build import write_base

    out = write_base(args.preset, args.directory)
    print(f"wrote {args.preset} base weights (random init, Hugging Face layout) to {out}/clip and {out}/sam")
    return 0


def add_parser(subparsers: Any) -> None:
    from rsrefseg.config import PRESET_NAMES

    p = subparsers.add_parser("info", help="parameter counts of a preset (built on the meta device, no download)")
    p.add_argument("--preset", default="rsrefseg-b", choices=PRESET_NAMES)
    p.add_argument("--finetune", default="lora", choices=["lora", "full"])
    p.set_defaults(func=_info)
    p = subparsers.add_parser(
        "init-base", help="write a preset's architecture with random weights as Hugging Face directories"
    )
    p.add_argument("preset", choices=PRESET_NAMES)
    p.add_argument("directory")
    p.set_defaults(func=_init_base)
