"""A first look at nbbn: drop-in statistics, more accurate than NumPy's float32."""
import time

import numpy as np

import nbbn

rng = np.random.default_rng(0)
x = rng.standard_normal((64, 64, 56, 56), dtype=np.float32)  # [batch, channels, h, w]

mean, var = nbbn.mean_var(x, axis=(0, 2, 3))  # first call compiles (cached on disk)
t0 = time.perf_counter()
mean, var = nbbn.mean_var(x, axis=(0, 2, 3))
t1 = time.perf_counter()
np_mean, np_var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
t2 = time.perf_counter()
print(f"per-channel mean/var of {x.shape} float32: nbbn {1e3 * (t1 - t0):.1f} ms, "
      f"NumPy {1e3 * (t2 - t1):.1f} ms")

a = (1e3 + 0.01 * rng.standard_normal(10**6)).astype(np.float32)
exact = a.astype(np.float64).var()
print(f"variance of float32 1e3 + 0.01*N(0,1): relative error nbbn "
      f"{abs(nbbn.var(a, dtype=np.float64) / exact - 1):.1e}, NumPy {abs(np.var(a) / exact - 1):.1e}")
