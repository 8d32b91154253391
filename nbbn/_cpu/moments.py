"""Per-channel (count, mean, m2) of a strided (outer, C, inner) view, one pass.

Accurate on every input, at memory speed:

* Shift. Each thread sums its share of a channel shifted by one value ``k``
  of that channel's data: ``s1 = sum(x - k)``, ``s2 = sum((x - k)**2)``.
  ``x - k`` is exact where it matters (data far from zero: Sterbenz), and
  ``m2 = s2 - s1**2 / n`` loses only the bits of ``s2 / m2 = 1 + (mean - k)**2
  / variance``. k is the one of a few values sampled across the data that is
  nearest to their mean, or 0 for data around zero (``central``), so that ratio
  is near 1; where it is more than a few bits after all (an unlucky sample),
  the thread sums its share again shifted by the mean.
* Sums. Chunks of about CHUNK values (of a row, or 512 rows of a column) are
  summed by vectorized float64 loops, and the chunks' sums added into
  double-doubles (TwoSum), so rounding happens only inside chunks. The mean,
  ``k + s1 / n`` to double-double accuracy (an FMA remainder), comes out
  correctly rounded; exact sums (integer data) and constant data are exact.
* Merge. The threads' (count, double-double mean, m2) merge with Chan et al.'s
  formula in double-double (``_math.chan_merge_dd``); so do the regrouped
  copies of a channel (``fold_columns``) and ``Moments``.
* What must be exact is compiled without fastmath (``_math``'s functions:
  ``_jit._compile_shared_math``), the hot loops with it.
* Inf, nan and overflow are not the kernels' business: they let non-finite
  values propagate, and ``channel_moments`` gives such channels NumPy's
  inf/nan results or, where the data is finite and only a sum or a square
  overflowed, computes the channel again scaled by a power of two (exact).

Channels-last (columns) reductions read memory in a few long sequential
streams: each thread takes a contiguous range of rows and walks STREAMS equal
parts of it side by side, so the per-column sums are loaded and stored once per
STREAMS rows, and the hardware prefetchers see long streams. Measured on one
thread, 51 MB: adjacent rows read in lockstep (short streams, restarted every
sweep) were 2-4x slower; sums held in registers over a tile of columns, each
tile swept down the rows, 2-6x slower (every row read in pieces, out of order).

Virtual batches: the state is per (group, channel), (groups, FIELDS, C); a
thread walks its share in runs of one group, each run summed as a thread's
share is otherwise (its own shifts, sampled from the run), its state kept apart
for the thread's first run and written into the group's otherwise (``_blocks``).
Channels-last runs of at most SHORT_RUN rows (small virtual batches of features)
take plain float64 sums shifted by the run's first row (``short_run_state``): a
few rows' sums need no double-double (for float32 data s1 is exact), and its
per-column steps vectorize, where the double-double state costs about 140
cycles per column (measured: 40x the rows' own sums for runs of 8 rows).
"""
import math

import numba
import numpy as np
from numba import prange

from .. import _math
from ._blocks import head_groups, next_block, row_block, row_items, run_stop, short_rows, widen
from .elements import as_float64, wide
from ._jit import helper, kernel, share, thread_plan

# A shift k with (s1**2 / n) / s2 above this (more than 4 bits cancelled in m2)
# is replaced by the mean and the sums taken again.
CANCELLATION = 1.0 - 1.0 / 16
# Elements summed by one loop. Partial sums must stay short: one long sequential sum of
# squares of data on a coarse grid (1.7e9 + N(0, 1)) rounds with a bias (squares' low
# bits are not uniform), 4e-14 relative over 4096 values. Vectorized (contiguous), a
# loop keeps 16-32 partial sums (shorter loops: 8% slower on one thread, float32); a
# strided block's loop is sequential.
CHUNK = 1024
STRIDED_CHUNK = 128
# Values sampled per channel to choose its shift (see ``central``).
SAMPLES = 8
# Rows summed side by side in a channels-last sweep (see the module docstring).
STREAMS = 8
# Sweeps per channels-last block: 8 streams x 64 rows = 512 rows per plain sum.
COLUMN_BLOCK_SWEEPS = 64
# Channels per kernel call: each thread keeps about 100 bytes of sums and state per
# channel, which for many channels of little data each (the last axis of a large
# array reduced) would rival the data itself.
CHANNEL_TILE = 4096
# Rows per channels-last run of a virtual batch at or below which ``short_run_state`` sums it.
SHORT_RUN = 256
# Rows of a (FIELDS, C) channel state: count, mean (double-double), m2.
COUNT, MEAN, MEAN_LOW, M2 = range(4)
FIELDS = 4
# Rows of a (4, C) array of double-double sums.
S1_HI, S1_LO, S2_HI, S2_LO = range(4)


