"""The elementwise pass of batch norm on the device: y = act(x * scale[c] + shift[c] +
residual).

The coefficients are per-channel values in the accumulation dtype (float32 for
16-bit input, float64 otherwise, as the CPU path), computed on the device
(``scale_shift``, or ``moments.channel_result`` in training). ``epi`` = (residual,
its strides, relu, copy, its strides, mask, its strides): the epilogue's optional
operands (None where absent; an absent operand's strides are x's), a residual added
before the ReLU (``relu``: None or True), and what a layer keeps for its backward:
x's values (``copy``) and the ReLU's gate y > 0 (``mask``, uint8).
"""
import math

from numba import cuda

from .elements import epilogue, keep, load4_if, load_if, store, wide
from .launch import (advance, as_index, column_start, four, four_rows, group_column_walk,
                     group_plane, load4, moved, operand_walk, plane_walk)

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
    """scale[j], shift[j] from given statistics (evaluation; ``nbbn.fold``; per (group,
    channel) pair j = g * C + c of virtual batches, weight and bias per channel)."""
    j = cuda.grid(1)
    if j < mean.shape[0]:
        w = wide(weight[j % weight.shape[0]], 0.0) if flags & HAS_WEIGHT else 1.0
        b = wide(bias[j % bias.shape[0]], 0.0) if flags & HAS_BIAS else 0.0
        a, d = affine_coefficients(wide(mean[j], 0.0), wide(var[j], 0.0), w, b, eps)
        scale[j] = a
        shift[j] = d


@cuda.jit(device=True, cache=True)
def put_affine(y, off_y, xv, rv, a, b, zero, epi, off_copy, off_mask):
    """One element: y = act(x * a + b + r) from x's element ``xv`` and the residual's ``rv``,
    and what the layer keeps (``epi``)."""
    residual, _, relu, copy, _, mask, _ = epi
    v = epilogue(wide(xv, zero) * a + b, rv, residual, relu, zero)
    store(y, off_y, v)
    keep(copy, off_copy, xv, mask, off_mask, v, y)


@cuda.jit(device=True, cache=True)
def put_affine4(y, ys, xs, rs, a, b, zero, epi, cs, ms):
    """Four elements at once (their loads issued together by the caller)."""
    put_affine(y, ys[0], xs[0], rs[0], a, b, zero, epi, cs[0], ms[0])
    put_affine(y, ys[1], xs[1], rs[1], a, b, zero, epi, cs[1], ms[1])
    put_affine(y, ys[2], xs[2], rs[2], a, b, zero, epi, cs[2], ms[2])
    put_affine(y, ys[3], xs[3], rs[3], a, b, zero, epi, cs[3], ms[3])


@cuda.jit(cache=True)
def affine_rows(x, sx, y, sy, shape, scale, shift, zero, epi):
    """x, y [outer, C, inner] as flat arrays with element strides sx, sy (index type); grid
    (channels, blocks per channel), each thread walking four elements of the plane at once."""
    n_outer, nchan, n_inner, group_rows = shape
    residual, s_res, _, copy, s_copy, mask, s_mask = epi
    j, c, row0, rows = group_plane(nchan, group_rows, n_outer)
    walk = plane_walk(rows, n_inner)
    q, _, i, step, _, step_i, plane, limit, _ = walk
    off_x, steps_x = operand_walk(sx, walk, c, row0)
    off_y, steps_y = operand_walk(sy, walk, c, row0)
    off_r, steps_r = operand_walk(s_res, walk, c, row0)
    off_c, steps_c = operand_walk(s_copy, walk, c, row0)
    off_m, steps_m = operand_walk(s_mask, walk, c, row0)
    a = scale[j]
    b = shift[j]
    while q < limit:
        x0, x1, x2, x3, off_x, _ = four(off_x, steps_x, i, step_i, n_inner)
        r0, r1, r2, r3, off_r, _ = four(off_r, steps_r, i, step_i, n_inner)
        c0, c1, c2, c3, off_c, _ = four(off_c, steps_c, i, step_i, n_inner)
        m0, m1, m2, m3, off_m, _ = four(off_m, steps_m, i, step_i, n_inner)
        y0, y1, y2, y3, off_y, i = four(off_y, steps_y, i, step_i, n_inner)
        put_affine4(y, (y0, y1, y2, y3), load4(x, x0, x1, x2, x3),
                    load4_if(residual, (r0, r1, r2, r3), zero), a, b, zero, epi,
                    (c0, c1, c2, c3), (m0, m1, m2, m3))
        q = as_index(q + as_index(step * 4, step), step)
    while q < plane:
        put_affine(y, off_y, x[off_x], load_if(residual, off_r, zero), a, b, zero, epi,
                   off_c, off_m)
        i, wrapped = advance(i, step_i, n_inner)
        off_x = moved(off_x, steps_x, wrapped)
        off_y = moved(off_y, steps_y, wrapped)
        off_r = moved(off_r, steps_r, wrapped)
        off_c = moved(off_c, steps_c, wrapped)
        off_m = moved(off_m, steps_m, wrapped)
        q = as_index(q + step, step)


@cuda.jit(cache=True)
def affine_columns(x, sx, y, sy, shape, scale, shift, zero, epi):
    """x[rows, C], channels-last, flat with element strides (row, channel): TX threads along
    C (coalesced), TY along rows, four rows at once."""
    n_rows, nchan, group_rows = shape
    residual, s_res, _, copy, s_copy, mask, s_mask = epi
    j, c, row0, rows, r, rstep, limit = group_column_walk(nchan, group_rows, n_rows)
    if c >= nchan:
        return
    off_x, x_step = column_start(sx, row0 + r, c, rstep)
    off_y, y_step = column_start(sy, row0 + r, c, rstep)
    off_r, r_step = column_start(s_res, row0 + r, c, rstep)
    off_c, c_step = column_start(s_copy, row0 + r, c, rstep)
    off_m, m_step = column_start(s_mask, row0 + r, c, rstep)
    a = scale[j]
    b = shift[j]
    while r < limit:
        x0, x1, x2, x3, off_x = four_rows(off_x, x_step)
        r0, r1, r2, r3, off_r = four_rows(off_r, r_step)
        c0, c1, c2, c3, off_c = four_rows(off_c, c_step)
        m0, m1, m2, m3, off_m = four_rows(off_m, m_step)
        y0, y1, y2, y3, off_y = four_rows(off_y, y_step)
        put_affine4(y, (y0, y1, y2, y3), load4(x, x0, x1, x2, x3),
                    load4_if(residual, (r0, r1, r2, r3), zero), a, b, zero, epi,
                    (c0, c1, c2, c3), (m0, m1, m2, m3))
        r = as_index(r + as_index(rstep * 4, rstep), rstep)
    while r < rows:
        put_affine(y, off_y, x[off_x], load_if(residual, off_r, zero), a, b, zero, epi,
                   off_c, off_m)
        off_x = as_index(off_x + x_step, x_step)
        off_y = as_index(off_y + y_step, y_step)
        off_r = as_index(off_r + r_step, r_step)
        off_c = as_index(off_c + c_step, c_step)
        off_m = as_index(off_m + m_step, m_step)
        r = as_index(r + rstep, rstep)


KERNELS = ("scale_shift", "affine_rows", "affine_columns")
