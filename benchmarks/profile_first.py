"""``python benchmarks/profile_first.py [--preset rsrefseg-b] [--precision fp32|bf16] [--reps N] [--out F]``.

(not ``profile.py``: that name would shadow the standard library module.) torch.profiler of the first expression per op class, op and module (code in
:mod:`rsrefseg.bench.profile`). Run it under ``flock /tmp/rsrefseg-heavy.lock`` on a shared machine.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rsrefseg.bench.profile import main

    sys.exit(main())
