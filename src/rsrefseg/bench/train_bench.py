"""The training section of the suite (``rsrefseg bench --train``): measured steps, traced estimates.

Per preset, for batch 1 and 2 with and without gradient checkpointing, and grouped (one image, K = 4
expressions) vs ungrouped, every configuration is

1. traced on fake tensors (:mod:`rsrefseg.bench.train_trace`): activation memory and FLOPs, no
   memory used; this is the estimate for a configuration that cannot run here;
2. measured in a fresh subprocess (:mod:`rsrefseg.bench.train_step`) if it fits: before it starts,
   its resident peak is estimated (the interpreter and libraries, weights, AdamW state and the
   traced activations times the resident/traced ratio seen on smaller configurations) and held
   against ``MemAvailable`` (``/proc/meminfo``); a configuration that does not fit is recorded as
   ``"estimated, not run: needs X GiB, Y GiB available"``. While a child runs, a watchdog kills it
   if ``MemAvailable`` falls below a floor (other processes share the machine), and a time budget
   lowers repetitions or skips configurations (recorded as such).

From the parts it derives what gradient checkpointing saves and costs, what grouped expressions gain
(expressions per second), and the bf16 GPU-fit estimate (:mod:`rsrefseg.bench.train_fit`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from rsrefseg.bench.train_derive import FULL_PRESETS, GROUP_K, derive, train_checks

GIB = 2**30
#: Presets of ``--smoke``.
SMOKE_PRESETS = ("tiny",)
#: Presets whose grouped step (one image, K expressions) is measured too.
GROUPED_PRESETS = ("rsrefseg-b", "tiny")
#: Head room kept free when deciding whether a configuration may start, and the floor of
#: ``MemAvailable`` under which the watchdog kills a running child.
START_MARGIN = 1.0 * GIB
KILL_FLOOR = 0.6 * GIB
#: Resident / traced-activation ratio assumed before any configuration of a preset was measured.
DEFAULT_RSS_FACTOR = 1.25
#: Version of the trace's accounting (part of the trace cache's keys).
TRACE_VERSION = 2
#: GFLOP/s assumed for time estimates before any full-size step was measured.
DEFAULT_RATE = 50.0


def mem_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def configs(preset: str, smoke: bool = False) -> list[dict[str, Any]]:
    """The configurations of one preset: ``{"key", "images", "per_image", "checkpointing"}``.

    ``smoke``: batch 1 and 2 without checkpointing, batch 2 with it, and the grouped step.
    """
    out = []
    for ckpt in (False, True):
        suffix = "+ckpt" if ckpt else ""
        for batch in (1, 2):
            if not (smoke and ckpt and batch == 1):
                out.append({"key": f"batch{batch}{suffix}", "images": batch, "per_image": 1, "checkpointing": ckpt})
        if preset in GROUPED_PRESETS and not (smoke and ckpt):
            out.append({"key": f"grouped1x{GROUP_K}{suffix}", "images": 1, "per_image": GROUP_K,
                        "checkpointing": ckpt})
    return out


def _priority(preset: str, cfg: dict[str, Any], first: str) -> int:
    """Measured first: what the targets need. Last (cross-checks, skipped first when time is short): the
    grouped step with checkpointing, and batch 2 of the presets after the first (without checkpointing
    they do not fit into a 24 GiB machine, so their batch-2 saving is an estimate anyway)."""
    return 1 if (cfg["per_image"] > 1 and cfg["checkpointing"]) or (preset != first and cfg["images"] > 1) else 0


def static_bytes(trace: dict[str, Any]) -> int:
    """Weights + gradients + AdamW state of a traced configuration."""
    return int(trace["weights_bytes"] + trace["gradients_bytes"] + trace["optimizer_state_bytes"])


def estimate_peak(trace: dict[str, Any], baseline: float, factor: float) -> float:
    """Estimated resident peak of a configuration: baseline + static parts + factor x traced activations."""
    return baseline + static_bytes(trace) + factor * trace["activations_bytes"]


def run_child(cfg: dict[str, Any], preset: str, reps: int, probe: int, threads: int | None,
              timeout: float, floor: float = KILL_FLOOR) -> dict[str, Any]:
    """Run :mod:`rsrefseg.bench.train_step` for ``cfg`` with the memory watchdog; its JSON or ``{"error"}``."""
    cmd = [sys.executable, "-m", "rsrefseg.bench.train_step", "--preset", preset, "--images", str(cfg["images"]),
           "--per-image", str(cfg["per_image"]), "--reps", str(reps), "--probe", str(probe)]
    cmd += ["--checkpointing"] if cfg["checkpointing"] else []
    cmd += ["--threads", str(threads)] if threads else []
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    start = time.monotonic()
    low = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            while proc.poll() is None:
                available = mem_available()
                if available is not None and available < floor:
                    low = available
                    os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: nothing else
                    break
                if time.monotonic() - start > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.5)
            out, err = proc.communicate()
        finally:
            if proc.poll() is None:  # an exception above (e.g. KeyboardInterrupt)
                os.killpg(proc.pid, signal.SIGKILL)
    wall = time.monotonic() - start
    if low is not None:
        return {"error": f"stopped by the memory watchdog: MemAvailable fell to {low / GIB:.2f} GiB "
                         f"(floor {floor / GIB:.2f} GiB) after {wall:.0f} s"}
    if wall > timeout:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (err or out).strip().splitlines()[-1:] or ["no output"]
        killed = " (killed by signal; out of memory?)" if proc.returncode and proc.returncode < 0 else ""
        return {"error": f"exit {proc.returncode}{killed}: {tail[0]}"}
    result = json.loads(lines[-1])
    result["child_wall_s"] = wall
    return result


class _Planner:
    """Memory and time decisions for the measured runs, learning from the ones already done."""

    def __init__(self, budget_s: float, reps: int) -> None:
        self.deadline = time.monotonic() + budget_s
        self.reps = reps
        self.factor: dict[str, float] = {}  # preset -> (resident - static) / traced activations, measured
        self.baseline: float | None = None  # interpreter + libraries, measured
        self.rate: dict[str, float] = {}  # preset -> GFLOP/s of its steps
        self.build_s: dict[str, float] = {}

    def peak(self, preset: str, trace: dict[str, Any]) -> float:
        """Estimated resident peak of the child (the largest measured factor of any preset if none of this one)."""
        factor = self.factor.get(preset, max(self.factor.values(), default=DEFAULT_RSS_FACTOR))
        return estimate_peak(trace, self.baseline or 0.45 * GIB, factor)

    def fits(self, preset: str, trace: dict[str, Any]) -> tuple[bool, float, float | None]:
        """``(fits, needed bytes with head room, MemAvailable)`` right now."""
        need = self.peak(preset, trace) + START_MARGIN
        available = mem_available()
        return (available is None or need <= available), need, available

    def seconds(self, preset: str, trace: dict[str, Any], reps: int) -> float:
        """Estimated wall time of a child: imports and build, the instrumented warm-up (~1.5 steps), reps steps."""
        rate = self.rate.get(preset, min(self.rate.values(), default=DEFAULT_RATE))
        return self.build_s.get(preset, 30.0) + 15.0 + trace["gflop"] / rate * (reps + 1.5)

    def plan(self, preset: str, trace: dict[str, Any], rest: list[tuple[str, dict[str, Any]]]) -> tuple[int, float]:
        """``(reps, estimated seconds)`` leaving time for one repetition of every ``rest`` configuration;
        reps 0 = does not fit into the remaining budget."""
        left = self.deadline - time.monotonic()
        reserve = sum(self.seconds(p, t, 1) for p, t in rest if self.fits(p, t)[0])
        for reps in range(self.reps, 0, -1):
            if self.seconds(preset, trace, reps) + reserve <= left:
                return reps, self.seconds(preset, trace, reps)
        seconds = self.seconds(preset, trace, 1)
        return (1 if seconds <= left else 0), seconds  # the rest may be skipped later, not this one

    def learn(self, preset: str, trace: dict[str, Any], measured: dict[str, Any]) -> None:
        mem = measured["memory"]
        self.baseline = mem["baseline_rss_bytes"]
        peak = mem["process_peak_rss_bytes"] or mem["steps_peak_rss_bytes"] or 0
        rest = peak - mem["baseline_rss_bytes"] - static_bytes(trace)
        if trace["activations_bytes"] > 0:
            self.factor[preset] = max(self.factor.get(preset, 0.0), rest / trace["activations_bytes"], 1.0)
        self.rate[preset] = trace["gflop"] / measured["min_s"]
        self.build_s[preset] = measured["build_s"]


def bench_train(presets: tuple[str, ...] = FULL_PRESETS, reps: int = 2, threads: int | None = None,
                probe: int = 4096, budget_min: float = 30.0, gpu_batches: tuple[int, ...] = (1, 2, 4, 8, 16),
                smoke: bool = False, log: Callable[[str], None] = print,
                trace_cache: str | None = None) -> dict[str, Any]:
    """The training section (see the module docstring); a JSON-serialisable dict.

    ``budget_min``: wall-time budget of the measured steps (the traces come first and are not counted).
    ``trace_cache``: a JSON file keeping the traces (:class:`TraceCache`).
    """
    from rsrefseg.bench.train_fit import gpu_fit
    from rsrefseg.bench.train_trace import recipe

    traces = TraceCache(trace_cache)
    trace_step = traces.trace

    started = time.monotonic()
    section: dict[str, Any] = {
        "settings": {"presets": list(presets), "reps": reps, "warmup": 1, "threads": threads, "probe": probe,
                     "group_k": GROUP_K, "budget_min": budget_min, "smoke": smoke, "mem_total_bytes": _mem_total(),
                     "mem_available_start_bytes": mem_available()},
        "presets": {},
    }
    todo: list[tuple[str, dict[str, Any]]] = []
    for preset in presets:  # 1. traces: estimates for every configuration, no memory needed
        spec = recipe(preset)
        entry: dict[str, Any] = {"recipe": {**spec, "loss": list(spec["loss"])}, "configs": {}, "gpu_traces": {}}
        section["presets"][preset] = entry
        for cfg in configs(preset, smoke):
            log(f"[train {preset}] trace {cfg['key']} (fake tensors, fp32)")
            trace = trace_step(preset, cfg["images"], cfg["per_image"], cfg["checkpointing"], "fp32")
            entry["configs"][cfg["key"]] = {**{k: cfg[k] for k in ("images", "per_image", "checkpointing")},
                                            "expressions": cfg["images"] * cfg["per_image"], "trace": trace}
            todo.append((preset, cfg))
        first = next(iter(entry["configs"].values()))["trace"]
        entry.update({k: first[k] for k in ("parameters", "trainable_parameters", "weights_bytes", "gradients_bytes")})
        for ckpt in (False,) if smoke else (False, True):
            for batch in (1, 2):
                key = f"batch{batch}{'+ckpt' if ckpt else ''}"
                log(f"[train {preset}] trace {key} (fake tensors, bf16 autocast)")
                entry["gpu_traces"][key] = trace_step(preset, batch, 1, ckpt, "bf16")
    section["trace_wall_s"] = time.monotonic() - started
    section["trace_cache"] = {"path": trace_cache, "reused": traces.hits, "traced": traces.misses}
    # 2. measured steps
    planner = _Planner(budget_min * 60.0, reps)
    item_of = {(p, c["key"]): section["presets"][p]["configs"][c["key"]] for p, c in todo}
    # within a priority, the smallest activations first: their resident peaks calibrate the estimates
    todo.sort(key=lambda pc: (_priority(pc[0], pc[1], presets[0]),
                              item_of[(pc[0], pc[1]["key"])]["trace"]["activations_bytes"]))
    for i, (preset, cfg) in enumerate(todo):
        rest = [(p, item_of[(p, c["key"])]["trace"]) for p, c in todo[i + 1:]]
        _measure(preset, cfg, item_of[(preset, cfg["key"])], planner, rest, probe, threads, log)
    for entry in section["presets"].values():
        entry["derived"] = derive(entry)
    section["gpu_fit"] = gpu_fit(section["presets"], gpu_batches)
    section["checks"] = train_checks(section["presets"])
    section["mem_available_end_bytes"] = mem_available()
    section["wall_s"] = time.monotonic() - started
    return section


def _measure(preset: str, cfg: dict[str, Any], item: dict[str, Any], planner: _Planner,
             rest: list[tuple[str, dict[str, Any]]], probe: int, threads: int | None,
             log: Callable[[str], None]) -> None:
    """Measure one configuration if it fits (memory, time budget); record why not otherwise."""
    trace = item["trace"]
    fits, need, available = planner.fits(preset, trace)
    item["estimated_peak_rss_bytes"] = need - START_MARGIN
    if not fits:
        item["status"] = (f"estimated, not run: needs {need / GIB:.1f} GiB (with {START_MARGIN / GIB:.0f} GiB "
                          f"head room), {(available or 0) / GIB:.1f} GiB available")
        log(f"[train {preset}] {cfg['key']}: {item['status']}")
        return
    reps, seconds = planner.plan(preset, trace, rest)
    if reps == 0:
        item["status"] = f"estimated, not run: needs ~{seconds:.0f} s, beyond the time budget"
        log(f"[train {preset}] {cfg['key']}: {item['status']}")
        return
    log(f"[train {preset}] {cfg['key']}: measuring ({reps} reps after a warm-up; est. peak "
        f"{item['estimated_peak_rss_bytes'] / GIB:.1f} GiB, ~{seconds:.0f} s)")
    measured = run_child(cfg, preset, reps, probe, threads, timeout=max(600.0, 4 * seconds))
    if "error" in measured:
        item["status"] = f"failed: {measured['error']}"
        log(f"[train {preset}] {cfg['key']}: {item['status']}")
        return
    item["status"] = "measured"
    item["measured"] = measured
    planner.learn(preset, trace, measured)
    mem = measured["memory"]
    log(f"[train {preset}] {cfg['key']}: {measured['min_s']:.2f} s/step (min of {measured['reps']}), "
        f"peak RSS {(mem['steps_peak_rss_bytes'] or 0) / GIB:.2f} GiB, activations {mem['activations_bytes'] / GIB:.2f} "
        f"GiB (traced {trace['activations_bytes'] / GIB:.2f})")


class TraceCache:
    """Traces kept in a JSON file between runs (they take minutes and need no lock: nothing is measured).

    Entries are keyed by the configuration and the versions of rsrefseg, torch and transformers; delete
    the file after changing the model code. A file that is not such a cache is a ConfigError.
    """

    def __init__(self, path: str | None) -> None:
        self.path, self.entries, self.hits, self.misses = path, {}, 0, 0
        if path and os.path.exists(path):
            from rsrefseg.errors import ConfigError

            try:
                with open(path, encoding="utf-8") as handle:
                    data = json.load(handle)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError(f"{path}: not a readable trace cache ({type(exc).__name__})") from None
            if not isinstance(data, dict) or not isinstance(data.get("traces"), dict):
                raise ConfigError(f"{path}: not a trace cache (no 'traces' object)")
            self.entries = data["traces"]

    @staticmethod
    def _key(preset: str, images: int, per_image: int, checkpointing: bool, precision: str) -> str:
        import torch
        import transformers

        from rsrefseg import __version__

        return (f"{preset}|images={images}|per_image={per_image}|checkpointing={checkpointing}|{precision}|"
                f"trace v{TRACE_VERSION}|rsrefseg {__version__}|torch {torch.__version__}|"
                f"transformers {transformers.__version__}")

    def trace(self, preset: str, images: int, per_image: int = 1, checkpointing: bool = False,
              precision: str = "fp32") -> dict[str, Any]:
        """:func:`rsrefseg.bench.train_trace.trace_step`, from the file when it holds the entry."""
        from rsrefseg.bench.train_trace import trace_step

        key = self._key(preset, images, per_image, checkpointing, precision)
        if key in self.entries:
            self.hits += 1
            return dict(self.entries[key])
        self.misses += 1
        result = trace_step(preset, images, per_image, checkpointing, precision)
        self.entries[key] = result
        if self.path:
            from rsrefseg.utils import atomic_write_json

            atomic_write_json(self.path, {"traces": self.entries})
        return result


def _mem_total() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover
        return None


# ---------------------------------------------------------------------- suite hooks
def add_train_arguments(parser: Any) -> None:
    """The ``--train*`` options of ``rsrefseg bench``."""
    parser.add_argument("--train", action="store_true",
                        help="add the training section: one training step of --train-presets at batch 1 and 2, with "
                             "and without gradient checkpointing, grouped vs ungrouped (each in a fresh process, "
                             "skipped with an estimate where memory is short); see docs/benchmarks.md")
    parser.add_argument("--train-only", action="store_true", help="run only the training section")
    parser.add_argument("--train-presets", default=",".join(FULL_PRESETS), metavar="P,P",
                        help="presets of the training section (default rsrefseg-b,rsrefseg-l; --smoke: tiny)")
    parser.add_argument("--train-reps", type=int, default=2, help="timed training steps after the warm-up (default 2)")
    parser.add_argument("--train-trace-cache", default=None, metavar="FILE",
                        help="keep the traces in FILE and reuse them (they need no lock; e.g. trace ahead of a "
                             "measured run)")
    parser.add_argument("--train-budget", type=float, default=30.0, metavar="MIN",
                        help="wall-time budget of the measured training steps in minutes (default 30): "
                             "repetitions are lowered, then configurations skipped (recorded as such)")


def train_options(args: Any) -> dict[str, Any] | None:
    """The training section's options from ``--train*``; None without ``--train``/``--train-only``."""
    from rsrefseg.build import PRESETS
    from rsrefseg.errors import ConfigError

    if not (getattr(args, "train", False) or getattr(args, "train_only", False)):
        return None
    presets = tuple(p.strip() for p in str(args.train_presets).split(",") if p.strip())
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        raise ConfigError(f"--train-presets: unknown preset(s) {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(PRESETS)}")
    if args.train_reps < 1 or args.train_budget <= 0:
        raise ConfigError("--train-reps must be >= 1 and --train-budget > 0")
    return {"only": bool(args.train_only), "presets": presets, "reps": int(args.train_reps),
            "budget_min": float(args.train_budget), "trace_cache": args.train_trace_cache}


