"""Benchmark machinery shared by ``bench/`` (pytest-benchmark) and ``nbbn bench``."""
