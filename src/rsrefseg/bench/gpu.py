"""The GPU section: bf16 latency, throughput at the best batch size, a training step and MFU.

Without CUDA it records ``"not measured (no GPU)"``. Any failure is recorded, never raised, so
the CPU results of the run are always written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rsrefseg.bench.flops import count_flops
from rsrefseg.bench.roofline import roofline
from rsrefseg.bench.timing import time_fn

NO_GPU = "not measured (no GPU)"


def _sync() -> None:
    torch.cuda.synchronize()


def _inputs(model: Any, batch: int) -> tuple[torch.Tensor, list[str]]:
    from rsrefseg.bench.cpu import EXPRESSIONS, seeded_image

    image = seeded_image(model.image_size).to("cuda").expand(batch, -1, -1, -1).contiguous()
    texts = [EXPRESSIONS[i % len(EXPRESSIONS)] for i in range(batch)]
    return image, texts


def bench_gpu(
    preset: str, reps: int, batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32), train_batch: int = 8,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """bf16 inference latency (batch 1), best throughput, training step time and MFU on CUDA."""
    if not torch.cuda.is_available():
        return {"status": NO_GPU}
    try:
        return _bench_gpu(preset, reps, batches, train_batch, log)
    except Exception as exc:  # recorded in the report, the CPU results still count
        torch.cuda.empty_cache()
        return {"status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def _bench_gpu(preset: str, reps: int, batches: tuple[int, ...], train_batch: int,
               log: Callable[[str], None]) -> dict[str, Any]:
    result: dict[str, Any] = {"status": "measured", "device": torch.cuda.get_device_name(0)}
    roof = roofline([4096, 8192], reps, ("bf16",), device="cuda")
    peak = roof["bf16"]["gflops"]
    result["roofline_bf16_gflops"] = peak
    log(f"[gpu {preset}] inference")
    result.update(_inference(preset, reps, batches, peak))
    torch.cuda.empty_cache()
    log(f"[gpu {preset}] training step (LoRA, bf16 autocast, batch {train_batch})")
    result["training_step"] = _training(preset, reps, train_batch, peak)
    torch.cuda.empty_cache()
    return result


def _inference(preset: str, reps: int, batches: tuple[int, ...], peak: float) -> dict[str, Any]:
    from rsrefseg.bench.cpu import build_fast

    model, _ = build_fast(preset)
    model.to("cuda", torch.bfloat16)

    def timed(batch: int, warmup: int, n: int) -> dict[str, Any]:
        image, texts = _inputs(model, batch)
        return time_fn(lambda: model(image, texts), reps=n, warmup=warmup, sync=_sync)

    out: dict[str, Any] = {}
    with torch.inference_mode():
        image, texts = _inputs(model, 1)
        gflop = count_flops(lambda: model(image, texts))["gflop"]
        lat = timed(1, 2, max(reps, 5))
        out["latency_batch1"] = {**lat, "gflop": gflop, "mfu_at_min": gflop / lat["min_s"] / peak}
        through: dict[str, Any] = {}
        for b in batches:
            try:
                t = timed(b, 1, reps)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
            through[str(b)] = {**t, "images_per_s": b / t["min_s"], "mfu_at_min": b * gflop / t["min_s"] / peak}
        best = max(through, key=lambda k: through[k]["images_per_s"])
        out["throughput"] = {"per_batch": through, "best_batch": int(best), "images_per_s": through[best]["images_per_s"]}
    return out


def _training(preset: str, reps: int, batch: int, peak: float) -> dict[str, Any]:
    from rsrefseg.modeling.fast_sam import enable_fast_sam
    from rsrefseg.modeling.rsrefseg import RSRefSeg

    model = RSRefSeg.from_preset(preset, random_init=True).to("cuda")
    enable_fast_sam(model)
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    image, texts = _inputs(model, batch)
    target = (torch.rand(batch, 1, model.image_size, model.image_size, device="cuda") > 0.5).float()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(image, texts)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.mask_logits.float(), target)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    gflop = count_flops(step)["gflop"]
    t = time_fn(step, reps=reps, warmup=2, sync=_sync)
    return {**t, "batch": batch, "gflop": gflop, "mfu_at_min": gflop / t["min_s"] / peak,
            "mfu_at_median": gflop / t["median_s"] / peak,
            "mfu_note": "FLOPs counted (forward + backward) / time / measured bf16 matmul peak"}
