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

from rsrefseg.modeling.fast_linear import cpu_flags


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


def _busy_seconds() -> float | None:
    """CPU seconds all processes have been busy since boot (Linux ``/proc/stat``), or None."""
    try:
        with open("/proc/stat", encoding="utf-8") as handle:
            fields = handle.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuMonitor:
    """How much CPU other processes used while this one ran (the machine is shared).

    ``others_cpu_fraction`` is the busy time of everything but this process (and its children)
    over ``wall x cores``: 0 on a quiet machine; 0.5 on 2 cores means one core was taken.
    """

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._wall = time.perf_counter()
        self._busy = _busy_seconds()
        t = os.times()
        self._ours = t.user + t.system + t.children_user + t.children_system

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._wall
        busy = _busy_seconds()
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system - self._ours
        if busy is None or self._busy is None or wall <= 0:
            return {"wall_s": wall, "others_cpu_fraction": None}
        others = max(0.0, busy - self._busy - ours)
        return {"wall_s": wall, "ours_cpu_s": ours, "others_cpu_s": others,
                "others_cpu_fraction": others / (wall * (os.cpu_count() or 1))}


def contention(start: list[float], end: list[float], others_fraction: float | None, threads: int) -> dict[str, Any]:
    """Whether other work took CPU this run's threads needed (see :class:`CpuMonitor`).

    Contended: other processes used more than the cores this run leaves free, plus 0.1 core.
    """
    cores = os.cpu_count() or 1
    free = max(0, cores - threads)
    return {
        "load_average_start": start,
        "load_average_end": end,
        "others_cpu_fraction": others_fraction,
        "others_cores": None if others_fraction is None else others_fraction * cores,
        "contended": None if others_fraction is None else others_fraction * cores > free + 0.1,
        "note": "others_cpu_fraction: CPU time of other processes / (wall x cores) over the whole run",
    }
