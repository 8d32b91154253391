"""Statistics of several batches (or virtual batches) merged per channel, in float64."""
import numpy as np

from .. import _math
from ._jit import kernel


@kernel
def merge_batches(state, mean, var, count, last_count):
    """Fold groups' (mean, biased var), ``groups * C`` long, into state (5, C) in place: count,
    mean, m2 of all values, their unbiased variance, the mean of the groups' unbiased
    variances weighted by count (``count`` values per channel per group, the last
    ``last_count``)."""
    nchan = state.shape[1]
    groups = mean.shape[0] // nchan
    for c in range(nchan):
        n, m, m2, vbar = state[0, c], state[1, c], state[2, c], state[4, c]
        for g in range(groups):
            n_b = np.float64(count if g < groups - 1 else last_count)
            j = g * nchan + c
            n, m, m2 = _math.chan_merge(n, m, m2, n_b, mean[j], var[j] * n_b)
            vbar = _math.pooled_variance(vbar, n, n_b, var[j])
        state[0, c], state[1, c], state[2, c], state[4, c] = n, m, m2, vbar
        state[3, c] = m2 / (n - 1)
