"""Per-element math shared by the CPU and CUDA kernels, written once as plain Python.

Each function here uses only operations both Numba targets compile (``math``,
not ``numpy`` ufuncs: ``np.isfinite`` has no CUDA lowering). The CUDA backend
wraps them with ``cuda.jit(device=True)``; the CPU kernels can wrap the same
functions with their ``helper`` decorator (``numba.njit``).
"""
import math


def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, m2) states (Chan et al.); exact for unequal counts and count 0."""
    if n_b == 0:
        return n_a, mean_a, m2_a
    if n_a == 0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    if delta == 0:  # exact for constant data
        mean = mean_a
    elif math.isfinite(delta):  # weights <= 1: no overflow near the float64 limit
        mean = mean_a + delta * (n_b / n)
    else:  # inf/nan data: NumPy's (sum / n) semantics
        mean = (n_a * mean_a + n_b * mean_b) / n
    return n, mean, m2_a + m2_b + delta * delta * (n_a * n_b / n)


def renorm_factors(mean, var, running_mean, running_var, rmax, dmax, eps):
    """Batch renorm's (r, d) of one channel (Ioffe 2017) from the batch's mean and biased
    variance and the running buffers: r = clip(sigma_b / sigma, 1/rmax, rmax),
    d = clip((mean - running_mean) / sigma, -dmax, dmax). NaN stays NaN (no clipping)."""
    sigma = math.sqrt(running_var + eps)
    r = math.sqrt(var + eps) / sigma
    if r > rmax:
        r = rmax
    elif r < 1.0 / rmax:
        r = 1.0 / rmax
    d = (mean - running_mean) / sigma
    if d > dmax:
        d = dmax
    elif d < -dmax:
        d = -dmax
    return r, d



def pooled_variance(vbar_a, n, n_b, var_b):
    """The count-weighted mean of batches' unbiased variances, vbar_a over the batches so far,
    with one more batch folded in (n_b values, biased variance var_b; n values in all)."""
    if n_b == 0:
        return vbar_a
    return vbar_a + (var_b * (n_b / (n_b - 1)) - vbar_a) * (n_b / n)
