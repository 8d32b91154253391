"""Batch-norm backward on the device: one fused reduction, then one elementwise pass.

Reduction: per channel ``sum(dy)`` and ``sum(dy * (x - mean))``, per thread in the
accumulation dtype over the walk of the statistics (``accumulate_sums``), per block in
float64 (``launch.block_sum2``), and over the channel's blocks in the last of them to
finish, which writes the channel's sums. Per channel, from the sums (which a
synchronized layer adds up over ranks in between): dx's coefficients, computed where
each block of the elementwise pass starts a channel (``dx_coefficients``), and
dweight/dbias (``param_grads``). Elementwise: ``dx = g[c]*dy + h[c]*(x - mean[c]) +
k[c]``, as the CPU path (h = k = 0 for running statistics).
"""
from numba import cuda, float64

from .launch import (advance, as_index, block_sum2, cast, column_start, column_walk, four,
                     four_rows, last_block, load4, load_partial, moved, operand_walk,
                     plane_walk)
from .normalize import inv_sqrt

# dx flags
HAS_WEIGHT, BATCH_STATS = 1, 2


@cuda.jit(device=True, cache=True)
def accumulate_sums(s_dy, s_dxm, g, v, m, zero):
    """The per-thread sums after one more (dy, x) pair."""
    g = zero + g
    return s_dy + g, s_dxm + g * ((zero + v) - m)


@cuda.jit(device=True, cache=True)
def merged_sums(partial, c, first, stride, parts):
    """Sums of partial[c, :, p] for p = first, first + stride, ... < parts."""
    s_dy = 0.0
    s_dxm = 0.0
    for p in range(first, parts, stride):
        s_dy += load_partial(partial, c, 0, p)
        s_dxm += load_partial(partial, c, 1, p)
    return s_dy, s_dxm


@cuda.jit(device=True, cache=True)
def accumulate_sums4(s_dy, s_dxm, gs, vs, m, zero):
    """The per-thread sums after four more (dy, x) pairs."""
    g0, g1, g2, g3 = gs
    v0, v1, v2, v3 = vs
    s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, g0, v0, m, zero)
    s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, g1, v1, m, zero)
    s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, g2, v2, m, zero)
    return accumulate_sums(s_dy, s_dxm, g3, v3, m, zero)


@cuda.jit(device=True, cache=True)
def write_sums(sum_dy, sum_dy_xmu, c, s_dy, s_dxm):
    sum_dy[c] = s_dy
    sum_dy_xmu[c] = s_dxm


@cuda.jit(cache=True)
def sums_rows(dy, sdy, x, sx, shape, mean, zero, partial, tickets, sum_dy, sum_dy_xmu):
    """x, dy [outer, C, inner], flat with element strides: the walk of
    ``moments.moments_rows``; sum_dy[c] = sum(dy), sum_dy_xmu[c] = sum(dy * (x - mean))."""
    n_outer, nchan, n_inner = shape
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    parts = cuda.gridDim.y
    c = cuda.blockIdx.x
    walk = plane_walk(n_outer, n_inner)
    q, _, i, step, _, step_i, plane, limit, _ = walk
    off_dy, steps_dy = operand_walk(sdy, walk, c)
    off_x, steps_x = operand_walk(sx, walk, c)
    m = zero + mean[c]
    s_dy = zero
    s_dxm = zero
    while q < limit:
        g0, g1, g2, g3, off_dy, _ = four(off_dy, steps_dy, i, step_i, n_inner)
        x0, x1, x2, x3, off_x, i = four(off_x, steps_x, i, step_i, n_inner)
        s_dy, s_dxm = accumulate_sums4(s_dy, s_dxm, load4(dy, g0, g1, g2, g3),
                                       load4(x, x0, x1, x2, x3), m, zero)
        q = as_index(q + as_index(step * 4, step), step)
    while q < plane:
        s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, dy[off_dy], x[off_x], m, zero)
        i, wrapped = advance(i, step_i, n_inner)
        off_dy = moved(off_dy, steps_dy, wrapped)
        off_x = moved(off_x, steps_x, wrapped)
        q = as_index(q + step, step)
    s_dy, s_dxm = block_sum2(float64(s_dy), float64(s_dxm), tid, nthreads, 1)
    if parts > 1:
        if tid == 0:
            write_sums(partial[c, 0], partial[c, 1], cuda.blockIdx.y, s_dy, s_dxm)
        if not last_block(tickets, c, parts, tid):
            return
        s_dy, s_dxm = merged_sums(partial, c, tid, nthreads, parts)
        s_dy, s_dxm = block_sum2(s_dy, s_dxm, tid, nthreads, 1)
    if tid == 0:
        write_sums(sum_dy, sum_dy_xmu, c, s_dy, s_dxm)


