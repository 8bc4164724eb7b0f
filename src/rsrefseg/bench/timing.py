"""Timing helpers and a description of the machine the numbers come from."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def time_fn(fn: Callable[[], Any], reps: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times; wall-clock seconds.

    Returns:
        ``{"min_s", "median_s", "reps", "times_s"}``.
    """
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times: list[float] = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return {"min_s": min(times), "median_s": statistics.median(times), "reps": len(times), "times_s": times}


def scaled(timing: dict[str, Any], divisor: float) -> dict[str, Any]:
    """A timing divided by ``divisor`` (per expression from a batch of ``divisor``)."""
    out = {k: v / divisor for k, v in timing.items() if k in ("min_s", "median_s")}
    out["reps"] = timing["reps"]
    out["times_s"] = [t / divisor for t in timing["times_s"]]
    out["per"] = divisor
    return out


def cpu_flags() -> set[str]:
    """The CPU feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return []


def machine_info(argv: list[str] | None = None) -> dict[str, Any]:
    """Date, command, versions, CPU (model, cores, bf16/AMX flags), threads and load."""
    import transformers

    flags = cpu_flags()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(argv if argv is not None else sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda": torch.cuda.is_available(),
        "load_average_start": load_average(),
    }


def contention(start: list[float], end: list[float], cpus: int | None) -> dict[str, Any]:
    """Whether other work shared the CPUs: 1-minute load above the cores this run uses."""
    cores = cpus or 1
    worst = max([x for x in start[:1] + end[:1]] or [0.0])
    return {
        "load_average_start": start,
        "load_average_end": end,
        "contended": worst > cores + 0.5,
        "note": "1-minute load average vs cores; this run itself accounts for up to all cores",
    }
