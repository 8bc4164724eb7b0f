"""A faster SAM mask decoder for inference (drop-in, same parameters) for the Hugging Face ``SamModel``.

Decoding another expression on cached image features is SAM's mask decoder on ``T`` copies of the
``g x g`` image embedding (4096 tokens for the official models), which is memory-bound on a CPU:
Hugging Face's ``SamMaskDecoder`` adds the positional encoding to the image tokens three times per
layer, projects the same tokens three times (keys and values of the token-to-image attention,
queries of the image-to-token attention), expands the positional encoding to every expression,
transposes the ``T x 256 x 64 x 64`` embedding twice, upsamples in channels-first layout and
computes the masks of all four mask tokens when one is asked for. Here, for inference:

- one linear per layer gives those three projections of the image tokens (their weights
  concatenated); the positional encoding enters as its own projection (``pe @ W^T``), computed
  once per model and positional encoding (cached, exact: the cache is checked against the
  parameters' versions and the encoding itself), not once per expression;
- the image tokens stay ``T x N x C`` (channels last) from the first add to the masks: the two
  transposed convolutions (kernel 2, stride 2) are linears to ``2 x 2`` sub-pixels, the layer norm
  and GELUs run on the last dimension (the second GELU fused into its linear on oneDNN, the first
  in place), and the hypernetwork product runs on the sub-pixels before they are put in place
  (a ``T x 4h x 4w`` copy instead of ``T x 32 x 4h x 4w`` and ``T x 64 x 2h x 2w``);
- only the requested mask tokens (one, or the three of ``multimask_output``) are upscaled.

Tokens (a few dozen) go through the Hugging Face submodules themselves. The outputs equal the
reference within float rounding (tests: 1e-4 relative in fp32). Training, gradients, attention
similarity and target embeddings use the reference forward. :func:`enable_fast_decoder` swaps the
class in place (parameter names untouched); :func:`disable_fast_decoder` swaps it back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.modeling_sam import SamAttention, SamMaskDecoder

from rsrefseg.modeling.class_swap import restore_classes, swap_classes
from rsrefseg.modeling.fast_linear import fast_linear

#: Attribute holding the class before :func:`enable_fast_decoder` (and the cached positional terms).
_ORIGINAL = "_rsrefseg_decoder_original_class"
_CACHE = "_rsrefseg_decoder_cache"


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``B x N x (heads*d)`` (any strides, last dimension contiguous) -> ``B x heads x N x d`` view."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)


def _attend(attn: SamAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM attention on projected ``B x N x c`` queries/keys/values -> ``B x Nq x c`` before ``out_proj``."""
    heads = attn.num_attention_heads
    out = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), scale=attn.scaling)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)  # B x heads x Nq x d -> B x Nq x c


