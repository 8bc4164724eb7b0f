"""One model on the CPU: FLOPs and time per stage, first and further expressions, naive, bf16.

Every variant is timed in rounds (each round runs every variant once), so slow drifts of a shared
machine hit all of them alike and their ratios are side by side. The optimised inference path is
the library's: ``merge_lora()`` + :func:`rsrefseg.modeling.fast_sam.enable_fast_sam`; the
reference SAM encoder is the same model with the Hugging Face attention put back.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from rsrefseg.bench.flops import count_flops
from rsrefseg.bench.timing import scaled

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
    """Time several functions side by side: ``warmup`` + ``reps`` rounds, each running all once."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + max(1, reps)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {
        name: {"min_s": min(t), "median_s": statistics.median(t), "reps": len(t), "times_s": t}
        for name, t in times.items()
    }


def _rate(timing: dict[str, Any], gflop: float, roof: float) -> dict[str, Any]:
    out = dict(timing)
    out["gflop"] = gflop
    out["gflops_at_min"] = gflop / timing["min_s"]
    out["gflops_at_median"] = gflop / timing["median_s"]
    out["share_of_roofline_at_min"] = out["gflops_at_min"] / roof if roof else None
    out["share_of_roofline_at_median"] = out["gflops_at_median"] / roof if roof else None
    return out


