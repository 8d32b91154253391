"""Per-channel (count, mean, m2) of a strided (outer, C, inner) view on the device, and the
channel's results, in one launch.

Accurate as the host's (``_cpu/moments.py``), at the same cost in memory traffic:

* Shift. Each thread sums ``x - k`` and ``(x - k)**2``, ``k`` the first value it reads (a
  value of the channel: ``x - k`` is exact for data far from zero, and constant data sums
  to exactly 0), or 0 where that value is not finite (then the sums are plain sums:
  NumPy's inf/nan semantics with no second pass). The thread's values are spread over the
  whole plane (a grid stride), so its first one lies within the channel's spread of the
  mean and ``m2 = s2 - s1**2 / n`` cancels a few bits at most.
* Sums. ``launch.CHUNK_ROUNDS`` rounds of four values are summed plainly in the
  accumulation dtype (``accumulate``), then added into the thread's float64 sums by TwoSum
  (``launch.folded``), so rounding stays inside short chunks however many values a thread
  reads. The sums become a state ``(n, mean, mean_low, m2)`` whose mean is a
  double-double (``_math.shifted_moments``: an FMA remainder).
* Merge. The block's threads (``launch.block_merge``), then the channel's blocks, in the
  last of them to finish (``launch.last_block``), pairwise over their partial states
  (``merged_partials``), merge with Chan's formula in double-double (``launch.merge``):
  the channel's mean comes out correctly rounded, its m2 within a few ulps.

The last block writes the channel's results (``channel_result``): statistics for
``nbbn.var`` & co (and the mean's low part, for mergeable ``Moments``), or the batch
statistics, the normalization's scale/shift and the running-buffer update for the forward
pass. Accumulation: float32 for float16 input, float64 otherwise (as the host);
chunks join float64 double-doubles. Cost per value: one subtraction, an add and an FMA as
before; per chunk of 64 values, two TwoSums; per thread, ~40 float64 operations to make
and merge its state, and one more float64 shuffle per warp level (``block_merge``).
"""
import math

from numba import cuda, float64

from .elements import store, wide
from .ema import ema_step
from .launch import (CHUNK_ROUNDS, ROUND0, advance, as_index, block_merge, column_start,
                     folded, four, four_rows, group_column_walk, group_plane, last_block, load4,
                     load_partial, merge, moved, operand_walk, plane_walk, shifted_moments,
                     two_sum)
from .normalize import affine_coefficients

# channel_result modes (the second statistic written)
RAW_M2, VARIANCE, STD = 0, 1, 2
# channel_result flags
COEFFICIENTS, HAS_WEIGHT, HAS_BIAS, UPDATE_RUNNING = 1, 2, 4, 8
# Fields of a block's partial state (``write_partial``): count, mean, mean_low, m2.
FIELDS = 4


@cuda.jit(device=True, cache=True)
def shift_of(value, zero):
    """The shift k of a thread's sums: its first value, or 0 where that is not finite."""
    k = wide(value, zero)
    if math.isfinite(k):
        return k
    return zero


@cuda.jit(device=True, cache=True)
def accumulate(s1, s2, value, k, zero):
    """The per-thread chunk sums after one more value."""
    d = wide(value, zero) - k
    return s1 + d, s2 + d * d


@cuda.jit(device=True, cache=True)
def accumulate4(s1, s2, values, k, zero):
    """The per-thread chunk sums after four more values."""
    a, b, c, d = values
    s1, s2 = accumulate(s1, s2, a, k, zero)
    s1, s2 = accumulate(s1, s2, b, k, zero)
    s1, s2 = accumulate(s1, s2, c, k, zero)
    return accumulate(s1, s2, d, k, zero)


@cuda.jit(device=True, cache=True)
def shifted_state(n, k, h1, h2, s1, s2):
    """The (n, mean, mean_low, m2) state of n values from their sums shifted by k:
    ``h1 + s1`` and ``h2 + s2``, float64 sums and the last chunk's."""
    if n == 0:
        return 0.0, 0.0, 0.0, 0.0
    nf = float64(n)
    h1, l1 = two_sum(h1, float64(s1))
    h2, l2 = two_sum(h2, float64(s2))
    if not math.isfinite(h1):  # inf/nan data: NumPy's semantics
        return nf, float64(k) + h1 / nf, 0.0, h2 - h1 * (h1 / nf)
    if not math.isfinite(h2):  # squares beyond float64 (an m2 as large): NumPy's inf
        return nf, float64(k) + h1 / nf, 0.0, h2
    mean, mean_low, m2 = shifted_moments(nf, float64(k), h1, l1, h2, l2)
    return nf, mean, mean_low, max(m2, 0.0)  # m2 < 0: rounding


@cuda.jit(device=True, cache=True)
def divide_m2(m2, n, ddof):
    """m2 / (n - ddof), as NumPy: inf or nan where n - ddof <= 0."""
    dof = n - ddof
    if dof > 0.0:
        return m2 / dof
    return m2 * math.inf


