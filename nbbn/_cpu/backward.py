"""Batch-norm backward: one fused reduction pass, then one elementwise pass.

Reduction: per channel ``sum(g)`` and ``sum(g * (x - mean))`` in float64, as the
statistics are summed (``moments.py``): vectorized loops over chunks of CHUNK values (a
row) or COLUMN_BLOCK_SWEEPS sweeps (channels-last), whose sums go into per-thread
double-doubles (TwoSum), so rounding stays inside short chunks; the threads'
double-doubles are added at the end. Elementwise: ``dx = G[c] * g + H[c] * (x - mean[c])
+ K[c]`` with per-channel coefficients in the working dtype (``elements.work_dtype``),
which covers training (batch statistics) and evaluation (running statistics: H = K = 0)
alike. ``g`` is dy, or, behind a ReLU, dy where the forward's output was positive
(``gate``: y or a layer's kept mask; None: no ReLU), computed in both passes from dy and
the gate, never stored, unless the reduction is asked to write it (``dres``: the
residual's gradient, which the dx pass may then read as its dy). With virtual batches,
sums, statistics and coefficients are per (group, channel): (groups, C) arrays indexed
by a row's group (see ``_blocks``).
"""
import numpy as np
from numba import prange

from .. import _math
from ._jit import helper, kernel, share, thread_plan
from ._blocks import (GRAD_STREAMS, SUMS_STREAMS, WIDE_ROW, head_groups, next_block, row_block,
                      row_items, run_stop, short_rows, stream_step, tiled, widen)
from .elements import gated, part, store, store_if, wide
from .moments import (CHUNK, COLUMN_BLOCK_SWEEPS, STRIDED_CHUNK, add_block, add_pending,
                      flush_pending)


@helper
def grad_terms(dy, x, gate, dres, i, m):
    """(g, g * (x[i] - m)) in float64 for g = dy[i] through the gate; g also into ``dres``
    (None: not written)."""
    d = gated(wide(dy[i]), gate, i)
    store_if(dres, i, d)
    d = np.float64(d)
    return d, d * (np.float64(wide(x[i])) - m)


# Rows of a (4, C) array of double-double sums: sum(dy), sum(dy * (x - mean)).
DY_HI, DY_LO, DXM_HI, DXM_LO = range(4)


@helper
def add_sums(sums, c, s_dy, s_dxm):
    """Add a chunk's sums of channel c into the double-double sums."""
    sums[DY_HI, c], sums[DY_LO, c] = _math.accumulate(sums[DY_HI, c], sums[DY_LO, c], s_dy)
    sums[DXM_HI, c], sums[DXM_LO, c] = _math.accumulate(sums[DXM_HI, c], sums[DXM_LO, c],
                                                        s_dxm)


@helper
def add_part(total, c, part_):
    """Add channel c of the (4, C) double-double sums ``part_`` into ``total``'s."""
    add_sums(total, c, part_[DY_HI, c], part_[DXM_HI, c])
    total[DY_LO, c] += part_[DY_LO, c]
    total[DXM_LO, c] += part_[DXM_LO, c]


@helper
def add_heads(sums, heads, first_groups):
    """Each thread's first run's double-double sums into its group's (see ``_blocks``): the
    result."""
    for t in range(heads.shape[0]):
        if first_groups[t] >= 0:
            for c in range(sums.shape[2]):
                add_part(sums[first_groups[t]], c, heads[t])
    return sums


@kernel
def total_sums(partial):
    """Per-(group, channel) (sum(dy), sum(dy * (x - mean))), (groups, C) each, of (groups,
    P, 4, C) double-double sums, added in double-double (a plain sum of the parts' hi would
    round as often as P)."""
    groups, n_parts, _, nchan = partial.shape
    total = np.zeros((groups, 4, nchan))
    for q in range(groups):
        for p in range(n_parts):
            for c in range(nchan):
                add_part(total[q], c, partial[q, p])
    return total[:, DY_HI] + total[:, DY_LO], total[:, DXM_HI] + total[:, DXM_LO]