@helper
def chunk_sums(row, k):
    """(sum(row - k), sum((row - k)**2)) in float64: one vectorized loop."""
    s1 = 0.0
    s2 = 0.0
    for i in range(row.shape[0]):
        d = wide(row[i]) - k
        s1 += d
        s2 += d * d
    return s1, s2


@helper
def shifted_sums(row, k):
    """``chunk_sums`` of a block, CHUNK (or, strided, STRIDED_CHUNK) elements at a time."""
    step = CHUNK if row.strides[0] == row.itemsize else STRIDED_CHUNK
    if row.shape[0] <= step:
        return chunk_sums(row, k)
    s1 = 0.0
    s2 = 0.0
    for start in range(0, row.shape[0], step):
        c1, c2 = chunk_sums(row[start:start + step], k)
        s1 += c1
        s2 += c2
    return s1, s2


@helper
def central(samples):
    """A shift for data sampled by ``samples``: 0 where the data straddles zero
    (its samples' mean within their mean absolute deviation of it), else the
    sample nearest to that mean (a value of the data: constant data is shifted
    by its value, exactly). The mean comes from ``k + s1 / n`` and its error
    from s1's, which is relative to ``|mean - k|``: near zero, 0 is the nearest
    shift that is exact (the mean as accurate as a plain sum); m2's cancellation,
    ``(mean - k)**2 / variance``, stays below about 1 either way."""
    mean = 0.0
    for v in samples:
        mean += v
    mean /= samples.shape[0]
    spread = 0.0
    best = samples[0]
    for v in samples:
        spread += abs(v - mean)
        if abs(v - mean) < abs(best - mean):
            best = v
    return 0.0 if abs(mean) * samples.shape[0] <= spread else best


@helper
def accumulate(sums, c, s1, s2):
    """Add a block's sums of channel c into the double-double sums."""
    sums[S1_HI, c], sums[S1_LO, c] = _math.accumulate(sums[S1_HI, c], sums[S1_LO, c], s1)
    sums[S2_HI, c], sums[S2_LO, c] = _math.accumulate(sums[S2_HI, c], sums[S2_LO, c], s2)


@helper
def add_pending(sums, pending, c, s1, s2, count, threshold):
    """Add a row block's plain sums of channel c into ``pending`` (3, C: plain sums, count),
    and those into the (4, C) double-double ``sums`` once they cover ``threshold`` values:
    short rows take a double-double step per chunk of values, not per row (one per row of
    64 values cost a third of the backward's sums). The backward's (4, C) sums of dy and
    dy * (x - mean) have the same layout."""
    pending[0, c] += s1
    pending[1, c] += s2
    pending[2, c] += count
    if pending[2, c] >= threshold:
        accumulate(sums, c, pending[0, c], pending[1, c])
        pending[0, c] = 0.0
        pending[1, c] = 0.0
        pending[2, c] = 0.0


@helper
def flush_pending(sums, pending):
    """The rest of ``add_pending``'s plain sums into ``sums``."""
    for c in range(pending.shape[1]):
        accumulate(sums, c, pending[0, c], pending[1, c])


