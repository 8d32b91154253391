"""Batch-norm backward on the device: one fused reduction, then one elementwise pass.

Reduction: per channel ``sum(dy)`` and ``sum(dy * (x - mean))``, per thread in the
accumulation dtype over the walk of the statistics (``accumulate_sums``) in chunks added
into float64 double-doubles (``launch.folded``, as the statistics), per block in float64
(``launch.block_sum2``), and over the channel's blocks in the last of them to
finish, which writes the channel's sums. Per channel, from the sums (which a
synchronized layer adds up over ranks in between): dx's coefficients, computed where
each block of the elementwise pass starts a channel (``dx_coefficients``), and
dweight/dbias (``param_grads``). Elementwise: ``dx = g[c]*dy + h[c]*(x - mean[c]) +
k[c]``, as the CPU path (h = k = 0 for running statistics).

Behind a ReLU, dy is taken where the forward's output was positive: ``gating`` =
(gate, its strides, dres, its strides), the gate being y or a layer's kept mask, and
``dres`` where the reduction also writes that gated dy (the residual's gradient), all
None where absent (an absent operand's strides are x's).
"""
from numba import cuda, float64

from .elements import gated, load4_if, load_if, store, store_if, wide
from .launch import (CHUNK_ROUNDS, ROUND0, advance, as_index, block_sum2, cast, column_start,
                     folded, four, four_rows, group_column_walk, group_plane, last_block, load4,
                     load_partial, moved, operand_walk, plane_walk)
from .normalize import inv_sqrt

# dx flags
HAS_WEIGHT, BATCH_STATS = 1, 2


@cuda.jit(device=True, cache=True)
def accumulate_sums(s_dy, s_dxm, g, v, t, off_dres, m, zero, gating):
    """The per-thread sums after one more (dy, x) pair (``t``: the gate's element), the gated
    dy written into dres at ``off_dres`` where gating asks for it."""
    gate, _, dres, _ = gating
    g = gated(wide(g, zero), t, gate, zero)
    store_if(dres, off_dres, g)
    return s_dy + g, s_dxm + g * (wide(v, zero) - m)


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
def accumulate_sums4(s_dy, s_dxm, gs, vs, ts, es, m, zero, gating):
    """The per-thread sums after four more (dy, x) pairs."""
    s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, gs[0], vs[0], ts[0], es[0], m, zero, gating)
    s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, gs[1], vs[1], ts[1], es[1], m, zero, gating)
    s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, gs[2], vs[2], ts[2], es[2], m, zero, gating)
    return accumulate_sums(s_dy, s_dxm, gs[3], vs[3], ts[3], es[3], m, zero, gating)


@cuda.jit(device=True, cache=True)
def write_sums(sum_dy, sum_dy_xmu, c, s_dy, s_dxm):
    sum_dy[c] = s_dy
    sum_dy_xmu[c] = s_dxm