class FastSamMaskDecoder(SamMaskDecoder):
    """``SamMaskDecoder`` with a faster inference forward (see the module docstring)."""

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_positional_embeddings: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor | None,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``SamMaskDecoder.forward``: ``B x C x h x w`` embeddings -> masks ``B x P x K x 4h x 4w``
        and IoU ``B x P x K`` (``P`` = 1 prompt set per image on the fast path)."""
        fast = (
            attention_similarity is None
            and target_embedding is None
            and not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))
            and (sparse_prompt_embeddings is None or sparse_prompt_embeddings.shape[1] == 1)
            and len(self.transformer.layers) > 0
        )
        if not fast:
            return super().forward(image_embeddings, image_positional_embeddings, sparse_prompt_embeddings,
                                   dense_prompt_embeddings, multimask_output, attention_similarity, target_embedding)
        b, c, h, w = image_embeddings.shape
        dtype = self.iou_token.weight.dtype
        # Output tokens (IoU, masks), then the prompts: B x 1 x Nt x C, as the reference.
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0).expand(b, 1, -1, -1)
        if sparse_prompt_embeddings is not None:
            tokens = torch.cat((tokens, sparse_prompt_embeddings.to(tokens.dtype)), dim=2)
        point = tokens.to(dtype)
        # (B x C x h x w) + (B x C x h x w) written as B x h x w x C: the image tokens, channels last.
        x = image_embeddings.new_empty(b, h, w, c, dtype=dtype)
        torch.add(image_embeddings.permute(0, 2, 3, 1), dense_prompt_embeddings.permute(0, 2, 3, 1), out=x)
        x = x.view(b, h * w, c)  # B x h x w x C -> B x N x C
        pe_terms = self._pe_terms(image_positional_embeddings, h, w)
        queries = point
        for index, layer in enumerate(self.transformer.layers):
            queries, x = self._layer(layer, index, queries, point, x, pe_terms)
        queries = self._final(queries, point, x, pe_terms)
        iou_token_out = queries[:, :, 0, :]  # B x 1 x C
        mask_slice = slice(1, self.num_mask_tokens) if multimask_output else slice(0, 1)
        masks = self._masks(x, queries, mask_slice, h, w)  # B x 1 x K x 4h x 4w
        iou_pred = self.iou_prediction_head(iou_token_out)[:, :, mask_slice]  # B x 1 x K
        return masks, iou_pred

    # ------------------------------------------------------------------ image-side constants
    def _pe_terms(self, pe: torch.Tensor, h: int, w: int) -> list[torch.Tensor]:
        """Per layer, ``N x 3c`` (``pe @ [Wk; 0; Wq]^T`` + the biases), then ``N x 2c`` for the final
        attention (``pe @ [Wk; 0]^T`` + biases): what adding the positional encoding to the image
        tokens contributes to their projections. Cached per positional encoding and parameters."""
        if pe.shape[0] > 1 and not (pe.stride(0) == 0 or bool((pe == pe[:1]).all())):
            raise ValueError("the fast mask decoder needs one positional encoding for the whole batch")
        pe1 = pe[0].to(self.iou_token.weight.dtype).flatten(1).transpose(0, 1)  # C x h x w -> N x C
        params = [p for m in self._image_attentions() for p in (m.q_proj.weight, m.q_proj.bias, m.k_proj.weight,
                                                                m.k_proj.bias, m.v_proj.weight, m.v_proj.bias)]
        # Inference tensors (parameters made under torch.inference_mode) have no version counter,
        # so an in-place change could not be seen: no cache for them.
        cacheable = not any(p.is_inference() for p in params)
        key = (pe1.device, pe1.dtype, pe1.shape, tuple((id(p), p._version, p.device) for p in params)) \
            if cacheable else None
        cached = self.__dict__.get(_CACHE)
        if cacheable and cached is not None and cached[0] == key and torch.equal(cached[1], pe1):
            return cached[2]  # type: ignore[no-any-return]
        terms = []
        for layer in self.transformer.layers:
            t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            zero = torch.zeros_like(t2i.v_proj.weight)
            weight = torch.cat([t2i.k_proj.weight, zero, i2t.q_proj.weight])  # 3c x C
            bias = torch.cat([t2i.k_proj.bias, t2i.v_proj.bias, i2t.q_proj.bias])
            terms.append(torch.addmm(bias, pe1, weight.t()))  # N x 3c
        final = self.transformer.final_attn_token_to_image
        weight = torch.cat([final.k_proj.weight, torch.zeros_like(final.v_proj.weight)])
        terms.append(torch.addmm(torch.cat([final.k_proj.bias, final.v_proj.bias]), pe1, weight.t()))  # N x 2c
        if cacheable:
            self.__dict__[_CACHE] = (key, pe1.clone(), terms)
        return terms

    def _image_attentions(self) -> list[SamAttention]:
        layers = self.transformer.layers
        return [a for layer in layers for a in (layer.cross_attn_token_to_image, layer.cross_attn_image_to_token)] \
            + [self.transformer.final_attn_token_to_image]

    # ------------------------------------------------------------------ transformer
    def _layer(self, layer: Any, index: int, queries: torch.Tensor, point: torch.Tensor, x: torch.Tensor,
               pe_terms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``SamTwoWayAttentionBlock``: tokens ``B x 1 x Nt x C`` and image ``B x N x C``."""
        if layer.skip_first_layer_pe:
            queries, _ = layer.self_attn(query=queries, key=queries, value=queries)
        else:
            q = queries + point
            attn_out, _ = layer.self_attn(query=q, key=q, value=queries)
            queries = queries + attn_out
        queries = layer.layer_norm1(queries)
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        weight = torch.cat([t2i.k_proj.weight, t2i.v_proj.weight, i2t.q_proj.weight])  # 3c x C
        proj = fast_linear(x, weight, None).add_(pe_terms[index])  # B x N x 3c: keys, values, image queries
        cdim = t2i.k_proj.weight.shape[0]
        # Tokens attend to the image.
        q_tok = t2i.q_proj(queries + point)[:, 0]  # B x 1 x Nt x c -> B x Nt x c
        attn = _attend(t2i, q_tok, proj[..., :cdim], proj[..., cdim:2 * cdim])
        queries = layer.layer_norm2(queries + t2i.out_proj(attn).unsqueeze(1))
        queries = layer.layer_norm3(queries + layer.mlp(queries))
        # The image attends to the tokens.
        k_tok = i2t.k_proj(queries + point)[:, 0]
        v_tok = i2t.v_proj(queries)[:, 0]
        attn = _attend(i2t, proj[..., 2 * cdim:], k_tok, v_tok)  # B x N x c
        x = fast_linear(attn, i2t.out_proj.weight, i2t.out_proj.bias).add_(x)
        x = F.layer_norm(x, (x.shape[-1],), layer.layer_norm4.weight, layer.layer_norm4.bias, layer.layer_norm4.eps)
        return queries, x

    def _final(self, queries: torch.Tensor, point: torch.Tensor, x: torch.Tensor,
               pe_terms: list[torch.Tensor]) -> torch.Tensor:
        """The final token-to-image attention and norm -> tokens ``B x 1 x Nt x C``."""
        final = self.transformer.final_attn_token_to_image
        weight = torch.cat([final.k_proj.weight, final.v_proj.weight])  # 2c x C
        proj = fast_linear(x, weight, None).add_(pe_terms[-1])  # B x N x 2c
        cdim = final.k_proj.weight.shape[0]
        q_tok = final.q_proj(queries + point)[:, 0]
        attn = _attend(final, q_tok, proj[..., :cdim], proj[..., cdim:])
        return self.transformer.layer_norm_final_attn(queries + final.out_proj(attn).unsqueeze(1))

    # ------------------------------------------------------------------ masks
    def _masks(self, x: torch.Tensor, queries: torch.Tensor, mask_slice: slice, h: int, w: int) -> torch.Tensor:
        """Upscale the image tokens ``B x N x C`` (channels last) and take the hypernetwork product of
        the selected mask tokens -> ``B x 1 x K x 4h x 4w``.

        The norm, the GELUs, the second transposed convolution and the product all act on one
        sub-pixel at a time, so the sub-pixels stay where the linears put them (pixel, then sub-pixel
        ``(a, b)`` of the first upscaling, then ``(c, d)`` of the second) and only the ``K`` masks are
        put in place at the end (output pixel ``(4i + 2a + c, 4j + 2b + d)``)."""
        b = x.shape[0]
        up1 = _subpixel_linear(x, self.upscale_conv1)  # B x N x 4 x C1
        c1 = up1.shape[-1]
        norm = self.upscale_layer_norm
        y = torch.ops.aten.gelu_(F.layer_norm(up1, (c1,), norm.weight, norm.bias, norm.eps))  # fresh tensor
        up2 = _subpixel_linear(y.view(b, -1, c1), self.upscale_conv2, gelu=True)  # B x 4N x 4 x C2
        tokens = queries[:, 0, 1:1 + self.num_mask_tokens]  # B x M x C
        hyper = torch.stack([self.output_hypernetworks_mlps[i](tokens[:, i])
                             for i in range(self.num_mask_tokens)[mask_slice]], dim=1)  # B x K x C2
        k = hyper.shape[1]
        masks = torch.matmul(up2.view(b, -1, up2.shape[-1]), hyper.transpose(1, 2))  # B x 16N x K
        # B x (h x w x a x b x c x d) x K -> B x K x h x a x c x w x b x d -> B x K x 4h x 4w.
        masks = masks.view(b, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, k, 4 * h, 4 * w)
        return masks.unsqueeze(1)