@helper
def sums_items(dy, x, mean, gate, dres, first, last, sums):
    """Add sum(g) and sum(g * (x - mean)) of row items first:last into the (4, C)
    double-double ``sums``, CHUNK (strided: STRIDED_CHUNK) values per plain sum (short
    rows' sums gather until they cover that many: ``moments.add_pending``)."""
    n_outer, nchan, n_inner = x.shape
    step = CHUNK if x.strides[2] == x.itemsize and dy.strides[2] == dy.itemsize \
        else STRIDED_CHUNK
    pending = np.zeros((3, nchan))
    o, c, start, stop = row_block(first, nchan, n_inner)
    for _ in range(first, last):
        for lo in range(start, stop, step):
            hi = min(stop, lo + step)
            s_dy, s_dxm = chunk_sums(dy[o, c, lo:hi], x[o, c, lo:hi], part(gate, o, c, lo, hi),
                                     part(dres, o, c, lo, hi), mean[c])
            add_pending(sums, pending, c, s_dy, s_dxm, hi - lo, step)
        o, c, start, stop = next_block(o, c, start, stop, nchan, n_inner)
    flush_pending(sums, pending)


@helper
def chunk_sums(g, v, gate, dres, m):
    """(sum(g'), sum(g' * (v - m))) in float64 of one chunk, g' = g through the gate (also
    written into ``dres``): one vectorized loop."""
    s_dy = 0.0
    s_dxm = 0.0
    for i in range(g.shape[0]):
        a, b = grad_terms(g, v, gate, dres, i, m)
        s_dy += a
        s_dxm += b
    return s_dy, s_dxm


