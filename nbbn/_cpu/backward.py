"""Batch-norm backward: one fused reduction pass, then one elementwise pass.

Reduction: per channel ``sum(dy)`` and ``sum(dy * (x - mean))`` in float64,
as the statistics are summed (``moments.py``): vectorized loops over chunks of
CHUNK values (a row) or COLUMN_BLOCK_SWEEPS sweeps (channels-last), whose sums
go into per-thread double-doubles (TwoSum), so rounding stays inside short
chunks; the threads' double-doubles are added at the end. Elementwise:
``dx = g[c] * dy + h[c] * (x - mean[c]) + k[c]`` with per-channel float64
coefficients, which covers training (batch statistics) and evaluation
(running statistics: h = k = 0) alike.
"""
import numba
import numpy as np
from numba import prange

from .. import _math
from ._jit import helper, kernel, thread_plan
from ._blocks import (BLOCK, GRAD_STREAMS, SUMS_STREAMS, WIDE_ROW, row_block, stream_split,
                      tiled, widen)
from .moments import CHUNK, COLUMN_BLOCK_SWEEPS, STRIDED_CHUNK

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
def chunk_sums(g, v, m):
    """(sum(g), sum(g * (v - m))) in float64: one vectorized loop."""
    s_dy = 0.0
    s_dxm = 0.0
    for i in range(g.shape[0]):
        d = np.float64(g[i])
        s_dy += d
        s_dxm += d * (np.float64(v[i]) - m)
    return s_dy, s_dxm


