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

from .launch import (advance, as_index, block_sum2, cast, column_offset, column_rows, four,
                     four_limit, four_rows, last_block, load_partial, moved, plane_walk,
                     row_offset, walk_steps)
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


@cuda.jit(cache=True)
def sums_rows(dy, sdy, x, sx, shape, mean, zero, partial, tickets, sum_dy, sum_dy_xmu):
    """x, dy [outer, C, inner], flat with element strides: the walk of
    ``moments.moments_rows``; sum_dy[c] = sum(dy), sum_dy_xmu[c] = sum(dy * (x - mean))."""
    n_outer, nchan, n_inner = shape
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    parts = cuda.gridDim.y
    q0, o0, i0, step, step_o, step_i = plane_walk(n_outer, n_inner)
    plane = as_index(n_outer * n_inner, n_inner)
    limit = four_limit(plane, step)
    step4 = as_index(step * 4, step)
    steps_dy = walk_steps(sdy, step_o, step_i, n_inner)
    steps_x = walk_steps(sx, step_o, step_i, n_inner)
    c = cuda.blockIdx.x
    if c < nchan:
        m = zero + mean[c]
        off_dy = row_offset(sdy, o0, c, i0)
        off_x = row_offset(sx, o0, c, i0)
        i = i0
        q = q0
        s_dy = zero
        s_dxm = zero
        while q < limit:
            g0, g1, g2, g3, off_dy, _ = four(off_dy, steps_dy, i, step_i, n_inner)
            x0, x1, x2, x3, off_x, i = four(off_x, steps_x, i, step_i, n_inner)
            a0 = dy[g0]
            a1 = dy[g1]
            a2 = dy[g2]
            a3 = dy[g3]
            v0 = x[x0]
            v1 = x[x1]
            v2 = x[x2]
            v3 = x[x3]
            s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, a0, v0, m, zero)
            s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, a1, v1, m, zero)
            s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, a2, v2, m, zero)
            s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, a3, v3, m, zero)
            q = as_index(q + step4, step)
        while q < plane:
            s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, dy[off_dy], x[off_x], m, zero)
            i, wrapped = advance(i, step_i, n_inner)
            off_dy = moved(off_dy, steps_dy, wrapped)
            off_x = moved(off_x, steps_x, wrapped)
            q = as_index(q + step, step)
        s_dy, s_dxm = block_sum2(float64(s_dy), float64(s_dxm), tid, nthreads, 1)
        if parts > 1:
            if tid == 0:
                part = cuda.blockIdx.y
                partial[c, 0, part] = s_dy
                partial[c, 1, part] = s_dxm
            if not last_block(tickets, c, parts, tid):
                return
            s_dy, s_dxm = merged_sums(partial, c, tid, nthreads, parts)
            s_dy, s_dxm = block_sum2(s_dy, s_dxm, tid, nthreads, 1)
        if tid == 0:
            sum_dy[c] = s_dy
            sum_dy_xmu[c] = s_dxm


