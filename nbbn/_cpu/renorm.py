"""Batch renorm's per-channel factors r and d (Ioffe 2017), in float64."""
from .. import _math
from ._jit import helper, kernel

factors = helper(_math.renorm_factors)


@kernel
def renorm_factors(mean, var, running_mean, running_var, rmax, dmax, eps, r, d):
    """r[c], d[c] from float64 batch statistics and running buffers (``_math.renorm_factors``)."""
    for c in range(mean.shape[0]):
        r[c], d[c] = factors(mean[c], var[c], running_mean[c], running_var[c], rmax, dmax, eps)
