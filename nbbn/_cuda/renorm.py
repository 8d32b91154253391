"""Batch renorm's per-channel kernels on the device (Ioffe 2017), one thread per channel.

Forward: r and d (``_math.renorm_factors``) and the coefficients of the affine
pass, batch norm's with the effective weight ``weight * r`` and bias
``bias + weight * d``. Backward: that effective weight (r and d are constants
for the gradient, so batch norm's dx with it is renorm's) and the parameter
gradients. As the CPU's ``renorm`` family, in float64.
"""
from numba import cuda, float64

from .. import _math
from .normalize import HAS_BIAS, HAS_WEIGHT, affine_coefficients, inv_sqrt

factors = cuda.jit(device=True)(_math.renorm_factors)


@cuda.jit
def renorm_coefficients(mean, var, running_mean, running_var, weight, bias, flags, rmax, dmax,
                        eps, r, d, scale, shift):
    """r[c], d[c], and y = x * scale[c] + shift[c]'s coefficients (flags: HAS_WEIGHT|HAS_BIAS)."""
    c = cuda.grid(1)
    if c < mean.shape[0]:
        w = float64(weight[c]) if flags & HAS_WEIGHT else 1.0
        b = float64(bias[c]) if flags & HAS_BIAS else 0.0
        m = float64(mean[c])
        v = float64(var[c])
        rc, dc = factors(m, v, float64(running_mean[c]), float64(running_var[c]), rmax, dmax,
                         eps)
        r[c] = rc
        d[c] = dc
        a, s = affine_coefficients(m, v, w * rc, b + w * dc, eps)
        scale[c] = a
        shift[c] = s


@cuda.jit
def renorm_grads(sum_dy, sum_dy_xmu, var, r, d, weight, flags, eps, weight_eff, dweight, dbias):
    """weight_eff[c] = weight[c] * r[c]; with HAS_WEIGHT, dweight[c] = r[c] * sum(dy * (x -
    mean)) / sigma_b + d[c] * sum(dy) and dbias[c] = sum(dy)."""
    c = cuda.grid(1)
    if c < var.shape[0]:
        rc = float64(r[c])
        if flags & HAS_WEIGHT:
            weight_eff[c] = float64(weight[c]) * rc
            dweight[c] = (rc * sum_dy_xmu[c] * inv_sqrt(float64(var[c]) + eps)
                          + float64(d[c]) * sum_dy[c])
            dbias[c] = sum_dy[c]
        else:
            weight_eff[c] = rc


KERNELS = ("renorm_coefficients", "renorm_grads")
