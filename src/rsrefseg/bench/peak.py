"""The CPU's physical peak FLOP/s from its features, printed next to the measured GEMMs for context.

peak = cores x FLOP per cycle per core x clock, where

- cores: the CPUs this process may run on (``os.sched_getaffinity``), capped at the torch threads;
- FLOP per cycle per core (fp32) = FMA units x lanes x 2, the FMA units and their width from the
  small table :data:`FMA_TABLE` by vendor / family / model (public microarchitecture descriptions)
  and the vector flags (``avx512f``, ``avx2`` + ``fma``); a CPU the table does not know is
  "unknown" (no number is made up);
- clock: ``cpuinfo_max_freq`` from cpufreq when the kernel exposes it, else ``cpu MHz`` of
  ``/proc/cpuinfo``. Always an estimate (turbo and AVX-512 clocks differ), and under a hypervisor
  (the ``hypervisor`` flag) the guest sees only a nominal clock.

bf16: CPUs with ``avx512_bf16`` compute bf16 dot products at twice the fp32 FMA rate; ``amx_bf16``
has tile units of much higher peak (not computed here: "unknown"); without either the CPU has no
native bf16 arithmetic (bf16 is converted and computed in fp32, never faster than fp32).

The measured roofline of the suite is the best GEMM it can run, not this number; this one says how
far that GEMM is from the silicon.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FmaRow:
    """One row of :data:`FMA_TABLE`: a microarchitecture's fp32 FMA datapaths per core."""

    vendor: str  # "AuthenticAMD" or "GenuineIntel" (the vendor_id of /proc/cpuinfo)
    families: tuple[int, ...]  # CPU families (decimal, as /proc/cpuinfo prints them)
    models: tuple[tuple[int, int], ...]  # inclusive (first, last) model ranges; () = any model
    needs: str  # the vector flag the row applies to ("avx512f" or "avx2")
    units: int  # FMA pipes per core
    width_bits: int  # datapath width of each pipe
    name: str  # the microarchitecture, for the report
    upper_bound: bool = False  # True when some parts of the family have fewer units


