"""Batch-norm backward: one fused reduction pass, then one elementwise pass.

Reduction: per channel ``sum(dy)`` and ``sum(dy * (x - mean))`` in float64,
per-thread partial sums added serially at the end. Elementwise:
``dx = g[c] * dy + h[c] * (x - mean[c]) + k[c]`` with per-channel float64
coefficients, which covers training (batch statistics) and evaluation
(running statistics: h = k = 0) alike.
"""
import numpy as np
from numba import prange

from ._jit import kernel, thread_plan
from ._blocks import BLOCK, widen


@kernel
def sums_rows(dy, x, mean, nthreads):
    n_outer, nchan, n_inner = x.shape
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    n_items = n_outer * nchan * blocks_per_row
    partial = np.zeros((nthreads, 2, nchan))
    for t in prange(nthreads):
        for item in range(t * n_items // nthreads, (t + 1) * n_items // nthreads):
            row, blk = divmod(item, blocks_per_row)
            o, c = divmod(row, nchan)
            start = blk * BLOCK
            g = dy[o, c, start:min(n_inner, start + BLOCK)]
            v = x[o, c, start:min(n_inner, start + BLOCK)]
            m = mean[c]
            s_dy = 0.0
            s_dxm = 0.0
            for i in range(g.shape[0]):
                d = np.float64(g[i])
                s_dy += d
                s_dxm += d * (np.float64(v[i]) - m)
            partial[t, 0, c] += s_dy
            partial[t, 1, c] += s_dxm
    return partial.sum(axis=0)


@kernel
def sums_columns(dy, x, mean, nthreads):
    n_rows, nchan = x.shape
    partial = np.zeros((nthreads, 2, nchan))
    for t in prange(nthreads):
        s_dy = partial[t, 0]
        s_dxm = partial[t, 1]
        for r in range(t * n_rows // nthreads, (t + 1) * n_rows // nthreads):
            g = dy[r]
            v = x[r]
            for c in range(nchan):
                d = np.float64(g[c])
                s_dy[c] += d
                s_dxm[c] += d * (np.float64(v[c]) - mean[c])
    return partial.sum(axis=0)


@kernel
def dx_rows(dy, x, mean, g, h, k, dx, nthreads):
    n_outer, nchan, n_inner = x.shape
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    n_items = n_outer * nchan * blocks_per_row
    for t in prange(nthreads):
        for item in range(t * n_items // nthreads, (t + 1) * n_items // nthreads):
            row, blk = divmod(item, blocks_per_row)
            o, c = divmod(row, nchan)
            start = blk * BLOCK
            stop = min(n_inner, start + BLOCK)
            gy = dy[o, c, start:stop]
            v = x[o, c, start:stop]
            out = dx[o, c, start:stop]
            m, gc, hc, kc = mean[c], g[c], h[c], k[c]
            for i in range(gy.shape[0]):
                out[i] = gc * np.float64(gy[i]) + hc * (np.float64(v[i]) - m) + kc


@kernel
def dx_columns(dy, x, mean, g, h, k, dx, nthreads):
    n_rows, nchan = x.shape
    for t in prange(nthreads):
        for r in range(t * n_rows // nthreads, (t + 1) * n_rows // nthreads):
            gy = dy[r]
            v = x[r]
            out = dx[r]
            for c in range(nchan):
                out[c] = g[c] * np.float64(gy[c]) + h[c] * (np.float64(v[c]) - mean[c]) + k[c]


def _rows_plan(x):
    n_outer, nchan, n_inner = x.shape
    return thread_plan(2 * x.size, n_outer * nchan * ((n_inner + BLOCK - 1) // BLOCK))


def _columns_plan(x):
    return thread_plan(2 * x.size, x.shape[0])


def backward_sums(dy, x, mean):
    """(sum(dy), sum(dy * (x - mean))) per channel of 3-D views, float64[C] each."""
    if x.shape[2] > 1:
        nthreads, parallel = _rows_plan(x)
        sums = sums_rows(dy, x, mean, nthreads, parallel=parallel)
        return sums[0], sums[1]
    nchan = x.shape[1]
    k, (dyw, xw), rest = widen(dy[:, :, 0], x[:, :, 0])
    nthreads, parallel = _columns_plan(xw)
    sums = sums_columns(dyw, xw, np.tile(mean, k), nthreads, parallel=parallel)
    sums = sums.reshape(2, k, nchan).sum(axis=1)
    if rest:
        sums += sums_columns(*rest, mean, 1, parallel=False)
    return sums[0], sums[1]


def grad_input(dy, x, mean, g, h, k, dx):
    """dx = g*dy + h*(x - mean) + k over 3-D views, per-channel float64 coefficients."""
    if x.shape[2] > 1:
        nthreads, parallel = _rows_plan(x)
        dx_rows(dy, x, mean, g, h, k, dx, nthreads, parallel=parallel)
        return
    copies, wide, rest = widen(dy[:, :, 0], x[:, :, 0], dx[:, :, 0])
    coeffs = [np.tile(a, copies) for a in (mean, g, h, k)]
    nthreads, parallel = _columns_plan(wide[1])
    dx_columns(*wide[:2], *coeffs, wide[2], nthreads, parallel=parallel)
    if rest:
        dx_columns(*rest[:2], mean, g, h, k, rest[2], 1, parallel=False)
