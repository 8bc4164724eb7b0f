"""LoRA through ``peft``: which layers get adapters, what trains, and merging for inference."""

from __future__ import annotations

from torch import nn

from rsrefseg.config import RSRefSegConfig

#: Module-name patterns (full match) of the LoRA targets, relative to an RSRefSeg model.
SAM_TARGETS = [
    r"sam\.vision_encoder\.layers\.\d+\.attn\.(qkv|proj)",
    r"sam\.vision_encoder\.layers\.\d+\.mlp\.(lin1|lin2)",
    r"sam\.vision_encoder\.neck\.(conv1|conv2)",
]
VISION_TARGETS = [r"clip\.model\.vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"]
TEXT_TARGETS = [
    r"clip\.model\.text_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    r"clip\.model\.text_model\.head",  # SigLIP's text head
    r"clip\.model\.text_projection",  # CLIP's text head
]
#: Parameter-name prefixes trained in full in "lora" mode.
TRAINED_PREFIXES = ("prompter.", "sam.prompt_encoder.", "sam.mask_decoder.", "clip.logit_bias")


def lora_target_pattern(config: RSRefSegConfig) -> str | None:
    """One regular expression for peft's ``target_modules`` (None when no tower gets LoRA)."""
    patterns: list[str] = []
    if config.lora_sam:
        patterns += SAM_TARGETS
    if config.lora_vision:
        patterns += VISION_TARGETS
    if config.lora_text:
        patterns += TEXT_TARGETS
    if not patterns or config.lora_r <= 0:
        return None
    return "^(" + "|".join(patterns) + ")$"


def apply_lora(model: nn.Module, config: RSRefSegConfig) -> None:
    """Inject LoRA adapters in place and set ``requires_grad`` for the configured fine-tuning mode.

    The ablation switches ``lora_sam`` / ``lora_vision`` / ``lora_text`` choose the towers that get
    adapters (all off = frozen encoders); without sparse prompts the prompter is unused and frozen.
    """
    if config.finetune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        _freeze_unused(model, config)
        return
    pattern = lora_target_pattern(config)
    if pattern is not None:
        from peft import LoraConfig, inject_adapter_in_model

        lora_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=pattern,
            bias="none",
        )
        inject_adapter_in_model(lora_config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or name.startswith(TRAINED_PREFIXES))
    _freeze_unused(model, config)


def _freeze_unused(model: nn.Module, config: RSRefSegConfig) -> None:
    """Parameters that the configured model never uses train no more (and stay out of checkpoints)."""
    if not config.use_sparse_prompt:
        for name, p in model.named_parameters():
            if name.startswith("prompter."):
                p.requires_grad_(False)


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer into its base layer and put the plain base layer back; returns the count."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged
