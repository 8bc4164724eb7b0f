"""The traced training step (fake tensors) counts exactly what the measured step counts."""

from __future__ import annotations

from typing import Any

import pytest

from rsrefseg.bench.train_step import child
from rsrefseg.bench.train_trace import trace_step

pytestmark = pytest.mark.slow  # a real step and five traces of tiny: ~20 s on 2 free cores


@pytest.fixture(scope="module")
def measured() -> dict[str, Any]:
    return child("tiny", images=2, per_image=1, checkpointing=False, reps=1, probe=64, threads=1)


@pytest.fixture(scope="module")
def traced() -> dict[str, Any]:
    return trace_step("tiny", 2)


def test_trace_equals_measured_step(measured: dict[str, Any], traced: dict[str, Any]) -> None:
    mem = measured["memory"]
    # The same live-storage accounting on fake and real tensors: equal up to a 0-dim scalar or two.
    assert abs(traced["activations_bytes"] - mem["activations_bytes"]) <= 64
    assert mem["activations_bytes"] > 1_000_000
    assert traced["gflop"] == pytest.approx(measured["gflop"], rel=1e-9)
    for key in ("parameters", "trainable_parameters", "weights_bytes", "gradients_bytes"):
        assert traced[key] == measured[key], key
    # AdamW's state as created by the real optimizer (parameters without a gradient get none).
    assert traced["optimizer_state_bytes"] == mem["optimizer_state_bytes"]
    assert mem["optimizer_state_bytes"] <= 2 * mem["gradients_bytes"] + 4 * measured["trainable_parameters"]


def test_measured_step_report(measured: dict[str, Any]) -> None:
    assert measured["expressions"] == 2 and measured["reps"] == 1
    assert measured["min_s"] > 0 and measured["gflops_at_min"] > 0
    assert 0 < measured["share_of_roofline_at_min"]
    assert measured["expressions_per_s_at_min"] == pytest.approx(2 / measured["min_s"])
    mem = measured["memory"]
    assert mem["steps_peak_rss_bytes"] >= mem["baseline_rss_bytes"] > 0
    assert mem["process_peak_rss_bytes"] >= mem["steps_peak_rss_bytes"]


def test_trace_scales_and_levers(traced: dict[str, Any]) -> None:
    one = trace_step("tiny", 1)
    ckpt = trace_step("tiny", 2, checkpointing=True)
    grouped = trace_step("tiny", 1, per_image=4)
    bf16 = trace_step("tiny", 2, precision="bf16")
    # Activations and FLOPs grow with the batch; checkpointing trades activations for a recomputed forward.
    assert 1.6 * one["activations_bytes"] < traced["activations_bytes"] < 2.4 * one["activations_bytes"]
    assert traced["gflop"] == pytest.approx(2 * one["gflop"], rel=1e-3)
    assert ckpt["activations_bytes"] < 0.9 * traced["activations_bytes"]
    assert ckpt["gflop"] > 1.05 * traced["gflop"]
    # One image encoded for four expressions: fewer FLOPs than four pairs, more than one.
    assert one["gflop"] < grouped["gflop"] < 4 * one["gflop"]
    assert grouped["expressions"] == 4
    # bf16 autocast keeps fewer activation bytes (fp32 weights, bf16 matmul outputs).
    assert bf16["activations_bytes"] < traced["activations_bytes"]
    assert bf16["weights_bytes"] == traced["weights_bytes"]


def test_flop_counting_keeps_checkpointing_s_saving() -> None:
    """FLOPs are counted without FlopCounterMode's module hooks, which keep checkpointed activations alive."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import rsrefseg.bench.train_trace as tt
    from rsrefseg.bench.flops import count_flops

    def peak(counter: Any) -> tuple[int, float]:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        model = tt.fake_model("tiny", True, mode)
        tracker = tt.StorageTracker(exclude=tt.storage_keys(model))
        with mode:
            batch = tt.step_inputs(model.image_size, 2, 1)

            def step() -> None:
                with tracker:
                    tt.loss_terms(model, batch, tt.recipe("tiny")["loss"]).backward()

            gflop = counter(step)["gflop"] if counter else 0.0
            if counter is None:
                step()
        return tracker.peak, gflop

    plain, _ = peak(None)
    lean, lean_gflop = peak(tt.count_step_flops)
    hooked, hooked_gflop = peak(count_flops)
    assert lean == plain and lean_gflop == pytest.approx(hooked_gflop, rel=1e-12)
    assert hooked > plain  # the module-tracking counter holds activations the step has freed
    measured = child("tiny", images=2, per_image=1, checkpointing=True, reps=1, probe=64, threads=1)
    assert abs(measured["memory"]["activations_bytes"] - plain) <= 0.02 * plain
    assert measured["gflop"] == pytest.approx(lean_gflop, rel=1e-9)