@cuda.jit(device=True, cache=True)
def channel_result(j, c, state, fin):
    """Write the results of (group, channel) pair j of channel c (j = c without virtual
    batches) from its (n, mean, mean_low, m2) state: ``fin`` = (ddof, mode, flags, eps,
    momentum, var_factor, mean_out, second_out, low_out, scale, shift, weight, bias,
    running_mean, running_var): mean_out[j] (correctly rounded), low_out[j] the rest of the
    mean; second_out[j] = m2, variance or std (mode, ddof); with COEFFICIENTS, y =
    x*scale[j] + shift[j]'s coefficients from the biased variance (weight[c]/bias[c] per
    HAS_WEIGHT/HAS_BIAS); with UPDATE_RUNNING (one group only), the running buffers."""
    (ddof, mode, flags, eps, momentum, var_factor, mean_out, second_out, low_out, scale,
     shift, weight, bias, running_mean, running_var) = fin
    n, mean, mean_low, m2 = state
    if n == 0.0:
        mean = math.nan
        m2 = math.nan
    store(mean_out, j, mean)
    low_out[j] = mean_low
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
def partial_state(partial, c, p):
    return (load_partial(partial, c, 0, p), load_partial(partial, c, 1, p),
            load_partial(partial, c, 2, p), load_partial(partial, c, 3, p))


@cuda.jit(device=True, cache=True)
def write_partial(partial, c, p, state):
    n, hi, lo, m2 = state
    partial[c, 0, p] = n
    partial[c, 1, p] = hi
    partial[c, 2, p] = lo
    partial[c, 3, p] = m2


@cuda.jit(device=True, cache=True)
def merged_partials(partial, c, valid, first, stride, parts, keep):
    """Channel c's partial states ``partial[c, :, :parts]`` (where ``valid``) merged in place
    down to ``keep`` <= stride of them by threads first, first + stride, ...: pairs (p, p +
    half) per level, levels apart by a barrier (pairwise, and no state carried through a
    loop: the kernels stay within their registers); returns state ``first``, zeros past
    the end. Every thread of the block must call it."""
    count = parts
    while count > keep:
        half = (count + 1) // 2
        if valid:
            p = first
            while p < count - half:
                n, hi, lo, m2 = partial_state(partial, c, p)
                n_b, hi_b, lo_b, m2_b = partial_state(partial, c, p + half)
                write_partial(partial, c, p, merge(n, hi, lo, m2, n_b, hi_b, lo_b, m2_b))
                p += stride
        cuda.syncthreads()
        count = half
    if valid and first < count:
        return partial_state(partial, c, first)
    return 0.0, 0.0, 0.0, 0.0


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
    h1 = 0.0
    h2 = 0.0
    rounds = ROUND0
    if q < plane:
        count = (plane - q + step - 1) // step
        k = shift_of(x[off], zero)
    while q < limit:
        a, b, d, e, off, i = four(off, steps, i, step_i, n_inner)
        s1, s2 = accumulate4(s1, s2, load4(x, a, b, d, e), k, zero)
        rounds = as_index(rounds + 1, rounds)
        if rounds == CHUNK_ROUNDS:
            h1, h2, s1, s2 = folded(h1, h2, s1, s2)
            rounds = ROUND0
        q = as_index(q + as_index(step * 4, step), step)
    while q < plane:
        s1, s2 = accumulate(s1, s2, x[off], k, zero)
        i, wrapped = advance(i, step_i, n_inner)
        off = moved(off, steps, wrapped)
        q = as_index(q + step, step)
    state = shifted_state(count, k, h1, h2, s1, s2)
    state = block_merge(state, tid, nthreads, 1)
    if parts > 1:
        if tid == 0:
            write_partial(partial, j, cuda.blockIdx.y, state)
        if not last_block(tickets, j, parts, tid):
            return
        state = block_merge(merged_partials(partial, j, True, tid, nthreads, parts, nthreads),
                            tid, nthreads, 1)
    if tid == 0:
        channel_result(j, c, state, fin)


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
    j, c, row0, rows, r, rstep, limit = group_column_walk(nchan, group_rows, n_rows)
    count = as_index(0, rstep)
    k = zero
    s1 = zero
    s2 = zero
    h1 = 0.0
    h2 = 0.0
    rounds = ROUND0
    if c < nchan and r < rows:
        count = (rows - r + rstep - 1) // rstep
        off, row_step = column_start(sx, row0 + r, c, rstep)
        k = shift_of(x[off], zero)
        while r < limit:
            a, b, d, e, off = four_rows(off, row_step)
            s1, s2 = accumulate4(s1, s2, load4(x, a, b, d, e), k, zero)
            rounds = as_index(rounds + 1, rounds)
            if rounds == CHUNK_ROUNDS:
                h1, h2, s1, s2 = folded(h1, h2, s1, s2)
                rounds = ROUND0
            r = as_index(r + as_index(rstep * 4, rstep), rstep)
        while r < rows:
            s1, s2 = accumulate(s1, s2, x[off], k, zero)
            off = as_index(off + row_step, row_step)
            r = as_index(r + rstep, rstep)
    state = shifted_state(count, k, h1, h2, s1, s2)
    state = block_merge(state, tid, nthreads, ntx)
    if parts > 1:
        if tid < ntx and c < nchan:
            write_partial(partial, j, cuda.blockIdx.y, state)
        if not last_block(tickets, cuda.blockIdx.x, parts, tid):
            return
        state = merged_partials(partial, j, c < nchan, cuda.threadIdx.y, cuda.blockDim.y,
                                parts, 1)
    if tid < ntx and c < nchan:
        channel_result(j, c, state, fin)


KERNELS = ("moments_rows", "moments_columns")
