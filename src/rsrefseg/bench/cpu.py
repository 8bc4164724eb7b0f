"""One model on the CPU: FLOPs and time per stage, first and further expressions, naive, bf16.

Every variant is timed in rounds (each round runs every variant once), so slow drifts of a shared
machine hit all of them alike and their ratios are side by side. The optimised inference path is
the library's :func:`rsrefseg.modeling.optimize.optimize_for_inference`; the reference SAM encoder
is the same model with the Hugging Face attention put back.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from rsrefseg.bench.flops import count_flops
from rsrefseg.bench.roofline import probes, round_roofline
from rsrefseg.bench.timing import CpuMonitor, scaled

#: The expressions of the benchmark (one image, several referring expressions).
EXPRESSIONS = [
    "the storage tank on the far left",
    "the largest airplane near the terminal",
    "all the ships in the harbor",
    "the vehicle closest to the top of the image",
    "the baseball field next to the tennis courts",
    "the bridge over the river in the middle",
    "the small white building on the right",
    "the ground track field at the bottom",
]


def seeded_image(size: int, seed: int = 0) -> torch.Tensor:
    """``1 x 3 x size x size`` RGB in [0, 255]."""
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255.0


def rounds(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, dict[str, Any]]:
    """Time several functions side by side: ``warmup`` + ``reps`` rounds, each running all once.

    The entry ``"_cpu"`` says how much CPU other processes took meanwhile.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    monitor = CpuMonitor()
    for r in range(warmup + max(1, reps)):
        if r == warmup:
            monitor.start()
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    out: dict[str, dict[str, Any]] = {
        name: {"min_s": min(t), "median_s": statistics.median(t), "reps": len(t), "times_s": t}
        for name, t in times.items()
    }
    out["_cpu"] = monitor.stop()
    return out


def _rate(timing: dict[str, Any], gflop: float, roof: dict[str, Any] | None) -> dict[str, Any]:
    """Add GFLOP/s and shares of the GEMMs measured in the same rounds (min vs min, median vs median).

    ``share_of_roofline``: of the best GEMM (the roofline); ``share_of_torch_mm``: of ``torch.mm``
    alone (the first suite's roofline, kept for comparison).
    """
    out = dict(timing)
    out["gflop"] = gflop
    out["gflops_at_min"] = gflop / timing["min_s"]
    out["gflops_at_median"] = gflop / timing["median_s"]
    r = roof or {}
    for at in ("min", "median"):
        best, mm = r.get(f"best_gflops_at_{at}", 0.0), r.get(f"gflops_at_{at}", 0.0)
        out[f"share_of_roofline_at_{at}"] = out[f"gflops_at_{at}"] / best if best else None
        out[f"share_of_torch_mm_at_{at}"] = out[f"gflops_at_{at}"] / mm if mm else None
    return out


def _roof(timings: dict[str, Any], name: str, gflop: float) -> dict[str, Any]:
    """Pop the probe timings ``name[_kind]`` into GFLOP/s (:func:`rsrefseg.bench.roofline.round_roofline`)."""
    return round_roofline(timings, name, gflop)


def build_fast(preset: str) -> tuple[Any, dict[str, Any]]:
    """The preset at seeded random init (FLOP-identical to the trained model), optimised for inference.

    :func:`rsrefseg.modeling.optimize.optimize_for_inference` in fp32: LoRA merged, fast SAM
    attention, oneDNN linears, CLIP/SigLIP attention that is fast in bf16.
    """
    from rsrefseg.modeling.optimize import optimize_for_inference
    from rsrefseg.modeling.rsrefseg import RSRefSeg

    start = time.perf_counter()
    model = RSRefSeg.from_preset(preset, random_init=True)
    build_s = time.perf_counter() - start
    done = optimize_for_inference(model, "fp32")
    params = sum(p.numel() for p in model.parameters())
    return model, {"build_s": build_s, "fast_sam_layers": done["fast_sam_layers"],
                   "fast_linear_layers": done["fast_linear_layers"],
                   "fast_attention_models": done["fast_attention_models"], "parameters": params}


