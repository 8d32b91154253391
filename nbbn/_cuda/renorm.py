"""Batch renorm's per-channel kernels on the device (Ioffe 2017), one thread per channel.

Forward: r and d (``_math.renorm_factors``) and the coefficients of the affine
pass, batch norm's with the effective weight ``weight * r`` and bias
``bias + weight * d``. Backward: that effective weight (r and d are constants
for the gradient, so batch norm's dx with it is renorm's) and the parameter
gradients. As the CPU's ``renorm`` family, in float64.
"""
from numba import cuda

from .. import _math
from .elements import store, wide
from .normalize import HAS_BIAS, HAS_WEIGHT, affine_coefficients, inv_sqrt

factors = cuda.jit(device=True, cache=True)(_math.renorm_factors)


@cuda.jit(cache=True)
def renorm_coefficients(mean, var, running_mean, running_var, weight, bias, flags, rmax, dmax,
                        eps, r, d, scale, shift):
    """r[c], d[c], and y = x * scale[c] + shift[c]'s coefficients (flags: HAS_WEIGHT|HAS_BIAS)."""
    c = cuda.grid(1)
    if c < mean.shape[0]:
        w = wide(weight[c], 0.0) if flags & HAS_WEIGHT else 1.0
        b = wide(bias[c], 0.0) if flags & HAS_BIAS else 0.0
        m = wide(mean[c], 0.0)
        v = wide(var[c], 0.0)
        rc, dc = factors(m, v, wide(running_mean[c], 0.0), wide(running_var[c], 0.0), rmax,
                         dmax, eps)
        r[c] = rc
        d[c] = dc
        a, s = affine_coefficients(m, v, w * rc, b + w * dc, eps)
        scale[c] = a
        shift[c] = s


@cuda.jit(cache=True)
def renorm_weight(weight, r, flags, weight_eff):
    """weight_eff[c] = weight[c] * r[c] (r[c] without HAS_WEIGHT)."""
    c = cuda.grid(1)
    if c < r.shape[0]:
        rc = wide(r[c], 0.0)
        weight_eff[c] = wide(weight[c], 0.0) * rc if flags & HAS_WEIGHT else rc


@cuda.jit(cache=True)
def renorm_grads(sum_dy, sum_dy_xmu, var, r, d, eps, dweight, dbias):
    """dweight[c] = r[c] * sum(dy * (x - mean)) / sigma_b + d[c] * sum(dy), dbias[c] =
    sum(dy)."""
    c = cuda.grid(1)
    if c < var.shape[0]:
        store(dweight, c, wide(r[c], 0.0) * sum_dy_xmu[c] * inv_sqrt(wide(var[c], 0.0) + eps)
              + wide(d[c], 0.0) * sum_dy[c])
        store(dbias, c, sum_dy[c])


KERNELS = ("renorm_coefficients", "renorm_weight", "renorm_grads")