def train_section(options: dict[str, Any], smoke: bool, threads: int | None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """:func:`bench_train` with the suite's settings (``--smoke``: tiny, one repetition, small probe)."""
    if smoke:
        return bench_train(SMOKE_PRESETS, reps=1, threads=threads, probe=512, budget_min=options["budget_min"],
                           gpu_batches=(1, 2, 4), smoke=True, log=log, trace_cache=options.get("trace_cache"))
    return bench_train(options["presets"], reps=options["reps"], threads=threads, budget_min=options["budget_min"],
                       log=log, trace_cache=options.get("trace_cache"))


def run_train_only(report: dict[str, Any], options: dict[str, Any], smoke: bool, threads: int | None,
                   log: Callable[[str], None], save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """``rsrefseg bench --train-only``: the report with only the training section and its targets."""
    from rsrefseg.bench.timing import CpuMonitor, contention, load_average
    from rsrefseg.bench.train_report import format_train

    monitor = CpuMonitor()
    started = time.monotonic()
    report["train"] = train_section(options, smoke, threads, log)
    report["targets"] = {"preset": "training section", "checks": report["train"]["checks"]}
    meta = report["meta"]
    meta.update(contention(meta["load_average_start"], load_average(), monitor.stop()["others_cpu_fraction"],
                           report["settings"]["threads"]))
    meta["wall_s"] = time.monotonic() - started
    save(report)
    log(format_train(report["train"]))
    return report
