"""The first-expression profiler: op classes, GEMM FLOPs from shapes, module and part timings."""

from __future__ import annotations

import pytest

from rsrefseg.bench import profile


def test_gemm_flop_from_shapes() -> None:
    assert profile.gemm_flop("aten::addmm", [[768], [4096, 768], [768, 3072]]) == 2.0 * 4096 * 768 * 3072
    assert profile.gemm_flop("aten::mm", [[64, 32], [32, 16]]) == 2.0 * 64 * 32 * 16
    assert profile.gemm_flop("mkldnn::_linear_pointwise", [[2, 8, 32], [16, 32]]) == 2.0 * 16 * 32 * 16
    assert profile.gemm_flop("aten::bmm", [[3, 4, 5], [3, 5, 6]]) == 2.0 * 3 * 4 * 5 * 6
    # q: B x h x Nq x d, k: B x h x Nk x d -> QK^T and PV
    assert profile.gemm_flop("aten::_scaled_dot_product_flash_attention_for_cpu",
                             [[1, 12, 4096, 64], [1, 12, 4096, 64]]) == 4.0 * 12 * 4096 * 4096 * 64
    assert profile.gemm_flop("aten::gelu", [[4096, 3072]]) == 0.0
    assert profile.gemm_flop("aten::addmm", [[768]]) == 0.0  # malformed shapes count nothing


def test_op_classes() -> None:
    assert profile.op_class("aten::addmm") == "GEMM (addmm/mm, BLAS)"
    assert profile.op_class("aten::gelu") == "GELU"
    assert profile.op_class("aten::copy_") == "copies and layout changes"
    assert profile.op_class("aten::something_new") == "other"


@pytest.mark.slow
def test_profile_of_the_tiny_preset() -> None:
    result = profile.profile_first_expression("tiny", reps=1, log=lambda _: None)
    assert result["wall_s"] > 0 and result["unprofiled_wall_s"] > 0
    assert abs(sum(row["share"] for row in result["op_classes"].values()) - 1.0) < 1e-9
    gemm = result["op_classes"]["GEMM (addmm/mm, BLAS)"]["s"] + result["op_classes"].get(
        "GEMM (linear, oneDNN)", {"s": 0.0})["s"]
    assert gemm > 0
    parts = result["unprofiled_modules_s"]
    # every part of SAM's two layer kinds and of SigLIP's image layers was timed, inside its layer
    for kind in ("global", "windowed"):
        attention = parts[f"SAM {kind}: attention (qkv, attention, proj)"]
        rest = parts[f"SAM {kind}: MLP, norms, residuals (layer - attention)"]
        assert attention > 0 and rest > 0, kind
        assert attention + rest == pytest.approx(parts[f"SAM layer, {kind}"])
    assert parts["SigLIP image: MLP"] > 0
    assert parts["SigLIP layer (image)"] > parts["SigLIP image: MLP"]
    assert "without the profiler" in profile.format_profile(result)
