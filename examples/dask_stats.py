"""Per-channel statistics of a chunked Dask array, lazily, with nbbn's one-pass kernels.

    python examples/dask_stats.py

Each chunk is reduced by nbbn (one pass, float64 accumulation) and the chunks'
(count, mean, m2) are merged with Chan's formula up Dask's reduction tree.
"""
import dask
import dask.array as da
import numpy as np

import nbbn.dask

# A [b, c, h, w] batch in chunks along both the batch and the channel axis.
x = da.random.default_rng(0).normal(1e3, 0.01, size=(256, 16, 32, 32), chunks=(50, 5, 32, 32))
x = x.astype(np.float32)

mean, var = nbbn.dask.mean_var(x, axis=(0, 2, 3), dtype=np.float64)  # lazy: nothing computed yet
std = nbbn.dask.std(x, axis=(0, 2, 3), ddof=1)                  # float32, as the input
moments = nbbn.dask.moments(x, axis=(0, 2, 3))          # mergeable Moments of dask arrays
print(type(var).__name__, var.shape, f"{x.numblocks} blocks")

with dask.config.set(scheduler="threads"):
    mean, var, std, m2 = dask.compute(mean, var, std, moments.m2)

exact = np.var(x.compute().astype(np.float64), axis=(0, 2, 3))
print("per-channel var (first 4):", var[:4])
error = np.abs(var / exact - 1).max()
print(f"float64 relative error against float64 NumPy on the whole array: {error:.1e}")
print(f"values per channel: {moments.count}")
