"""Keep freed memory inside the process so large tensors do not page-fault on every use (glibc).

Decoding a window allocates and frees the same few dozen tensors of 1-30 MB for every window and
expression set (image tokens, upscaled maps, ``C x 1024 x 1024`` logits). With glibc's default
settings, blocks that size are served by ``mmap`` and unmapped again on ``free``, and the heap is
trimmed back to the operating system whenever its free top exceeds the (dynamic) trim threshold, so
every new tensor faults its pages in again: 0.6-0.7 million minor page faults per 18-window Landsat
decode, 2-4 microseconds each in a virtual machine (measured 2026-12-03: 15.5 s with the defaults,
10.4-11.8 s with the settings below, faults 640,000 -> under 4,000 once warm).

:func:`retain_freed_memory` sets, through ``mallopt``:

- ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's maximum): blocks up to that size come from the heap and
  are reused after ``free`` instead of being unmapped;
- ``M_TRIM_THRESHOLD`` = 1 GiB: the heap gives memory back to the system only when more than
  that is free at its top.

The peak memory of a run is unchanged (it is the same tensors); what changes is that the process
keeps up to its high-water mark of heap after a peak instead of returning it. This is what
PyTorch's CPU performance guide gets from preloading jemalloc or tcmalloc, without a native
dependency. The ``rsrefseg`` command and the inference benchmarks call it at start; the library
itself never does (no side effects at import). It does nothing off glibc (macOS, Windows, musl),
when ``RSREFSEG_MALLOC=system`` is set, or when the user set glibc's own ``MALLOC_MMAP_THRESHOLD_``
/ ``MALLOC_TRIM_THRESHOLD_`` variables (theirs win).

Blocks above 32 MiB (SAM ViT-B's ``qkv`` 38 MB and MLP hidden 50 MB per layer) still come from
``mmap``. Tried and left out (2026-12-03): ``M_MMAP_MAX`` = 0 (every block from the heap) takes the
first expression's faults from 120-220 thousand to 0 and its system time from 0.4-0.8 s to
0.01 s, but its wall time did not measurably change (min 13.7-15.0 s vs 14.6-15.5 s, 3 processes
of 5 rounds each), and PyTorch's 64-byte ``posix_memalign`` leaves small remainders in glibc's
thread cache that keep freed big blocks from being reused for the first rounds, so the heap grows:
``rsrefseg predict`` with 64 expressions peaked 60 MiB above the 8-expression run instead of
14 MiB (``tests/inference/test_predict_memory.py`` bounds that difference at 48 MiB).
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "retain_freed_memory"]

#: Blocks up to this size come from the heap (glibc's largest allowed M_MMAP_THRESHOLD on 64-bit).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the heap top kept before trimming.
TRIM_THRESHOLD = 1024 * 1024 * 1024
#: ``mallopt`` parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Set to ``system`` to keep the C library's defaults.
ENV = "RSREFSEG_MALLOC"


def retain_freed_memory() -> str:
    """Apply the settings of the module docstring where they apply; returns what was done, in words
    (``"glibc: mmap threshold 32 MiB, trim threshold 1024 MiB"``, or why nothing was changed)."""
    if os.environ.get(ENV, "").strip().lower() == "system":
        return f"system defaults ({ENV}=system)"
    user = [name for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if name in os.environ]
    if user:
        return f"system ({', '.join(user)} set by the user)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "system defaults (not glibc)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):
        return "system defaults (mallopt not available)"
    if not ok:
        return "system defaults (mallopt refused the settings)"
    return f"glibc: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