@share
def sums_rows_share(dy, x, mean, gate, dres, group_rows, t, nthreads, sums, heads):
    """Thread t's share of ``sums_rows``: the t-th contiguous share of the row items, in runs
    of one group, its first run's sums into ``heads[t]``, the others' into ``sums``."""
    n_outer, nchan, n_inner = x.shape
    n_items = row_items(x.shape)
    group_items = row_items((group_rows, nchan, n_inner))
    first, last = t * n_items // nthreads, (t + 1) * n_items // nthreads
    item = first
    while item < last:
        end = run_stop(item, last, group_items)
        sums_items(dy, x, mean[item // group_items], gate, dres, item, end,
                   heads[t] if item == first else sums[item // group_items])
        item = end


@kernel
def sums_rows(dy, x, mean, gate, dres, group_rows, nthreads):
    """(groups, 4, C) double-double sums over row items, per group of ``group_rows`` outer
    rows."""
    n_outer, nchan, n_inner = x.shape
    n_items = row_items(x.shape)
    group_items = row_items((group_rows, nchan, n_inner))
    sums = np.zeros((mean.shape[0], 4, nchan))
    heads = np.zeros((nthreads, 4, nchan))
    for t in prange(nthreads):
        sums_rows_share(dy, x, mean, gate, dres, group_rows, np.int64(t), nthreads, sums, heads)
    return add_heads(sums, heads, head_groups(n_items, group_items, nthreads))


@helper
def sums_sweep(dy, x, gate, dres, r, step, n_streams, mean, s_dy, s_dxm):
    """Add sum(g) and sum(g * (x - mean)) of rows r, r + step, ... (n_streams rows) into
    per-column accumulators: one sweep, the rows' terms added in registers first."""
    for c in range(mean.shape[0]):
        m = mean[c]
        a, b = grad_terms(dy, x, gate, dres, (r, c), m)
        for s in range(1, n_streams):
            d, e = grad_terms(dy, x, gate, dres, (r + s * step, c), m)
            a += d
            b += e
        s_dy[c] += a
        s_dxm[c] += b


@helper
def sums_walk(dy, x, gate, dres, first, stop, n_streams, mean, s_dy, s_dxm, sums):
    """Rows first:stop as n_streams lockstep streams (``_blocks.stream_step``), in blocks of
    COLUMN_BLOCK_SWEEPS sweeps whose sums go into the double-double ``sums``."""
    step = stream_step(first, stop, n_streams)
    for r0 in range(first, first + step, COLUMN_BLOCK_SWEEPS):
        s_dy[:] = 0.0
        s_dxm[:] = 0.0
        for r in range(r0, min(first + step, r0 + COLUMN_BLOCK_SWEEPS)):
            sums_sweep(dy, x, gate, dres, r, step, n_streams, mean, s_dy, s_dxm)
        add_block(sums, s_dy, s_dxm)
    s_dy[:] = 0.0
    s_dxm[:] = 0.0
    for r in range(first + n_streams * step, stop):
        sums_sweep(dy, x, gate, dres, r, 0, 1, mean, s_dy, s_dxm)
    for c in range(mean.shape[0]):
        add_sums(sums, c, s_dy[c], s_dxm[c])


@helper
def sums_share(dy, x, mean, gate, dres, first, stop, sums, s_dy, s_dxm):
    """The sums over channels-last rows first:stop into the (4, C) double-double ``sums``;
    ``s_dy``, ``s_dxm``: per-column accumulators, fresh arrays of the caller's, so that the
    compiler knows that nothing else writes them and vectorizes the sweep without alias
    checks."""
    if x.shape[1] >= WIDE_ROW:  # each call with its constant: the sweep's loop unrolls
        sums_walk(dy, x, gate, dres, first, stop, SUMS_STREAMS[1], mean, s_dy, s_dxm, sums)
    else:
        sums_walk(dy, x, gate, dres, first, stop, SUMS_STREAMS[0], mean, s_dy, s_dxm, sums)


@share
def sums_columns_share(dy, x, mean, gate, dres, group_rows, t, nthreads, sums, heads):
    """Thread t's share of ``sums_columns``: the t-th contiguous share of the rows, in runs of
    one group, its first run's sums into ``heads[t]``, the others' into ``sums``."""
    n_rows, nchan = x.shape
    first, stop = t * n_rows // nthreads, (t + 1) * n_rows // nthreads
    s_dy, s_dxm = np.empty(nchan), np.empty(nchan)
    r = first
    while r < stop:
        end = run_stop(r, stop, group_rows)
        sums_share(dy, x, mean[r // group_rows], gate, dres, r, end,
                   heads[t] if r == first else sums[r // group_rows], s_dy, s_dxm)
        r = end


@kernel
def sums_columns(dy, x, mean, gate, dres, group_rows, nthreads):
    """(groups, 4, C) double-double sums over channels-last rows: thread t's share in runs
    of one group (``sums_columns_share``)."""
    n_rows, nchan = x.shape
    sums = np.zeros((mean.shape[0], 4, nchan))
    heads = np.zeros((nthreads, 4, nchan))
    for t in prange(nthreads):
        sums_columns_share(dy, x, mean, gate, dres, group_rows, np.int64(t), nthreads, sums, heads)
    return add_heads(sums, heads, head_groups(n_rows, group_rows, nthreads))


@helper
def dx_value(dy, x, gate, i, m, gc, hc, kc):
    return gc * gated(wide(dy[i]), gate, i) + hc * (wide(x[i]) - m) + kc


@helper
def dx_items(dy, x, gate, mean, g, h, k, dx, first, last):
    """dx over row items first:last."""
    n_outer, nchan, n_inner = x.shape
    o, c, start, stop = row_block(first, nchan, n_inner)
    for _ in range(first, last):
        gy = dy[o, c, start:stop]
        v = x[o, c, start:stop]
        open_ = part(gate, o, c, start, stop)
        out = dx[o, c, start:stop]
        m, gc, hc, kc = mean[c], g[c], h[c], k[c]
        for i in range(gy.shape[0]):
            store(out, i, dx_value(gy, v, open_, i, m, gc, hc, kc))
        o, c, start, stop = next_block(o, c, start, stop, nchan, n_inner)


@share
def dx_rows_share(dy, x, gate, mean, g, h, k, dx, group_rows, t, nthreads):
    """Thread t's share of ``dx_rows``: the t-th contiguous share of the row items, in runs
    of one group."""
    n_outer, nchan, n_inner = x.shape
    n_items = row_items(x.shape)
    group_items = row_items((group_rows, nchan, n_inner))
    item, last = t * n_items // nthreads, (t + 1) * n_items // nthreads
    while item < last:
        end = run_stop(item, last, group_items)
        q = item // group_items
        dx_items(dy, x, gate, mean[q], g[q], h[q], k[q], dx, item, end)
        item = end


@kernel
def dx_rows(dy, x, gate, mean, g, h, k, dx, group_rows, nthreads):
    """dx over row items (``dx_rows_share``)."""
    for t in prange(nthreads):
        dx_rows_share(dy, x, gate, mean, g, h, k, dx, group_rows, np.int64(t), nthreads)


@helper
def dx_sweep(dy, x, gate, r, step, n_streams, mean, g, h, k, dx):
    """dx = G*g + H*(x - mean) + K on rows r, r + step, ... (n_streams rows), one sweep."""
    for c in range(mean.shape[0]):
        m, gc, hc, kc = mean[c], g[c], h[c], k[c]
        for s in range(n_streams):
            i = (r + s * step, c)
            store(dx, i, dx_value(dy, x, gate, i, m, gc, hc, kc))


@helper
def dx_walk(dy, x, gate, first, stop, n_streams, mean, g, h, k, dx):
    """Rows first:stop as n_streams lockstep streams (``_blocks.stream_step``)."""
    step = stream_step(first, stop, n_streams)
    for r in range(first, first + step):
        dx_sweep(dy, x, gate, r, step, n_streams, mean, g, h, k, dx)
    for r in range(first + n_streams * step, stop):
        dx_sweep(dy, x, gate, r, 0, 1, mean, g, h, k, dx)


@helper
def dx_share(dy, x, gate, mean, g, h, k, dx, first, stop):
    """dx over channels-last rows first:stop."""
    if x.shape[1] >= WIDE_ROW:
        dx_walk(dy, x, gate, first, stop, GRAD_STREAMS[1], mean, g, h, k, dx)
    else:
        dx_walk(dy, x, gate, first, stop, GRAD_STREAMS[0], mean, g, h, k, dx)


@share
def dx_columns_share(dy, x, gate, mean, g, h, k, dx, group_rows, t, nthreads):
    """Thread t's share of ``dx_columns``: the t-th contiguous share of the rows, in runs of
    one group."""
    n_rows = x.shape[0]
    r, stop = t * n_rows // nthreads, (t + 1) * n_rows // nthreads
    while r < stop:
        end = run_stop(r, stop, group_rows)
        q = r // group_rows
        dx_share(dy, x, gate, mean[q], g[q], h[q], k[q], dx, r, end)
        r = end


@kernel
def dx_columns(dy, x, gate, mean, g, h, k, dx, group_rows, nthreads):
    """dx over channels-last rows (``dx_columns_share``)."""
    for t in prange(nthreads):
        dx_columns_share(dy, x, gate, mean, g, h, k, dx, group_rows, np.int64(t), nthreads)


def _rows_plan(x):
    n_outer, nchan, n_inner = x.shape
    return thread_plan(2 * x.size, row_items(x.shape))


def _columns_plan(x):
    return thread_plan(2 * x.size, x.shape[0])


def _plane(a):
    return None if a is None else a[:, :, 0]


def _group_rows(x, group_rows):
    """(the kernels' group_rows, widen's): None (one group) is all rows."""
    return (max(x.shape[0], 1), None) if group_rows is None else (group_rows, group_rows)


def _columns(arrays, vectors, grouped):
    """``(n_inner, planes, vectors)``: 3-D views read as channels-last columns (``widen``'s
    2-D planes; short rows, where not grouped, as ``short_rows``' planes, the (groups, C)
    vectors repeated per row element), or None where they are read as rows."""
    short = None if grouped else short_rows(*arrays)
    if short is not None:
        n_inner, planes = short
        return n_inner, planes, [np.repeat(v, n_inner, axis=1) for v in vectors]
    if arrays[0].shape[2] > 1:
        return None
    return 1, tuple(_plane(a) for a in arrays), list(vectors)


def backward_sums(dy, x, mean, gate=None, dres=None, group_rows=None):
    """(sum(g), sum(g * (x - mean))) of 3-D views per (group, channel), float64 groups * C
    values each (group-major), as ``mean``, per group of ``group_rows`` outer rows (None:
    one group); g = dy through the ``gate`` (3-D view or None), written into ``dres`` (3-D
    view or None)."""
    rows, grouping = _group_rows(x, group_rows)
    mean = mean.reshape(-1, x.shape[1])
    columns = _columns((dy, x, gate, dres), (mean,), group_rows is not None)
    if columns is None:
        nthreads, parallel = _rows_plan(x)
        parts = sums_rows(dy, x, mean, gate, dres, rows, nthreads, parallel=parallel)[:, None]
    else:
        n_inner, planes, (mean,) = columns
        groups, ncols = mean.shape
        k, (dyw, xw, gw, rw), rest = widen(*planes, group_rows=grouping)
        nthreads, parallel = _columns_plan(xw)
        sums = sums_columns(dyw, xw, tiled(mean, k), gw, rw, max(rows // k, 1), nthreads,
                            parallel=parallel)
        # The parts of a group's sums: the k regrouped copies of each column, the rest rows.
        parts = np.zeros((groups, k + 1, 4, ncols))
        parts[:, :k] = sums.reshape(groups, 4, k, ncols).transpose(0, 2, 1, 3)
        if rest:
            dyr, xr, gr, rr = rest
            parts[-1, k] = sums_columns(dyr, xr, mean[-1:], gr, rr, xr.shape[0], 1,
                                        parallel=False)[0]
        if n_inner > 1:  # a channel's columns: more parts of its sums
            parts = parts.reshape(groups, k + 1, 4, ncols // n_inner, n_inner) \
                .transpose(0, 1, 4, 2, 3).reshape(groups, -1, 4, ncols // n_inner)
    sum_dy, sum_dy_xmu = total_sums(parts, parallel=False)
    return sum_dy.ravel(), sum_dy_xmu.ravel()


def grad_input(dy, x, mean, g, h, k, dx, gate=None, group_rows=None):
    """dx = G*g + H*(x - mean) + K over 3-D views (g: dy through the ``gate``, 3-D view or
    None), coefficients per (group, channel), groups * C values, in the working dtype, per
    group of ``group_rows`` outer rows (None: one group)."""
    rows, grouping = _group_rows(x, group_rows)
    coeffs = [a.reshape(-1, x.shape[1]) for a in (mean, g, h, k)]
    columns = _columns((dy, x, gate, dx), coeffs, group_rows is not None)
    if columns is None:
        nthreads, parallel = _rows_plan(x)
        dx_rows(dy, x, gate, *coeffs, dx, rows, nthreads, parallel=parallel)
        return
    _, planes, coeffs = columns
    copies, wide_, rest = widen(*planes, group_rows=grouping)
    nthreads, parallel = _columns_plan(wide_[1])
    dx_columns(*wide_[:3], *(tiled(a, copies) for a in coeffs), wide_[3],
               max(rows // copies, 1), nthreads, parallel=parallel)
    if rest:
        dx_columns(*rest[:3], *(a[-1:] for a in coeffs), rest[3], rest[1].shape[0], 1,
                   parallel=False)