@cuda.jit(cache=True)
def sums_columns(dy, sdy, x, sx, shape, mean, zero, partial, tickets, sum_dy, sum_dy_xmu):
    """x, dy [rows, C], channels-last: the walk of ``moments.moments_columns``."""
    n_rows, nchan = shape
    ntx = cuda.blockDim.x
    nthreads = ntx * cuda.blockDim.y
    tid = cuda.threadIdx.y * ntx + cuda.threadIdx.x
    parts = cuda.gridDim.y
    c, r, rstep, limit = column_walk(n_rows)
    s_dy = zero
    s_dxm = zero
    if c < nchan:
        m = zero + mean[c]
        off_dy, dy_step = column_start(sdy, r, c, rstep)
        off_x, x_step = column_start(sx, r, c, rstep)
        while r < limit:
            g0, g1, g2, g3, off_dy = four_rows(off_dy, dy_step)
            x0, x1, x2, x3, off_x = four_rows(off_x, x_step)
            s_dy, s_dxm = accumulate_sums4(s_dy, s_dxm, load4(dy, g0, g1, g2, g3),
                                           load4(x, x0, x1, x2, x3), m, zero)
            r = as_index(r + as_index(rstep * 4, rstep), rstep)
        while r < n_rows:
            s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, dy[off_dy], x[off_x], m, zero)
            off_dy = as_index(off_dy + dy_step, dy_step)
            off_x = as_index(off_x + x_step, x_step)
            r = as_index(r + rstep, rstep)
    s_dy, s_dxm = block_sum2(float64(s_dy), float64(s_dxm), tid, nthreads, ntx)
    if parts > 1:
        if tid < ntx and c < nchan:
            write_sums(partial[c, 0], partial[c, 1], cuda.blockIdx.y, s_dy, s_dxm)
        if not last_block(tickets, cuda.blockIdx.x, parts, tid):
            return
        s_dy = 0.0
        s_dxm = 0.0
        if c < nchan:
            s_dy, s_dxm = merged_sums(partial, c, cuda.threadIdx.y, cuda.blockDim.y, parts)
        s_dy, s_dxm = block_sum2(s_dy, s_dxm, tid, nthreads, ntx)
    if tid < ntx and c < nchan:
        write_sums(sum_dy, sum_dy_xmu, c, s_dy, s_dxm)


@cuda.jit(device=True, cache=True)
def dx_coefficients(c, grad, zero):
    """dx's coefficients (g, h, k) and mean of channel c in zero's dtype; ``grad`` = (mean,
    var, weight, sum_dy, sum_dy_xmu, count, flags, eps) (flags: HAS_WEIGHT|BATCH_STATS)."""
    mean, var, weight, sum_dy, sum_dy_xmu, count, flags, eps = grad
    invstd = inv_sqrt(float64(var[c]) + eps)
    g = invstd * (float64(weight[c]) if flags & HAS_WEIGHT else 1.0)
    h = 0.0
    k = 0.0
    if flags & BATCH_STATS and count > 0:
        # The mean and variance depend on x too: their gradients, folded per channel.
        h = -g * invstd * invstd * sum_dy_xmu[c] / count
        k = -g * sum_dy[c] / count
    return cast(g, zero), cast(h, zero), cast(k, zero), zero + mean[c]


@cuda.jit(cache=True)
def param_grads(sum_dy, sum_dy_xmu, var, eps, dweight, dbias):
    """dweight[c] = sum(dy*(x-mean))*invstd, dbias[c] = sum(dy)."""
    c = cuda.grid(1)
    if c < var.shape[0]:
        dweight[c] = sum_dy_xmu[c] * inv_sqrt(float64(var[c]) + eps)
        dbias[c] = sum_dy[c]