@cuda.jit(cache=True)
def sums_rows(dy, sdy, x, sx, shape, mean, zero, partial, tickets, sum_dy, sum_dy_xmu,
              gating):
    """x, dy [outer, C, inner], flat with element strides: the walk of
    ``moments.moments_rows``; sum_dy[c] = sum(g), sum_dy_xmu[c] = sum(g * (x - mean)), g
    being dy through the gate."""
    n_outer, nchan, n_inner, group_rows = shape
    gate, s_gate, _, s_dres = gating
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    parts = cuda.gridDim.y
    j, c, row0, rows = group_plane(nchan, group_rows, n_outer)
    walk = plane_walk(rows, n_inner)
    q, _, i, step, _, step_i, plane, limit, _ = walk
    off_dy, steps_dy = operand_walk(sdy, walk, c, row0)
    off_x, steps_x = operand_walk(sx, walk, c, row0)
    off_t, steps_t = operand_walk(s_gate, walk, c, row0)
    off_e, steps_e = operand_walk(s_dres, walk, c, row0)
    m = wide(mean[j], zero)
    s_dy = zero
    s_dxm = zero
    h_dy = 0.0
    h_dxm = 0.0
    rounds = ROUND0
    while q < limit:
        g0, g1, g2, g3, off_dy, _ = four(off_dy, steps_dy, i, step_i, n_inner)
        t0, t1, t2, t3, off_t, _ = four(off_t, steps_t, i, step_i, n_inner)
        e0, e1, e2, e3, off_e, _ = four(off_e, steps_e, i, step_i, n_inner)
        x0, x1, x2, x3, off_x, i = four(off_x, steps_x, i, step_i, n_inner)
        s_dy, s_dxm = accumulate_sums4(s_dy, s_dxm, load4(dy, g0, g1, g2, g3),
                                       load4(x, x0, x1, x2, x3),
                                       load4_if(gate, (t0, t1, t2, t3), zero),
                                       (e0, e1, e2, e3), m, zero, gating)
        rounds = as_index(rounds + 1, rounds)
        if rounds == CHUNK_ROUNDS:
            h_dy, h_dxm, s_dy, s_dxm = folded(h_dy, h_dxm, s_dy, s_dxm)
            rounds = ROUND0
        q = as_index(q + as_index(step * 4, step), step)
    while q < plane:
        s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, dy[off_dy], x[off_x],
                                      load_if(gate, off_t, zero), off_e, m, zero, gating)
        i, wrapped = advance(i, step_i, n_inner)
        off_dy = moved(off_dy, steps_dy, wrapped)
        off_x = moved(off_x, steps_x, wrapped)
        off_t = moved(off_t, steps_t, wrapped)
        off_e = moved(off_e, steps_e, wrapped)
        q = as_index(q + step, step)
    s_dy, s_dxm = block_sum2(h_dy + float64(s_dy), h_dxm + float64(s_dxm), tid, nthreads, 1)
    if parts > 1:
        if tid == 0:
            write_sums(partial[j, 0], partial[j, 1], cuda.blockIdx.y, s_dy, s_dxm)
        if not last_block(tickets, j, parts, tid):
            return
        s_dy, s_dxm = merged_sums(partial, j, tid, nthreads, parts)
        s_dy, s_dxm = block_sum2(s_dy, s_dxm, tid, nthreads, 1)
    if tid == 0:
        write_sums(sum_dy, sum_dy_xmu, j, s_dy, s_dxm)


@cuda.jit(cache=True)
def sums_columns(dy, sdy, x, sx, shape, mean, zero, partial, tickets, sum_dy, sum_dy_xmu,
                 gating):
    """x, dy [rows, C], channels-last: the walk of ``moments.moments_columns``."""
    n_rows, nchan, group_rows = shape
    gate, s_gate, _, s_dres = gating
    ntx = cuda.blockDim.x
    nthreads = ntx * cuda.blockDim.y
    tid = cuda.threadIdx.y * ntx + cuda.threadIdx.x
    parts = cuda.gridDim.y
    j, c, row0, rows, r, rstep, limit = group_column_walk(nchan, group_rows, n_rows)
    s_dy = zero
    s_dxm = zero
    h_dy = 0.0
    h_dxm = 0.0
    rounds = ROUND0
    if c < nchan:
        m = wide(mean[j], zero)
        off_dy, dy_step = column_start(sdy, row0 + r, c, rstep)
        off_x, x_step = column_start(sx, row0 + r, c, rstep)
        off_t, t_step = column_start(s_gate, row0 + r, c, rstep)
        off_e, e_step = column_start(s_dres, row0 + r, c, rstep)
        while r < limit:
            g0, g1, g2, g3, off_dy = four_rows(off_dy, dy_step)
            t0, t1, t2, t3, off_t = four_rows(off_t, t_step)
            e0, e1, e2, e3, off_e = four_rows(off_e, e_step)
            x0, x1, x2, x3, off_x = four_rows(off_x, x_step)
            s_dy, s_dxm = accumulate_sums4(s_dy, s_dxm, load4(dy, g0, g1, g2, g3),
                                           load4(x, x0, x1, x2, x3),
                                           load4_if(gate, (t0, t1, t2, t3), zero),
                                           (e0, e1, e2, e3), m, zero, gating)
            rounds = as_index(rounds + 1, rounds)
            if rounds == CHUNK_ROUNDS:
                h_dy, h_dxm, s_dy, s_dxm = folded(h_dy, h_dxm, s_dy, s_dxm)
                rounds = ROUND0
            r = as_index(r + as_index(rstep * 4, rstep), rstep)
        while r < rows:
            s_dy, s_dxm = accumulate_sums(s_dy, s_dxm, dy[off_dy], x[off_x],
                                          load_if(gate, off_t, zero), off_e, m, zero, gating)
            off_dy = as_index(off_dy + dy_step, dy_step)
            off_x = as_index(off_x + x_step, x_step)
            off_t = as_index(off_t + t_step, t_step)
            off_e = as_index(off_e + e_step, e_step)
            r = as_index(r + rstep, rstep)
    s_dy, s_dxm = block_sum2(h_dy + float64(s_dy), h_dxm + float64(s_dxm), tid, nthreads, ntx)
    if parts > 1:
        if tid < ntx and c < nchan:
            write_sums(partial[j, 0], partial[j, 1], cuda.blockIdx.y, s_dy, s_dxm)
        if not last_block(tickets, cuda.blockIdx.x, parts, tid):
            return
        s_dy = 0.0
        s_dxm = 0.0
        if c < nchan:
            s_dy, s_dxm = merged_sums(partial, j, cuda.threadIdx.y, cuda.blockDim.y, parts)
        s_dy, s_dxm = block_sum2(s_dy, s_dxm, tid, nthreads, ntx)
    if tid < ntx and c < nchan:
        write_sums(sum_dy, sum_dy_xmu, j, s_dy, s_dxm)


