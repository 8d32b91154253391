"""The elementwise pass of batch norm on the device: y = x * scale[c] + shift[c].

scale/shift are per-channel arrays in the accumulation dtype (float32 for
float16 input, float64 otherwise, as the CPU path's float64), computed on the
device (``scale_shift``, or ``moments.finalize_forward`` in training). With
virtual batches they are per (group, channel): scale[g*C + c], g the outer
row's group (``group_rows`` rows each; all rows: one group).
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
    if c < mean.shape[0]:  # per (group, channel) statistics: weight and bias of c % C
        w = float64(weight[c % weight.shape[0]]) if flags & HAS_WEIGHT else 1.0
        b = float64(bias[c % bias.shape[0]]) if flags & HAS_BIAS else 0.0
        a, d = affine_coefficients(float64(mean[c]), float64(var[c]), w, b, eps)
        scale[c] = a
        shift[c] = d


@cuda.jit
def affine_rows(x, scale, shift, zero, group_rows, y):
    """x[outer, C, inner]: TX threads along inner, TY along the (o, c) rows."""
    n_outer, nchan, n_inner = x.shape
    i0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    istep = cuda.gridDim.x * cuda.blockDim.x
    r0 = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    rstep = cuda.gridDim.y * cuda.blockDim.y
    for r in range(r0, n_outer * nchan, rstep):
        o = r // nchan
        c = r - o * nchan
        s = o // group_rows * nchan + c
        a = scale[s]
        b = shift[s]
        for i in range(i0, n_inner, istep):
            y[o, c, i] = (zero + x[o, c, i]) * a + b


@cuda.jit(device=True)
def group_first_row(g, group_rows, r0, rstep):
    """The first row of group g in a walk over rows r0, r0 + rstep, ..."""
    lo = g * group_rows
    return lo + (r0 - lo) % rstep


@cuda.jit(device=True)
def group_span(g, group_rows, offset, n_rows):
    """Rows ``first:end`` of group g that a reduction's thread starting at ``offset`` reads
    (its walk restarts in every group)."""
    return g * group_rows + offset, min(n_rows, (g + 1) * group_rows)


@cuda.jit
def affine_columns(x, scale, shift, zero, group_rows, y):
    """x[rows, C], channels-last: TX threads along C (coalesced), TY along rows, one group's
    rows after the other."""
    n_rows, nchan = x.shape
    c0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    cstep = cuda.gridDim.x * cuda.blockDim.x
    r0 = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    rstep = cuda.gridDim.y * cuda.blockDim.y
    for c in range(c0, nchan, cstep):
        for g in range(scale.shape[0] // nchan):
            a = scale[g * nchan + c]
            b = shift[g * nchan + c]
            end = min(n_rows, (g + 1) * group_rows)
            for r in range(group_first_row(g, group_rows, r0, rstep), end, rstep):
                y[r, c] = (zero + x[r, c]) * a + b


KERNELS = ("scale_shift", "affine_rows", "affine_columns")
