"""A faster SAM vision attention (drop-in, same parameters) for the Hugging Face ``SamModel``.

Hugging Face's ``SamVisionAttention`` / ``SamVisionSdpaAttention`` add SAM's decomposed relative
positions as a ``B*heads x N x N`` bias built by a broadcast add of two permuted (non-contiguous)
einsum results followed by a reshape, which copies it once more with a strided gather. For SAM
ViT-B at 1024^2 that is an 805 MB tensor written twice per global layer, slower than the attention
itself. Here:

- ``rel_h``/``rel_w`` come from two small batched matmuls (the relative-position tables are
  gathered with a strided view instead of an index);
- the bias is materialised contiguously for a block of query rows (or windows) at a time, into one
  reused buffer small enough to stay in cache, and ``scaled_dot_product_attention`` runs per block
  (in bf16/fp16 on the CPU without gradients: ``baddbmm`` with the bias and scale fused, softmax
  and ``bmm`` over smaller blocks, as the CPU flash kernel gets no speed-up from bf16);
- windowed layers run ``qkv`` on the real tokens only and give padding tokens ``qkv(0)``, exactly
  what the padded zeros of the reference produce, and ``proj`` only on the real tokens;
- without gradients, the MLP's ``Linear + GELU`` runs as one oneDNN op when both layers are plain
  ``nn.Linear`` on the CPU (after ``merge_lora``; LoRA layers are always called as modules; see
  :mod:`rsrefseg.modeling.fast_linear`).

:func:`enable_fast_sam` swaps the classes of the attention and layer modules in place: parameter
names, checkpoints and LoRA wrappers are unchanged, and :func:`disable_fast_sam` swaps them back.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionLayer

from rsrefseg.modeling.fast_attention import use_math_path
from rsrefseg.modeling.fast_linear import (  # noqa: F401  (re-exported: the oneDNN linears lived here)
    FastLinear,
    disable_fast_linear,
    enable_fast_linear,
    mlp_forward,
    onednn_linear,
    onednn_linear_supported,
)

#: Bytes of attention bias materialised at once on the CPU: one head's block of query rows (or a
#: group of windows), at least :data:`MIN_BLOCK_QUERIES` queries (the CPU attention kernel's large
#: tile). For ViT-B at 1024^2, 2 threads: 32 MiB (2048 queries) 0.50 s per global layer, 16 MiB
#: 0.55 s, 4-8 MiB 0.65 s, the whole 805 MB bias at once 0.73 s (no bias at all: 0.36 s).
BIAS_BLOCK_BYTES = 32 * 1024 * 1024
#: The same on accelerators, where fewer, larger kernels are better (a ViT-B global layer at 1024^2
#: needs 805 MB per image).
DEVICE_BIAS_BLOCK_BYTES = 1024 * 1024 * 1024
MIN_BLOCK_QUERIES = 768
#: Bytes of attention scores per block on the CPU in bf16/fp16 without gradients, where explicit
#: ``baddbmm`` (bias and scale fused) + softmax + ``bmm`` beats the CPU flash kernel, which gets
#: no bf16 speed-up (ViT-B global layer, 2 threads: 0.28 s vs 0.49 s; in fp32 the kernel wins).
MATH_BLOCK_BYTES = 4 * 1024 * 1024


def rel_pos_table(rel_pos: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """``q_size x k_size x C`` relative-position embeddings, as ``SamVisionAttention.get_rel_pos``.

    When the table already has ``2 * size - 1`` rows (always, for square windows at the trained
    size) this is a strided view (``R[i, j] = rel_pos[i - j + size - 1]``), with no interpolation
    and no gather; otherwise it follows the reference (linear interpolation, scaled coordinates).
    """
    if q_size == k_size and rel_pos.shape[0] == 2 * q_size - 1:
        # flipped[m] = rel_pos[2k-2-m]; windows[s, :, j] = flipped[s + j] = rel_pos[2k-2-s-j];
        # row i of the result is window k-1-i: rel_pos[k-1+i-j].
        windows = rel_pos.flip(0).unfold(0, k_size, 1)  # k x C x k
        return windows.flip(0).transpose(1, 2)  # q x k x C
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).transpose(1, 2), size=max_rel_dist, mode="linear")
    resized = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return resized[relative.long()]


def _block_shape(
    b: int, heads: int, height: int, width: int, esize: int, budget: int, min_queries: int
) -> tuple[int, int, int]:
    """(batch items, heads, query rows) per bias block of at most ``budget`` bytes (when possible)."""
    row = width * height * width * esize  # one head, one query row: width queries x N keys
    head = row * height
    if head * heads <= budget:
        return max(1, min(b, budget // (head * heads))), heads, height
    if head <= budget:
        return 1, max(1, min(heads, budget // head)), height
    rows = max(-(-min_queries // width), budget // row)
    return 1, 1, max(1, min(height, rows))


def attention_with_rel_pos(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rel_pos_h: torch.Tensor | None,
    rel_pos_w: torch.Tensor | None,
    size: tuple[int, int],
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention with SAM's decomposed relative positions, in cache-sized bias blocks.

    Args:
        query, key, value: ``B x heads x N x d`` (any strides with a contiguous last dimension),
            ``N = height * width`` in row-major order.
        rel_pos_h, rel_pos_w: the module's tables (``None``: no relative positions).
        size: ``(height, width)`` of the token grid.
        scale: softmax scale applied to ``q @ k^T`` (not to the relative-position terms).

    Returns:
        ``B x N x heads x d``, contiguous.
    """
    b, heads, n, d = query.shape
    height, width = size
    out = query.new_empty(b, n, heads, d)
    if rel_pos_h is None or rel_pos_w is None:
        o = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scale)
        out.copy_(o.transpose(1, 2))
        return out
    table_h = rel_pos_table(rel_pos_h, height, height).to(query.dtype)  # h x h x d
    table_w = rel_pos_table(rel_pos_w, width, width).to(query.dtype)  # w x w x d
    q5 = query.view(b, heads, height, width, d)
    # rel_h[b, n, i, j, a] = q[b, n, i, j] . table_h[i, a]; rel_w[..., c] = q[b, n, i, j] . table_w[j, c]
    rel_h = torch.matmul(q5.permute(2, 0, 1, 3, 4).reshape(height, -1, d), table_h.transpose(1, 2))
    rel_h = rel_h.view(height, b, heads, width, height).permute(1, 2, 0, 3, 4).contiguous()  # b x n x h x w x h
    rel_w = torch.matmul(q5.permute(3, 0, 1, 2, 4).reshape(width, -1, d), table_w.transpose(1, 2))
    rel_w = rel_w.view(width, b, heads, height, width).permute(1, 2, 3, 0, 4).contiguous()  # b x n x h x w x w
    grad = torch.is_grad_enabled() and (query.requires_grad or rel_pos_h.requires_grad or rel_pos_w.requires_grad)
    math = use_math_path(query, dropout) and not grad
    if math:
        bs, hs, rs = _block_shape(b, heads, height, width, query.element_size(), MATH_BLOCK_BYTES, 1)
    else:
        budget = BIAS_BLOCK_BYTES if query.device.type == "cpu" else DEVICE_BIAS_BLOCK_BYTES
        bs, hs, rs = _block_shape(b, heads, height, width, query.element_size(), budget, MIN_BLOCK_QUERIES)
    buffer = None if grad else query.new_empty(bs, hs, rs, width, height, width)
    out_rows = out.view(b, height, width, heads, d)
    for b0 in range(0, b, bs):
        b1 = min(b, b0 + bs)
        for h0 in range(0, heads, hs):
            h1 = min(heads, h0 + hs)
            k, v = key[b0:b1, h0:h1], value[b0:b1, h0:h1]
            bh = (b1 - b0) * (h1 - h0)
            if math:  # contiguous once per block of heads, not once per block of rows
                kt, v3 = k.reshape(bh, n, d).transpose(1, 2).contiguous(), v.reshape(bh, n, d).contiguous()
            for r0 in range(0, height, rs):
                r1 = min(height, r0 + rs)
                lhs = rel_h[b0:b1, h0:h1, r0:r1, :, :, None]
                rhs = rel_w[b0:b1, h0:h1, r0:r1, :, None, :]
                if buffer is None:
                    bias = lhs + rhs  # contiguous: both are, in the output's order
                else:
                    bias = torch.add(lhs, rhs, out=buffer[: b1 - b0, : h1 - h0, : r1 - r0])
                q = query[b0:b1, h0:h1, r0 * width : r1 * width]
                shape = (b1 - b0, h1 - h0, (r1 - r0) * width, n)
                if math:  # scores = bias + scale * q k^T in one GEMM, then softmax and P v
                    scores = torch.baddbmm(bias.reshape(bh, shape[2], n), q.reshape(bh, shape[2], d), kt, alpha=scale)
                    o = torch.bmm(torch.softmax(scores, -1), v3).view(*shape[:3], d)
                else:
                    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(shape), dropout_p=dropout, scale=scale)
                # B x h x rows*w x d -> B x rows x w x h x d
                out_rows[b0:b1, r0:r1, :, h0:h1] = o.view(b1 - b0, h1 - h0, r1 - r0, width, d).permute(0, 2, 3, 1, 4)
    return out


