"""Per-channel (count, mean, m2) of a strided (outer, C, inner) view, one pass.

Each thread walks its share of cache-sized blocks. Inside a block the moments
come from a shifted two-pass sum (the block is in cache, so the second pass
costs no memory traffic, and both passes vectorize); blocks are folded into the
thread's running state with Chan et al.'s merge, and the per-thread states are
merged serially at the end. Accumulation is float64 whatever the input dtype.
"""
import numpy as np
from numba import prange

from ._jit import helper, kernel, thread_plan

# Elements per block: small enough to stay in L1/L2 between the two passes.
BLOCK = 4096
# Rows per tile of the vertical (channels-last) reduction.
COLUMN_TILE_ROWS = 256


@helper
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, m2) states; exact for unequal counts and count 0."""
    if n_b == 0:
        return n_a, mean_a, m2_a
    if n_a == 0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    # The weighted form keeps mean exact for constant data and +-inf for inf data.
    mean = (n_a * mean_a + n_b * mean_b) / n
    return n, mean, m2_a + m2_b + delta * delta * (n_a * n_b / n)


@helper
def row_moments(row):
    """(n, mean, m2) of a 1-D block in two in-cache passes."""
    n = row.shape[0]
    total = 0.0
    for i in range(n):
        total += np.float64(row[i])
    mean = total / n
    sq = 0.0
    resid = 0.0
    for i in range(n):
        d = np.float64(row[i]) - mean
        sq += d * d
        resid += d
    # resid is the rounding error of mean (exactly 0 in exact arithmetic).
    return np.float64(n), mean, sq - resid * resid / n


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
def moments_rows(x, nthreads):
    """Moments over axes 0 and 2 of x[outer, C, inner]; rows x[o, c, :] in blocks."""
    n_outer, nchan, n_inner = x.shape
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    n_items = n_outer * nchan * blocks_per_row
    state = np.zeros((nthreads, 3, nchan))
    for t in prange(nthreads):
        for item in range(t * n_items // nthreads, (t + 1) * n_items // nthreads):
            row, blk = divmod(item, blocks_per_row)
            o, c = divmod(row, nchan)
            start = blk * BLOCK
            n_b, mean_b, m2_b = row_moments(x[o, c, start:min(n_inner, start + BLOCK)])
            state[t, 0, c], state[t, 1, c], state[t, 2, c] = chan_merge(
                state[t, 0, c], state[t, 1, c], state[t, 2, c], n_b, mean_b, m2_b
            )
    return merge_threads(state)


@helper
def shifted_rows(x, r0, r1, c0, shift, s1, s2):
    """Accumulate sum(x - shift) and sum((x - shift)**2) of rows r0:r1 per channel.

    Four rows per sweep so the per-channel accumulators are loaded and stored
    once per four elements (they live in memory, not registers).
    """
    width = shift.shape[0]
    r = r0
    while r + 4 <= r1:
        a = x[r, c0:c0 + width]
        b = x[r + 1, c0:c0 + width]
        c = x[r + 2, c0:c0 + width]
        d = x[r + 3, c0:c0 + width]
        for j in range(width):
            k = shift[j]
            da = np.float64(a[j]) - k
            db = np.float64(b[j]) - k
            dc = np.float64(c[j]) - k
            dd = np.float64(d[j]) - k
            s1[j] += (da + db) + (dc + dd)
            s2[j] += (da * da + db * db) + (dc * dc + dd * dd)
        r += 4
    while r < r1:
        a = x[r, c0:c0 + width]
        for j in range(width):
            da = np.float64(a[j]) - shift[j]
            s1[j] += da
            s2[j] += da * da
        r += 1


@helper
def column_sum(x, r0, r1, c):
    total = 0.0
    for r in range(r0, r1):
        total += np.float64(x[r, c])
    return total


@kernel
def moments_columns(x, nthreads):
    """Moments over axis 0 of x[rows, C] (a vertical reduction, channels-last).

    Work items are tiles of (COLUMN_TILE_ROWS, <= 2048 channels) read row by row,
    in memory order. Here the per-channel accumulators live in memory, so a
    second pass would double the load/store traffic: each tile is instead one
    pass of sums shifted by its first row, which is stable because the shift is
    a data point of the tile: the relative error of m2 is below
    COLUMN_TILE_ROWS * eps.
    """
    n_rows, nchan = x.shape
    tile_c = min(nchan, 2048)
    ctiles = (nchan + tile_c - 1) // tile_c
    n_items = ((n_rows + COLUMN_TILE_ROWS - 1) // COLUMN_TILE_ROWS) * ctiles
    state = np.zeros((nthreads, 3, nchan))
    for t in prange(nthreads):
        shift = np.empty(tile_c)
        s1 = np.empty(tile_c)
        s2 = np.empty(tile_c)
        for item in range(t * n_items // nthreads, (t + 1) * n_items // nthreads):
            rt, ct = divmod(item, ctiles)
            r0 = rt * COLUMN_TILE_ROWS
            r1 = min(n_rows, r0 + COLUMN_TILE_ROWS)
            c0 = ct * tile_c
            width = min(nchan, c0 + tile_c) - c0
            for j in range(width):
                shift[j] = x[r0, c0 + j]
                s1[j] = 0.0
                s2[j] = 0.0
            shifted_rows(x, r0, r1, c0, shift[:width], s1, s2)
            n_b = np.float64(r1 - r0)
            for j in range(width):
                c = c0 + j
                mean_b = shift[j] + s1[j] / n_b
                if not np.isfinite(mean_b):
                    # inf - inf poisons the shifted sum; NumPy's mean is the plain sum's.
                    mean_b = column_sum(x, r0, r1, c) / n_b
                state[t, 0, c], state[t, 1, c], state[t, 2, c] = chan_merge(
                    state[t, 0, c], state[t, 1, c], state[t, 2, c],
                    n_b, mean_b, s2[j] - s1[j] * s1[j] / n_b,
                )
    return merge_threads(state)


def channel_moments(x):
    """(mean[C], m2[C]) in float64 of a 3-D (outer, C, inner) view; count = outer*inner."""
    n_outer, nchan, n_inner = x.shape
    if n_inner == 1:
        x2 = x[:, :, 0]
        nthreads, parallel = thread_plan(x.size, n_outer)
        return moments_columns(x2, nthreads, parallel=parallel)
    items = n_outer * nchan * ((n_inner + BLOCK - 1) // BLOCK)
    nthreads, parallel = thread_plan(x.size, items)
    return moments_rows(x, nthreads, parallel=parallel)
