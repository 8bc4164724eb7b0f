"""The prompter: activated CLIP features -> SAM sparse prompt tokens (+ dense mask prompt)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.sam.modeling_sam import SamLayerNorm, SamPositionalEmbedding

from rsrefseg.modeling.activation import Activated


def grid_positional_encoding(pe_layer: SamPositionalEmbedding, height: int, width: int) -> torch.Tensor:
    """SAM's random-Fourier positional encoding of an ``height x width`` grid of cell centres.

    Returns:
        ``1 x C x height x width`` (C = SAM prompt width, 256 for the official models).
    """
    weight = pe_layer.positional_embedding
    ys = (torch.arange(height, device=weight.device, dtype=weight.dtype) + 0.5) / height
    xs = (torch.arange(width, device=weight.device, dtype=weight.dtype) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([grid_x, grid_y], dim=-1)  # h x w x 2, (x, y) in [0, 1]
    encoding = pe_layer(coords)  # h x w x C
    return encoding.permute(2, 0, 1).unsqueeze(0)  # 1 x C x h x w


def _conv_block(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    """conv + SAM's LayerNorm2d (batch-independent, unlike the reference's SyncBN) + GELU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False),
        SamLayerNorm(out_ch, data_format="channels_first"),
        nn.GELU(),
    )


#: The feature maps a prompter can concatenate, in their fixed order (the paper uses all three).
BRANCHES = ("local", "global", "visual")


class Prompter(nn.Module):
    """[local, global, V] (3D channels) -> sparse prompt tokens for SAM's mask decoder.

    1x1 conv to the prompt width + norm + GELU; add SAM's dense positional encoding for the grid;
    ``down_spatial_times`` x [3x3 stride-2 conv + norm + GELU]; 1x1 conv; flatten to tokens.
    For SigLIP so400m at 384 (27 x 27 patches) and two downsamplings this gives 7 x 7 = 49 tokens.
    ``branches`` selects which of the three maps are concatenated (ablations drop the global or the
    local activation, or both: plain visual features); the input width is ``len(branches) x D``.
    """

    def __init__(
        self,
        in_channels: int,
        prompt_dim: int,
        down_spatial_times: int = 2,
        branches: tuple[str, ...] = BRANCHES,
    ) -> None:
        super().__init__()
        unknown = [b for b in branches if b not in BRANCHES]
        if unknown or not branches or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be distinct names among {BRANCHES}, got {branches!r}")
        self.in_channels = in_channels
        self.prompt_dim = prompt_dim
        self.down_spatial_times = down_spatial_times
        self.branches = tuple(b for b in BRANCHES if b in branches)  # always in the fixed order
        self.input_proj = _conv_block(len(self.branches) * in_channels, prompt_dim, kernel=1, stride=1)
        self.down = nn.Sequential(
            *[_conv_block(prompt_dim, prompt_dim, kernel=3, stride=2) for _ in range(down_spatial_times)]
        )
        self.output_proj = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=1)

    @staticmethod
    def num_tokens(grid: int, down_spatial_times: int) -> int:
        """Number of sparse tokens for a ``grid x grid`` patch map."""
        for _ in range(down_spatial_times):
            grid = (grid + 1) // 2  # 3x3, stride 2, padding 1
        return grid * grid

    def forward(
        self,
        local: torch.Tensor,
        global_: torch.Tensor,
        visual: torch.Tensor,
        pe_layer: SamPositionalEmbedding,
    ) -> torch.Tensor:
        """Args:
            local, global_, visual: ``B x D x h x w`` each (only those in ``branches`` are used).
            pe_layer: SAM's shared positional embedding (gives the dense encoding of the grid).

        Returns:
            Sparse prompt tokens ``B x N x C`` (C = SAM prompt width, N = tokens after downsampling).
        """
        maps = {"local": local, "global": global_, "visual": visual}
        x = torch.cat([maps[name] for name in self.branches], dim=1)  # B x (n_branches * D) x h x w
        x = x.to(self.output_proj.weight.dtype)
        return self.tokens_from_projection(self.input_proj(x), pe_layer)  # B x C x h x w -> B x N x C

    def prompt_tokens(
        self,
        act: Activated,
        pe_layer: SamPositionalEmbedding,
        images: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sparse prompt tokens ``T x N x C`` of ``T`` activated expressions (:meth:`forward` on its maps).

        ``images`` (``B x D x h x w`` patch features of the distinct images) and ``image_index``
        (``T`` indices into them) say which image each expression's ``act.visual`` is; this class
        does not need them, :class:`rsrefseg.modeling.fast_prompter.FastPrompter` projects each image
        once with them.
        """
        return self(act.local, act.global_, act.visual, pe_layer)  # type: ignore[no-any-return]

    def tokens_from_projection(self, x: torch.Tensor, pe_layer: SamPositionalEmbedding) -> torch.Tensor:
        """After ``input_proj``: ``B x C x h x w`` -> sparse tokens ``B x N x C``."""
        x = x + grid_positional_encoding(pe_layer, x.shape[-2], x.shape[-1]).to(x.dtype)
        x = self.down(x)  # B x C x h' x w'
        x = self.output_proj(x)
        # B x C x h' x w' -> B x C x N -> B x N x C
        return x.flatten(2).transpose(1, 2)
