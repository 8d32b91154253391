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
residual's gradient, which the dx pass may then read as its dy).
"""
import numba
import numpy as np
from numba import prange

from .. import _math
from ._jit import helper, kernel, thread_plan
from ._blocks import (BLOCK, GRAD_STREAMS, SUMS_STREAMS, WIDE_ROW, row_block, short_rows,
                      stream_split, tiled, widen)
from .elements import gated, part, store, store_if, wide
from .moments import CHUNK, COLUMN_BLOCK_SWEEPS, STRIDED_CHUNK


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


@kernel
def total_sums(partial):
    """Per-channel (sum(dy), sum(dy * (x - mean))) of (P, 4, C) double-double sums, added
    in double-double (a plain sum of the parts' hi would round as often as P)."""
    total = np.zeros((4, partial.shape[2]))
    for p in range(partial.shape[0]):
        for c in range(partial.shape[2]):
            add_sums(total, c, partial[p, DY_HI, c], partial[p, DXM_HI, c])
            total[DY_LO, c] += partial[p, DY_LO, c]
            total[DXM_LO, c] += partial[p, DXM_LO, c]
    return total[DY_HI] + total[DY_LO], total[DXM_HI] + total[DXM_LO]


@numba.njit(fastmath=False, cache=False)
def add_block(sums, s_dy, s_dxm):
    """Add a block's per-column sums into the double-double sums: a loop of its own, compiled
    without fastmath (elementwise, it vectorizes without; inside the fastmath kernel it did
    not, and cost 15% of a channels-last float32 pass)."""
    for c in range(s_dy.shape[0]):
        add_sums(sums, c, s_dy[c], s_dxm[c])


@helper
def sums_items(dy, x, mean, gate, dres, first, last, sums):
    """Add sum(g) and sum(g * (x - mean)) of row items first:last into the (4, C)
    double-double ``sums``, CHUNK (strided: STRIDED_CHUNK) values per plain sum."""
    n_outer, nchan, n_inner = x.shape
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    step = CHUNK if x.strides[2] == x.itemsize and dy.strides[2] == dy.itemsize \
        else STRIDED_CHUNK
    for item in range(first, last):
        o, c, start, stop = row_block(item, nchan, blocks_per_row, n_inner)
        for lo in range(start, stop, step):
            hi = min(stop, lo + step)
            s_dy, s_dxm = chunk_sums(dy[o, c, lo:hi], x[o, c, lo:hi], part(gate, o, c, lo, hi),
                                     part(dres, o, c, lo, hi), mean[c])
            add_sums(sums, c, s_dy, s_dxm)


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


@kernel
def sums_rows(dy, x, mean, gate, dres, nthreads):
    n_outer, nchan, n_inner = x.shape
    n_items = n_outer * nchan * ((n_inner + BLOCK - 1) // BLOCK)
    partial = np.zeros((nthreads, 4, nchan))
    for t in prange(nthreads):
        sums_items(dy, x, mean, gate, dres, t * n_items // nthreads,
                   (t + 1) * n_items // nthreads, partial[t])
    return partial


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
def sums_walk(dy, x, gate, dres, t, nthreads, n_streams, mean, s_dy, s_dxm, sums):
    """Thread t's rows as n_streams lockstep streams (``_blocks.stream_split``), in blocks of
    COLUMN_BLOCK_SWEEPS sweeps whose sums go into the double-double ``sums``."""
    first, step, stop = stream_split(t, nthreads, x.shape[0], n_streams)
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
def sums_share(dy, x, mean, gate, dres, t, nthreads, sums):
    """Thread t's sums over channels-last rows into the (4, C) double-double ``sums``."""
    nchan = x.shape[1]
    # The thread's own accumulators: fresh arrays, so the compiler knows that
    # nothing else writes them and vectorizes the sweep without alias checks.
    s_dy = np.zeros(nchan)
    s_dxm = np.zeros(nchan)
    if nchan >= WIDE_ROW:  # each call with its constant: the sweep's loop unrolls
        sums_walk(dy, x, gate, dres, t, nthreads, SUMS_STREAMS[1], mean, s_dy, s_dxm, sums)
    else:
        sums_walk(dy, x, gate, dres, t, nthreads, SUMS_STREAMS[0], mean, s_dy, s_dxm, sums)


@kernel
def sums_columns(dy, x, mean, gate, dres, nthreads):
    """Per-thread double-double sums over channels-last rows."""
    partial = np.zeros((nthreads, 4, x.shape[1]))
    for t in prange(nthreads):
        sums_share(dy, x, mean, gate, dres, t, nthreads, partial[t])
    return partial


@helper
def dx_value(dy, x, gate, i, m, gc, hc, kc):
    return gc * gated(wide(dy[i]), gate, i) + hc * (wide(x[i]) - m) + kc


@helper
def dx_items(dy, x, gate, mean, g, h, k, dx, first, last):
    """dx over row items first:last."""
    n_outer, nchan, n_inner = x.shape
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    for item in range(first, last):
        o, c, start, stop = row_block(item, nchan, blocks_per_row, n_inner)
        gy = dy[o, c, start:stop]
        v = x[o, c, start:stop]
        open_ = part(gate, o, c, start, stop)
        out = dx[o, c, start:stop]
        m, gc, hc, kc = mean[c], g[c], h[c], k[c]
        for i in range(gy.shape[0]):
            store(out, i, dx_value(gy, v, open_, i, m, gc, hc, kc))


@kernel
def dx_rows(dy, x, gate, mean, g, h, k, dx, nthreads):
    n_outer, nchan, n_inner = x.shape
    n_items = n_outer * nchan * ((n_inner + BLOCK - 1) // BLOCK)
    for t in prange(nthreads):
        dx_items(dy, x, gate, mean, g, h, k, dx, t * n_items // nthreads,
                 (t + 1) * n_items // nthreads)


@helper
def dx_sweep(dy, x, gate, r, step, n_streams, mean, g, h, k, dx):
    """dx = G*g + H*(x - mean) + K on rows r, r + step, ... (n_streams rows), one sweep."""
    for c in range(mean.shape[0]):
        m, gc, hc, kc = mean[c], g[c], h[c], k[c]
        for s in range(n_streams):
            i = (r + s * step, c)
            store(dx, i, dx_value(dy, x, gate, i, m, gc, hc, kc))


@helper
def dx_walk(dy, x, gate, t, nthreads, n_streams, mean, g, h, k, dx):
    """Thread t's rows as n_streams lockstep streams (``_blocks.stream_split``)."""
    first, step, stop = stream_split(t, nthreads, x.shape[0], n_streams)
    for r in range(first, first + step):
        dx_sweep(dy, x, gate, r, step, n_streams, mean, g, h, k, dx)
    for r in range(first + n_streams * step, stop):
        dx_sweep(dy, x, gate, r, 0, 1, mean, g, h, k, dx)


@helper
def dx_share(dy, x, gate, mean, g, h, k, dx, t, nthreads):
    """Thread t's share of dx over channels-last rows."""
    if x.shape[1] >= WIDE_ROW:
        dx_walk(dy, x, gate, t, nthreads, GRAD_STREAMS[1], mean, g, h, k, dx)
    else:
        dx_walk(dy, x, gate, t, nthreads, GRAD_STREAMS[0], mean, g, h, k, dx)


@kernel
def dx_columns(dy, x, gate, mean, g, h, k, dx, nthreads):
    """dx over channels-last rows."""
    for t in prange(nthreads):
        dx_share(dy, x, gate, mean, g, h, k, dx, t, nthreads)


def _rows_plan(x):
    n_outer, nchan, n_inner = x.shape
    return thread_plan(2 * x.size, n_outer * nchan * ((n_inner + BLOCK - 1) // BLOCK))


def _columns_plan(x):
    return thread_plan(2 * x.size, x.shape[0])


def _plane(a):
    return None if a is None else a[:, :, 0]


def _columns(arrays, *vectors):
    """``(n_inner, planes, vectors)``: 3-D views read as channels-last columns (``widen``'s
    2-D planes; short rows as ``short_rows``' planes, the per-channel vectors repeated per
    row element), or None where they are read as rows."""
    short = short_rows(*arrays)
    if short is not None:
        n_inner, planes = short
        return n_inner, planes, [np.repeat(v, n_inner) for v in vectors]
    if arrays[0].shape[2] > 1:
        return None
    return 1, tuple(_plane(a) for a in arrays), list(vectors)


def backward_sums(dy, x, mean, gate=None, dres=None):
    """(sum(g), sum(g * (x - mean))) per channel of 3-D views, float64[C] each; g = dy
    through the ``gate`` (3-D view or None), written into ``dres`` (3-D view or None)."""
    columns = _columns((dy, x, gate, dres), mean)
    if columns is None:
        nthreads, parallel = _rows_plan(x)
        return total_sums(sums_rows(dy, x, mean, gate, dres, nthreads, parallel=parallel),
                          parallel=False)
    n_inner, planes, (mean,) = columns
    ncols = planes[1].shape[1]
    k, (dyw, xw, gw, rw), rest = widen(*planes)
    nthreads, parallel = _columns_plan(xw)
    partial = sums_columns(dyw, xw, tiled(mean, k), gw, rw, nthreads, parallel=parallel)
    partial = partial.reshape(nthreads, 4, k, ncols).transpose(0, 2, 1, 3).reshape(-1, 4, ncols)
    if rest:
        dyr, xr, gr, rr = rest
        partial = np.concatenate([partial, sums_columns(dyr, xr, mean, gr, rr, 1,
                                                        parallel=False)])
    if n_inner > 1:  # a channel's columns: more parts of its sums
        partial = partial.reshape(-1, 4, ncols // n_inner, n_inner).transpose(0, 3, 1, 2) \
            .reshape(-1, 4, ncols // n_inner)
    return total_sums(partial, parallel=False)


def grad_input(dy, x, mean, g, h, k, dx, gate=None):
    """dx = G*g + H*(x - mean) + K over 3-D views (g: dy through the ``gate``, 3-D view or
    None), per-channel coefficients in the working dtype."""
    columns = _columns((dy, x, gate, dx), mean, g, h, k)
    if columns is None:
        nthreads, parallel = _rows_plan(x)
        dx_rows(dy, x, gate, mean, g, h, k, dx, nthreads, parallel=parallel)
        return
    _, planes, coeffs = columns
    copies, wide_, rest = widen(*planes)
    nthreads, parallel = _columns_plan(wide_[1])
    dx_columns(*wide_[:3], *(tiled(a, copies) for a in coeffs), wide_[3], nthreads,
               parallel=parallel)
    if rest:
        dx_columns(*rest[:3], *coeffs, rest[3], 1, parallel=False)
