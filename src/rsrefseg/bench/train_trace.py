"""A training step traced on fake tensors: its activation memory and FLOPs without running it.

The model is built on the ``meta`` device (shapes only) and its parameters become
``FakeTensor`` s on the CPU (:mod:`torch._subclasses.fake_tensor`): every op of the step runs
through its CPU shape rules, no memory is allocated and nothing is computed. The step is the one of
:mod:`rsrefseg.bench.train_step` (same inputs, same model, same loss terms; only the loss parts that
the trainer reads out as Python floats are not read), so a trace gives, for any preset, batch size,
grouping and checkpointing, even one that does not fit into this machine's memory:

- ``activations_bytes``: the peak of live tensor storage created by forward + backward
  (:class:`StorageTracker`, the same accounting the measured step uses; equal to the measured
  number on configurations that run, checked by the suite);
- ``gflop``: the FLOPs the step executes (``torch.utils.flop_counter`` with the CPU attention of
  :mod:`rsrefseg.bench.flops`, :func:`count_step_flops`; with checkpointing the recomputed forward is
  included);
- ``precision="bf16"``: the same under ``torch.autocast("cpu", torch.bfloat16)`` with fp32 weights,
  the trainer's bf16 mixed precision (accelerate's autocast). CUDA's autocast keeps a few more ops in
  fp32 (layer norms, some pointwise ops) than the CPU rules traced here; the GPU-fit table adds a
  margin for that.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from rsrefseg.bench.memory import LiveTensorTracker

#: The training recipe per preset: model overrides and loss weights (bce, dice, activation) and the
#: gradient clip. Full-size presets: the paper's (configs/rrsisd-b.yaml: LoRA, 5 x BCE, no clip);
#: ``tiny``: the CPU demo's (configs/nwpu-tiny.yaml: every parameter trains, Dice and activation loss).
RECIPES: dict[str, dict[str, Any]] = {
    "tiny": {"overrides": {"finetune": "full"}, "loss": (5.0, 5.0, 20.0), "grad_clip": 1.0},
    "default": {"overrides": {"finetune": "lora"}, "loss": (5.0, 0.0, 0.0), "grad_clip": None},
}


def recipe(preset: str) -> dict[str, Any]:
    """The training recipe of ``preset`` (see :data:`RECIPES`)."""
    return RECIPES.get(preset, RECIPES["default"])


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    """``(key, bytes)`` of a tensor's storage; the key is shared by all views of one storage."""
    storage = t.untyped_storage()
    key = getattr(storage, "_cdata", None) or storage.data_ptr()
    return int(key), int(storage.nbytes())


class StorageTracker(LiveTensorTracker):
    """:class:`rsrefseg.bench.memory.LiveTensorTracker` keyed by storage identity instead of address.

    Works for real and fake tensors alike (fake tensors have no address), so a traced step and a
    measured one are counted the same way. ``exclude`` holds the keys of :func:`storage_keys`.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key, size = _storage_key(t)
            if size == 0 or key in self.exclude:
                continue
            entry = self.refs.get(key)
            if entry is None:
                self.refs[key] = entry = [size, 0]
                self.current += size
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


class _NoModuleTracking:
    """Stands in for ``FlopCounterMode``'s module tracker: every FLOP counts under "Global" only."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _NoModuleTracking:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def count_step_flops(fn: Any) -> dict[str, float]:
    """:func:`rsrefseg.bench.flops.count_flops` without the per-module breakdown.

    ``FlopCounterMode`` attributes FLOPs to modules through hooks (``register_multi_grad_hook``) that keep
    references to module outputs until the backward pass has passed them: inside a training step this
    keeps the activations that gradient checkpointing frees alive (measured: 8.4 instead of 2.6 GiB for
    rsrefseg-b at batch 1). Without the module tracker the counts are the same and the step's memory is
    its own. Returns ``{"gflop", "gflop_attention"}``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from rsrefseg.bench.flops import _ATTENTION_OPS, custom_mapping

    counter = FlopCounterMode(display=False, custom_mapping=custom_mapping())
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    per_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for k, v in per_op.items() if str(k).split(".")[-1] in _ATTENTION_OPS
                    or getattr(k, "__name__", "") in _ATTENTION_OPS)
    return {"gflop": float(sum(per_op.values())) / 1e9, "gflop_attention": float(attention) / 1e9}


def storage_keys(model: torch.nn.Module) -> set[int]:
    """Storage keys of the parameters and buffers (not counted as activations)."""
    return {_storage_key(t)[0] for t in list(model.parameters()) + list(model.buffers())}


def parameter_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts and bytes: all, trainable, and AdamW's state for the trainable part.

    AdamW (once every trainable parameter has had a gradient) keeps ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype and a scalar ``step`` per
    trainable tensor (``foreach``/non-capturable: a 0-dim fp32 tensor).
    """
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size()
                                                                      for b in model.buffers())
    train_bytes = sum(p.numel() * p.element_size() for p in trainable)
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "weights_bytes": weights,
        "gradients_bytes": train_bytes,
        "optimizer_state_bytes": 2 * train_bytes + 4 * len(trainable),
    }