def _grid_blocks(windows: torch.Tensor, plain: torch.Tensor, s: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching views of the real tokens in a window grid and in the plain token map.

    Args:
        windows: ``B x gh x s x gw x s x C``, the window grid seen as a (padded) image.
        plain: ``B x H x W x C``.

    Yields:
        Up to four pairs (full windows, right column, bottom row, corner) of equal shapes, each
        made just before it is used (views made before an in-place copy would confuse autograd).
    """
    b, height, width, c = plain.shape
    fh, th = divmod(height, s)
    fw, tw = divmod(width, s)
    if fh and fw:
        yield windows[:, :fh, :, :fw], plain[:, : fh * s, : fw * s].view(b, fh, s, fw, s, c)
    if fh and tw:
        yield windows[:, :fh, :, fw, :tw], plain[:, : fh * s, fw * s :].view(b, fh, s, tw, c)
    if th and fw:
        yield windows[:, fh, :th, :fw], plain[:, fh * s :, : fw * s].view(b, th, fw, s, c)
    if th and tw:
        yield windows[:, fh, :th, fw, :tw], plain[:, fh * s :, fw * s :]


class FastSamVisionAttention(SamVisionAttention):
    """``SamVisionAttention`` with a faster forward (same parameters; installed by class swap).

    ``forward(x)`` takes ``B x H x W x C`` tokens exactly like the reference (already windowed
    when the caller windows); ``forward(x, window_size=s)`` windows (and pads) internally,
    computing ``qkv`` and ``proj`` on the real tokens only.
    """

    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, output_attentions: bool | None = None, window_size: int = 0
    ) -> tuple[torch.Tensor, None]:
        b, height, width, channels = hidden_states.shape
        heads = self.num_attention_heads
        qkv = self.qkv(hidden_states)  # B x H x W x 3C
        s = window_size
        windowed = s > 0 and (height, width) != (s, s)
        if windowed:
            qkv = self._partition(hidden_states, qkv, s)  # B*gh*gw x s x s x 3C
        size = (s, s) if windowed else (height, width)
        n = size[0] * size[1]
        # B' x N x 3 x heads x d -> 3 x B' x heads x N x d (views, no copy).
        q, k, v = qkv.reshape(-1, n, 3, heads, channels // heads).permute(2, 0, 3, 1, 4).unbind(0)
        rel_h, rel_w = (self.rel_pos_h, self.rel_pos_w) if self.use_rel_pos else (None, None)
        dropout = self.dropout if self.training else 0.0
        attn = attention_with_rel_pos(q, k, v, rel_h, rel_w, size, self.scale, dropout)  # B' x N x heads x d
        if windowed:
            # B*gh*gw x s x s x C windows -> the B x H x W x C real tokens (one copy).
            grid = attn.view(b, -(-height // s), -(-width // s), s, s, channels).permute(0, 1, 3, 2, 4, 5)
            plain = attn.new_empty(b, height, width, channels)
            for src, dst in _grid_blocks(grid, plain, s):
                dst.copy_(src)
            attn = plain
        return self.proj(attn.view(b, height, width, channels)), None

    def _partition(self, hidden_states: torch.Tensor, qkv: torch.Tensor, s: int) -> torch.Tensor:
        """``B x H x W x 3C`` -> ``B*gh*gw x s x s x 3C`` windows in one copy.

        The reference pads the normalised tokens with zeros before ``qkv``, so padding tokens get
        ``qkv(0)`` (the bias, through LoRA too) here, without running ``qkv`` on them.
        """
        b, height, width, c3 = qkv.shape
        grid_h, grid_w = -(-height // s), -(-width // s)
        windows = qkv.new_empty(b, grid_h, grid_w, s, s, c3)
        grid = windows.permute(0, 1, 3, 2, 4, 5)  # B x gh x s x gw x s x 3C view
        tail_h, tail_w = height % s, width % s
        if tail_h or tail_w:
            pad = self.qkv(hidden_states.new_zeros(1, 1, 1, hidden_states.shape[-1])).reshape(c3)
            if tail_h:
                grid[:, height // s, tail_h:] = pad
            if tail_w:
                grid[:, :, :, width // s, tail_w:] = pad
        for dst, src in _grid_blocks(grid, qkv, s):
            dst.copy_(src)
        return windows.view(b * grid_h * grid_w, s, s, c3)


class FastSamVisionLayer(SamVisionLayer):
    """``SamVisionLayer`` whose attention windows internally (see :class:`FastSamVisionAttention`)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        residual = hidden_states
        x = self.layer_norm1(hidden_states)
        if isinstance(self.attn, FastSamVisionAttention):
            x, _ = self.attn(x, window_size=self.window_size)
        else:  # pragma: no cover - attention swapped back by hand
            return super().forward(hidden_states)
        hidden_states = x.add_(residual) if not torch.is_grad_enabled() else x + residual
        mlp_out = mlp_forward(self.mlp, self.layer_norm2(hidden_states))
        return mlp_out.add_(hidden_states) if not torch.is_grad_enabled() else mlp_out + hidden_states


def enable_fast_sam(model: nn.Module) -> int:
    """Switch every SAM vision attention (and its layer) in ``model`` to the fast forward, in place.

    Works on an ``RSRefSeg``, a ``SamModel`` or a ``SamVisionEncoder``; parameter names and
    values, LoRA wrappers and hooks are untouched. Returns the number of attention layers
    switched (already-fast layers count too), so ``0`` means the model has no SAM vision encoder.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, SamVisionAttention):
            module.__dict__.setdefault("_rsrefseg_original_class", type(module))
            module.__class__ = FastSamVisionAttention
            count += 1
        elif isinstance(module, SamVisionLayer):
            module.__dict__.setdefault("_rsrefseg_original_class", type(module))
            module.__class__ = FastSamVisionLayer
    return count


def disable_fast_sam(model: nn.Module) -> int:
    """Undo :func:`enable_fast_sam`; returns the number of attention layers switched back."""
    count = 0
    for module in model.modules():
        original = module.__dict__.pop("_rsrefseg_original_class", None)
        if original is not None:
            module.__class__ = original
            count += isinstance(module, SamVisionAttention)
    return count
