"""First call in a fresh process, with an empty and with a warm on-disk kernel cache.

Each round runs a new interpreter that imports nbbn and makes one call, with
NUMBA_CACHE_DIR pointing at an empty directory ("cold": every kernel the call
needs is compiled) or at one a previous process filled ("warm": kernels load
from disk). The benchmark times the whole child process; the child's own
import-to-result time is kept in ``extra_info["first_call_s"]``.
"""
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

import nbbn

# One call per op on an input large enough to take the parallel build.
CALLS = {
    "mean_var": "nbbn.mean_var(x, axis=(0, 2, 3))",
    "forward": "nbbn.batch_norm(x, np.zeros(64, np.float32), np.ones(64, np.float32), training=True)",
    "layer_step": "layer = nbbn.BatchNorm(64); layer(x); layer.backward(x)",
}
NEEDS = {"mean_var": "mean_var", "forward": "batch_norm", "layer_step": "BatchNorm"}

CHILD = """
import time
t0 = time.perf_counter()
import numpy as np
import nbbn
x = np.ones((32, 64, 16, 16), np.float32)
{call}
print(time.perf_counter() - t0)
"""


def run_child(op, cache_dir):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD.format(call=CALLS[op]))],
                         env=env, capture_output=True, text=True, check=True, timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="nbbn-cold-") as d:
        yield d


@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_first_call(benchmark, workdir, op, cache):
    if not hasattr(nbbn, NEEDS[op]):
        pytest.skip(f"nbbn.{NEEDS[op]} not available yet")
    benchmark.group = f"cold start: {op}"
    inner = []
    warm_dir = os.path.join(workdir, f"warm-{op}")
    if cache == "warm" and not os.path.isdir(warm_dir):
        run_child(op, warm_dir)  # fill the cache once
    counter = iter(range(1000))

    def setup():
        d = warm_dir if cache == "warm" else os.path.join(workdir, f"cold-{op}-{next(counter)}")
        return (d,), {}

    def child(d):
        inner.append(run_child(op, d))

    benchmark.pedantic(child, setup=setup, rounds=3 if cache == "cold" else 5, iterations=1)
    benchmark.extra_info.update(op=op, cache=cache, first_call_s=sorted(inner)[len(inner) // 2])
