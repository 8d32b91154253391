"""Batch-norm backward: one fused reduction pass, then one elementwise pass.

Reduction: per channel ``sum(dy)`` and ``sum(dy * (x - mean))`` in float64,
per-thread partial sums added serially at the end. Elementwise:
``dx = g[c] * dy + h[c] * (x - mean[c]) + k[c]`` with per-channel float64
coefficients, which covers training (batch statistics) and evaluation
(running statistics: h = k = 0) alike. With virtual batches the sums and the
coefficients are per (group, channel) (``_blocks``): index g * C + c.
"""
import numpy as np
from numba import prange

from ._jit import helper, kernel, thread_plan
from ._blocks import BLOCK, group_count, group_segment, group_size, row_block, tiled, widen


@kernel
def sums_rows(dy, x, mean, nthreads, group_rows):
    n_outer, nchan, n_inner = x.shape
    rows = group_size(group_rows, n_outer)
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    n_items = n_outer * nchan * blocks_per_row
    partial = np.zeros((nthreads, 2, mean.shape[0]))
    for t in prange(nthreads):
        for item in range(t * n_items // nthreads, (t + 1) * n_items // nthreads):
            o, c, start, stop = row_block(item, nchan, blocks_per_row, n_inner)
            s = o // rows * nchan + c  # the row's (group, channel)
            g = dy[o, c, start:stop]
            v = x[o, c, start:stop]
            m = mean[s]
            s_dy = 0.0
            s_dxm = 0.0
            for i in range(g.shape[0]):
                d = np.float64(g[i])
                s_dy += d
                s_dxm += d * (np.float64(v[i]) - m)
            partial[t, 0, s] += s_dy
            partial[t, 1, s] += s_dxm
    return partial.sum(axis=0)


@helper
def column_sums(dy, x, r0, r1, mean, s_dy, s_dxm):
    """Add sum(dy) and sum(dy * (x - mean)) of rows r0:r1 into per-column accumulators.

    Four rows of dy and x per sweep: the accumulators live in memory, so each
    is loaded and stored once per four elements (as ``moments.shifted_rows``).
    """
    width = mean.shape[0]
    r = r0
    while r + 4 <= r1:
        g0, g1, g2, g3 = dy[r], dy[r + 1], dy[r + 2], dy[r + 3]
        v0, v1, v2, v3 = x[r], x[r + 1], x[r + 2], x[r + 3]
        for j in range(width):
            m = mean[j]
            d0, d1 = np.float64(g0[j]), np.float64(g1[j])
            d2, d3 = np.float64(g2[j]), np.float64(g3[j])
            s_dy[j] += (d0 + d1) + (d2 + d3)
            s_dxm[j] += ((d0 * (np.float64(v0[j]) - m) + d1 * (np.float64(v1[j]) - m))
                         + (d2 * (np.float64(v2[j]) - m) + d3 * (np.float64(v3[j]) - m)))
        r += 4
    while r < r1:
        g0, v0 = dy[r], x[r]
        for j in range(width):
            d0 = np.float64(g0[j])
            s_dy[j] += d0
            s_dxm[j] += d0 * (np.float64(v0[j]) - mean[j])
        r += 1


@kernel
def sums_columns(dy, x, mean, nthreads, group_rows):
    """Each thread's rows, cut at the groups' ends: one sum per (group, channel)."""
    n_rows, nchan = x.shape
    rows = group_size(group_rows, n_rows)
    partial = np.zeros((nthreads, 2, mean.shape[0]))
    for t in prange(nthreads):
        r = t * n_rows // nthreads
        end = (t + 1) * n_rows // nthreads
        while r < end:
            s, stop = group_segment(r, end, rows, nchan)
            column_sums(dy, x, r, stop, mean[s:s + nchan], partial[t, 0, s:s + nchan],
                        partial[t, 1, s:s + nchan])
            r = stop
    return partial.sum(axis=0)


@kernel
def dx_rows(dy, x, mean, g, h, k, dx, nthreads, group_rows):
    n_outer, nchan, n_inner = x.shape
    rows = group_size(group_rows, n_outer)
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    n_items = n_outer * nchan * blocks_per_row
    for t in prange(nthreads):
        for item in range(t * n_items // nthreads, (t + 1) * n_items // nthreads):
            o, c, start, stop = row_block(item, nchan, blocks_per_row, n_inner)
            s = o // rows * nchan + c
            gy = dy[o, c, start:stop]
            v = x[o, c, start:stop]
            out = dx[o, c, start:stop]
            m, gc, hc, kc = mean[s], g[s], h[s], k[s]
            for i in range(gy.shape[0]):
                out[i] = gc * np.float64(gy[i]) + hc * (np.float64(v[i]) - m) + kc


@kernel
def dx_columns(dy, x, mean, g, h, k, dx, nthreads, group_rows):
    n_rows, nchan = x.shape
    rows = group_size(group_rows, n_rows)
    for t in prange(nthreads):
        r = t * n_rows // nthreads
        end = (t + 1) * n_rows // nthreads
        while r < end:
            s, stop = group_segment(r, end, rows, nchan)
            m, gs, hs, ks = mean[s:s + nchan], g[s:s + nchan], h[s:s + nchan], k[s:s + nchan]
            for i in range(r, stop):
                gy = dy[i]
                v = x[i]
                out = dx[i]
                for c in range(nchan):
                    out[c] = gs[c] * np.float64(gy[c]) + hs[c] * (np.float64(v[c]) - m[c]) + ks[c]
            r = stop


def _rows_plan(x):
    n_outer, nchan, n_inner = x.shape
    return thread_plan(2 * x.size, n_outer * nchan * ((n_inner + BLOCK - 1) // BLOCK))


def _columns_plan(x):
    return thread_plan(2 * x.size, x.shape[0])


def backward_sums(dy, x, mean, group_rows=0):
    """(sum(dy), sum(dy * (x - mean))) of 3-D views, float64, per channel or per (group,
    channel) with virtual batches of ``group_rows`` outer rows (mean likewise)."""
    if x.shape[2] > 1:
        nthreads, parallel = _rows_plan(x)
        sums = sums_rows(dy, x, mean, nthreads, group_rows, parallel=parallel)
        return sums[0], sums[1]
    nchan = x.shape[1]
    k, (dyw, xw), rest = widen(dy[:, :, 0], x[:, :, 0], group_rows=group_rows)
    nthreads, parallel = _columns_plan(xw)
    wide = sums_columns(dyw, xw, tiled(mean, k, nchan)[:xw.shape[1] * group_count(
        group_rows // k, xw.shape[0])], nthreads, group_rows // k, parallel=parallel)
    sums = np.zeros((2, mean.shape[0]))
    folded = wide.reshape(2, -1, k, nchan).sum(axis=2).reshape(2, -1)
    sums[:, :folded.shape[1]] = folded  # a short last group may lie in the rest alone
    if rest:  # the last group's
        sums[:, -nchan:] += sums_columns(*rest, mean[-nchan:], 1, 0, parallel=False)
    return sums[0], sums[1]


def grad_input(dy, x, mean, g, h, k, dx, group_rows=0):
    """dx = g*dy + h*(x - mean) + k over 3-D views, float64 coefficients per channel or per
    (group, channel) with virtual batches of ``group_rows`` outer rows."""
    if x.shape[2] > 1:
        nthreads, parallel = _rows_plan(x)
        dx_rows(dy, x, mean, g, h, k, dx, nthreads, group_rows, parallel=parallel)
        return
    nchan = x.shape[1]
    copies, wide, rest = widen(dy[:, :, 0], x[:, :, 0], dx[:, :, 0], group_rows=group_rows)
    coeffs = [tiled(a, copies, nchan) for a in (mean, g, h, k)]
    nthreads, parallel = _columns_plan(wide[1])
    dx_columns(*wide[:2], *coeffs, wide[2], nthreads, group_rows // copies, parallel=parallel)
    if rest:  # the last group's
        dx_columns(*rest[:2], *(a[-nchan:] for a in (mean, g, h, k)), rest[2], 1, 0,
                   parallel=False)
