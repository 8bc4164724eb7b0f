#!/usr/bin/env bash
# One-shot GPU check (issue 12), under 8 minutes on one GPU (H200 class or a 24 GB card):
#   1. the environment (torch, CUDA, device, memory)
#   2. the NWPU VHR-10 referring set (`rsrefseg data from-coco`, as scripts/demo.sh)
#   3. the benchmark suite's GPU section (bf16 latency, throughput, a training step, MFU)
#   4. 30 steps of `rsrefseg train` (configs/rrsisd-b.yaml, rsrefseg-b, random init, bf16) without and
#      with gradient checkpointing: step time, peak torch.cuda.max_memory_allocated, MFU against the
#      bf16 matmul peak measured on this GPU
#   5. `rsrefseg eval` of the trained checkpoint on NWPU val, 6. a GeoTIFF `rsrefseg predict` on the GPU
# Writes gpu-check.json and summary.txt into the output folder ($OUT if set, else gpu-check/).
#
#   scripts/gpu-check.sh [--out DIR] [--steps N] [--batch-size N] [--preset P]
#   scripts/gpu-check.sh --cpu-dry-run        # (or RSREFSEG_GPU_CHECK_DRY_RUN=1) the same phases with
#                                            # tiny on the CPU in well under a minute; NOT a GPU measurement
# Without CUDA (and without --cpu-dry-run) it stops at once: one `error:` line, exit status 2.
# Exit status 1 when a phase failed (each phase's status is in gpu-check.json).
# Environment: PYTHON (default .venv/bin/python, else python3), RSREFSEG_NWPU / RSREFSEG_DATA (data).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    PY=$(command -v python3 || true)
fi
if [ -z "$PY" ]; then
    echo "error: no Python found; build the environment first (make venv) or set PYTHON" >&2
    exit 2
fi
export TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
exec "$PY" -m rsrefseg.bench.gpu_check "$@"
