"""The benchmark suite behind ``rsrefseg bench`` (importing this package has no side effects).

- :mod:`rsrefseg.bench.timing`: warm-up + repetitions, min and median; machine description.
- :mod:`rsrefseg.bench.roofline`: large square matmul GFLOP/s (fp32, bf16).
- :mod:`rsrefseg.bench.flops`: FLOPs per stage (``FlopCounterMode``, attention included).
- :mod:`rsrefseg.bench.cpu`: stages, first/further expressions, naive pipeline, bf16, fast SAM.
- :mod:`rsrefseg.bench.memory`: peak resident memory in a fresh subprocess vs weights + activations.
- :mod:`rsrefseg.bench.gpu`: the CUDA section (or "not measured (no GPU)").
- :mod:`rsrefseg.bench.suite`: runs everything in one process and writes the JSON and the table.
"""
