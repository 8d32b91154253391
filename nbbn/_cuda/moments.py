"""Per-channel (count, mean, m2) of a strided (outer, C, inner) view on the device, and the
channel's results, in one launch.

Accurate as the host's (``_cpu/moments.py``), at the same cost in memory traffic:

* Shift. Each thread sums ``x - k`` and ``(x - k)**2``, ``k`` the first value it reads (a
  value of the channel: ``x - k`` is exact for data far from zero, and constant data sums
  to exactly 0), or 0 where that value is not finite (then the sums are plain sums). The
  thread's values are spread over the whole plane (a grid stride), so its first one lies
  within the channel's spread of the mean and ``m2 = s2 - s1**2 / n`` cancels a few bits
  at most.
* Sums. ``launch.CHUNK_ROUNDS`` rounds of four values are summed plainly in the
  accumulation dtype (``accumulate``), then added into the thread's float64 sums by TwoSum
  (``launch.folded``), so rounding stays inside short chunks however many values a thread
  reads. The sums become a state ``(n, mean, mean_low, m2)`` whose mean is a
  double-double (``_math.shifted_moments``: an FMA remainder).
* Merge. The block's threads (``launch.block_merge``), then the channel's blocks, in the
  last of them to finish (``launch.last_block``), pairwise over their partial states
  (``merged_partials``), merge with Chan's formula in double-double (``launch.merge``):
  the channel's mean comes out correctly rounded, its m2 within a few ulps.
* Overflow. Sums of float64 data can overflow where the data is finite (``x - k`` and the
  squares near ``finfo.max``; float32 sums of 16-bit data and float64 sums of float32 or
  integer data cannot). Where a float64 channel's merged state is not finite, its last
  block sums the channel again with every value scaled by ``RESCALE`` (a power of two:
  exact; ``rescaled_sums``: one value at a time and no division, so that the kernels keep
  4 blocks per multiprocessor), and ``channel_result`` scales the results back after m2's
  division, so a variance or std is finite wherever it is, even where m2 is not. No sum
  of scaled finite values overflows, so inf and nan data come out of that walk by the
  host's rules (``_cpu/moments.nonfinite_channel``): nan with any nan or both infinities,
  else the infinity's sign and a nan m2. Such a float64 channel (inf/nan, or values near
  the limit) is read twice, the second time by one block; other data pays nothing but a
  finiteness test per channel (and ``moments_columns`` 16 KB more static shared memory).

The last block writes the channel's results (``channel_result``): statistics for
``nbbn.var`` & co (and the mean's low part, for mergeable ``Moments``), or the batch
statistics, the normalization's scale/shift and the running-buffer update for the forward
pass. Accumulation: float32 for float16 input, float64 otherwise (as the host);
chunks join float64 double-doubles. Cost per value: one subtraction, an add and an FMA as
before; per chunk of 64 values, two TwoSums; per thread, ~40 float64 operations to make
and merge its state, and one more float64 shuffle per warp level (``block_merge``).
"""
import math

import numpy as np
from numba import cuda, float64, int32

