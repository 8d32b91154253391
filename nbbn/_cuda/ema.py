"""The running-statistics update on the device, both buffers in one pass (float64 math)."""
from numba import cuda, float64


@cuda.jit(device=True, cache=True)
def ema_step(running_mean, running_var, c, mean, var, momentum, var_factor):
    """running = (1 - momentum) * running + momentum * batch for channel c (the CPU's ``ema``)."""
    keep = 1.0 - momentum
    running_mean[c] = keep * float64(running_mean[c]) + momentum * mean
    running_var[c] = keep * float64(running_var[c]) + momentum * var_factor * var


@cuda.jit(cache=True)
def ema(running_mean, running_var, mean, var, momentum, var_factor):
    c = cuda.grid(1)
    if c < running_mean.shape[0]:
        ema_step(running_mean, running_var, c, float64(mean[c]), float64(var[c]), momentum,
                 var_factor)


KERNELS = ("ema",)