@numba.njit(fastmath=False, cache=False)
def add_block(sums, s1, s2):
    """Add a block's per-column sums into the (4, C) double-double sums: a loop of its own,
    compiled without fastmath (elementwise, it vectorizes without; inside a fastmath
    kernel it did not, and cost 15% of a channels-last float32 pass)."""
    for c in range(s1.shape[0]):
        accumulate(sums, c, s1[c], s2[c])


@helper
def thread_state(counts, k, sums, state):
    """Fill the (FIELDS, C) state from a thread's shifted sums; True where a shift
    cancelled too much (see CANCELLATION) and the sums must be taken again."""
    again = False
    for c in range(k.shape[0]):
        n = counts[c]
        state[COUNT, c] = n
        if n > 0:
            state[MEAN, c], state[MEAN_LOW, c], state[M2, c] = _math.shifted_moments(
                n, k[c], sums[S1_HI, c], sums[S1_LO, c], sums[S2_HI, c], sums[S2_LO, c])
            s1 = sums[S1_HI, c]
            again |= s1 * (s1 / n) > CANCELLATION * sums[S2_HI, c]
    return again


@helper
def checked(state):
    """(state, whether all its means and m2 are finite): the kernels' result."""
    for c in range(state.shape[1]):
        if not (np.isfinite(state[MEAN, c]) and np.isfinite(state[M2, c])):
            return state, False
    return state, True


@helper
def merge_states(states):
    """Merge (P, FIELDS, C) states into one (FIELDS, C) state, in place: pairwise, so
    that each m2 passes through about log2(P) roundings, not P (86 regrouped copies of
    a channel)."""
    step = 1
    while step < states.shape[0]:
        for t in range(0, states.shape[0] - step, 2 * step):
            for c in range(states.shape[2]):
                (states[t, COUNT, c], states[t, MEAN, c], states[t, MEAN_LOW, c],
                 states[t, M2, c]) = _math.chan_merge_dd(
                    states[t, COUNT, c], states[t, MEAN, c], states[t, MEAN_LOW, c],
                    states[t, M2, c], states[t + step, COUNT, c], states[t + step, MEAN, c],
                    states[t + step, MEAN_LOW, c], states[t + step, M2, c])
        step *= 2
    return checked(states[0])


@helper
def merge_heads(states, heads, first_groups):
    """(states, finite): the (groups, FIELDS, C) states with each thread's first run's state
    (``heads``, (P, FIELDS, C)) merged into its group's (see ``_blocks``), pairwise."""
    scratch = np.empty((heads.shape[0] + 1, FIELDS, heads.shape[2]))
    t = 0
    while t < heads.shape[0]:
        g = first_groups[t]
        end = t + 1
        while end < heads.shape[0] and first_groups[end] == g:
            end += 1
        if g >= 0:
            scratch[0] = states[g]
            scratch[1:end - t + 1] = heads[t:end]
            states[g] = merge_states(scratch[:end - t + 1])[0]
        t = end
    finite = True
    for g in range(states.shape[0]):
        finite &= checked(states[g])[1]
    return states, finite


