"""FLOPs of a call with ``torch.utils.flop_counter.FlopCounterMode``, attention included.

The stock counter knows the CUDA attention kernels but not the CPU one
(``_scaled_dot_product_flash_attention_for_cpu``), so on a CPU it silently leaves out every
``softmax(q k^T) v``; it is added here with the same formula. Both totals are reported. The
oneDNN fused ``Linear + GELU`` of :mod:`rsrefseg.modeling.fast_sam` (``mkldnn._linear_pointwise``)
is unknown to it too and is counted as the matmul it is (in both totals).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

_ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu",)


def _cpu_sdpa_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _linear_flop(input_shape: Any, weight_shape: Any, *args: Any, **kwargs: Any) -> int:
    rows = 1
    for n in input_shape[:-1]:
        rows *= n
    return 2 * rows * input_shape[-1] * weight_shape[0]


def custom_mapping() -> dict[Any, Any]:
    aten = torch.ops.aten
    mapping: dict[Any, Any] = {getattr(aten, name): _cpu_sdpa_flop for name in _ATTENTION_OPS if hasattr(aten, name)}
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if mkldnn is not None and hasattr(mkldnn, "_linear_pointwise"):
        mapping[mkldnn._linear_pointwise] = _linear_flop
    return mapping


def count_flops(fn: Callable[[], Any]) -> dict[str, float]:
    """Run ``fn`` once under the counter.

    Returns:
        ``{"gflop": total, "gflop_attention": softmax(qk)v part, "gflop_stock_counter": total
        without the CPU attention (what an unmodified FlopCounterMode reports)}``.
    """
    mapping = custom_mapping()
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    per_op = counter.get_flop_counts().get("Global", {})
    total = float(sum(per_op.values()))
    attention = float(sum(v for k, v in per_op.items() if str(k).split(".")[-1] in _ATTENTION_OPS
                          or getattr(k, "__name__", "") in _ATTENTION_OPS))
    return {"gflop": total / 1e9, "gflop_attention": attention / 1e9, "gflop_stock_counter": (total - attention) / 1e9}