@kernel
def sums_rows(dy, x, mean, nthreads):
    n_outer, nchan, n_inner = x.shape
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    n_items = n_outer * nchan * blocks_per_row
    step = CHUNK if x.strides[2] == x.itemsize and dy.strides[2] == dy.itemsize \
        else STRIDED_CHUNK
    partial = np.zeros((nthreads, 4, nchan))
    for t in prange(nthreads):
        for item in range(t * n_items // nthreads, (t + 1) * n_items // nthreads):
            o, c, start, stop = row_block(item, nchan, blocks_per_row, n_inner)
            for first in range(start, stop, step):
                last = min(stop, first + step)
                s_dy, s_dxm = chunk_sums(dy[o, c, first:last], x[o, c, first:last], mean[c])
                add_sums(partial[t], c, s_dy, s_dxm)
    return partial


@helper
def sums_sweep(dy, x, r, step, n_streams, mean, s_dy, s_dxm):
    """Add sum(dy) and sum(dy * (x - mean)) of rows r, r + step, ... (n_streams rows) into
    per-column accumulators: one sweep, the rows' terms added in registers first."""
    for c in range(mean.shape[0]):
        m = mean[c]
        a = np.float64(dy[r, c])
        b = a * (np.float64(x[r, c]) - m)
        for s in range(1, n_streams):
            d = np.float64(dy[r + s * step, c])
            a += d
            b += d * (np.float64(x[r + s * step, c]) - m)
        s_dy[c] += a
        s_dxm[c] += b


@helper
def sums_walk(dy, x, t, nthreads, n_streams, mean, s_dy, s_dxm, sums):
    """Thread t's rows as n_streams lockstep streams (``_blocks.stream_split``), in blocks of
    COLUMN_BLOCK_SWEEPS sweeps whose sums go into the double-double ``sums``."""
    first, step, stop = stream_split(t, nthreads, x.shape[0], n_streams)
    for r0 in range(first, first + step, COLUMN_BLOCK_SWEEPS):
        s_dy[:] = 0.0
        s_dxm[:] = 0.0
        for r in range(r0, min(first + step, r0 + COLUMN_BLOCK_SWEEPS)):
            sums_sweep(dy, x, r, step, n_streams, mean, s_dy, s_dxm)
        add_block(sums, s_dy, s_dxm)
    s_dy[:] = 0.0
    s_dxm[:] = 0.0
    for r in range(first + n_streams * step, stop):
        sums_sweep(dy, x, r, 0, 1, mean, s_dy, s_dxm)
    for c in range(mean.shape[0]):
        add_sums(sums, c, s_dy[c], s_dxm[c])


@kernel
def sums_columns(dy, x, mean, nthreads):
    """Per-thread double-double sums over channels-last rows."""
    nchan = x.shape[1]
    partial = np.zeros((nthreads, 4, nchan))
    for t in prange(nthreads):
        # The thread's own accumulators: fresh arrays, so the compiler knows that
        # nothing else writes them and vectorizes the sweep without alias checks.
        s_dy = np.zeros(nchan)
        s_dxm = np.zeros(nchan)
        if nchan >= WIDE_ROW:
            sums_walk(dy, x, t, nthreads, SUMS_STREAMS[1], mean, s_dy, s_dxm, partial[t])
        else:
            sums_walk(dy, x, t, nthreads, SUMS_STREAMS[0], mean, s_dy, s_dxm, partial[t])
    return partial


@kernel
def dx_rows(dy, x, mean, g, h, k, dx, nthreads):
    n_outer, nchan, n_inner = x.shape
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    n_items = n_outer * nchan * blocks_per_row
    for t in prange(nthreads):
        for item in range(t * n_items // nthreads, (t + 1) * n_items // nthreads):
            o, c, start, stop = row_block(item, nchan, blocks_per_row, n_inner)
            gy = dy[o, c, start:stop]
            v = x[o, c, start:stop]
            out = dx[o, c, start:stop]
            m, gc, hc, kc = mean[c], g[c], h[c], k[c]
            for i in range(gy.shape[0]):
                out[i] = gc * np.float64(gy[i]) + hc * (np.float64(v[i]) - m) + kc


@helper
def dx_sweep(dy, x, r, step, n_streams, mean, g, h, k, dx):
    """dx = g*dy + h*(x - mean) + k on rows r, r + step, ... (n_streams rows), one sweep."""
    for c in range(mean.shape[0]):
        m, gc, hc, kc = mean[c], g[c], h[c], k[c]
        for s in range(n_streams):
            i = r + s * step
            dx[i, c] = gc * np.float64(dy[i, c]) + hc * (np.float64(x[i, c]) - m) + kc


@helper
def dx_walk(dy, x, t, nthreads, n_streams, mean, g, h, k, dx):
    """Thread t's rows as n_streams lockstep streams (``_blocks.stream_split``)."""
    first, step, stop = stream_split(t, nthreads, x.shape[0], n_streams)
    for r in range(first, first + step):
        dx_sweep(dy, x, r, step, n_streams, mean, g, h, k, dx)
    for r in range(first + n_streams * step, stop):
        dx_sweep(dy, x, r, 0, 1, mean, g, h, k, dx)


@kernel
def dx_columns(dy, x, mean, g, h, k, dx, nthreads):
    """dx over channels-last rows."""
    for t in prange(nthreads):
        if x.shape[1] >= WIDE_ROW:
            dx_walk(dy, x, t, nthreads, GRAD_STREAMS[1], mean, g, h, k, dx)
        else:
            dx_walk(dy, x, t, nthreads, GRAD_STREAMS[0], mean, g, h, k, dx)


def _rows_plan(x):
    n_outer, nchan, n_inner = x.shape
    return thread_plan(2 * x.size, n_outer * nchan * ((n_inner + BLOCK - 1) // BLOCK))


def _columns_plan(x):
    return thread_plan(2 * x.size, x.shape[0])


def backward_sums(dy, x, mean):
    """(sum(dy), sum(dy * (x - mean))) per channel of 3-D views, float64[C] each."""
    if x.shape[2] > 1:
        nthreads, parallel = _rows_plan(x)
        return total_sums(sums_rows(dy, x, mean, nthreads, parallel=parallel), parallel=False)
    nchan = x.shape[1]
    k, (dyw, xw), rest = widen(dy[:, :, 0], x[:, :, 0])
    nthreads, parallel = _columns_plan(xw)
    partial = sums_columns(dyw, xw, tiled(mean, k), nthreads, parallel=parallel)
    partial = partial.reshape(nthreads, 4, k, nchan).transpose(0, 2, 1, 3).reshape(-1, 4, nchan)
    if rest:
        partial = np.concatenate([partial, sums_columns(*rest, mean, 1, parallel=False)])
    return total_sums(partial, parallel=False)


def grad_input(dy, x, mean, g, h, k, dx):
    """dx = g*dy + h*(x - mean) + k over 3-D views, per-channel float64 coefficients."""
    if x.shape[2] > 1:
        nthreads, parallel = _rows_plan(x)
        dx_rows(dy, x, mean, g, h, k, dx, nthreads, parallel=parallel)
        return
    copies, wide, rest = widen(dy[:, :, 0], x[:, :, 0], dx[:, :, 0])
    coeffs = [tiled(a, copies) for a in (mean, g, h, k)]
    nthreads, parallel = _columns_plan(wide[1])
    dx_columns(*wide[:2], *coeffs, wide[2], nthreads, parallel=parallel)
    if rest:
        dx_columns(*rest[:2], mean, g, h, k, rest[2], 1, parallel=False)