def step_inputs(image_size: int, images: int, per_image: int, seed: int = 0) -> dict[str, Any]:
    """Inputs of one step: ``U x 3 x S x S`` images in [0, 255], ``T = U x K`` expressions,
    ``T x 1 x S x S`` binary targets, ``T`` image indices (None when ``K == 1``: pair i on image i).

    Made on the current default device / fake mode (the caller's context).
    """
    from rsrefseg.bench.cpu import EXPRESSIONS

    gen = torch.Generator().manual_seed(seed)
    n = images * per_image
    pixels = torch.rand(images, 3, image_size, image_size, generator=gen) * 255.0
    target = (torch.rand(n, 1, image_size, image_size, generator=gen) > 0.7).float()
    texts = [EXPRESSIONS[i % len(EXPRESSIONS)] for i in range(n)]
    # T indices: expressions k*U .. of image u are u, u, ... (K per image, grouped as the sampler does)
    index = torch.arange(images).repeat_interleave(per_image) if per_image > 1 else None
    return {"pixel_values": pixels, "texts": texts, "target": target, "image_index": index}


def loss_terms(model: Any, batch: dict[str, Any], weights: tuple[float, float, float]) -> torch.Tensor:
    """The trainer's loss (:class:`rsrefseg.training.train.LossModule`) as tensor ops only.

    ``LossModule`` also reads the BCE/Dice parts out as Python floats, which a fake tensor cannot
    give; the tensor ops are the same.
    """
    from rsrefseg.training.losses import activation_loss, bce_loss, dice_loss, match_size

    bce_w, dice_w, act_w = weights
    out = model(batch["pixel_values"], batch["texts"], batch["image_index"])
    logits = match_size(out.mask_logits, batch["target"])
    loss = logits.new_zeros((), dtype=torch.float32)
    if bce_w > 0:
        loss = loss + bce_w * bce_loss(logits, batch["target"])
    if dice_w > 0:
        loss = loss + dice_w * dice_loss(logits, batch["target"])
    if act_w > 0:
        loss = loss + act_w * activation_loss(out.global_activation, batch["target"])
    return loss


def fake_model(preset: str, checkpointing: bool, fake_mode: Any) -> Any:
    """The preset as the trainer builds it (LoRA/trainable set, train mode, checkpointing), on fake CPU tensors."""
    from torch._subclasses.fake_tensor import FakeTensor

    from rsrefseg.build import build_from_preset
    from rsrefseg.modeling.checkpointing import enable_gradient_checkpointing
    from rsrefseg.tokenizer import offline_tokenizer

    model = build_from_preset(preset, device="meta", **recipe(preset)["overrides"])
    model.clip.tokenizer = offline_tokenizer(max_length=model.config.max_text_length)  # no tokenizer on meta
    cpu = torch.device("cpu")

    def fake(t: torch.Tensor) -> torch.Tensor:
        return FakeTensor(fake_mode, t if t.device.type == "meta" else t.to("meta"), cpu)

    done: dict[int, torch.nn.Parameter] = {}  # tied parameters stay one parameter
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(fake(p.detach()), requires_grad=p.requires_grad)
                module._parameters[name] = done[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake(b)
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model


def trace_step(preset: str, images: int, per_image: int = 1, checkpointing: bool = False,
               precision: str = "fp32") -> dict[str, Any]:
    """Trace forward + backward of one training step (see the module docstring).

    Returns ``activations_bytes``, ``gflop`` (executed), ``expressions``, and the
    :func:`parameter_bytes` of the model.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)  # tokenizer ids arrive as real tensors
    model = fake_model(preset, checkpointing, mode)
    info = parameter_bytes(model)
    tracker = StorageTracker(exclude=storage_keys(model))
    weights = recipe(preset)["loss"]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with mode:
        batch = step_inputs(model.image_size, images, per_image)

        def forward_backward() -> None:
            with tracker:
                with autocast:
                    loss = loss_terms(model, batch, weights)
                loss.backward()

        flops = count_step_flops(forward_backward)
    # AdamW keeps state only for parameters that received a gradient (unused ones get none).
    with_grad = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    info["optimizer_state_bytes"] = sum(2 * p.numel() * p.element_size() + 4 for p in with_grad)
    return {**info, "preset": preset, "images": images, "expressions": images * per_image,
            "checkpointing": checkpointing, "precision": precision,
            "activations_bytes": tracker.peak, "gflop": flops["gflop"], "gflop_attention": flops["gflop_attention"]}
