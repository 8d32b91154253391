"""Benchmark machinery shared by ``bench/`` (pytest-benchmark) and ``nbbn bench``."""

# Batch-norm parameters every contender is timed with.
EPS = 1e-5
MOMENTUM = 0.1
