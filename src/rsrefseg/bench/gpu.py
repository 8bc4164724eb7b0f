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
    from rsrefseg.bench.cpu import build_fast
    from rsrefseg.modeling.fast_sam import enable_fast_sam
    from rsrefseg.modeling.rsrefseg import RSRefSeg

    result: dict[str, Any] = {"status": "measured", "device": torch.cuda.get_device_name(0)}
    roof = roofline([4096, 8192], reps, ("bf16",), device="cuda")
    peak = roof["bf16"]["gflops"]
    result["roofline_bf16_gflops"] = peak
    model, _ = build_fast(preset)
    model.to("cuda", torch.bfloat16)
    log(f"[gpu {preset}] inference")
    with torch.inference_mode():
        image, texts = _inputs(model, 1)
        gflop = count_flops(lambda: model(image, texts))["gflop"]
        lat = time_fn(lambda: model(image, texts), reps=max(reps, 5), warmup=2, sync=_sync)
        result["latency_batch1"] = {**lat, "gflop": gflop, "mfu_at_min": gflop / lat["min_s"] / peak}
        through: dict[str, Any] = {}
        for b in batches:
            try:
                image, texts = _inputs(model, b)
                t = time_fn(lambda: model(image, texts), reps=reps, warmup=1, sync=_sync)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
            through[str(b)] = {**t, "images_per_s": b / t["min_s"], "mfu_at_min": b * gflop / t["min_s"] / peak}
        best = max(through, key=lambda k: through[k]["images_per_s"])
        result["throughput"] = {"per_batch": through, "best_batch": int(best),
                                "images_per_s": through[best]["images_per_s"]}
    del model
    torch.cuda.empty_cache()

    log(f"[gpu {preset}] training step (LoRA, bf16 autocast, batch {train_batch})")
    train = RSRefSeg.from_preset(preset, random_init=True).to("cuda")
    enable_fast_sam(train)
    train.train()
    params = [p for p in train.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    image, texts = _inputs(train, train_batch)
    target = (torch.rand(train_batch, 1, train.image_size, train.image_size, device="cuda") > 0.5).float()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = train(image, texts)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.mask_logits.float(), target)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    step_gflop = count_flops(step)["gflop"]
    t = time_fn(step, reps=reps, warmup=2, sync=_sync)
    result["training_step"] = {**t, "batch": train_batch, "gflop": step_gflop,
                               "mfu_at_min": step_gflop / t["min_s"] / peak,
                               "mfu_at_median": step_gflop / t["median_s"] / peak,
                               "mfu_note": "FLOPs counted (forward + backward) / time / measured bf16 matmul peak"}
    del train, optim
    torch.cuda.empty_cache()
    return result
