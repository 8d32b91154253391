"""Per-channel (count, mean, m2) of a strided (outer, C, inner) view, one pass.

One pass over memory, float64 accumulation, stable, vectorized:

* Each thread walks a contiguous share of the work in memory order, keeping a
  running (count, mean, m2) per channel in its own row of a state buffer; the
  per-thread states are merged serially at the end (Chan et al.). Nothing is
  shared between threads inside the parallel loop.
* A block of data is summed once, shifted by the thread's running mean of its
  channel (or, for a channel's first block, by the block's own mean):
  ``s1 = sum(x - k)``, ``s2 = sum((x - k)**2)``. With k the running mean,
  folding the block in is exact algebra (Chan's merge with the shift as the
  old mean): ``mean += s1 / n``, ``m2 += s2 - s1**2 / n``. The cancellation in
  ``s2 - s1**2 / n`` is bounded by ``(block mean - k)**2 / block variance``,
  small because k tracks the channel's mean; the inner loop is a subtract and
  two accumulations, which vectorizes (PyTorch found Welford's per-element
  division 60% slower; a per-block two-pass costs half as many passes over the
  cached block again).
* A block holding inf or nan takes a slow exact path with NumPy's semantics.
"""
import numpy as np
from numba import prange

from .. import _math
from ._blocks import BLOCK, group_count, group_size, widen
from ._jit import helper, kernel, strict_helper, thread_plan

# Rows per tile of the vertical (channels-last) reduction.
COLUMN_TILE_ROWS = 256
# Channels per tile of the vertical reduction: three float64 accumulators of
# this width stay in L1.
COLUMN_TILE_CHANNELS = 1024


# Chan et al.'s merge, shared with the CUDA kernels; reassociation would turn
# mean_a + (mean_b - mean_a) * w into forms that overflow near the float64 limit.
chan_merge = strict_helper(_math.chan_merge)


@helper
def shifted_sums(row, k):
    """(sum(row - k), sum((row - k)**2)) in float64: one vectorized pass."""
    s1 = 0.0
    s2 = 0.0
    for i in range(row.shape[0]):
        d = np.float64(row[i]) - k
        s1 += d
        s2 += d * d
    return s1, s2


@helper
def block_mean(row):
    total = 0.0
    for i in range(row.shape[0]):
        total += np.float64(row[i])
    return total / row.shape[0]


@helper
def running_mean(row):
    """Mean of a block whose plain float64 sum overflows: a running mean (no sum to
    overflow; a division per element, but only on this slow path). inf/nan data keep
    the plain sum's mean, as NumPy. (Scaling the sum by a power of two would not
    survive fastmath, which may factor the scale out of the sum again.)"""
    mean = 0.0
    for i in range(row.shape[0]):
        v = np.float64(row[i])
        if not np.isfinite(v):
            return block_mean(row)
        mean += (v - mean) / (i + 1)
    return mean


@helper
def exact_moments(row):
    """(mean, m2) of a 1-D block in two passes, NumPy's inf/nan semantics (slow path)."""
    n = row.shape[0]
    mean = block_mean(row)
    if not np.isfinite(mean):
        mean = running_mean(row)
    sq = 0.0
    for i in range(n):
        d = np.float64(row[i]) - mean
        sq += d * d
    return mean, sq


@helper
def fold_block(n_a, mean_a, m2_a, row):
    """A channel's running (n, mean, m2) with the 1-D block ``row`` folded in."""
    n_b = np.float64(row.shape[0])
    if n_a == 0 or np.isfinite(mean_a):
        # Shift by the running mean (or, first, by the block's own mean: one
        # extra in-cache pass per channel and thread buys full accuracy).
        k = mean_a if n_a > 0 else block_mean(row)
        s1, s2 = shifted_sums(row, k)
        if np.isfinite(s2) and np.isfinite(k):
            n = n_a + n_b
            return n, k + s1 / n, m2_a + (s2 - s1 * s1 / n)
    # inf or nan in the block or the channel: exact, as NumPy.
    mean_b, m2_b = exact_moments(row)
    return chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b)


@helper
def merge_threads(state):
    """Merge per-thread (T, 3, C) states into (mean[C], m2[C])."""
    nthreads, _, nchan = state.shape
    mean = np.empty(nchan)
    m2 = np.empty(nchan)
    for c in range(nchan):
        n_a, mean_a, m2_a = 0.0, 0.0, 0.0
        for t in range(nthreads):
            n_a, mean_a, m2_a = chan_merge(
                n_a, mean_a, m2_a, state[t, 0, c], state[t, 1, c], state[t, 2, c]
            )
        mean[c] = mean_a
        m2[c] = m2_a
    return mean, m2