def _agreement(a: Any, b: Any) -> dict[str, float]:
    """How close two RSRefSegOutputs are: max |diff| of mask logits and IoU of the binary masks."""
    la, lb = a.mask_logits.float(), b.mask_logits.float()
    ma, mb = la > 0, lb > 0
    union = (ma | mb).sum().item()
    return {
        "mask_logits_max_abs_diff": (la - lb).abs().max().item(),
        "mask_logits_max_abs": la.abs().max().item(),
        "mask_iou": (ma & mb).sum().item() / union if union else 1.0,
    }


def bench_model(
    preset: str,
    reps: int,
    probe_size: int = 4096,
    batch: int = 8,
    bf16: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """All CPU measurements of one preset (see the module docstring).

    A ``probe_size^2`` matmul runs in every round: GFLOP/s are shared against the roofline measured
    under the same conditions as the stage, not minutes earlier on a shared machine.
    """
    from rsrefseg.modeling.fast_sam import (
        disable_fast_linear,
        disable_fast_sam,
        enable_fast_linear,
        enable_fast_sam,
    )

    model, info = build_fast(preset)
    log(f"[{preset}] built in {info['build_s']:.1f} s ({info['parameters'] / 1e6:.1f} M parameters)")
    image = seeded_image(model.image_size)
    texts = EXPRESSIONS[:batch]
    index = torch.zeros(len(texts), dtype=torch.long)
    # The fp32 probes are built once and run in both rounds (stages and pipelines).
    probes32, g32 = probes("roofline_fp32", probe_size, torch.float32)  # every fp32 GEMM kind
    result: dict[str, Any] = {"preset": preset, **info, "image_size": model.image_size,
                              "clip_image_size": model.clip.image_size, "batch_expressions": len(texts)}
    with torch.inference_mode():
        sam_in = (image - model.sam_mean) / model.sam_std
        feats = model.encode_image(image)
        one, many = model.encode_text(texts[:1]), model.encode_text(texts)
        naive_i = [0]

        def naive() -> Any:  # the reference pipeline: every expression re-encodes the image
            naive_i[0] = (naive_i[0] + 1) % len(texts)
            return model(image, [texts[naive_i[0]]])

        def sam_reference() -> Any:  # the Hugging Face modules, as built
            encoder = model.sam.vision_encoder
            disable_fast_sam(encoder)
            disable_fast_linear(encoder)
            try:
                return encoder(sam_in)
            finally:
                enable_fast_sam(encoder)
                enable_fast_linear(encoder)

        stage_fns: dict[str, Callable[[], Any]] = {
            "sam_image_encoder": lambda: model.sam.vision_encoder(sam_in),
            "sam_image_encoder_reference": sam_reference,
            "clip_image_encoder": lambda: model.clip.encode_image(image),
            "text_encoder_per_expression": lambda: model.encode_text(texts[:1]),
            "decode_per_expression": lambda: model.decode(feats, one),
            "text_encoder_batch": lambda: model.encode_text(texts),
            "decode_batch": lambda: model.decode(feats, many, image_index=index),
        }
        log(f"[{preset}] counting FLOPs")  # (this pass doubles as a warm-up)
        flops = {name: count_flops(fn) for name, fn in stage_fns.items()}
        keys = ("sam_image_encoder", "clip_image_encoder", "text_encoder_per_expression", "decode_per_expression")
        flops["first_expression"] = {k: sum(flops[s][k] for s in keys) for k in flops["sam_image_encoder"]}
        further = {k: (flops["text_encoder_batch"][k] + flops["decode_batch"][k]) / len(texts)
                   for k in flops["sam_image_encoder"]}
        flops["further_expression_batched_per_expression"] = further
        result["flops"] = flops
        g = {name: f["gflop"] for name, f in flops.items()}

        log(f"[{preset}] timing stages ({reps} reps)")
        st = rounds({**stage_fns, **probes32}, reps)
        roof = _roof(st, "roofline_fp32", g32)
        result["roofline_in_rounds"] = {"stages_fp32": roof}
        result["contention"] = {"stages": st.pop("_cpu")}
        stages = {name: _rate(t, g[name], roof) for name, t in st.items()}
        for name in ("text_encoder_batch", "decode_batch"):
            stages[name + "_per_expression"] = _rate(scaled(st[name], len(texts)), g[name] / len(texts), roof)
        result["stages"] = stages
        fast_out = model.sam.vision_encoder(sam_in).last_hidden_state
        result["fast_sam"] = {
            "speedup_min": st["sam_image_encoder_reference"]["min_s"] / st["sam_image_encoder"]["min_s"],
            "speedup_median": st["sam_image_encoder_reference"]["median_s"] / st["sam_image_encoder"]["median_s"],
            "max_abs_diff_vs_hf": (fast_out - sam_reference().last_hidden_state).abs().max().item(),
        }
        result["pipeline"] = _pipelines(model, image, texts, feats, naive, reps, g, further["gflop"], bf16,
                                        probe_size, probes32, g32, result, log)
    return result


def _pipelines(model: Any, image: torch.Tensor, texts: list[str], feats: Any, naive: Callable[[], Any], reps: int,
               g: dict[str, float], further_gflop: float, bf16: bool, probe_size: int,
               probes32: dict[str, Callable[[], Any]], g32: float, result: dict[str, Any],
               log: Callable[[str], None]) -> dict[str, Any]:
    """First / further / naive expressions (+ the bf16 path), side by side (with the fp32 probes)."""
    from rsrefseg.modeling.optimize import PrecisionFallbackWarning, optimize_for_inference

    index = torch.zeros(len(texts), dtype=torch.long)
    fns: dict[str, Callable[[], Any]] = {
        "first_expression": lambda: model.decode(model.encode_image(image), model.encode_text(texts[:1])),
        "further_expression_batched": lambda: model.decode(feats, model.encode_text(texts), image_index=index),
        "further_expression_single": lambda: model.decode(feats, model.encode_text(texts[1:2])),
        "naive_per_expression": naive,
        **probes32,
    }
    bf16_model, bf16_path = None, None
    if bf16:
        bf16_path = _bf16_path(g["first_expression"], probe_size)
        result["bf16_path"] = bf16_path
        log(f"[{preset_of(model)}] bf16 path: {bf16_path['status']}")
    if bf16_path is not None and bf16_path["timed"]:
        tokenizer = model.clip.tokenizer  # shared: tokenizers need not (and some cannot) be copied
        bf16_model = copy.deepcopy(model, memo={id(tokenizer): tokenizer})
        # the library's bf16 path (encoders bf16, head fp32); forced where the library keeps fp32
        with warnings.catch_warnings():  # the report says what the library does (bf16_path)
            warnings.simplefilter("ignore", PrecisionFallbackWarning)
            optimize_for_inference(bf16_model, "bf16", fallback=False)
        feats16 = bf16_model.encode_image(image)
        fns["bf16_first_expression"] = lambda: bf16_model.decode(
            bf16_model.encode_image(image), bf16_model.encode_text(texts[:1]))
        fns["bf16_further_expression_batched"] = lambda: bf16_model.decode(
            feats16, bf16_model.encode_text(texts), image_index=index)
    if bf16_path is not None:  # the bf16 GEMMs, sized to stay affordable where bf16 is slow
        probes16, g16 = probes("roofline_bf16", bf16_path["probe_size"], torch.bfloat16)
        fns.update(probes16)
    log(f"[{preset_of(model)}] timing pipelines ({reps} reps)")
    pt = rounds(fns, reps)
    result["contention"]["pipelines"] = pt.pop("_cpu")
    roof = _roof(pt, "roofline_fp32", g32)
    result["roofline_in_rounds"]["pipelines_fp32"] = roof
    n = len(texts)
    pipe: dict[str, Any] = {
        "first_expression": _rate(pt["first_expression"], g["first_expression"], roof),
        "further_expression_batched_per_expression": _rate(scaled(pt["further_expression_batched"], n),
                                                           further_gflop, roof),
        "further_expression_single": _rate(pt["further_expression_single"],
                                           g["text_encoder_per_expression"] + g["decode_per_expression"], roof),
        "naive_per_expression": _rate(pt["naive_per_expression"], g["first_expression"], roof),
    }
    first, b, nv = pt["first_expression"], pipe["further_expression_batched_per_expression"], pipe["naive_per_expression"]
    ratios = pipe["ratios"] = {
        "first_over_further_batched_min": first["min_s"] / b["min_s"],
        "first_over_further_batched_median": first["median_s"] / b["median_s"],
        "naive_over_further_batched_min": nv["min_s"] / b["min_s"],
        "naive_over_further_batched_median": nv["median_s"] / b["median_s"],
        "first_over_further_single_min": first["min_s"] / pipe["further_expression_single"]["min_s"],
    }
    if bf16_path is not None:
        roof16 = _roof(pt, "roofline_bf16", g16)
        result["roofline_in_rounds"]["pipelines_bf16"] = roof16
        # What bf16 can gain at most where everything is GEMM: the best bf16 GEMM over the best fp32
        # GEMM, probed in the same rounds (below 1 on CPUs without native bf16).
        for at in ("min", "median"):
            ratios[f"bf16_gemm_ceiling_{at}"] = roof16[f"best_gflops_at_{at}"] / roof[f"best_gflops_at_{at}"]
    if bf16_model is not None:
        pipe["bf16_first_expression"] = _rate(pt["bf16_first_expression"], g["first_expression"], roof16)
        pipe["bf16_further_expression_batched_per_expression"] = _rate(
            scaled(pt["bf16_further_expression_batched"], n), further_gflop, roof16)
        ratios["bf16_speedup_first_min"] = first["min_s"] / pt["bf16_first_expression"]["min_s"]
        ratios["bf16_speedup_first_median"] = first["median_s"] / pt["bf16_first_expression"]["median_s"]
        ratios["bf16_speedup_further_batched_min"] = (
            pt["further_expression_batched"]["min_s"] / pt["bf16_further_expression_batched"]["min_s"])
        pipe["bf16_agreement"] = _agreement(fns["first_expression"](), fns["bf16_first_expression"]())
    return pipe


#: The bf16 pipelines are timed where the library keeps fp32 (no bf16 kernels) only when a first
#: expression is estimated to take at most this long at the CPU's best bf16 GEMM rate.
FORCED_BF16_BUDGET_S = 30.0


def _bf16_path(first_gflop: float, largest_probe: int) -> dict[str, Any]:
    """What ``--precision bf16`` does on this CPU, and whether the suite times it.

    Returns ``{"support", "library", "timed", "status", "probe_size", "estimated_first_s"}``:
    where the library falls back to fp32 (:func:`rsrefseg.modeling.optimize.bf16_cpu_support` is
    ``"none"``) the real bf16 path is timed only when cheap (small presets), since it is a
    model the library never runs there.
    """
    from rsrefseg.bench.roofline import calibrate, gemm_kinds, probe_size
    from rsrefseg.modeling.optimize import bf16_cpu_support

    support = bf16_cpu_support()
    size = probe_size(torch.bfloat16, largest_probe)
    out: dict[str, Any] = {"support": support, "probe_size": size,
                           "library": "fp32 (falls back: no bf16 kernels)" if support == "none" else "bf16"}
    if support != "none":
        return {**out, "timed": True, "status": f"bf16 ({support})"}
    best = max(calibrate(torch.bfloat16, kind) for kind in gemm_kinds(torch.bfloat16))
    estimate = first_gflop / best
    timed = estimate <= FORCED_BF16_BUDGET_S
    status = ("bf16 forced (the library keeps fp32 on this CPU)" if timed else
              f"not timed: the library keeps fp32 on this CPU (no bf16 kernels); forced bf16 would take "
              f"~{estimate:.0f} s per first expression")
    return {**out, "timed": timed, "status": status, "estimated_first_s": estimate}


def preset_of(model: Any) -> str:
    return str(getattr(model.config, "preset", "model"))
