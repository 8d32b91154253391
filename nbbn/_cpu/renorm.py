"""Batch renorm's per-channel factors r and d (Ioffe 2017), in float64."""
from .. import _math
from ._jit import kernel


@kernel
def renorm_factors(mean, var, running_mean, running_var, rmax, dmax, eps, r, d):
    """r[j], d[j] from float64 batch statistics and running buffers (``_math.renorm_factors``)."""
    for j in range(mean.shape[0]):
        r[j], d[j] = _math.renorm_factors(mean[j], var[j], running_mean[j], running_var[j], rmax,
                                          dmax, eps)