#: fp32 FMA datapaths per core, first match wins. Zen 4 executes AVX-512 on its 256-bit pipes
#: (two cycles per 512-bit FMA), so AVX-512 doubles nothing there; Zen 5 server and desktop parts
#: have full 512-bit pipes (mobile Zen 5 keeps 256-bit ones: not in the table, hence unknown);
#: Skylake-SP and later Xeons have one or two 512-bit FMA units depending on the SKU (the table
#: gives two, as an upper bound).
FMA_TABLE: tuple[FmaRow, ...] = (
    FmaRow("AuthenticAMD", (26,), ((0x00, 0x1F), (0x40, 0x4F)), "avx512f", 2, 512, "Zen 5 (server/desktop)"),
    FmaRow("AuthenticAMD", (25,), ((0x10, 0x1F), (0x60, 0x7F), (0xA0, 0xAF)), "avx512f", 2, 256, "Zen 4"),
    FmaRow("AuthenticAMD", (25,), ((0x00, 0x0F), (0x20, 0x5F)), "avx2", 2, 256, "Zen 3"),
    FmaRow("AuthenticAMD", (23,), ((0x30, 0xFF),), "avx2", 2, 256, "Zen 2"),
    FmaRow("AuthenticAMD", (23,), ((0x00, 0x2F),), "avx2", 2, 128, "Zen / Zen+"),
    FmaRow("GenuineIntel", (6,), (), "avx512f", 2, 512, "Intel Xeon with AVX-512 (Skylake-SP or later)", True),
    FmaRow("GenuineIntel", (6,), (), "avx2", 2, 256, "Intel with AVX2 + FMA (Haswell or later)"),
)


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's ``key: value`` fields of ``/proc/cpuinfo`` (empty when unreadable)."""
    fields: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # end of the first processor's block
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _max_freq_ghz(cpufreq: str | Path) -> float | None:
    try:
        return int(Path(cpufreq, "cpuinfo_max_freq").read_text().strip()) / 1e6  # kHz -> GHz
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """CPUs this process may run on (affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def lookup(vendor: str, family: int | None, model: int | None, flags: set[str]) -> FmaRow | None:
    """The :data:`FMA_TABLE` row of this CPU, or None when it is not known."""
    for row in FMA_TABLE:
        if row.vendor != vendor or family not in row.families or row.needs not in flags:
            continue
        if row.needs == "avx2" and "fma" not in flags:
            continue
        if row.models and (model is None or not any(lo <= model <= hi for lo, hi in row.models)):
            continue
        return row
    return None


def physical_peak(
    threads: int | None = None,
    cpuinfo: dict[str, str] | None = None,
    cpufreq: str | Path = "/sys/devices/system/cpu/cpu0/cpufreq",
    cores: int | None = None,
) -> dict[str, Any]:
    """The CPU's fp32 (and native bf16) peak GFLOP/s from its features; ``None`` where unknown.

    Args:
        threads: torch threads of the run (the peak counts at most this many cores).
        cpuinfo: fields of ``/proc/cpuinfo`` (default: read them).
        cpufreq: the cpufreq folder of CPU 0.
        cores: usable cores (default: the affinity mask).

    Returns:
        ``{"cpu", "vendor", "family", "model", "microarchitecture", "cores", "fma_units",
        "fma_width_bits", "fp32_flop_per_cycle_per_core", "clock_ghz", "clock_source", "hypervisor",
        "fp32_gflops", "bf16_gflops", "native_bf16", "note"}``.
    """
    info = read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = set(info.get("flags", "").split())
    vendor = info.get("vendor_id", "unknown")
    family = _int(info.get("cpu family"))
    model = _int(info.get("model"))
    n = usable_cores() if cores is None else cores
    if threads:
        n = min(n, threads)
    row = lookup(vendor, family, model, flags)
    clock = _max_freq_ghz(cpufreq)
    source = "cpufreq cpuinfo_max_freq"
    if clock is None:
        mhz = _float(info.get("cpu MHz"))
        clock, source = (None, "unknown") if mhz is None else (mhz / 1000.0, "/proc/cpuinfo cpu MHz")
    hypervisor = "hypervisor" in flags
    per_cycle = None if row is None else row.units * row.width_bits // 32 * 2  # lanes x 2 FLOP per FMA
    fp32 = None if per_cycle is None or clock is None else n * per_cycle * clock
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    bf16 = None
    if fp32 is not None and "avx512_bf16" in flags and "amx_bf16" not in flags:
        bf16 = 2.0 * fp32  # vdpbf16ps: two bf16 products per fp32 lane
    notes = ["clock is an estimate (" + source + ")"]
    if hypervisor:
        notes.append("under a hypervisor: the guest sees a nominal clock; boost and host contention unknown")
    if row is None:
        notes.append(f"FMA datapaths of {vendor} family {family} model {model} unknown: no peak")
    elif row.upper_bound:
        notes.append("some parts of this family have one 512-bit FMA unit per core: an upper bound")
    if "amx_bf16" in flags:
        notes.append("AMX bf16 peak not computed")
    elif not native_bf16:
        notes.append("no native bf16 (no avx512_bf16/amx_bf16): bf16 runs converted to fp32")
    return {
        "cpu": info.get("model name", "unknown"), "vendor": vendor, "family": family, "model": model,
        "microarchitecture": None if row is None else row.name, "cores": n,
        "fma_units": None if row is None else row.units, "fma_width_bits": None if row is None else row.width_bits,
        "fp32_flop_per_cycle_per_core": per_cycle, "clock_ghz": clock, "clock_source": source,
        "hypervisor": hypervisor, "fp32_gflops": fp32, "bf16_gflops": bf16, "native_bf16": native_bf16,
        "note": "; ".join(notes),
    }


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