@cuda.jit(cache=True)
def sums_columns(dy, sdy, x, sx, shape, mean, zero, partial, tickets, sum_dy, sum_dy_xmu):
    """x, dy [rows, C], channels-last: the walk of ``moments.moments_columns``."""
    n_rows, nchan = shape
    tx = cuda.threadIdx.x
    ntx = cuda.blockDim.x
    nty = cuda.blockDim.y
    tid = cuda.threadIdx.y * ntx + tx
    nthreads = ntx * nty
    part = cuda.blockIdx.y
    parts = cuda.gridDim.y
    r0, rstep, limit = column_rows(n_rows)
    step4 = as_index(rstep * 4, rstep)
    dy_step = as_index(rstep * sdy[0], rstep)
    x_step = as_index(rstep * sx[0], rstep)
    c0 = cuda.blockIdx.x * ntx
    if c0 < nchan:
        c = c0 + tx
        s_dy = zero
        s_dxm = zero
        if c < nchan:
            m = zero + mean[c]
            off_dy = column_offset(sdy, r0, c)
            off_x = column_offset(sx, r0, c)
            r = r0
            while r < limit:
                g0, g1, g2, g3, off_dy = four_rows(off_dy, dy_step)
                x0, x1, x2, x3, off_x = four_rows(off_x, x_step)
                a0 = dy[g0]
                a1 = dy[g1]
                a2 = dy[g2]
                a3 = dy[g3]
                v0 = x[x0]
                v1 = x[x1]
                v2 = x[x2]
                v3 = x[x3]
                s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, a0, v0, m, zero)
                s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, a1, v1, m, zero)
                s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, a2, v2, m, zero)
                s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, a3, v3, m, zero)
                r = as_index(r + step4, rstep)
            while r < n_rows:
                s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, dy[off_dy], x[off_x], m, zero)
                off_dy = as_index(off_dy + dy_step, dy_step)
                off_x = as_index(off_x + x_step, x_step)
                r = as_index(r + rstep, rstep)
        s_dy, s_dxm = block_sum2(float64(s_dy), float64(s_dxm), tid, nthreads, ntx)
        if parts > 1:
            if tid < ntx and c < nchan:
                partial[c, 0, part] = s_dy
                partial[c, 1, part] = s_dxm
            if not last_block(tickets, c0 // ntx, parts, tid):
                return
            s_dy = 0.0
            s_dxm = 0.0
            if c < nchan:
                s_dy, s_dxm = merged_sums(partial, c, cuda.threadIdx.y, nty, parts)
            s_dy, s_dxm = block_sum2(s_dy, s_dxm, tid, nthreads, ntx)
        if tid < ntx and c < nchan:
            sum_dy[c] = s_dy
            sum_dy_xmu[c] = s_dxm


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


@cuda.jit(cache=True)
def dx_rows(dy, sdy, x, sx, dx, sdx, shape, grad, zero):
    """dx[outer, C, inner], threads as ``normalize.affine_rows``."""
    n_outer, nchan, n_inner = shape
    q0, o0, i0, step, step_o, step_i = plane_walk(n_outer, n_inner)
    plane = as_index(n_outer * n_inner, n_inner)
    limit = four_limit(plane, step)
    step4 = as_index(step * 4, step)
    steps_dy = walk_steps(sdy, step_o, step_i, n_inner)
    steps_x = walk_steps(sx, step_o, step_i, n_inner)
    steps_dx = walk_steps(sdx, step_o, step_i, n_inner)
    c = cuda.blockIdx.x
    if c < nchan:
        g, h, k, m = dx_coefficients(c, grad, zero)
        off_dy = row_offset(sdy, o0, c, i0)
        off_x = row_offset(sx, o0, c, i0)
        off_dx = row_offset(sdx, o0, c, i0)
        i = i0
        q = q0
        while q < limit:
            g0, g1, g2, g3, off_dy, _ = four(off_dy, steps_dy, i, step_i, n_inner)
            x0, x1, x2, x3, off_x, _ = four(off_x, steps_x, i, step_i, n_inner)
            d0, d1, d2, d3, off_dx, i = four(off_dx, steps_dx, i, step_i, n_inner)
            a0 = dy[g0]
            a1 = dy[g1]
            a2 = dy[g2]
            a3 = dy[g3]
            v0 = x[x0]
            v1 = x[x1]
            v2 = x[x2]
            v3 = x[x3]
            dx[d0] = g * (zero + a0) + h * ((zero + v0) - m) + k
            dx[d1] = g * (zero + a1) + h * ((zero + v1) - m) + k
            dx[d2] = g * (zero + a2) + h * ((zero + v2) - m) + k
            dx[d3] = g * (zero + a3) + h * ((zero + v3) - m) + k
            q = as_index(q + step4, step)
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
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    r0, rstep, limit = column_rows(n_rows)
    step4 = as_index(rstep * 4, rstep)
    dy_step = as_index(rstep * sdy[0], rstep)
    x_step = as_index(rstep * sx[0], rstep)
    dx_step = as_index(rstep * sdx[0], rstep)
    if c < nchan:
        g, h, k, m = dx_coefficients(c, grad, zero)
        off_dy = column_offset(sdy, r0, c)
        off_x = column_offset(sx, r0, c)
        off_dx = column_offset(sdx, r0, c)
        r = r0
        while r < limit:
            g0, g1, g2, g3, off_dy = four_rows(off_dy, dy_step)
            x0, x1, x2, x3, off_x = four_rows(off_x, x_step)
            d0, d1, d2, d3, off_dx = four_rows(off_dx, dx_step)
            a0 = dy[g0]
            a1 = dy[g1]
            a2 = dy[g2]
            a3 = dy[g3]
            v0 = x[x0]
            v1 = x[x1]
            v2 = x[x2]
            v3 = x[x3]
            dx[d0] = g * (zero + a0) + h * ((zero + v0) - m) + k
            dx[d1] = g * (zero + a1) + h * ((zero + v1) - m) + k
            dx[d2] = g * (zero + a2) + h * ((zero + v2) - m) + k
            dx[d3] = g * (zero + a3) + h * ((zero + v3) - m) + k
            r = as_index(r + step4, rstep)
        while r < n_rows:
            dx[off_dx] = g * (zero + dy[off_dy]) + h * ((zero + x[off_x]) - m) + k
            off_dy = as_index(off_dy + dy_step, dy_step)
            off_x = as_index(off_x + x_step, x_step)
            off_dx = as_index(off_dx + dx_step, dx_step)
            r = as_index(r + rstep, rstep)


KERNELS = ("sums_rows", "sums_columns", "param_grads", "dx_rows", "dx_columns")
