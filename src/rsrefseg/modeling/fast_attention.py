"""Blocked "math" attention for CPU inference, and its use in the CLIP/SigLIP towers.

PyTorch's CPU flash-attention kernel gets no speed-up from bf16 on this kind of CPU (AVX-512 BF16,
no AMX): SigLIP so400m's attention (16 heads x 729 tokens) runs at about 80 GFLOP/s in bf16
with it, against about 230 GFLOP/s as ``bmm`` + ``softmax`` + ``bmm`` over blocks of two heads,
whose scores stay in cache. In fp32 the kernel is as fast or faster, so the math path is used
only for bf16/fp16 without gradients; everything else goes to ``scaled_dot_product_attention``.

:func:`enable_fast_attention` registers :func:`cpu_attention_forward` with transformers'
``AttentionInterface`` (the first time it is called; nothing happens at import) and switches the
CLIP/SigLIP model to it through ``set_attn_implementation``; parameters are untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Name under which :func:`cpu_attention_forward` is registered with transformers.
ATTN_IMPLEMENTATION = "rsrefseg_cpu"
#: Bytes of attention scores per block (a group of heads); ~2 heads of SigLIP so400m in bf16.
SCORE_BLOCK_BYTES = 2 * 1024 * 1024


def use_math_path(query: torch.Tensor, dropout: float = 0.0) -> bool:
    """Whether :func:`math_attention` is the faster choice: CPU, bf16/fp16, no gradients, no dropout."""
    grad = torch.is_grad_enabled() and query.requires_grad
    return query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and not grad and dropout == 0.0


def math_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    budget: int = SCORE_BLOCK_BYTES,
) -> torch.Tensor:
    """``softmax(scale * q k^T + bias) v`` over blocks of heads (inference; no dropout).

    Args:
        query: ``B x heads x Nq x d``.
        key, value: ``B x heads x Nk x d``.
        scale: Multiplies the scores.
        bias: Additive float mask broadcastable to ``B x heads x Nq x Nk`` (or ``None``).
        budget: Bytes of scores per block.

    Returns:
        ``B x Nq x heads x d`` (the layout the transformers attention functions return).
    """
    b, heads, nq, d = query.shape
    nk = key.shape[2]
    block = max(1, min(heads, budget // max(1, nq * nk * query.element_size())))
    out = query.new_empty(b, nq, heads, d)
    for i in range(b):
        for h0 in range(0, heads, block):
            h1 = min(heads, h0 + block)
            q, k, v = query[i, h0:h1], key[i, h0:h1], value[i, h0:h1]  # h x N x d each
            if bias is None:
                scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)  # h x Nq x Nk
            else:
                # the bias broadcast over this block's heads: 1|heads x 1|Nq x Nk -> h x Nq x Nk
                mask = bias.expand(b, heads, nq, nk)[i, h0:h1].to(query.dtype)
                scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale)
            # h x Nq x d -> Nq x h x d, into this block's heads of the output
            out[i, :, h0:h1] = torch.bmm(torch.softmax(scores, -1), v).transpose(0, 1)
    return out


def cpu_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: :func:`math_attention` where it is faster, else SDPA.

    Takes ``B x heads x N x d`` query/key/value like ``sdpa_attention_forward`` and returns
    ``(B x N x heads x d, None)``. Causal attention, boolean masks, grouped keys and anything
    :func:`use_math_path` declines go to transformers' SDPA function unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain_mask = attention_mask is None or attention_mask.is_floating_point()
    causal = bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", False))
    if (use_math_path(query, dropout) and plain_mask and not causal and key.shape[1] == query.shape[1]
            and not kwargs.get("output_attentions")):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return math_attention(query, key, value, scale, attention_mask), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _register() -> None:
    """Register :func:`cpu_attention_forward` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, cpu_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)  # masks as for SDPA


def _towers(model: nn.Module) -> list[Any]:
    """The CLIP/SigLIP Hugging Face models inside ``model`` (or ``model`` itself)."""
    from transformers import CLIPModel, SiglipModel

    return [m for m in model.modules() if isinstance(m, (CLIPModel, SiglipModel))]


def enable_fast_attention(model: nn.Module) -> int:
    """Switch the CLIP/SigLIP models inside ``model`` to :func:`cpu_attention_forward`; returns how many.

    The previous implementation is remembered for :func:`disable_fast_attention`.
    """
    towers = _towers(model)
    if towers:
        _register()
    for tower in towers:
        tower.__dict__.setdefault("_rsrefseg_original_attn", tower.config._attn_implementation)
        tower.set_attn_implementation(ATTN_IMPLEMENTATION)
    return len(towers)


def disable_fast_attention(model: nn.Module) -> int:
    """Undo :func:`enable_fast_attention`; returns the number of models switched back."""
    count = 0
    for tower in _towers(model):
        original = tower.__dict__.pop("_rsrefseg_original_attn", None)
        if original is not None:
            tower.set_attn_implementation(original)
            count += 1
    return count