@kernel
def moments_rows(x, nthreads, group_rows=0):
    """Moments over axes 0 and 2 of x[outer, C, inner]; rows x[o, c, :] in blocks.

    Work items are (row, block) pairs in memory order; thread t takes the
    t-th contiguous share and walks it with one division per row (its group).
    Per (group, channel) with virtual batches of ``group_rows`` outer rows.
    """
    n_outer, nchan, n_inner = x.shape
    rows = group_size(group_rows, n_outer)
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    n_items = n_outer * nchan * blocks_per_row
    state = np.zeros((nthreads, 3, (n_outer + rows - 1) // rows * nchan))
    for t in prange(nthreads):
        lo = t * n_items // nthreads
        hi = (t + 1) * n_items // nthreads
        row, blk = divmod(lo, blocks_per_row)
        o, c = divmod(row, nchan)
        s = o // rows * nchan + c  # the state of the row's (group, channel)
        n_a, mean_a, m2_a = state[t, 0, s], state[t, 1, s], state[t, 2, s]
        for _ in range(lo, hi):
            start = blk * BLOCK
            n_a, mean_a, m2_a = fold_block(n_a, mean_a, m2_a, x[o, c, start:min(n_inner, start + BLOCK)])
            blk += 1
            if blk == blocks_per_row:
                blk = 0
                state[t, 0, s], state[t, 1, s], state[t, 2, s] = n_a, mean_a, m2_a
                c += 1
                if c == nchan:
                    c = 0
                    o += 1
                s = o // rows * nchan + c
                if o < n_outer:
                    n_a, mean_a, m2_a = state[t, 0, s], state[t, 1, s], state[t, 2, s]
        if blk != 0:
            state[t, 0, s], state[t, 1, s], state[t, 2, s] = n_a, mean_a, m2_a
    return merge_threads(state)


@helper
def shifted_rows(x, r0, r1, c0, shift, s1, s2):
    """Accumulate sum(x - shift) and sum((x - shift)**2) of rows r0:r1 per column.

    Eight rows per sweep: the per-column accumulators live in memory, so each
    is loaded and stored once per eight elements, and the eight nearby row
    streams keep the prefetchers busy (measured, one thread, 51 MB float32
    input: 9.7 G elements/s with eight rows, 6.7 with four, 8.0 with sixteen,
    against 13 for a plain read).
    """
    width = shift.shape[0]
    r = r0
    while r + 8 <= r1:
        # Row slices first: indexing them with j >= 0 needs no negative-index
        # fix-up, which would otherwise turn the loads into gathers.
        a0 = x[r, c0:c0 + width]
        a1 = x[r + 1, c0:c0 + width]
        a2 = x[r + 2, c0:c0 + width]
        a3 = x[r + 3, c0:c0 + width]
        a4 = x[r + 4, c0:c0 + width]
        a5 = x[r + 5, c0:c0 + width]
        a6 = x[r + 6, c0:c0 + width]
        a7 = x[r + 7, c0:c0 + width]
        for j in range(width):
            k = shift[j]
            d0 = np.float64(a0[j]) - k
            d1 = np.float64(a1[j]) - k
            d2 = np.float64(a2[j]) - k
            d3 = np.float64(a3[j]) - k
            d4 = np.float64(a4[j]) - k
            d5 = np.float64(a5[j]) - k
            d6 = np.float64(a6[j]) - k
            d7 = np.float64(a7[j]) - k
            s1[j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            s2[j] += (((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))
                      + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)))
        r += 8
    while r < r1:
        a0 = x[r, c0:c0 + width]
        for j in range(width):
            d = np.float64(a0[j]) - shift[j]
            s1[j] += d
            s2[j] += d * d
        r += 1


@helper
def column_means(x, r0, r1, c0, out):
    """out[j] = mean of x[r0:r1, c0 + j], accumulated row by row (vectorized across j)."""
    width = out.shape[0]
    out[:] = 0.0
    for r in range(r0, r1):
        a = x[r, c0:c0 + width]
        for j in range(width):
            out[j] += np.float64(a[j])
    for j in range(width):
        out[j] /= r1 - r0


@kernel
def moments_columns(x, nthreads, group_rows=0):
    """Moments over axis 0 of x[rows, C] (a vertical reduction, channels-last).

    Work items are tiles of (COLUMN_TILE_ROWS, <= COLUMN_TILE_CHANNELS
    columns), row-major, in memory order. Each tile is one pass of sums shifted
    per column by the thread's running mean (its first row for a column's first
    tile), folded in as in ``fold_block``. Per (group, channel) with virtual
    batches of ``group_rows`` rows: the tiles of a group end at its last row.
    """
    n_rows, nchan = x.shape
    rows = group_size(group_rows, n_rows)
    groups = (n_rows + rows - 1) // rows
    tile_c = min(nchan, COLUMN_TILE_CHANNELS)
    ctiles = (nchan + tile_c - 1) // tile_c
    group_tiles = (rows + COLUMN_TILE_ROWS - 1) // COLUMN_TILE_ROWS
    n_items = groups * group_tiles * ctiles
    state = np.zeros((nthreads, 3, groups * nchan))
    for t in prange(nthreads):
        shift = np.empty(tile_c)
        s1 = np.empty(tile_c)
        s2 = np.empty(tile_c)
        for item in range(t * n_items // nthreads, (t + 1) * n_items // nthreads):
            rt, ct = divmod(item, ctiles)
            g, rt = divmod(rt, group_tiles)
            r0 = g * rows + rt * COLUMN_TILE_ROWS
            r1 = min(n_rows, g * rows + rows, r0 + COLUMN_TILE_ROWS)
            if r0 >= r1:  # past the end of a short last group
                continue
            c0 = ct * tile_c
            s0 = g * nchan + c0  # the state of the tile's first (group, channel)
            width = min(nchan, c0 + tile_c) - c0
            if state[t, 0, s0] > 0:  # shift by the running means
                for j in range(width):
                    shift[j] = state[t, 1, s0 + j]
            elif g > 0 and state[t, 0, s0 - nchan] > 0:
                # a virtual batch's first tile: by the thread's means of the previous batch
                for j in range(width):
                    shift[j] = state[t, 1, s0 - nchan + j]
            else:  # these columns' first tile: shift by its own means (one in-cache pass)
                column_means(x, r0, r1, c0, shift[:width])
            s1[:width] = 0.0
            s2[:width] = 0.0
            shifted_rows(x, r0, r1, c0, shift[:width], s1, s2)
            n_b = np.float64(r1 - r0)
            for j in range(width):
                c = s0 + j
                n_a = state[t, 0, c]
                k = shift[j]
                n = n_a + n_b
                # k is the running mean (or, first, a near mean); where it lies far from the
                # tile's values (s2 almost all s1**2 / n: cancellation), the exact path.
                if np.isfinite(s2[j]) and np.isfinite(k) and s1[j] * s1[j] <= 0.99 * n * s2[j]:
                    state[t, 0, c] = n
                    state[t, 1, c] = k + s1[j] / n
                    state[t, 2, c] = state[t, 2, c] + (s2[j] - s1[j] * s1[j] / n)
                else:
                    mean_b, m2_b = exact_moments(x[r0:r1, c0 + j])
                    state[t, 0, c], state[t, 1, c], state[t, 2, c] = chan_merge(
                        n_a, state[t, 1, c], state[t, 2, c], n_b, mean_b, m2_b)
    return merge_threads(state)


@kernel
def fold_columns(mean, m2, copies, n_rows, group_rows, groups, tail):
    """Channel moments from regrouped columns: in group g, column (g * copies + k) * C + c
    holds channel c.

    ``mean``/``m2`` are the moments of the columns of ``n_rows`` wide rows,
    ``group_rows`` per group (0: one group); ``tail`` is the (rows, C) remainder
    that did not fill a wide row (the last group's).
    """
    nchan = tail.shape[1]
    group_rows = group_size(group_rows, n_rows)
    out_mean = np.empty(groups * nchan)
    out_m2 = np.empty(groups * nchan)
    n_tail = np.float64(tail.shape[0])
    for g in range(groups):
        n_group = np.float64(min(group_rows, n_rows - g * group_rows))
        for c in range(nchan):
            n_a, mean_a, m2_a = 0.0, 0.0, 0.0
            for k in range(copies if n_group > 0 else 0):
                j = (g * copies + k) * nchan + c
                n_a, mean_a, m2_a = chan_merge(n_a, mean_a, m2_a, n_group, mean[j], m2[j])
            if n_tail > 0 and g == groups - 1:
                mean_b, m2_b = exact_moments(tail[:, c])
                n_a, mean_a, m2_a = chan_merge(n_a, mean_a, m2_a, n_tail, mean_b, m2_b)
            out_mean[g * nchan + c] = mean_a
            out_m2[g * nchan + c] = m2_a
    return out_mean, out_m2


def column_moments(x, group_rows=0):
    """(mean, m2) in float64 over axis 0 of a 2-D (rows, C) view, per channel (per group
    and channel with virtual batches of ``group_rows`` rows).

    Few channels: contiguous rows are regrouped into wide rows (``_blocks.widen``)
    so that the vector loop runs across many columns; ``fold_columns`` merges the
    k copies of each channel and the leftover rows afterwards.
    """
    n_rows, nchan = x.shape
    k, (wide,), rest = widen(x, group_rows=group_rows)
    nthreads, parallel = thread_plan(x.size, wide.shape[0])
    wide_rows = group_rows // k
    mean, m2 = moments_columns(wide, nthreads, wide_rows, parallel=parallel)
    if k == 1:
        return mean, m2
    return fold_columns(mean, m2, k, wide.shape[0], wide_rows, group_count(group_rows, n_rows),
                        x[:0] if rest is None else rest[0], parallel=False)


def channel_moments(x, group_rows=0):
    """(mean, m2) in float64 of a 3-D (outer, C, inner) view, per channel: count =
    outer*inner; per (group, channel), g-major, with virtual batches of ``group_rows``
    outer rows (0: one group)."""
    n_outer, nchan, n_inner = x.shape
    if n_inner == 1:
        return column_moments(x[:, :, 0], group_rows)
    items = n_outer * nchan * ((n_inner + BLOCK - 1) // BLOCK)
    nthreads, parallel = thread_plan(x.size, items)
    return moments_rows(x, nthreads, group_rows, parallel=parallel)
