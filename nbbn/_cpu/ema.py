"""The running-statistics update, both buffers in one pass."""
import numpy as np

from ._jit import kernel


@kernel
def ema(running_mean, running_var, mean, var, momentum, var_factor):
    """running = (1 - momentum) * running + momentum * batch, in place (float64 math)."""
    keep = 1.0 - momentum
    for c in range(running_mean.shape[0]):
        running_mean[c] = keep * np.float64(running_mean[c]) + momentum * np.float64(mean[c])
        running_var[c] = (keep * np.float64(running_var[c])
                          + momentum * var_factor * np.float64(var[c]))
