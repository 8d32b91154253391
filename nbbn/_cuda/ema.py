"""The running-statistics update on the device, both buffers in one pass (float64 math)."""
from numba import cuda

from .elements import store, wide


@cuda.jit(device=True, cache=True)
def ema_step(running_mean, running_var, c, mean, var, momentum, var_factor):
    """running = (1 - momentum) * running + momentum * batch for channel c (the CPU's ``ema``)."""
    keep = 1.0 - momentum
    store(running_mean, c, keep * wide(running_mean[c], 0.0) + momentum * mean)
    store(running_var, c, keep * wide(running_var[c], 0.0) + momentum * var_factor * var)


@cuda.jit(cache=True)
def ema(running_mean, running_var, mean, var, momentum, var_factor):
    c = cuda.grid(1)
    if c < running_mean.shape[0]:
        ema_step(running_mean, running_var, c, wide(mean[c], 0.0), wide(var[c], 0.0), momentum,
                 var_factor)


KERNELS = ("ema",)
