"""The elementwise pass of batch norm on the device: y = x * scale[c] + shift[c].

scale/shift are per-channel arrays in the accumulation dtype (float32 for
float16 input, float64 otherwise, as the CPU path's float64), computed on the
device (``scale_shift``, or ``moments.finalize_forward`` in training).
"""
import math

from numba import cuda, float64

HAS_WEIGHT, HAS_BIAS = 1, 2


@cuda.jit(device=True)
def inv_sqrt(v):
    """1 / sqrt(v) as NumPy: inf at 0, nan below 0 or at nan (no exceptions anywhere)."""
    if v > 0.0:
        return 1.0 / math.sqrt(v)
    if v == 0.0:
        return math.inf
    return math.nan


@cuda.jit(device=True)
def affine_coefficients(mean, var, w, b, eps):
    """(scale, shift) of batch norm as an affine map, in float64 (the CPU's ``_scale_shift``)."""
    scale = inv_sqrt(var + eps) * w
    return scale, b - mean * scale


@cuda.jit
def scale_shift(mean, var, weight, bias, flags, eps, scale, shift):
    """scale[c], shift[c] from given statistics (evaluation; ``nbbn.fold``)."""
    c = cuda.grid(1)
    if c < mean.shape[0]:
        w = float64(weight[c]) if flags & HAS_WEIGHT else 1.0
        b = float64(bias[c]) if flags & HAS_BIAS else 0.0
        a, d = affine_coefficients(float64(mean[c]), float64(var[c]), w, b, eps)
        scale[c] = a
        shift[c] = d


@cuda.jit
def affine_rows(x, scale, shift, zero, y):
    """x[outer, C, inner]: TX threads along inner, TY along the (o, c) rows."""
    n_outer, nchan, n_inner = x.shape
    i0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    istep = cuda.gridDim.x * cuda.blockDim.x
    r0 = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    rstep = cuda.gridDim.y * cuda.blockDim.y
    for r in range(r0, n_outer * nchan, rstep):
        o = r // nchan
        c = r - o * nchan
        a = scale[c]
        b = shift[c]
        for i in range(i0, n_inner, istep):
            y[o, c, i] = (zero + x[o, c, i]) * a + b


@cuda.jit
def affine_columns(x, scale, shift, zero, y):
    """x[rows, C], channels-last: TX threads along C (coalesced), TY along rows."""
    n_rows, nchan = x.shape
    c0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    cstep = cuda.gridDim.x * cuda.blockDim.x
    r0 = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    rstep = cuda.gridDim.y * cuda.blockDim.y
    for c in range(c0, nchan, cstep):
        a = scale[c]
        b = shift[c]
        for r in range(r0, n_rows, rstep):
            y[r, c] = (zero + x[r, c]) * a + b


KERNELS = ("scale_shift", "affine_rows", "affine_columns")