@cuda.jit(device=True, cache=True)
def put_dx4(dx, offsets, dys, xs, coefficients, zero):
    """dx at four offsets from four (dy, x) pairs: g*dy + h*(x - mean) + k."""
    g, h, k, m = coefficients
    d0, d1, d2, d3 = offsets
    a0, a1, a2, a3 = dys
    v0, v1, v2, v3 = xs
    dx[d0] = g * (zero + a0) + h * ((zero + v0) - m) + k
    dx[d1] = g * (zero + a1) + h * ((zero + v1) - m) + k
    dx[d2] = g * (zero + a2) + h * ((zero + v2) - m) + k
    dx[d3] = g * (zero + a3) + h * ((zero + v3) - m) + k


@cuda.jit(cache=True)
def dx_rows(dy, sdy, x, sx, dx, sdx, shape, grad, zero):
    """dx[outer, C, inner], threads as ``normalize.affine_rows``."""
    n_outer, nchan, n_inner = shape
    c = cuda.blockIdx.x
    walk = plane_walk(n_outer, n_inner)
    q, _, i, step, _, step_i, plane, limit, _ = walk
    off_dy, steps_dy = operand_walk(sdy, walk, c)
    off_x, steps_x = operand_walk(sx, walk, c)
    off_dx, steps_dx = operand_walk(sdx, walk, c)
    coefficients = dx_coefficients(c, grad, zero)
    g, h, k, m = coefficients
    while q < limit:
        g0, g1, g2, g3, off_dy, _ = four(off_dy, steps_dy, i, step_i, n_inner)
        x0, x1, x2, x3, off_x, _ = four(off_x, steps_x, i, step_i, n_inner)
        d0, d1, d2, d3, off_dx, i = four(off_dx, steps_dx, i, step_i, n_inner)
        put_dx4(dx, (d0, d1, d2, d3), load4(dy, g0, g1, g2, g3), load4(x, x0, x1, x2, x3),
                coefficients, zero)
        q = as_index(q + as_index(step * 4, step), step)
    while q < plane:
        dx[off_dx] = g * (zero + dy[off_dy]) + h * ((zero + x[off_x]) - m) + k
        i, wrapped = advance(i, step_i, n_inner)
        off_dy = moved(off_dy, steps_dy, wrapped)
        off_x = moved(off_x, steps_x, wrapped)
        off_dx = moved(off_dx, steps_dx, wrapped)
        q = as_index(q + step, step)


@cuda.jit(cache=True)
def dx_columns(dy, sdy, x, sx, dx, sdx, shape, grad, zero):
    """dx[rows, C], channels-last, threads as ``normalize.affine_columns``."""
    n_rows, nchan = shape
    c, r, rstep, limit = column_walk(n_rows)
    if c >= nchan:
        return
    off_dy, dy_step = column_start(sdy, r, c, rstep)
    off_x, x_step = column_start(sx, r, c, rstep)
    off_dx, dx_step = column_start(sdx, r, c, rstep)
    coefficients = dx_coefficients(c, grad, zero)
    g, h, k, m = coefficients
    while r < limit:
        g0, g1, g2, g3, off_dy = four_rows(off_dy, dy_step)
        x0, x1, x2, x3, off_x = four_rows(off_x, x_step)
        d0, d1, d2, d3, off_dx = four_rows(off_dx, dx_step)
        put_dx4(dx, (d0, d1, d2, d3), load4(dy, g0, g1, g2, g3), load4(x, x0, x1, x2, x3),
                coefficients, zero)
        r = as_index(r + as_index(rstep * 4, rstep), rstep)
    while r < n_rows:
        dx[off_dx] = g * (zero + dy[off_dy]) + h * ((zero + x[off_x]) - m) + k
        off_dy = as_index(off_dy + dy_step, dy_step)
        off_x = as_index(off_x + x_step, x_step)
        off_dx = as_index(off_dx + dx_step, dx_step)
        r = as_index(r + rstep, rstep)


KERNELS = ("sums_rows", "sums_columns", "param_grads", "dx_rows", "dx_columns")
