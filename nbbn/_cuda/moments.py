"""Per-channel (count, mean, m2) of a strided (outer, C, inner) view on the device.

Each thread accumulates shifted sums ``sum(x - k)``, ``sum((x - k)**2)`` over a
grid-stride loop, ``k`` being the first value it reads (a data point of the
channel: stable, and no division in the loop, unlike a per-element Welford
update); the sums become a (n, mean, m2) state, threads are merged per block
(``launch.block_merge``: Chan's formula) into one partial state per block, and
``finalize_*`` merges a channel's partials (the grid-level merge) and writes
the results: statistics for ``nbbn.var`` & co, or the batch statistics, the
normalization's scale/shift and the running-buffer update for the forward pass.

Accumulation: float32 for float16 input, float64 otherwise (as the CPU path);
block and grid merges in float64.

Virtual batches (ghost batch norm): the outer rows are cut into groups of
``group_rows`` (all rows: one group), and the partial states are per (group,
channel), index g * C + c: the rows kernel takes (group, channel) planes as it
takes channels, the columns kernel walks each group's rows in turn.
"""
import math

from numba import cuda, float64

from .ema import ema_step
from .launch import block_merge, chan_merge, columns_walk, rows_walk
from .normalize import affine_coefficients, group_span

# finalize_moments modes
RAW_M2, VARIANCE, STD = 0, 1, 2
# finalize_forward flags
HAS_WEIGHT, HAS_BIAS, UPDATE_RUNNING = 1, 2, 4


@cuda.jit(device=True)
def shifted_state(n, k, s1, s2):
    """(n, mean, m2) in float64 from n values' sums shifted by k (one of the values)."""
    if n == 0:
        return 0.0, 0.0, 0.0
    nf = float64(n)
    d = float64(s1)
    mean = float64(k) + d / nf
    m2 = float64(s2) - d * d / nf
    if m2 < 0.0:  # rounding; never for nan
        m2 = 0.0
    return nf, mean, m2