@cuda.jit(device=True, cache=True)
def dx_coefficients(j, c, grad, zero):
    """dx's coefficients (g, h, k) and mean of (group, channel) pair j of channel c in
    zero's dtype; ``grad`` = (mean, var, weight, sum_dy, sum_dy_xmu, counts, flags, eps)
    (flags: HAS_WEIGHT|BATCH_STATS), counts = (values behind a pair's statistics, those of
    the last group's pairs, the last group's first pair)."""
    mean, var, weight, sum_dy, sum_dy_xmu, counts, flags, eps = grad
    count, last_count, last_pair = counts
    if j >= last_pair:
        count = last_count
    invstd = inv_sqrt(wide(var[j], 0.0) + eps)
    g = invstd * (wide(weight[c], 0.0) if flags & HAS_WEIGHT else 1.0)
    h = 0.0
    k = 0.0
    if flags & BATCH_STATS and count > 0:
        # The mean and variance depend on x too: their gradients, folded per channel.
        h = -g * invstd * invstd * sum_dy_xmu[j] / count
        k = -g * sum_dy[j] / count
    return cast(g, zero), cast(h, zero), cast(k, zero), wide(mean[j], zero)


@cuda.jit(cache=True)
def param_grads(sum_dy, sum_dy_xmu, var, eps, dweight, dbias):
    """dweight[c] = sum(dy*(x-mean))*invstd, dbias[c] = sum(dy), summed over the (group,
    channel) pairs j = g * C + c of virtual batches."""
    c = cuda.grid(1)
    nchan = dweight.shape[0]
    if c < nchan:
        dw = 0.0
        db = 0.0
        for j in range(c, var.shape[0], nchan):
            dw += sum_dy_xmu[j] * inv_sqrt(wide(var[j], 0.0) + eps)
            db += sum_dy[j]
        store(dweight, c, dw)
        store(dbias, c, db)


@cuda.jit(device=True, cache=True)
def put_dx(dx, off, g, v, t, coefficients, zero, gate):
    """One element: dx = G*g + H*(x - mean) + K from dy's element ``g`` (through the gate's
    element ``t``) and x's ``v``."""
    cg, ch, ck, m = coefficients
    store(dx, off, cg * gated(wide(g, zero), t, gate, zero) + ch * (wide(v, zero) - m) + ck)


@cuda.jit(device=True, cache=True)
def put_dx4(dx, offsets, dys, xs, ts, coefficients, zero, gate):
    """dx at four offsets from four (dy, x, gate) elements."""
    put_dx(dx, offsets[0], dys[0], xs[0], ts[0], coefficients, zero, gate)
    put_dx(dx, offsets[1], dys[1], xs[1], ts[1], coefficients, zero, gate)
    put_dx(dx, offsets[2], dys[2], xs[2], ts[2], coefficients, zero, gate)
    put_dx(dx, offsets[3], dys[3], xs[3], ts[3], coefficients, zero, gate)


