"""Entry point of the benchmark suite: ``python benchmarks/bench.py [--smoke] [--reps N] [--out F]``.

The same as ``rsrefseg bench``; the code lives in :mod:`rsrefseg.bench` so that the installed
command works without this directory. See benchmarks/README.md for what is measured.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rsrefseg.bench.suite import main

    sys.exit(main())