@cuda.jit
def moments_rows(x, zero, bx, group_rows, partial):
    """x[outer, C, inner]: block (bx_i, by_i) of (group g, channel c) reads the group's rows
    o = g*group_rows + by_i*TY + ty + k*by*TY, elements i = bx_i*TX + tx + m*bx*TX;
    partial[:, block, g*C + c] = its (n, mean, m2)."""
    n_outer, nchan, n_inner = x.shape
    tid, o0, ostep, i0, istep = rows_walk(bx)
    nthreads = cuda.blockDim.x * cuda.blockDim.y
    b = cuda.blockIdx.x
    for gc in range(cuda.blockIdx.y, partial.shape[2], cuda.gridDim.y):
        g = gc // nchan
        c = gc - g * nchan
        first, end = group_span(g, group_rows, o0, n_outer)
        count = 0
        if first < end and i0 < n_inner:
            count = ((end - first + ostep - 1) // ostep) * ((n_inner - i0 + istep - 1) // istep)
        k = zero
        s1 = zero
        s2 = zero
        if count > 0:
            k = zero + x[first, c, i0]
        for o in range(first, end, ostep):
            for i in range(i0, n_inner, istep):
                d = (zero + x[o, c, i]) - k
                s1 += d
                s2 += d * d
        n, mean, m2 = shifted_state(count, k, s1, s2)
        if n > 0 and not math.isfinite(mean):
            # inf - inf poisons the shifted sums; NumPy's mean is the plain sum's.
            total = zero
            for o in range(first, end, ostep):
                for i in range(i0, n_inner, istep):
                    total += zero + x[o, c, i]
            mean = float64(total) / n
        n, mean, m2 = block_merge(n, mean, m2, tid, nthreads, 1)
        if tid == 0:
            partial[0, b, gc] = n
            partial[1, b, gc] = mean
            partial[2, b, gc] = m2


@cuda.jit
def moments_columns(x, zero, group_rows, partial):
    """x[rows, C], channels-last: thread tx of a block reads channel c (consecutive threads,
    consecutive channels: coalesced), rows r = g*group_rows + by_i*TY + ty + k*by*TY of each
    group g in turn."""
    n_rows, nchan = x.shape
    tid, part, r0, rstep = columns_walk()
    tx = cuda.threadIdx.x
    ntx = cuda.blockDim.x
    nthreads = ntx * cuda.blockDim.y
    for c0 in range(cuda.blockIdx.x * ntx, nchan, cuda.gridDim.x * ntx):
        c = c0 + tx
        for g in range(partial.shape[2] // nchan):
            first, end = group_span(g, group_rows, r0, n_rows)
            count = 0
            if first < end and c < nchan:
                count = (end - first + rstep - 1) // rstep
            k = zero
            s1 = zero
            s2 = zero
            if count > 0:
                k = zero + x[first, c]
                for r in range(first, end, rstep):
                    d = (zero + x[r, c]) - k
                    s1 += d
                    s2 += d * d
            n, mean, m2 = shifted_state(count, k, s1, s2)
            if n > 0 and not math.isfinite(mean):
                total = zero
                for r in range(first, end, rstep):
                    total += zero + x[r, c]
                mean = float64(total) / n
            n, mean, m2 = block_merge(n, mean, m2, tid, nthreads, ntx)
            if tid < ntx and c < nchan:
                partial[0, part, g * nchan + c] = n
                partial[1, part, g * nchan + c] = mean
                partial[2, part, g * nchan + c] = m2


@cuda.jit(device=True)
def merge_partials(partial, c, tid, nthreads):
    """The channel's (n, mean, m2) from its partial states, valid in thread 0."""
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for p in range(tid, partial.shape[1], nthreads):
        n, mean, m2 = chan_merge(n, mean, m2, partial[0, p, c], partial[1, p, c],
                                 partial[2, p, c])
    n, mean, m2 = block_merge(n, mean, m2, tid, nthreads, 1)
    if n == 0.0:
        mean = math.nan
        m2 = math.nan
    return n, mean, m2


@cuda.jit(device=True)
def divide_m2(m2, n, ddof):
    """m2 / (n - ddof), as NumPy: inf or nan where n - ddof <= 0."""
    dof = n - ddof
    if dof > 0.0:
        return m2 / dof
    return m2 * math.inf


@cuda.jit
def finalize_moments(partial, ddof, mode, mean_out, var_out):
    """Statistics: mean_out[c] and var_out[c] = m2 (RAW_M2), variance or std (ddof)."""
    tid = cuda.threadIdx.x
    for c in range(cuda.blockIdx.x, partial.shape[2], cuda.gridDim.x):
        n, mean, m2 = merge_partials(partial, c, tid, cuda.blockDim.x)
        if tid == 0:
            mean_out[c] = mean
            if mode == RAW_M2:
                var_out[c] = m2
            elif mode == VARIANCE:
                var_out[c] = divide_m2(m2, n, ddof)
            else:
                var_out[c] = math.sqrt(divide_m2(m2, n, ddof))


@cuda.jit
def finalize_forward(partial, weight, bias, eps, momentum, var_factor, flags,
                     mean_out, var_out, scale, shift, running_mean, running_var):
    """Training forward, per channel: batch mean and biased var, y = x*scale + shift's
    coefficients, and the running buffers' update (flags: HAS_WEIGHT|HAS_BIAS|UPDATE_RUNNING)."""
    tid = cuda.threadIdx.x
    for c in range(cuda.blockIdx.x, partial.shape[2], cuda.gridDim.x):
        n, mean, m2 = merge_partials(partial, c, tid, cuda.blockDim.x)
        if tid == 0:
            var = m2 / n if n > 0.0 else math.nan
            mean_out[c] = mean
            var_out[c] = var
            # per (group, channel) statistics: weight and bias of channel c % C
            w = float64(weight[c % weight.shape[0]]) if flags & HAS_WEIGHT else 1.0
            b = float64(bias[c % bias.shape[0]]) if flags & HAS_BIAS else 0.0
            a, d = affine_coefficients(mean, var, w, b, eps)
            scale[c] = a
            shift[c] = d
            if flags & UPDATE_RUNNING:
                ema_step(running_mean, running_var, c, mean, var, momentum, var_factor)


KERNELS = ("moments_rows", "moments_columns", "finalize_moments", "finalize_forward")
