"""Batch-norm backward on the device: one fused reduction, then one elementwise pass.

Reduction: per channel ``sum(dy)`` and ``sum(dy * (x - mean))``, per thread in
the accumulation dtype over the same grid-stride walk as the statistics, per
block in float64 (``launch.block_sum2``), per channel over the blocks'
partials in ``finalize_sums``. Per channel, from the sums (which a
synchronized layer adds up over ranks in between): dx's coefficients
(``dx_coefficients``) and dweight/dbias (``param_grads``). Elementwise:
``dx = g[c]*dy + h[c]*(x - mean[c]) + k[c]``, as the CPU path (h = k = 0 for
running statistics). With virtual batches the sums, the mean and the
coefficients are per (group, channel), as in ``moments`` and ``normalize``.
"""
from numba import cuda, float64

from .launch import block_sum2, columns_walk, rows_walk
from .normalize import group_first_row, group_span, inv_sqrt

# dx_coefficients flags
HAS_WEIGHT, BATCH_STATS = 1, 2


@cuda.jit
def sums_rows(dy, x, mean, zero, bx, group_rows, partial):
    """x, dy [outer, C, inner]: the walk of ``moments.moments_rows``; partial[:, block, g*C + c]."""
    n_outer, nchan, n_inner = x.shape
    tid, o0, ostep, i0, istep = rows_walk(bx)
    nthreads = cuda.blockDim.x * cuda.blockDim.y
    b = cuda.blockIdx.x
    for gc in range(cuda.blockIdx.y, partial.shape[2], cuda.gridDim.y):
        grp = gc // nchan
        c = gc - grp * nchan
        m = zero + mean[gc]
        s_dy = zero
        s_dxm = zero
        first, end = group_span(grp, group_rows, o0, n_outer)
        for o in range(first, end, ostep):
            for i in range(i0, n_inner, istep):
                g = zero + dy[o, c, i]
                s_dy += g
                s_dxm += g * ((zero + x[o, c, i]) - m)
        s_dy, s_dxm = block_sum2(float64(s_dy), float64(s_dxm), tid, nthreads, 1)
        if tid == 0:
            partial[0, b, gc] = s_dy
            partial[1, b, gc] = s_dxm


@cuda.jit
def sums_columns(dy, x, mean, zero, group_rows, partial):
    """x, dy [rows, C], channels-last: the walk of ``moments.moments_columns``."""
    n_rows, nchan = x.shape
    tid, part, r0, rstep = columns_walk()
    tx = cuda.threadIdx.x
    ntx = cuda.blockDim.x
    nthreads = ntx * cuda.blockDim.y
    for c0 in range(cuda.blockIdx.x * ntx, nchan, cuda.gridDim.x * ntx):
        c = c0 + tx
        for grp in range(partial.shape[2] // nchan):
            s_dy = zero
            s_dxm = zero
            if c < nchan:
                m = zero + mean[grp * nchan + c]
                first, end = group_span(grp, group_rows, r0, n_rows)
                for r in range(first, end, rstep):
                    g = zero + dy[r, c]
                    s_dy += g
                    s_dxm += g * ((zero + x[r, c]) - m)
            s_dy, s_dxm = block_sum2(float64(s_dy), float64(s_dxm), tid, nthreads, ntx)
            if tid < ntx and c < nchan:
                partial[0, part, grp * nchan + c] = s_dy
                partial[1, part, grp * nchan + c] = s_dxm


@cuda.jit
def finalize_sums(partial, sum_dy, sum_dy_xmu):
    """Per channel: sum(dy) and sum(dy*(x-mean)) over the blocks' partials (float64)."""
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    for c in range(cuda.blockIdx.x, partial.shape[2], cuda.gridDim.x):
        s_dy = 0.0
        s_dxm = 0.0
        for p in range(tid, partial.shape[1], nthreads):
            s_dy += partial[0, p, c]
            s_dxm += partial[1, p, c]
        s_dy, s_dxm = block_sum2(s_dy, s_dxm, tid, nthreads, 1)
        if tid == 0:
            sum_dy[c] = s_dy
            sum_dy_xmu[c] = s_dxm


@cuda.jit
def dx_coefficients(sum_dy, sum_dy_xmu, count, last_count, last_group, var, weight, flags, eps,
                    coef):
    """dx's per-channel coefficients coef[:, c] = (g, h, k) (flags: HAS_WEIGHT|BATCH_STATS);
    per (group, channel) with virtual batches: weight[c % C], ``count`` values per group,
    ``last_count`` from index ``last_group`` on (the last group's)."""
    c = cuda.grid(1)
    if c < var.shape[0]:
        invstd = inv_sqrt(float64(var[c]) + eps)
        g = invstd * (float64(weight[c % weight.shape[0]]) if flags & HAS_WEIGHT else 1.0)
        h = 0.0
        k = 0.0
        if c >= last_group:
            count = last_count
        if flags & BATCH_STATS and count > 0:
            # The mean and variance depend on x too: their gradients, folded per channel.
            h = -g * invstd * invstd * sum_dy_xmu[c] / count
            k = -g * sum_dy[c] / count
        coef[0, c] = g
        coef[1, c] = h
        coef[2, c] = k


@cuda.jit
def param_grads(sum_dy, sum_dy_xmu, var, eps, dweight, dbias):
    """dweight[c] = sum(dy*(x-mean))*invstd, dbias[c] = sum(dy), summed over the groups of
    per-(group, channel) sums."""
    c = cuda.grid(1)
    nchan = dweight.shape[0]
    if c < nchan:
        dw = 0.0
        db = 0.0
        for s in range(c, var.shape[0], nchan):
            dw += sum_dy_xmu[s] * inv_sqrt(float64(var[s]) + eps)
            db += sum_dy[s]
        dweight[c] = dw
        dbias[c] = db


@cuda.jit
def dx_rows(dy, x, mean, coef, zero, group_rows, dx):
    """dx[outer, C, inner], threads as ``normalize.affine_rows``."""
    n_outer, nchan, n_inner = x.shape
    i0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    istep = cuda.gridDim.x * cuda.blockDim.x
    r0 = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    rstep = cuda.gridDim.y * cuda.blockDim.y
    for r in range(r0, n_outer * nchan, rstep):
        o = r // nchan
        c = r - o * nchan
        s = o // group_rows * nchan + c
        m = zero + mean[s]
        g = coef[0, s]
        h = coef[1, s]
        k = coef[2, s]
        for i in range(i0, n_inner, istep):
            dx[o, c, i] = g * (zero + dy[o, c, i]) + h * ((zero + x[o, c, i]) - m) + k


@cuda.jit
def dx_columns(dy, x, mean, coef, zero, group_rows, dx):
    """dx[rows, C], channels-last, threads as ``normalize.affine_columns``."""
    n_rows, nchan = x.shape
    c0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    cstep = cuda.gridDim.x * cuda.blockDim.x
    r0 = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    rstep = cuda.gridDim.y * cuda.blockDim.y
    for c in range(c0, nchan, cstep):
        for grp in range(mean.shape[0] // nchan):
            s = grp * nchan + c
            m = zero + mean[s]
            g = coef[0, s]
            h = coef[1, s]
            k = coef[2, s]
            end = min(n_rows, (grp + 1) * group_rows)
            for r in range(group_first_row(grp, group_rows, r0, rstep), end, rstep):
                dx[r, c] = g * (zero + dy[r, c]) + h * ((zero + x[r, c]) - m) + k


KERNELS = ("sums_rows", "sums_columns", "finalize_sums", "dx_coefficients", "param_grads",
           "dx_rows", "dx_columns")