@helper
def rows_shift(x, c, first, last, samples):
    """Channel c's shift for work items first:last, from values sampled in blocks
    spread over the items (a channel's data may drift: its first value may lie
    far from its mean); see ``central``."""
    n_outer, nchan, n_inner = x.shape
    m = samples.shape[0]
    for s in range(m):
        o, _, start, stop = row_block(first + (2 * s + 1) * (last - first) // (2 * m), nchan,
                                      n_inner)
        samples[s] = wide(x[o, c, start + (2 * s + 1) * (stop - start) // (2 * m)])
    return central(samples)


@helper
def rows_pass(x, first, last, k, new_shift, counts, sums, pending, samples):
    """Shifted sums of work items first:last (row blocks, see ``row_block``), walked in
    memory order; with ``new_shift``, a channel's shift k is chosen where the channel is
    first met. Short rows' sums gather in ``pending`` (``add_pending``)."""
    n_outer, nchan, n_inner = x.shape
    counts[:] = 0.0
    sums[:] = 0.0
    pending[:] = 0.0
    if first == last:
        return
    o, c, start, stop = row_block(first, nchan, n_inner)
    for _ in range(first, last):
        if new_shift and counts[c] == 0:
            k[c] = rows_shift(x, c, first, last, samples)
        s1, s2 = shifted_sums(x[o, c, start:stop], k[c])
        counts[c] += stop - start
        add_pending(sums, pending, c, s1, s2, stop - start, CHUNK)
        o, c, start, stop = next_block(o, c, start, stop, nchan, n_inner)
    flush_pending(sums, pending)


@helper
def rows_state(x, first, last, state):
    """Fill the (FIELDS, C) ``state`` from work items first:last of x[outer, C, inner]."""
    nchan = x.shape[1]
    work = np.empty((9, nchan))  # one allocation: shifts, counts, sums, pending sums
    k, counts, sums, pending = work[0], work[1], work[2:6], work[6:]
    samples = np.empty(SAMPLES)
    for attempt in range(2):  # a second pass only where the shift was too far
        rows_pass(x, first, last, k, attempt == 0, counts, sums, pending, samples)
        if not thread_state(counts, k, sums, state):
            break
        k[:] = state[MEAN]


@share
def rows_share(x, group_rows, t, nthreads, states, heads):
    """Thread t's share of ``moments_rows``: the t-th contiguous share of the work items, in
    runs of one group, its first run's state into ``heads[t]``, the others' into ``states``."""
    n_outer, nchan, n_inner = x.shape
    n_items = row_items(x.shape)
    group_items = row_items((group_rows, nchan, n_inner))
    first, last = t * n_items // nthreads, (t + 1) * n_items // nthreads
    work = np.empty((9, nchan))  # one allocation: shifts, counts, sums, pending sums
    k, counts, sums, pending = work[0], work[1], work[2:6], work[6:]
    samples = np.empty(SAMPLES)
    a = first
    while a < last:
        b = run_stop(a, last, group_items)
        state = heads[t] if a == first else states[a // group_items]
        for attempt in range(2):  # a second pass only where the shift was too far
            rows_pass(x, a, b, k, attempt == 0, counts, sums, pending, samples)
            if not thread_state(counts, k, sums, state):
                break
            k[:] = state[MEAN]
        a = b


@kernel
def moments_rows(x, group_rows, nthreads):
    """(states, finite) over axes 0 and 2 of x[outer, C, inner] per group of ``group_rows``
    outer rows: (groups, FIELDS, C) (see ``merge_heads``).

    Work items are (row, block) pairs in memory order; thread t takes the
    t-th contiguous share, in runs of one group (``rows_share``).
    """
    n_outer, nchan, n_inner = x.shape
    n_items = row_items(x.shape)
    group_items = row_items((group_rows, nchan, n_inner))
    states = np.zeros(((n_outer + group_rows - 1) // group_rows, FIELDS, nchan))
    heads = np.zeros((nthreads, FIELDS, nchan))
    for t in prange(nthreads):
        rows_share(x, group_rows, np.int64(t), nthreads, states, heads)
    return merge_heads(states, heads, head_groups(n_items, group_items, nthreads))


@helper
def sweep(x, r, spacing, k, s1, s2):
    """Add the shifted sums of rows r, r + spacing, ..., r + 7 * spacing (one per
    stream) into per-column s1, s2. Row slices first: indexing them with j >= 0
    needs no negative-index fix-up, which would turn the loads into gathers."""
    a0 = x[r]
    a1 = x[r + spacing]
    a2 = x[r + 2 * spacing]
    a3 = x[r + 3 * spacing]
    a4 = x[r + 4 * spacing]
    a5 = x[r + 5 * spacing]
    a6 = x[r + 6 * spacing]
    a7 = x[r + 7 * spacing]
    for j in range(k.shape[0]):
        kj = k[j]
        d0 = wide(a0[j]) - kj
        d1 = wide(a1[j]) - kj
        d2 = wide(a2[j]) - kj
        d3 = wide(a3[j]) - kj
        d4 = wide(a4[j]) - kj
        d5 = wide(a5[j]) - kj
        d6 = wide(a6[j]) - kj
        d7 = wide(a7[j]) - kj
        s1[j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
        s2[j] += (((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))
                  + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)))


@helper
def add_row(a, k, s1, s2):
    for j in range(k.shape[0]):
        d = wide(a[j]) - k[j]
        s1[j] += d
        s2[j] += d * d


@helper
def columns_pass(x, r0, r1, k, sums, s1, s2):
    """Shifted sums of rows r0:r1 per column: STREAMS parts side by side in blocks
    of COLUMN_BLOCK_SWEEPS sweeps, then the rows left over."""
    sums[:] = 0.0
    part = (r1 - r0) // STREAMS
    for q0 in range(0, part, COLUMN_BLOCK_SWEEPS):
        s1[:] = 0.0
        s2[:] = 0.0
        for q in range(q0, min(part, q0 + COLUMN_BLOCK_SWEEPS)):
            sweep(x, r0 + q, part, k, s1, s2)
        add_block(sums, s1, s2)
    s1[:] = 0.0
    s2[:] = 0.0
    for r in range(r0 + STREAMS * part, r1):
        add_row(x[r], k, s1, s2)
    add_block(sums, s1, s2)


@helper
def short_run_sums(x, r0, r1, k, s1, s2):
    """Plain float64 sums of rows r0:r1 of x[rows, C] shifted by k per column, ``s1 = sum(x -
    k)`` and ``s2 = sum((x - k)**2)``: STREAMS rows a sweep."""
    s1[:] = 0.0
    s2[:] = 0.0
    part = (r1 - r0) // STREAMS
    for r in range(r0, r0 + part):
        sweep(x, r, part, k, s1, s2)
    for r in range(r0 + STREAMS * part, r1):
        add_row(x[r], k, s1, s2)


@numba.njit(fastmath=False, error_model="numpy", cache=False)
def short_moments(k, s1, s2, n, inverse):
    """(mean, m2, whether the shift cancelled too much: see CANCELLATION) of n values from
    their plain sums shifted by k (``short_run_sums``), ``inverse`` as ``_math.per_count``'s.
    Loops that call it are strict and without Python's division-by-zero check (Numba's
    default error model), which keeps a loop of divisions from vectorizing."""
    q = _math.per_count(s1, n, inverse)
    return k + q, _math.fma(-s1, q, s2), s1 * q > CANCELLATION * s2


@helper
def short_run_state(x, r0, r1, k, s1, s2, state):
    """The (FIELDS, C) state of rows r0:r1 (a short run of a virtual batch) from plain
    float64 sums shifted by the first row, again shifted by the means where that cancelled
    too much; mean_low is 0 (a group's statistics are not merged)."""
    for j in range(k.shape[0]):
        k[j] = wide(x[r0, j])
    for _ in range(2):
        short_run_sums(x, r0, r1, k, s1, s2)
        if not short_run_moments(k, s1, s2, r1 - r0, state):
            return
        k[:] = state[MEAN]


@numba.njit(fastmath=False, error_model="numpy", cache=False)
def short_run_moments(k, s1, s2, count, state):
    """``short_run_state``'s state from the sums; whether to sum again."""
    n = np.float64(count)
    inverse = _math.exact_inverse(count)
    again = False
    for j in range(k.shape[0]):
        state[COUNT, j] = n
        state[MEAN, j], state[M2, j], cancelled = short_moments(k[j], s1[j], s2[j], n, inverse)
        state[MEAN_LOW, j] = 0.0
        again |= cancelled
    return again


@helper
def column_shifts(x, r0, r1, k, mean, spread, best):
    """``central`` of each column of rows r0:r1, from SAMPLES rows spread over them, into
    ``k``: its steps taken a sampled row at a time across the columns (vector loops; a
    column's samples gathered one by one cost about 17 ns per column, as much as summing
    100 rows). ``mean``, ``spread``, ``best``: scratch vectors."""
    n = r1 - r0
    mean[:] = 0.0
    for s in range(SAMPLES):
        row = x[r0 + s * n // SAMPLES]
        for j in range(k.shape[0]):
            mean[j] += wide(row[j])
    first = x[r0]
    for j in range(k.shape[0]):
        mean[j] /= SAMPLES
        best[j] = wide(first[j])
        spread[j] = 0.0
    for s in range(SAMPLES):
        row = x[r0 + s * n // SAMPLES]
        for j in range(k.shape[0]):
            v = wide(row[j])
            spread[j] += abs(v - mean[j])
            if abs(v - mean[j]) < abs(best[j] - mean[j]):
                best[j] = v
    for j in range(k.shape[0]):
        k[j] = 0.0 if abs(mean[j]) * SAMPLES <= spread[j] else best[j]


@helper
def columns_state(x, r0, r1, state):
    """Fill the (FIELDS, C) ``state`` from rows r0:r1 of x[rows, C], shifted per column
    by a value sampled from rows spread over them (see ``central``)."""
    columns_run_state(x, r0, r1, np.empty((8, x.shape[1])), state)


@helper
def columns_run_state(x, r0, r1, work, state):
    """``columns_state`` with its scratch given (a thread's, reused over its runs): ``work``
    (8, C) for shifts, counts, sums and block sums (one allocation; the sums' rows serve
    ``column_shifts`` first)."""
    k, counts, sums, s1, s2 = work[0], work[1], work[2:6], work[6], work[7]
    counts[:] = r1 - r0
    column_shifts(x, r0, r1, k, sums[0], sums[1], sums[2])
    for _ in range(2):  # a second pass only where the shift was too far
        columns_pass(x, r0, r1, k, sums, s1, s2)
        if not thread_state(counts, k, sums, state):
            break
        k[:] = state[MEAN]


@share
def columns_share(x, group_rows, t, nthreads, states, heads):
    """Thread t's share of ``moments_columns``: the t-th contiguous share of the rows, in
    runs of one group, its first run's state into ``heads[t]``, the others' into ``states``."""
    n_rows, nchan = x.shape
    first, stop = t * n_rows // nthreads, (t + 1) * n_rows // nthreads
    work = np.empty((8, nchan))  # columns_run_state's
    # Short runs' shifts and sums: fresh arrays, so the compiler knows that nothing else
    # writes them and vectorizes their loops without alias checks.
    short_k, short_s1, short_s2 = np.empty(nchan), np.empty(nchan), np.empty(nchan)
    r0 = first
    while r0 < stop:
        r1 = run_stop(r0, stop, group_rows)
        state = heads[t] if r0 == first else states[r0 // group_rows]
        if group_rows < n_rows and group_rows <= SHORT_RUN:
            short_run_state(x, r0, r1, short_k, short_s1, short_s2, state)
        else:
            columns_run_state(x, r0, r1, work, state)
        r0 = r1


@kernel
def moments_columns(x, group_rows, nthreads):
    """(states, finite) over axis 0 of x[rows, C] (a vertical reduction, channels-last) per
    group of ``group_rows`` rows: (groups, FIELDS, C) (see ``merge_heads``).

    Thread t takes the t-th contiguous share of the rows, in runs of one group,
    each shifted per column by a value sampled from rows spread over the run
    (see ``central``; ``columns_share``).
    """
    n_rows, nchan = x.shape
    states = np.zeros(((n_rows + group_rows - 1) // group_rows, FIELDS, nchan))
    heads = np.zeros((nthreads, FIELDS, nchan))
    for t in prange(nthreads):
        columns_share(x, group_rows, np.int64(t), nthreads, states, heads)
    return merge_heads(states, heads, head_groups(n_rows, group_rows, nthreads))


@helper
def short_row_shifts(x, r0, r1, n_inner, k, lanes, samples):
    """``central`` of each channel of rows r0:r1 of the (rows, C * n_inner) plane of short
    rows (``moments_short_rows``), from SAMPLES values spread over them, into ``k`` (C,), and
    into each of the channel's columns of ``lanes`` (C * n_inner,)."""
    values = (r1 - r0) * n_inner
    m = samples.shape[0]
    for c in range(k.shape[0]):
        for s in range(m):
            r, i = divmod((2 * s + 1) * values // (2 * m), n_inner)
            samples[s] = wide(x[r0 + r, c * n_inner + i])
        k[c] = central(samples)
    spread(k, n_inner, lanes)


@helper
def spread(k, n_inner, lanes):
    """Each channel's shift ``k[c]`` into its n_inner columns of ``lanes``."""
    for c in range(k.shape[0]):
        lanes[c * n_inner:(c + 1) * n_inner] = k[c]


@numba.njit(fastmath=False, cache=False)
def fold_lanes(sums, n_inner, channel_sums):
    """The (4, C) double-double sums of each channel from its n_inner columns' (4, C *
    n_inner): one shift per channel, so the sums add (a column's high part exactly, its
    low part plainly, as ``backward.add_part``). Strict, and a column of each channel at a
    time, so that the loop over the channels vectorizes."""
    channel_sums[:] = 0.0
    for i in range(n_inner):
        for c in range(channel_sums.shape[1]):
            j = c * n_inner + i
            accumulate(channel_sums, c, sums[S1_HI, j], sums[S2_HI, j])
            channel_sums[S1_LO, c] += sums[S1_LO, j]
            channel_sums[S2_LO, c] += sums[S2_LO, j]


@kernel
def moments_short_rows(x, n_inner, nthreads):
    """(state, finite): the (FIELDS, C) state over axes 0 and 2 of x[outer, C, inner] with
    short rows, given as its (outer, C * inner) plane (``_blocks.short_rows``).

    Rows of a few values (a 4x4 feature map: 16) summed one at a time cost their fixed
    steps (a vector reduction, a double-double update) per row, 12x the read floor
    measured on [128, 512, 4, 4]; read as columns, a sweep runs across all channels, and
    every column of a channel shares the channel's shift, so the columns' sums add into
    the channel's before one state per channel (where per-column states, merged, cost
    as much again). Thread t takes the t-th contiguous share of the rows.
    """
    n_rows, width = x.shape
    nchan = width // n_inner
    states = np.zeros((nthreads, FIELDS, nchan))
    for t in prange(nthreads):
        r0, r1 = t * n_rows // nthreads, (t + 1) * n_rows // nthreads
        if r0 < r1:
            work = np.empty((7, width))  # column shifts, sums, block sums
            lanes, sums, s1, s2 = work[0], work[1:5], work[5], work[6]
            channel = np.empty((6, nchan))  # channel shifts, counts, sums
            k, counts, channel_sums = channel[0], channel[1], channel[2:]
            counts[:] = (r1 - r0) * n_inner
            short_row_shifts(x, r0, r1, n_inner, k, lanes, np.empty(SAMPLES))
            for _ in range(2):  # a second pass only where the shift was too far
                columns_pass(x, r0, r1, lanes, sums, s1, s2)
                fold_lanes(sums, n_inner, channel_sums)
                if not thread_state(counts, k, channel_sums, states[t]):
                    break
                k[:] = states[t, MEAN]
                spread(k, n_inner, lanes)
    return merge_states(states)


@kernel
def fold_columns(wide, tail, groups):
    """Channel states from regrouped columns: column j * C + c of ``wide`` holds channel c.

    ``wide`` and ``tail`` are (groups', FIELDS, k * C) and (1, FIELDS, C) states: the
    regrouped rows and the rows left over that did not fill a regrouped row (the last
    group's, which may lie in the tail alone: groups' = groups - 1).
    """
    nchan = tail.shape[2]
    copies = wide.shape[2] // nchan
    out = np.empty((groups, FIELDS, nchan))
    finite = True
    states = np.empty((copies + 1, FIELDS, nchan))
    for g in range(groups):
        states[:] = 0.0
        if g == groups - 1:
            states[0] = tail[0]
        if g < wide.shape[0]:
            for j in range(copies):
                states[j + 1] = wide[g, :, j * nchan:(j + 1) * nchan]
        merged, ok = merge_states(states)
        out[g] = merged
        finite &= ok
    return out, finite


def column_moments(x, group_rows=None):
    """(states, finite): the (groups, FIELDS, C) states over axis 0 of a 2-D (rows, C)
    view per group of ``group_rows`` rows (None: one group), and whether their means and
    m2 are all finite.

    Few channels: contiguous rows are regrouped into wide rows (``_blocks.widen``)
    so that the vector loop runs across many columns; ``fold_columns`` merges the
    k copies of each channel and the leftover rows afterwards.
    """
    n_rows = x.shape[0]
    k, (wide,), rest = widen(x, group_rows=group_rows)
    rows = n_rows if group_rows is None else group_rows
    nthreads, parallel = thread_plan(x.size, wide.shape[0])
    states, finite = moments_columns(wide, max(rows // k, 1), nthreads, parallel=parallel)
    if k == 1:
        return states, finite
    tail = (np.zeros((1, FIELDS, x.shape[1])) if rest is None
            else moments_columns(rest[0], rest[0].shape[0], 1, parallel=False)[0])
    return fold_columns(states, tail, (n_rows + rows - 1) // rows, parallel=False)


def channel_moments(x, group_rows=None):
    """(mean, m2, mean_low) in float64 of a 3-D (outer, C, inner) view, (groups * C,) each,
    group-major, per group of ``group_rows`` outer rows (None: one group, the count outer *
    inner). ``mean + mean_low`` is the mean as a double-double (``mean`` correctly
    rounded), for merges that must keep it exact (``Moments``)."""
    n_outer, nchan, n_inner = x.shape
    rows = max(n_outer, 1) if group_rows is None else group_rows
    groups = (n_outer + rows - 1) // rows
    if nchan > CHANNEL_TILE:
        out = np.empty((3, groups, nchan))
        for c0 in range(0, nchan, CHANNEL_TILE):
            tile = channel_moments(x[:, c0:c0 + CHANNEL_TILE], group_rows)
            for f in range(3):
                out[f, :, c0:c0 + CHANNEL_TILE] = tile[f].reshape(groups, -1)
        return out[0].ravel(), out[1].ravel(), out[2].ravel()
    short = short_rows(x) if group_rows is None else None
    if n_inner == 1:
        states, finite = column_moments(x[:, :, 0], group_rows)
    elif short is not None:
        nthreads, parallel = thread_plan(x.size, n_outer)
        state, finite = moments_short_rows(short[1][0], n_inner, nthreads, parallel=parallel)
        states = state[None]
    else:
        items = row_items(x.shape)
        nthreads, parallel = thread_plan(x.size, items)
        states, finite = moments_rows(x, rows, nthreads, parallel=parallel)
    mean, mean_low, m2 = (states[:, f].ravel() for f in (MEAN, MEAN_LOW, M2))
    if not finite:
        for j in np.flatnonzero(~(np.isfinite(mean) & np.isfinite(m2))):
            g, c = divmod(j, nchan)
            mean[j], m2[j], mean_low[j] = nonfinite_channel(x[g * rows:(g + 1) * rows, c, :])
    return mean, m2, mean_low


def nonfinite_channel(v):
    """(mean, m2, mean_low) of a channel whose kernel results were not finite.

    NumPy's rules where the data holds inf or nan; otherwise the data is finite
    and only an intermediate sum or square overflowed: the channel again, scaled
    by a power of two (exact) so that its largest value is near 2**450.
    """
    v = as_float64(v)
    if np.isnan(v).any() or (np.isposinf(v).any() and np.isneginf(v).any()):
        return np.nan, np.nan, 0.0
    if np.isinf(v).any():
        return (np.inf if np.isposinf(v).any() else -np.inf), np.nan, 0.0
    shift = 450 - math.frexp(np.abs(v).max())[1]
    mean, m2, mean_low = channel_moments(np.ldexp(v, shift)[:, None, :])
    with np.errstate(over="ignore"):  # an m2 beyond float64 is inf, as NumPy's
        return (np.ldexp(mean[0], -shift), np.ldexp(m2[0], -2 * shift),
                np.ldexp(mean_low[0], -shift))
