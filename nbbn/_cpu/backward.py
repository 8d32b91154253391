"""Batch-norm backward: one fused reduction pass, then one elementwise pass.

Reduction: per channel ``sum(g)`` and ``sum(g * (x - mean))`` in float64, per-thread
partial sums added serially at the end. Elementwise: ``dx = G[c] * g + H[c] * (x -
mean[c]) + K[c]`` with per-channel coefficients in the working dtype
(``elements.work_dtype``), which covers training (batch statistics) and evaluation
(running statistics: H = K = 0) alike. ``g`` is dy, or, behind a ReLU, dy where the
forward's output was positive (``gate``: y or a layer's kept mask; None: no ReLU),
computed in both passes from dy and the gate, never stored, unless the reduction is
asked to write it (``dres``: the residual's gradient, which the dx pass may then read
as its dy). With virtual batches, sums, statistics and coefficients are per (group,
channel): (groups, C) arrays indexed by a row's group (see ``_blocks``).
"""
import numpy as np
from numba import prange

from ._jit import helper, kernel, thread_plan
from ._blocks import (BLOCK, GRAD_STREAMS, SUMS_STREAMS, WIDE_ROW, head_groups, row_block,
                      run_stop, stream_step, tiled, widen)
from .elements import gated, part, store, store_if, wide


@helper
def grad_terms(dy, x, gate, dres, i, m):
    """(g, g * (x[i] - m)) in float64 for g = dy[i] through the gate; g also into ``dres``
    (None: not written)."""
    d = gated(wide(dy[i]), gate, i)
    store_if(dres, i, d)
    d = np.float64(d)
    return d, d * (np.float64(wide(x[i])) - m)


@helper
def add_heads(sums, heads, first_groups):
    """Each thread's first run's sums into its group's (see ``_blocks``): the result."""
    for t in range(heads.shape[0]):
        if first_groups[t] >= 0:
            sums[first_groups[t]] += heads[t]
    return sums


