"""Statistics of several batches (or virtual batches) merged per channel, in float64."""
import numba
import numpy as np

from .. import _math
from ._jit import kernel


@kernel
def merge_batches(state, mean, var, count, last_count):
    """Fold groups' (mean, biased var), ``groups * C`` long, into state (5, C) in place: count,
    mean, m2 of all values, their unbiased variance, the mean of the groups' unbiased
    variances weighted by count (``count`` values per channel per group, the last
    ``last_count``). A group at a time across the channels: a channel's merges one after
    another are a chain of dependent divisions (10-13x slower, measured on 512 groups)."""
    nchan = state.shape[1]
    groups = mean.shape[0] // nchan
    for g in range(groups):
        merge_group(state, mean[g * nchan:(g + 1) * nchan], var[g * nchan:(g + 1) * nchan],
                    np.float64(count if g < groups - 1 else last_count))
    for c in range(nchan):
        state[3, c] = state[2, c] / (state[0, c] - 1)


@numba.njit(fastmath=False, error_model="numpy", cache=False)
def merge_group(state, mean, var, n_b):
    """Fold one group's (mean, biased var) per channel, n_b values each, into ``state``, whose
    count is the same in every channel (each merge adds the same counts to all): the
    divisions of counts leave the loop, which vectorizes (strict, and with NumPy's error
    model: Numba's default checks each division for a zero divisor, see ``groups``)."""
    n_a = state[0, 0]
    for c in range(mean.shape[0]):
        n, state[1, c], state[2, c] = _math.chan_merge(n_a, state[1, c], state[2, c], n_b,
                                                       mean[c], var[c] * n_b)
        state[4, c] = _math.pooled_variance(state[4, c], n, n_b, var[c])
        state[0, c] = n