def build_fast(preset: str) -> tuple[Any, dict[str, Any]]:
    """The preset at seeded random init (FLOP-identical to the trained model), LoRA merged, fast SAM."""
    from rsrefseg.modeling.fast_sam import enable_fast_sam
    from rsrefseg.modeling.rsrefseg import RSRefSeg

    start = time.perf_counter()
    model = RSRefSeg.from_preset(preset, random_init=True)
    build_s = time.perf_counter() - start
    model.merge_lora()
    patched = enable_fast_sam(model)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    return model, {"build_s": build_s, "fast_sam_layers": patched, "parameters": params}


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
    roof_fp32: float,
    roof_bf16: float | None = None,
    batch: int = 8,
    bf16: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """All CPU measurements of one preset (see the module docstring)."""
    from rsrefseg.modeling.fast_sam import disable_fast_sam, enable_fast_sam

    model, info = build_fast(preset)
    log(f"[{preset}] built in {info['build_s']:.1f} s ({info['parameters'] / 1e6:.1f} M parameters)")
    image = seeded_image(model.image_size)
    texts = EXPRESSIONS[:batch]
    index = torch.zeros(len(texts), dtype=torch.long)
    result: dict[str, Any] = {"preset": preset, **info, "image_size": model.image_size,
                              "clip_image_size": model.clip.image_size, "batch_expressions": len(texts)}
    with torch.inference_mode():
        x = torch.nn.functional.interpolate(image, size=(model.image_size,) * 2, mode="bilinear")
        sam_in = (x - model.sam_mean) / model.sam_std
        feats = model.encode_image(image)
        one, many = model.encode_text(texts[:1]), model.encode_text(texts)

        def first() -> Any:
            return model.decode(model.encode_image(image), model.encode_text(texts[:1]))

        def further_batched() -> Any:
            return model.decode(feats, model.encode_text(texts), image_index=index)

        def further_single() -> Any:
            return model.decode(feats, model.encode_text(texts[1:2]))

        naive_i = [0]

        def naive() -> Any:  # the reference pipeline: every expression re-encodes the image
            naive_i[0] = (naive_i[0] + 1) % len(texts)
            return model(image, [texts[naive_i[0]]])

        def sam_reference() -> Any:
            disable_fast_sam(model)
            try:
                return model.sam.vision_encoder(sam_in)
            finally:
                enable_fast_sam(model)

        # ---- FLOPs (this pass doubles as a warm-up)
        log(f"[{preset}] counting FLOPs")
        flops = {
            "sam_image_encoder": count_flops(lambda: model.sam.vision_encoder(sam_in)),
            "sam_image_encoder_reference": count_flops(sam_reference),
            "clip_image_encoder": count_flops(lambda: model.clip.encode_image(image)),
            "text_encoder_per_expression": count_flops(lambda: model.encode_text(texts[:1])),
            "decode_per_expression": count_flops(lambda: model.decode(feats, one)),
            "text_encoder_batch": count_flops(lambda: model.encode_text(texts)),
            "decode_batch": count_flops(lambda: model.decode(feats, many, image_index=index)),
        }
        keys = ("sam_image_encoder", "clip_image_encoder", "text_encoder_per_expression", "decode_per_expression")
        flops["first_expression"] = {k: sum(flops[s][k] for s in keys) for k in flops["sam_image_encoder"]}
        further = {k: (flops["text_encoder_batch"][k] + flops["decode_batch"][k]) / len(texts)
                   for k in flops["sam_image_encoder"]}
        flops["further_expression_batched_per_expression"] = further
        result["flops"] = flops
        g = {name: f["gflop"] for name, f in flops.items()}

        # ---- stages (fast path) and the reference SAM encoder, side by side
        log(f"[{preset}] timing stages ({reps} reps)")
        st = rounds({
            "sam_image_encoder": lambda: model.sam.vision_encoder(sam_in),
            "sam_image_encoder_reference": sam_reference,
            "clip_image_encoder": lambda: model.clip.encode_image(image),
            "text_encoder_per_expression": lambda: model.encode_text(texts[:1]),
            "decode_per_expression": lambda: model.decode(feats, one),
            "text_encoder_batch": lambda: model.encode_text(texts),
            "decode_batch": lambda: model.decode(feats, many, image_index=index),
        }, reps)
        stages = {name: _rate(t, g[name], roof_fp32) for name, t in st.items()}
        for name in ("text_encoder_batch", "decode_batch"):
            per = scaled(st[name], len(texts))
            stages[name + "_per_expression"] = _rate(per, g[name] / len(texts), roof_fp32)
        result["stages"] = stages
        ref_out = model.sam.vision_encoder(sam_in).last_hidden_state
        disable_fast_sam(model)
        hf_out = model.sam.vision_encoder(sam_in).last_hidden_state
        enable_fast_sam(model)
        result["fast_sam"] = {
            "speedup_min": st["sam_image_encoder_reference"]["min_s"] / st["sam_image_encoder"]["min_s"],
            "speedup_median": st["sam_image_encoder_reference"]["median_s"] / st["sam_image_encoder"]["median_s"],
            "max_abs_diff_vs_hf": (ref_out - hf_out).abs().max().item(),
        }

        # ---- pipelines (+ bf16 weights), side by side
        fns: dict[str, Callable[[], Any]] = {
            "first_expression": first,
            "further_expression_batched": further_batched,
            "further_expression_single": further_single,
            "naive_per_expression": naive,
        }
        bf16_model = None
        if bf16:
            tokenizer = model.clip.tokenizer  # shared: tokenizers need not (and some cannot) be copied
            bf16_model = copy.deepcopy(model, memo={id(tokenizer): tokenizer}).to(torch.bfloat16)
            feats16 = bf16_model.encode_image(image)
            fns["bf16_first_expression"] = lambda: bf16_model.decode(
                bf16_model.encode_image(image), bf16_model.encode_text(texts[:1]))
            fns["bf16_further_expression_batched"] = lambda: bf16_model.decode(
                feats16, bf16_model.encode_text(texts), image_index=index)
        log(f"[{preset}] timing pipelines ({reps} reps)")
        pt = rounds(fns, reps)
        pipe: dict[str, Any] = {}
        pipe["first_expression"] = _rate(pt["first_expression"], g["first_expression"], roof_fp32)
        pipe["further_expression_batched_per_expression"] = _rate(
            scaled(pt["further_expression_batched"], len(texts)), further["gflop"], roof_fp32)
        pipe["further_expression_single"] = _rate(
            pt["further_expression_single"], g["text_encoder_per_expression"] + g["decode_per_expression"], roof_fp32)
        pipe["naive_per_expression"] = _rate(pt["naive_per_expression"], g["first_expression"], roof_fp32)
        f_min, f_med = pt["first_expression"]["min_s"], pt["first_expression"]["median_s"]
        b = pipe["further_expression_batched_per_expression"]
        n = pipe["naive_per_expression"]
        pipe["ratios"] = {
            "first_over_further_batched_min": f_min / b["min_s"],
            "first_over_further_batched_median": f_med / b["median_s"],
            "naive_over_further_batched_min": n["min_s"] / b["min_s"],
            "naive_over_further_batched_median": n["median_s"] / b["median_s"],
            "first_over_further_single_min": f_min / pipe["further_expression_single"]["min_s"],
        }
        if bf16_model is not None:
            pipe["bf16_first_expression"] = _rate(pt["bf16_first_expression"], g["first_expression"], roof_bf16 or 0.0)
            pipe["bf16_further_expression_batched_per_expression"] = _rate(
                scaled(pt["bf16_further_expression_batched"], len(texts)), further["gflop"], roof_bf16 or 0.0)
            pipe["ratios"]["bf16_speedup_first_min"] = f_min / pt["bf16_first_expression"]["min_s"]
            pipe["ratios"]["bf16_speedup_first_median"] = f_med / pt["bf16_first_expression"]["median_s"]
            pipe["ratios"]["bf16_speedup_further_batched_min"] = (
                pt["further_expression_batched"]["min_s"] / pt["bf16_further_expression_batched"]["min_s"])
            pipe["bf16_agreement"] = _agreement(first(), fns["bf16_first_expression"]())
            del bf16_model
        result["pipeline"] = pipe
    return result