@cuda.jit(cache=True)
def dx_rows(dy, sdy, x, sx, dx, sdx, shape, grad, zero, gating):
    """dx[outer, C, inner], threads as ``normalize.affine_rows``; ``gating``: (gate, its
    strides)."""
    n_outer, nchan, n_inner, group_rows = shape
    gate, s_gate = gating
    j, c, row0, rows = group_plane(nchan, group_rows, n_outer)
    walk = plane_walk(rows, n_inner)
    q, _, i, step, _, step_i, plane, limit, _ = walk
    off_dy, steps_dy = operand_walk(sdy, walk, c, row0)
    off_x, steps_x = operand_walk(sx, walk, c, row0)
    off_t, steps_t = operand_walk(s_gate, walk, c, row0)
    off_dx, steps_dx = operand_walk(sdx, walk, c, row0)
    coefficients = dx_coefficients(j, c, grad, zero)
    while q < limit:
        g0, g1, g2, g3, off_dy, _ = four(off_dy, steps_dy, i, step_i, n_inner)
        x0, x1, x2, x3, off_x, _ = four(off_x, steps_x, i, step_i, n_inner)
        t0, t1, t2, t3, off_t, _ = four(off_t, steps_t, i, step_i, n_inner)
        d0, d1, d2, d3, off_dx, i = four(off_dx, steps_dx, i, step_i, n_inner)
        put_dx4(dx, (d0, d1, d2, d3), load4(dy, g0, g1, g2, g3), load4(x, x0, x1, x2, x3),
                load4_if(gate, (t0, t1, t2, t3), zero), coefficients, zero, gate)
        q = as_index(q + as_index(step * 4, step), step)
    while q < plane:
        put_dx(dx, off_dx, dy[off_dy], x[off_x], load_if(gate, off_t, zero), coefficients,
               zero, gate)
        i, wrapped = advance(i, step_i, n_inner)
        off_dy = moved(off_dy, steps_dy, wrapped)
        off_x = moved(off_x, steps_x, wrapped)
        off_t = moved(off_t, steps_t, wrapped)
        off_dx = moved(off_dx, steps_dx, wrapped)
        q = as_index(q + step, step)


@cuda.jit(cache=True)
def dx_columns(dy, sdy, x, sx, dx, sdx, shape, grad, zero, gating):
    """dx[rows, C], channels-last, threads as ``normalize.affine_columns``."""
    n_rows, nchan, group_rows = shape
    gate, s_gate = gating
    j, c, row0, rows, r, rstep, limit = group_column_walk(nchan, group_rows, n_rows)
    if c >= nchan:
        return
    off_dy, dy_step = column_start(sdy, row0 + r, c, rstep)
    off_x, x_step = column_start(sx, row0 + r, c, rstep)
    off_t, t_step = column_start(s_gate, row0 + r, c, rstep)
    off_dx, dx_step = column_start(sdx, row0 + r, c, rstep)
    coefficients = dx_coefficients(j, c, grad, zero)
    while r < limit:
        g0, g1, g2, g3, off_dy = four_rows(off_dy, dy_step)
        x0, x1, x2, x3, off_x = four_rows(off_x, x_step)
        t0, t1, t2, t3, off_t = four_rows(off_t, t_step)
        d0, d1, d2, d3, off_dx = four_rows(off_dx, dx_step)
        put_dx4(dx, (d0, d1, d2, d3), load4(dy, g0, g1, g2, g3), load4(x, x0, x1, x2, x3),
                load4_if(gate, (t0, t1, t2, t3), zero), coefficients, zero, gate)
        r = as_index(r + as_index(rstep * 4, rstep), rstep)
    while r < rows:
        put_dx(dx, off_dx, dy[off_dy], x[off_x], load_if(gate, off_t, zero), coefficients,
               zero, gate)
        off_dy = as_index(off_dy + dy_step, dy_step)
        off_x = as_index(off_x + x_step, x_step)
        off_t = as_index(off_t + t_step, t_step)
        off_dx = as_index(off_dx + dx_step, dx_step)
        r = as_index(r + rstep, rstep)


KERNELS = ("sums_rows", "sums_columns", "param_grads", "dx_rows", "dx_columns")
