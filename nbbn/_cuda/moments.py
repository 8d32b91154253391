"""Per-channel (count, mean, m2) of a strided (outer, C, inner) view on the device, and the
channel's results, in one launch.

Each thread accumulates shifted sums ``sum(x - k)``, ``sum((x - k)**2)`` over its walk
(``accumulate``: the one place of the per-thread arithmetic), ``k`` being the first value
it reads (a data point of the channel: stable, and no division in the loop) or 0 where
that value is not finite (then the sums are plain sums: NumPy's inf/nan semantics with no
second pass); the sums become a (n, mean, m2) state, the block's threads are merged
(``launch.block_merge``: Chan's formula), and the channel's blocks meet in the last of
them to finish (``launch.last_block``), which merges their partial states and writes the
channel's results (``channel_result``): statistics for ``nbbn.var`` & co, or the batch
statistics, the normalization's scale/shift and the running-buffer update for the
forward pass.

Accumulation: float32 for float16 input, float64 otherwise (as the CPU path);
block and grid merges in float64.
"""
import math

from numba import cuda, float64

from .elements import store, wide
from .ema import ema_step
from .launch import (advance, as_index, block_merge, chan_merge, column_start, four,
                     four_rows, group_column_walk, group_plane, last_block, load4,
                     load_partial, moved, operand_walk, plane_walk)
from .normalize import affine_coefficients

# channel_result modes (the second statistic written)
RAW_M2, VARIANCE, STD = 0, 1, 2
# channel_result flags
COEFFICIENTS, HAS_WEIGHT, HAS_BIAS, UPDATE_RUNNING = 1, 2, 4, 8


@cuda.jit(device=True, cache=True)
def shift_of(value, zero):
    """The shift k of a thread's sums: its first value, or 0 where that is not finite."""
    k = wide(value, zero)
    if math.isfinite(k):
        return k
    return zero


@cuda.jit(device=True, cache=True)
def accumulate(s1, s2, value, k, zero):
    """The per-thread sums after one more value."""
    d = wide(value, zero) - k
    return s1 + d, s2 + d * d


@cuda.jit(device=True, cache=True)
def shifted_state(n, k, s1, s2):
    """(n, mean, m2) in float64 from n values' sums shifted by k."""
    if n == 0:
        return 0.0, 0.0, 0.0
    nf = float64(n)
    d = float64(s1)
    mean = float64(k) + d / nf
    m2 = float64(s2) - d * d / nf
    if m2 < 0.0:  # rounding; never for nan
        m2 = 0.0
    return nf, mean, m2


@cuda.jit(device=True, cache=True)
def divide_m2(m2, n, ddof):
    """m2 / (n - ddof), as NumPy: inf or nan where n - ddof <= 0."""
    dof = n - ddof
    if dof > 0.0:
        return m2 / dof
    return m2 * math.inf


@cuda.jit(device=True, cache=True)
def channel_result(j, c, n, mean, m2, fin):
    """Write the results of (group, channel) pair j of channel c (j = c without virtual
    batches) from its (n, mean, m2): ``fin`` = (ddof, mode, flags, eps, momentum,
    var_factor, mean_out, second_out, scale, shift, weight, bias, running_mean,
    running_var): mean_out[j]; second_out[j] = m2, variance or std (mode, ddof); with
    COEFFICIENTS, y = x*scale[j] + shift[j]'s coefficients from the biased variance
    (weight[c]/bias[c] per HAS_WEIGHT/HAS_BIAS); with UPDATE_RUNNING (one group only),
    the running buffers."""
    (ddof, mode, flags, eps, momentum, var_factor, mean_out, second_out, scale, shift,
     weight, bias, running_mean, running_var) = fin
    if n == 0.0:
        mean = math.nan
        m2 = math.nan
    store(mean_out, j, mean)
    if mode == RAW_M2:
        store(second_out, j, m2)
    elif mode == VARIANCE:
        store(second_out, j, divide_m2(m2, n, ddof))
    else:
        store(second_out, j, math.sqrt(divide_m2(m2, n, ddof)))
    if flags & COEFFICIENTS:
        var = divide_m2(m2, n, 0.0)
        w = wide(weight[c], 0.0) if flags & HAS_WEIGHT else 1.0
        b = wide(bias[c], 0.0) if flags & HAS_BIAS else 0.0
        a, d = affine_coefficients(mean, var, w, b, eps)
        scale[j] = a
        shift[j] = d
        if flags & UPDATE_RUNNING:
            ema_step(running_mean, running_var, c, mean, var, momentum, var_factor)


@cuda.jit(device=True, cache=True)
def merged_partials(partial, c, first, stride, parts):
    """Chan's merge of partial[c, :, p] for p = first, first + stride, ... < parts."""
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for p in range(first, parts, stride):
        n, mean, m2 = chan_merge(n, mean, m2, load_partial(partial, c, 0, p),
                                 load_partial(partial, c, 1, p), load_partial(partial, c, 2, p))
    return n, mean, m2