@kernel
def sums_rows(dy, x, mean, gate, dres, group_rows, nthreads):
    """(groups, 2, C) sums over row items, per group of ``group_rows`` outer rows."""
    n_outer, nchan, n_inner = x.shape
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    n_items = n_outer * nchan * blocks_per_row
    group_items = group_rows * nchan * blocks_per_row
    sums = np.zeros((mean.shape[0], 2, nchan))
    heads = np.zeros((nthreads, 2, nchan))
    for t in prange(nthreads):
        first, last = t * n_items // nthreads, (t + 1) * n_items // nthreads
        item = first
        while item < last:
            end = run_stop(item, last, group_items)
            target = heads[t] if item == first else sums[item // group_items]
            m = mean[item // group_items]
            for it in range(item, end):
                o, c, start, stop = row_block(it, nchan, blocks_per_row, n_inner)
                g = dy[o, c, start:stop]
                v = x[o, c, start:stop]
                open_ = part(gate, o, c, start, stop)
                out = part(dres, o, c, start, stop)
                mc = m[c]
                s_dy = 0.0
                s_dxm = 0.0
                for i in range(g.shape[0]):
                    a, b = grad_terms(g, v, open_, out, i, mc)
                    s_dy += a
                    s_dxm += b
                target[0, c] += s_dy
                target[1, c] += s_dxm
            item = end
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
def sums_walk(dy, x, gate, dres, first, stop, n_streams, mean, s_dy, s_dxm):
    """Rows first:stop as n_streams lockstep streams (``_blocks.stream_step``)."""
    step = stream_step(first, stop, n_streams)
    for r in range(first, first + step):
        sums_sweep(dy, x, gate, dres, r, step, n_streams, mean, s_dy, s_dxm)
    for r in range(first + n_streams * step, stop):
        sums_sweep(dy, x, gate, dres, r, 0, 1, mean, s_dy, s_dxm)


@kernel
def sums_columns(dy, x, mean, gate, dres, group_rows, nthreads):
    """(groups, 2, C) sums over channels-last rows: thread t's share in runs of one group."""
    n_rows, nchan = x.shape
    sums = np.zeros((mean.shape[0], 2, nchan))
    heads = np.zeros((nthreads, 2, nchan))
    for t in prange(nthreads):
        # The thread's own accumulators: fresh arrays, so the compiler knows that
        # nothing else writes them and vectorizes the sweep without alias checks.
        s_dy = np.empty(nchan)
        s_dxm = np.empty(nchan)
        first, stop = t * n_rows // nthreads, (t + 1) * n_rows // nthreads
        r = first
        while r < stop:
            end = run_stop(r, stop, group_rows)
            g = r // group_rows
            s_dy[:] = 0.0
            s_dxm[:] = 0.0
            if nchan >= WIDE_ROW:
                sums_walk(dy, x, gate, dres, r, end, SUMS_STREAMS[1], mean[g], s_dy, s_dxm)
            else:
                sums_walk(dy, x, gate, dres, r, end, SUMS_STREAMS[0], mean[g], s_dy, s_dxm)
            target = heads[t] if r == first else sums[g]
            target[0] = s_dy
            target[1] = s_dxm
            r = end
    return add_heads(sums, heads, head_groups(n_rows, group_rows, nthreads))


@helper
def dx_value(dy, x, gate, i, m, gc, hc, kc):
    return gc * gated(wide(dy[i]), gate, i) + hc * (wide(x[i]) - m) + kc


@kernel
def dx_rows(dy, x, gate, mean, g, h, k, dx, group_rows, nthreads):
    n_outer, nchan, n_inner = x.shape
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    n_items = n_outer * nchan * blocks_per_row
    for t in prange(nthreads):
        for item in range(t * n_items // nthreads, (t + 1) * n_items // nthreads):
            o, c, start, stop = row_block(item, nchan, blocks_per_row, n_inner)
            gy = dy[o, c, start:stop]
            v = x[o, c, start:stop]
            open_ = part(gate, o, c, start, stop)
            out = dx[o, c, start:stop]
            q = o // group_rows
            m, gc, hc, kc = mean[q, c], g[q, c], h[q, c], k[q, c]
            for i in range(gy.shape[0]):
                store(out, i, dx_value(gy, v, open_, i, m, gc, hc, kc))


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


@kernel
def dx_columns(dy, x, gate, mean, g, h, k, dx, group_rows, nthreads):
    """dx over channels-last rows: thread t's share in runs of one group."""
    n_rows = x.shape[0]
    for t in prange(nthreads):
        r, stop = t * n_rows // nthreads, (t + 1) * n_rows // nthreads
        while r < stop:
            end = run_stop(r, stop, group_rows)
            q = r // group_rows
            if x.shape[1] >= WIDE_ROW:
                dx_walk(dy, x, gate, r, end, GRAD_STREAMS[1], mean[q], g[q], h[q], k[q], dx)
            else:
                dx_walk(dy, x, gate, r, end, GRAD_STREAMS[0], mean[q], g[q], h[q], k[q], dx)
            r = end


def _rows_plan(x):
    n_outer, nchan, n_inner = x.shape
    return thread_plan(2 * x.size, n_outer * nchan * ((n_inner + BLOCK - 1) // BLOCK))


def _columns_plan(x):
    return thread_plan(2 * x.size, x.shape[0])


def _plane(a):
    return None if a is None else a[:, :, 0]


def _group_rows(x, group_rows):
    """(the kernels' group_rows, widen's): None (one group) is all rows."""
    return (max(x.shape[0], 1), None) if group_rows is None else (group_rows, group_rows)


def backward_sums(dy, x, mean, gate=None, dres=None, group_rows=None):
    """(sum(g), sum(g * (x - mean))) of 3-D views per (group, channel), float64 groups * C
    values each (group-major), as ``mean``, per group of ``group_rows`` outer rows (None:
    one group); g = dy through the ``gate`` (3-D view or None), written into ``dres`` (3-D
    view or None)."""
    rows, grouping = _group_rows(x, group_rows)
    nchan = x.shape[1]
    mean = mean.reshape(-1, nchan)
    if x.shape[2] > 1:
        nthreads, parallel = _rows_plan(x)
        sums = sums_rows(dy, x, mean, gate, dres, rows, nthreads, parallel=parallel)
        return sums[:, 0].ravel(), sums[:, 1].ravel()
    groups = mean.shape[0]
    k, (dyw, xw, gw, rw), rest = widen(*(_plane(a) for a in (dy, x, gate, dres)),
                                       group_rows=grouping)
    nthreads, parallel = _columns_plan(xw)
    sums = sums_columns(dyw, xw, tiled(mean, k), gw, rw, max(rows // k, 1), nthreads,
                        parallel=parallel)
    sums = sums.reshape(groups, 2, k, nchan).sum(axis=2)
    if rest:
        dyr, xr, gr, rr = rest
        sums[-1] += sums_columns(dyr, xr, mean[-1:], gr, rr, xr.shape[0], 1, parallel=False)[0]
    return sums[:, 0].ravel(), sums[:, 1].ravel()


def grad_input(dy, x, mean, g, h, k, dx, gate=None, group_rows=None):
    """dx = G*g + H*(x - mean) + K over 3-D views (g: dy through the ``gate``, 3-D view or
    None), coefficients per (group, channel), groups * C values, in the working dtype, per
    group of ``group_rows`` outer rows (None: one group)."""
    rows, grouping = _group_rows(x, group_rows)
    mean, g, h, k = (a.reshape(-1, x.shape[1]) for a in (mean, g, h, k))
    if x.shape[2] > 1:
        nthreads, parallel = _rows_plan(x)
        dx_rows(dy, x, gate, mean, g, h, k, dx, rows, nthreads, parallel=parallel)
        return
    copies, wide_, rest = widen(*(_plane(a) for a in (dy, x, gate, dx)), group_rows=grouping)
    coeffs = [tiled(a, copies) for a in (mean, g, h, k)]
    nthreads, parallel = _columns_plan(wide_[1])
    dx_columns(*wide_[:3], *coeffs, wide_[3], max(rows // copies, 1), nthreads,
               parallel=parallel)
    if rest:
        dx_columns(*rest[:3], *(a[-1:] for a in (mean, g, h, k)), rest[3], rest[1].shape[0], 1,
                   parallel=False)
