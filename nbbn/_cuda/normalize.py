"""The elementwise pass of batch norm on the device: y = x * scale[c] + shift[c].

The coefficients are per-channel values in the accumulation dtype (float32 for
float16 input, float64 otherwise, as the CPU path's float64), computed on the
device (``scale_shift``, or ``moments.channel_result`` in training).
"""
import math

from numba import cuda, float64

from .launch import (advance, as_index, column_start, column_walk, four, four_rows, load4,
                     moved, operand_walk, plane_walk)

HAS_WEIGHT, HAS_BIAS = 1, 2


@cuda.jit(device=True, cache=True)
def inv_sqrt(v):
    """1 / sqrt(v) as NumPy: inf at 0, nan below 0 or at nan (no exceptions anywhere)."""
    if v > 0.0:
        return 1.0 / math.sqrt(v)
    if v == 0.0:
        return math.inf
    return math.nan


@cuda.jit(device=True, cache=True)
def affine_coefficients(mean, var, w, b, eps):
    """(scale, shift) of batch norm as an affine map, in float64 (the CPU's ``_scale_shift``)."""
    scale = inv_sqrt(var + eps) * w
    return scale, b - mean * scale


@cuda.jit(cache=True)
def scale_shift(mean, var, weight, bias, flags, eps, scale, shift):
    """scale[c], shift[c] from given statistics (evaluation; ``nbbn.fold``)."""
    c = cuda.grid(1)
    if c < mean.shape[0]:
        w = float64(weight[c]) if flags & HAS_WEIGHT else 1.0
        b = float64(bias[c]) if flags & HAS_BIAS else 0.0
        a, d = affine_coefficients(float64(mean[c]), float64(var[c]), w, b, eps)
        scale[c] = a
        shift[c] = d


@cuda.jit(device=True, cache=True)
def put_affine4(y, offsets, values, a, b, zero):
    """y at four offsets from four values: x * a + b."""
    y0, y1, y2, y3 = offsets
    v0, v1, v2, v3 = values
    y[y0] = (zero + v0) * a + b
    y[y1] = (zero + v1) * a + b
    y[y2] = (zero + v2) * a + b
    y[y3] = (zero + v3) * a + b


@cuda.jit(cache=True)
def affine_rows(x, sx, y, sy, shape, scale, shift, zero):
    """x, y [outer, C, inner] as flat arrays with element strides sx, sy (index type); grid
    (channels, blocks per channel), each thread walking four elements of the plane at once."""
    n_outer, nchan, n_inner = shape
    c = cuda.blockIdx.x
    walk = plane_walk(n_outer, n_inner)
    q, _, i, step, _, step_i, plane, limit, _ = walk
    off_x, steps_x = operand_walk(sx, walk, c)
    off_y, steps_y = operand_walk(sy, walk, c)
    a = scale[c]
    b = shift[c]
    while q < limit:
        x0, x1, x2, x3, off_x, _ = four(off_x, steps_x, i, step_i, n_inner)
        y0, y1, y2, y3, off_y, i = four(off_y, steps_y, i, step_i, n_inner)
        put_affine4(y, (y0, y1, y2, y3), load4(x, x0, x1, x2, x3), a, b, zero)
        q = as_index(q + as_index(step * 4, step), step)
    while q < plane:
        y[off_y] = (zero + x[off_x]) * a + b
        i, wrapped = advance(i, step_i, n_inner)
        off_x = moved(off_x, steps_x, wrapped)
        off_y = moved(off_y, steps_y, wrapped)
        q = as_index(q + step, step)


@cuda.jit(cache=True)
def affine_columns(x, sx, y, sy, shape, scale, shift, zero):
    """x[rows, C], channels-last, flat with element strides (row, channel): TX threads along
    C (coalesced), TY along rows, four rows at once."""
    n_rows, nchan = shape
    c, r, rstep, limit = column_walk(n_rows)
    if c >= nchan:
        return
    off_x, x_step = column_start(sx, r, c, rstep)
    off_y, y_step = column_start(sy, r, c, rstep)
    a = scale[c]
    b = shift[c]
    while r < limit:
        x0, x1, x2, x3, off_x = four_rows(off_x, x_step)
        y0, y1, y2, y3, off_y = four_rows(off_y, y_step)
        put_affine4(y, (y0, y1, y2, y3), load4(x, x0, x1, x2, x3), a, b, zero)
        r = as_index(r + as_index(rstep * 4, rstep), rstep)
    while r < n_rows:
        y[off_y] = (zero + x[off_x]) * a + b
        off_x = as_index(off_x + x_step, x_step)
        off_y = as_index(off_y + y_step, y_step)
        r = as_index(r + rstep, rstep)


KERNELS = ("scale_shift", "affine_rows", "affine_columns")