def _subpixel_linear(x: torch.Tensor, conv: nn.ConvTranspose2d, gelu: bool = False) -> torch.Tensor:
    """A kernel-2, stride-2 ``ConvTranspose2d`` (then an exact GELU with ``gelu``) on channels-last tokens:
    ``B x N x Cin`` -> ``B x N x 4 x Cout`` (the 2 x 2 output sub-pixels of each input pixel, row-major)."""
    cin, cout = conv.weight.shape[:2]
    # Cin x Cout x 2 x 2 -> 2 x 2 x Cout x Cin -> (4 Cout) x Cin: one output row per (a, b, channel).
    weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * cout, cin).contiguous()
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    out = fast_linear(x, weight, bias, gelu=gelu)  # B x N x 4Cout
    return out.view(*x.shape[:-1], 4, cout)


def enable_fast_decoder(model: nn.Module) -> int:
    """Switch every ``SamMaskDecoder`` in ``model`` to :class:`FastSamMaskDecoder`, in place; returns how many."""
    return swap_classes(model, SamMaskDecoder, FastSamMaskDecoder, _ORIGINAL)


def disable_fast_decoder(model: nn.Module) -> int:
    """Undo :func:`enable_fast_decoder` (dropping the cached positional terms); returns how many."""
    return restore_classes(model, _ORIGINAL, drop=(_CACHE,))