from .elements import store, wide
from .ema import ema_step
from .launch import (CHUNK_ROUNDS, ROUND0, WARP, advance, as_index, block_merge, column_start,
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
# The scale of a channel summed again (``rescaled_sums``, float64 sums): the largest float64
# becomes < 2**450, its square < 2**902, and no sum of 2**64 such squares overflows.
RESCALE = 2.0 ** -574
# ``needs_rescue``'s flags: one per channel of a block (at most a warp's), then the block's.
RESCUE_FLAGS = WARP + 1


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
def channel_result(j, c, state, up, fin):
    """Write the results of (group, channel) pair j of channel c (j = c without virtual
    batches) from its (n, mean, mean_low, m2) state of values divided by ``up`` (1, or
    1 / RESCALE: multiplied back after m2's division, so that a variance or std is finite
    wherever it is, even where m2 is not): ``fin`` = (ddof, mode, flags, eps, momentum,
    var_factor, mean_out, second_out, low_out, scale, shift, weight, bias, running_mean,
    running_var): mean_out[j] (correctly rounded), low_out[j] the rest of the mean;
    second_out[j] = m2, variance or std (mode, ddof); with COEFFICIENTS, y = x*scale[j] +
    shift[j]'s coefficients from the biased variance (weight[c]/bias[c] per
    HAS_WEIGHT/HAS_BIAS); with UPDATE_RUNNING (one group only), the running buffers."""
    (ddof, mode, flags, eps, momentum, var_factor, mean_out, second_out, low_out, scale,
     shift, weight, bias, running_mean, running_var) = fin
    n, mean, mean_low, m2 = state
    if n == 0.0:
        mean = math.nan
        m2 = math.nan
    mean = mean * up
    store(mean_out, j, mean)
    low_out[j] = mean_low * up
    if mode == RAW_M2:
        store(second_out, j, m2 * up * up)
    elif mode == VARIANCE:
        store(second_out, j, divide_m2(m2, n, ddof) * up * up)
    else:
        store(second_out, j, math.sqrt(divide_m2(m2, n, ddof)) * up)
    if flags & COEFFICIENTS:
        var = divide_m2(m2, n, 0.0) * up * up
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


@cuda.jit(device=True, cache=True)
def needs_rescue(flags, state, tid, width):
    """Whether any channel of the block must be summed again, its merged state (valid in
    threads tid < width, as ``block_merge`` leaves it) not finite: then ``flags[tid %
    width]`` says whether thread tid's channel must. Every thread must call it."""
    if tid == 0:
        flags[WARP] = 0
    cuda.syncthreads()
    if tid < width:
        _, mean, _, m2 = state
        bad = not (math.isfinite(mean) and math.isfinite(m2))
        flags[tid] = 1 if bad else 0
        if bad:
            flags[WARP] = 1
    cuda.syncthreads()
    return flags[WARP] != 0


@cuda.jit(device=True, cache=True)
def rescaled_sums(x, first, outer, inner, zero, scale):
    """The shifted sums, ``(count, k, h1, h2, s1, s2)`` for ``shifted_state``, of x's values
    times ``scale`` at offsets ``first + o * s_o + i * s_i`` for o = o0, o0 + o_step, ... <
    n_o and i = i0, i0 + i_step, ... < n_i (``outer``, ``inner``: (n, start, step, stride)
    each): a channel summed again by one block, one value at a time (rare: no division,
    few registers)."""
    n_o, o, o_step, s_o = outer
    n_i, i0, i_step, s_i = inner
    count, k, h1, h2, s1, s2, rounds = as_index(0, first), zero, 0.0, 0.0, zero, zero, ROUND0
    row = as_index(first + o * s_o, first)
    while o < n_o:
        i = i0
        off = as_index(row + i * s_i, first)
        while i < n_i:
            v = wide(x[off], zero) * scale
            if count == 0:
                k = shift_of(v, zero)
            s1, s2 = accumulate(s1, s2, v, k, zero)
            count = as_index(count + 1, first)
            rounds = as_index(rounds + 1, rounds)
            if rounds == CHUNK_ROUNDS * 4:
                h1, h2, s1, s2 = folded(h1, h2, s1, s2)
                rounds = ROUND0
            i = as_index(i + i_step, first)
            off = as_index(off + i_step * s_i, first)
        o = as_index(o + o_step, first)
        row = as_index(row + o_step * s_o, first)
    return count, k, h1, h2, s1, s2


@cuda.jit(cache=True)
def moments_rows(x, sx, shape, zero, scale, partial, tickets, fin):
    """x[outer, C, inner] as a flat array with element strides sx (index type); grid
    (channels, parts): block (c, b) walks its share of channel c's plane, the last block of
    the channel writes its results (``channel_result``), summing the plane again times
    ``scale`` where they are not finite (see the module's docstring)."""
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
    up = 1.0
    if scale != 0 and needs_rescue(cuda.shared.array(RESCUE_FLAGS, int32), state, tid, 1):
        s_o, s_c, s_i = sx
        _, _, row0, rows = group_plane(nchan, group_rows, n_outer)
        n, k, h1, h2, s1, s2 = rescaled_sums(
            x, as_index(as_index(row0, s_i) * s_o + as_index(c, s_c) * s_c, s_c),
            (rows, as_index(0, n_outer), as_index(1, n_outer), s_o),
            (n_inner, as_index(tid, n_inner), as_index(nthreads, n_inner), s_i), zero, scale)
        state = block_merge(shifted_state(n, k, h1, h2, s1, s2), tid, nthreads, 1)
        up = 1.0 / float64(scale)
    if tid == 0:
        channel_result(j, c, state, up, fin)


@cuda.jit(cache=True)
def moments_columns(x, sx, shape, zero, scale, partial, tickets, fin):
    """x[rows, C], channels-last, flat with element strides sx = (row, channel): thread tx
    of a block reads channel c (consecutive threads, consecutive channels: coalesced), rows
    r = part*TY + ty + k*parts*TY; the last block of a channel tile writes its results,
    summing again, as ``moments_rows``, the channels whose results are not finite."""
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
    flags = cuda.shared.array(RESCUE_FLAGS, int32)
    tx = cuda.threadIdx.x
    again = scale != 0 and needs_rescue(flags, state, tid, ntx)
    if tid < ntx and c < nchan and not (again and flags[tx] != 0):
        channel_result(j, c, state, 1.0, fin)
    if again:  # the tile's other channels sum nothing
        s_r, s_c = sx
        mine = c < nchan and flags[tx] != 0
        _, _, row0, rows, _, _, _ = group_column_walk(nchan, group_rows, n_rows)
        n, k, h1, h2, s1, s2 = rescaled_sums(
            x, as_index(as_index(row0, s_r) * s_r + as_index(c, s_c) * s_c, s_c),
            (rows if mine else as_index(0, n_rows), as_index(cuda.threadIdx.y, n_rows),
             as_index(cuda.blockDim.y, n_rows), s_r),
            (as_index(1, n_rows), as_index(0, n_rows), as_index(1, n_rows), s_c), zero, scale)
        # The shared-memory tree (a second copy of block_merge's shared arrays: 16 KB): with
        # shuffles here, the kernel took 66 registers (3 blocks per multiprocessor).
        state = block_merge(shifted_state(n, k, h1, h2, s1, s2), tid, nthreads, ntx, False)
        if tid < ntx and mine:
            channel_result(j, c, state, 1.0 / float64(scale), fin)


def rescale(dtype, acc):
    """The kernels' ``scale`` (in the accumulation dtype ``acc``) for data of ``dtype``:
    RESCALE for float64 data, 0 (no second walk) for data whose sums cannot overflow."""
    return acc.type(RESCALE if dtype == np.float64 else 0.0)


KERNELS = ("moments_rows", "moments_columns")
