"""The running-statistics update, both buffers in one pass."""
import numpy as np
from numba import types
from numba.extending import overload

from ._jit import kernel


def ema_update(running_mean, running_var, mean, var, momentum, var_factor):
    """running = (1 - momentum) * running + momentum * batch, in place (float64 math); the
    variance's batch term scaled by var_factor. Nothing where the buffers are None."""


@overload(ema_update, inline="always")
def _ema_update(running_mean, running_var, mean, var, momentum, var_factor):
    if isinstance(running_mean, types.NoneType):
        return lambda running_mean, running_var, mean, var, momentum, var_factor: None

    def update(running_mean, running_var, mean, var, momentum, var_factor):
        keep = 1.0 - momentum
        for c in range(running_mean.shape[0]):
            running_mean[c] = keep * np.float64(running_mean[c]) + momentum * np.float64(mean[c])
            running_var[c] = (keep * np.float64(running_var[c])
                              + momentum * var_factor * np.float64(var[c]))
    return update


@kernel
def ema(running_mean, running_var, mean, var, momentum, var_factor):
    """``ema_update`` as a kernel."""
    ema_update(running_mean, running_var, mean, var, momentum, var_factor)