@cuda.jit(device=True, cache=True)
def accumulate4(s1, s2, values, k, zero):
    """The per-thread sums after four more values."""
    a, b, c, d = values
    s1, s2 = accumulate(s1, s2, a, k, zero)
    s1, s2 = accumulate(s1, s2, b, k, zero)
    s1, s2 = accumulate(s1, s2, c, k, zero)
    return accumulate(s1, s2, d, k, zero)


@cuda.jit(cache=True)
def moments_rows(x, sx, shape, zero, partial, tickets, fin):
    """x[outer, C, inner] as a flat array with element strides sx (index type); grid
    (channels, parts): block (c, b) walks its share of channel c's plane, the last block of
    the channel writes its results (``channel_result``)."""
    n_outer, nchan, n_inner, group_rows = shape
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    parts = cuda.gridDim.y
    j, c, row0, rows = group_plane(nchan, group_rows, n_outer)
    walk = plane_walk(rows, n_inner)
    q, _, i, step, _, step_i, plane, limit, _ = walk
    off, steps = operand_walk(sx, walk, c, row0)
    count = as_index(0, step)
    k = zero
    s1 = zero
    s2 = zero
    if q < plane:
        count = (plane - q + step - 1) // step
        k = shift_of(x[off], zero)
    while q < limit:
        a, b, d, e, off, i = four(off, steps, i, step_i, n_inner)
        s1, s2 = accumulate4(s1, s2, load4(x, a, b, d, e), k, zero)
        q = as_index(q + as_index(step * 4, step), step)
    while q < plane:
        s1, s2 = accumulate(s1, s2, x[off], k, zero)
        i, wrapped = advance(i, step_i, n_inner)
        off = moved(off, steps, wrapped)
        q = as_index(q + step, step)
    n, mean, m2 = shifted_state(count, k, s1, s2)
    n, mean, m2 = block_merge(n, mean, m2, tid, nthreads, 1)
    if parts > 1:
        if tid == 0:
            write_partial(partial, j, cuda.blockIdx.y, n, mean, m2)
        if not last_block(tickets, j, parts, tid):
            return
        n, mean, m2 = merged_partials(partial, j, tid, nthreads, parts)
        n, mean, m2 = block_merge(n, mean, m2, tid, nthreads, 1)
    if tid == 0:
        channel_result(j, c, n, mean, m2, fin)


@cuda.jit(device=True, cache=True)
def write_partial(partial, c, part, n, mean, m2):
    partial[c, 0, part] = n
    partial[c, 1, part] = mean
    partial[c, 2, part] = m2


@cuda.jit(cache=True)
def moments_columns(x, sx, shape, zero, partial, tickets, fin):
    """x[rows, C], channels-last, flat with element strides sx = (row, channel): thread tx
    of a block reads channel c (consecutive threads, consecutive channels: coalesced), rows
    r = part*TY + ty + k*parts*TY; the last block of a channel tile writes its results."""
    n_rows, nchan, group_rows = shape
    ntx = cuda.blockDim.x
    nthreads = ntx * cuda.blockDim.y
    tid = cuda.threadIdx.y * ntx + cuda.threadIdx.x
    parts = cuda.gridDim.y
    _, c, row0, rows, r, rstep, limit = group_column_walk(nchan, group_rows, n_rows)
    count = as_index(0, rstep)
    k = zero
    s1 = zero
    s2 = zero
    if c < nchan and r < rows:
        count = (rows - r + rstep - 1) // rstep
        off, row_step = column_start(sx, row0 + r, c, rstep)
        k = shift_of(x[off], zero)
        while r < limit:
            a, b, d, e, off = four_rows(off, row_step)
            s1, s2 = accumulate4(s1, s2, load4(x, a, b, d, e), k, zero)
            r = as_index(r + as_index(rstep * 4, rstep), rstep)
        while r < rows:
            s1, s2 = accumulate(s1, s2, x[off], k, zero)
            off = as_index(off + row_step, row_step)
            r = as_index(r + rstep, rstep)
    n, mean, m2 = shifted_state(count, k, s1, s2)
    n, mean, m2 = block_merge(n, mean, m2, tid, nthreads, ntx)
    j, c, _, _, _, _, _ = group_column_walk(nchan, group_rows, n_rows)  # again: registers
    if parts > 1:
        if tid < ntx and c < nchan:
            write_partial(partial, j, cuda.blockIdx.y, n, mean, m2)
        if not last_block(tickets, cuda.blockIdx.x, parts, tid):
            return
        n = 0.0
        mean = 0.0
        m2 = 0.0
        if c < nchan:
            n, mean, m2 = merged_partials(partial, j, cuda.threadIdx.y, cuda.blockDim.y, parts)
        n, mean, m2 = block_merge(n, mean, m2, tid, nthreads, ntx)
    if tid < ntx and c < nchan:
        channel_result(j, c, n, mean, m2, fin)


KERNELS = ("moments_rows", "moments_columns")
