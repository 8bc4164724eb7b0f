"""The prompter's input projection computed once per image instead of once per expression (inference).

The prompter's first layer is a 1x1 convolution ``W`` of the concatenated branches
``[local, global, V]``, each a per-pixel multiple of the patch features ``V``
(:class:`rsrefseg.modeling.activation.Activated`): ``local = (1 + mean_t A_t) / 2 * V``,
``global = A_g * V``. So ``W [local; global; V] = a * (W_l V) + g * (W_g V) + W_v V`` with the
per-pixel factors ``a`` and ``g`` of each expression: the three ``C x D`` projections of ``V``
run once per image, and each expression only adds three scaled ``C x h x w`` maps. For
``rsrefseg-b`` (D = 1152, 27 x 27 patches) that removes 1.3 GFLOP per further expression, plus
building the ``T x 3D x h x w`` concatenation. Equal to the reference within float rounding (tests).

Inference only: with gradients, and for prompters that were not switched, the reference
:meth:`~rsrefseg.modeling.prompter.Prompter.prompt_tokens` runs. :func:`enable_fast_prompter` swaps
the class in place (parameters untouched); :func:`disable_fast_prompter` swaps it back.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.sam.modeling_sam import SamPositionalEmbedding

from rsrefseg.modeling.activation import Activated
from rsrefseg.modeling.class_swap import restore_classes, swap_classes
from rsrefseg.modeling.fast_linear import fast_linear
from rsrefseg.modeling.prompter import Prompter

#: Attribute holding the class before :func:`enable_fast_prompter`.
_ORIGINAL = "_rsrefseg_prompter_original_class"


class FastPrompter(Prompter):
    """:class:`Prompter` whose inference ``prompt_tokens`` projects each image once (module docstring)."""

    def prompt_tokens(
        self,
        act: Activated,
        pe_layer: SamPositionalEmbedding,
        images: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As :meth:`Prompter.prompt_tokens`: ``T`` expressions -> sparse tokens ``T x N x C``."""
        conv = self.input_proj[0]
        grad = torch.is_grad_enabled() and (act.visual.requires_grad or conv.weight.requires_grad)
        if grad or images is None or conv.bias is not None or conv.kernel_size != (1, 1):
            return super().prompt_tokens(act, pe_layer, images, image_index)
        dtype = conv.weight.dtype
        b, d, h, w = images.shape
        c, n = conv.out_channels, len(self.branches)
        # C x nD x 1 x 1 -> C x n x D -> n x C x D -> nC x D: one row per (branch, output channel).
        weight = conv.weight.view(c, n, d).transpose(0, 1).reshape(n * c, d)
        tokens = images.to(dtype).flatten(2).transpose(1, 2)  # B x D x h x w -> B x hw x D
        proj = fast_linear(tokens.contiguous(), weight.contiguous(), None)
        proj = proj.view(b, h * w, n, c)  # B x hw x nC -> B x hw x n x C
        if image_index is not None:
            proj = proj[image_index]  # B -> T
        scales = act.scales()
        out = proj.new_zeros(proj.shape[0], h * w, c)  # T x hw x C
        for i, name in enumerate(self.branches):
            factor = scales[name]
            if factor is None:
                out.add_(proj[:, :, i])
            else:  # T x 1 x h x w -> T x hw x 1
                out.addcmul_(proj[:, :, i], factor.to(dtype).flatten(2).transpose(1, 2))
        x = out.transpose(1, 2).reshape(out.shape[0], c, h, w)  # T x hw x C -> T x C x h x w
        for module in list(self.input_proj)[1:]:  # the norm and GELU after the convolution
            x = module(x)
        return self.tokens_from_projection(x, pe_layer)


def enable_fast_prompter(model: nn.Module) -> int:
    """Switch every :class:`Prompter` in ``model`` to :class:`FastPrompter`, in place; returns how many."""
    return swap_classes(model, Prompter, FastPrompter, _ORIGINAL)


def disable_fast_prompter(model: nn.Module) -> int:
    """Undo :func:`enable_fast_prompter`; returns the number of prompters switched back."""
    return restore_classes(model, _ORIGINAL)
