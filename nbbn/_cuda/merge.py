"""Statistics of several batches (or virtual batches) merged per channel on the device, in
float64, one thread per channel (the CPU's ``merge`` family)."""
from numba import cuda

from .. import _math
from .elements import wide

chan_merge = cuda.jit(device=True, cache=True)(_math.chan_merge)
pooled_variance = cuda.jit(device=True, cache=True)(_math.pooled_variance)


@cuda.jit(cache=True)
def merge_batches(state, mean, var, count, last_count):
    """Fold groups' (mean, biased var), ``groups * C`` long, into state (5, C) in place: count,
    mean, m2 of all values, their unbiased variance, the mean of the groups' unbiased
    variances weighted by count (``count`` values per channel per group, the last
    ``last_count``)."""
    c = cuda.grid(1)
    nchan = state.shape[1]
    if c < nchan:
        groups = mean.shape[0] // nchan
        n = state[0, c]
        m = state[1, c]
        m2 = state[2, c]
        vbar = state[4, c]
        for g in range(groups):
            n_b = count if g < groups - 1 else last_count
            j = g * nchan + c
            v = wide(var[j], 0.0)
            n, m, m2 = chan_merge(n, m, m2, n_b, wide(mean[j], 0.0), v * n_b)
            vbar = pooled_variance(vbar, n, n_b, v)
        state[0, c] = n
        state[1, c] = m
        state[2, c] = m2
        state[3, c] = m2 / (n - 1.0)
        state[4, c] = vbar


KERNELS = ("merge_batches",)
