"""Peak resident memory of one first-expression inference, measured in a fresh subprocess.

The child (``python -m rsrefseg.bench.memory``) builds the preset as the benchmark does (random
init, LoRA merged, fast SAM), records its resident memory, resets the kernel's high-water mark
(``/proc/self/clear_refs``), runs one image + one expression, and reports:

- ``peak_rss_bytes``: the whole process peak (imports and building included): the larger of
  ``ru_maxrss`` and the kernel's ``VmHWM``. On Linux a child's ``ru_maxrss`` starts from its
  parent's resident size at ``fork``, so the suite runs this child before it loads any model;
- ``build_peak_rss_bytes`` and ``inference_peak_rss_bytes``: ``VmHWM`` after building, and of
  the inference alone (after the reset);
- ``weights_bytes``: parameters and buffers; ``activations_bytes``: the peak of live tensor
  storage during the inference (tracked op by op), plus the input image;
- ``ratio``: peak resident / (weights + activations); the interpreter and libraries
  (``baseline_rss_bytes``, after importing them) are part of the numerator;
- ``allocator``: the malloc settings, applied as the ``rsrefseg`` command applies them
  (:mod:`rsrefseg.allocator`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorTracker(TorchDispatchMode):
    """Peak bytes of live tensor storage created inside the mode (views and in-place ops counted once)."""

    def __init__(self, exclude: set[int] | None = None) -> None:
        super().__init__()
        self.exclude = exclude or set()
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [bytes, live tensor objects]
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.current -= entry[0]
            del self.refs[ptr]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if ptr == 0 or size == 0 or ptr in self.exclude:
                continue
            entry = self.refs.get(ptr)
            if entry is None:
                self.refs[ptr] = entry = [size, 0]
                self.current += size
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def child(preset: str, threads: int | None) -> dict[str, Any]:
    """Runs in the fresh process; see the module docstring."""
    if threads:
        torch.set_num_threads(threads)
    import peft  # noqa: F401  (the libraries are part of the baseline, not of the model)
    import transformers  # noqa: F401

    import rsrefseg.build  # noqa: F401
    from rsrefseg.bench.cpu import EXPRESSIONS, build_fast, seeded_image

    baseline = _rss_bytes()
    model, info = build_fast(preset)
    weights = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in list(model.parameters()) + list(model.buffers())}
    image = seeded_image(model.image_size)
    after_build = _rss_bytes()
    build_peak = _hwm_bytes()
    reset = _reset_hwm()
    tracker = LiveTensorTracker(exclude=set(weights))
    with torch.inference_mode(), tracker:
        out = model.decode(model.encode_image(image), model.encode_text(EXPRESSIONS[:1]))
    hwm = _hwm_bytes() if reset else None
    del out
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    weights_bytes = sum(weights.values())
    activations = tracker.peak + image.numel() * image.element_size()
    peak = max(maxrss, hwm or 0, build_peak or 0)
    return {
        "preset": preset,
        "baseline_rss_bytes": baseline,
        "rss_after_build_bytes": after_build,
        "peak_rss_bytes": peak,
        "ru_maxrss_bytes": maxrss,
        "build_peak_rss_bytes": build_peak,
        "inference_peak_rss_bytes": hwm,
        "weights_bytes": weights_bytes,
        "activations_bytes": activations,
        "ratio": peak / (weights_bytes + activations),
        "ratio_without_baseline": (peak - baseline) / (weights_bytes + activations),
        "inference_ratio": (hwm or peak) / (weights_bytes + activations),
        "parameters": info["parameters"],
    }


def measure_memory(preset: str, threads: int | None = None, timeout: float = 1800.0) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter and return its report (or ``{"error": ...}``)."""
    cmd = [sys.executable, "-m", "rsrefseg.bench.memory", "--preset", preset]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    from rsrefseg.allocator import retain_freed_memory

    allocator = retain_freed_memory()  # as the rsrefseg command does (RSREFSEG_MALLOC=system: glibc's defaults)
    print(json.dumps({**child(args.preset, args.threads), "allocator": allocator}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
