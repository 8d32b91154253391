"""The elementwise pass of batch norm: y = act(x * scale[c] + shift[c] + residual).

Computed in ``elements.work_dtype`` (the coefficients come in it). The epilogue's
arrays are optional (None: absent, pruned at compile time): a residual added before
the activation (``relu``: None or True), and what a layer keeps for its backward, x's
values (``copy``) and the ReLU gate ``y > 0`` (``mask``, uint8), written in this pass
while x is read anyway.
"""
import numpy as np
from numba import prange

from ._jit import helper, kernel, thread_plan
from ._blocks import (AFFINE_STREAMS, BLOCK, row_block, short_rows, stream_split, tiled,
                      widen)
from .elements import epilogue, keep, part, store, wide


@helper
def affine_items(x, scale, shift, y, residual, relu, copy, mask, first, last):
    """The affine pass over row items first:last (BLOCK-sized pieces of the rows)."""
    n_outer, nchan, n_inner = x.shape
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    for item in range(first, last):
        o, c, start, stop = row_block(item, nchan, blocks_per_row, n_inner)
        src = x[o, c, start:stop]
        dst = y[o, c, start:stop]
        res = part(residual, o, c, start, stop)
        kept = part(copy, o, c, start, stop)
        gate = part(mask, o, c, start, stop)
        a = scale[c]
        b = shift[c]
        for i in range(src.shape[0]):
            v = epilogue(wide(src[i]) * a + b, res, i, relu)
            store(dst, i, v)
            keep(src, kept, gate, i, v, dst)


@kernel
def affine_rows(x, scale, shift, y, residual, relu, copy, mask, nthreads):
    """y[o, c, i] = act(x[o, c, i] * scale[c] + shift[c] + residual[o, c, i]), rows split
    into BLOCK-sized items."""
    n_outer, nchan, n_inner = x.shape
    n_items = n_outer * nchan * ((n_inner + BLOCK - 1) // BLOCK)
    for t in prange(nthreads):
        affine_items(x, scale, shift, y, residual, relu, copy, mask,
                     t * n_items // nthreads, (t + 1) * n_items // nthreads)


@helper
def affine_sweep(x, r, step, n_streams, scale, shift, y, residual, relu, copy, mask):
    """The affine pass on rows r, r + step, ... (n_streams rows), one sweep."""
    for c in range(scale.shape[0]):
        a = scale[c]
        b = shift[c]
        for s in range(n_streams):
            i = (r + s * step, c)
            v = epilogue(wide(x[i]) * a + b, residual, i, relu)
            store(y, i, v)
            keep(x, copy, mask, i, v, y)


@helper
def affine_stream_share(x, scale, shift, y, residual, relu, copy, mask, t, nthreads):
    """Thread t's share of channels-last rows x[r, c] (``stream_split``)."""
    first, step, stop = stream_split(t, nthreads, x.shape[0], AFFINE_STREAMS)
    for r in range(first, first + step):
        affine_sweep(x, r, step, AFFINE_STREAMS, scale, shift, y, residual, relu, copy, mask)
    for r in range(first + AFFINE_STREAMS * step, stop):
        affine_sweep(x, r, 0, 1, scale, shift, y, residual, relu, copy, mask)


@kernel
def affine_columns(x, scale, shift, y, residual, relu, copy, mask, nthreads):
    """The affine pass over channels-last rows x[r, c]."""
    for t in prange(nthreads):
        affine_stream_share(x, scale, shift, y, residual, relu, copy, mask, t, nthreads)


def _affine_columns(x, scale, shift, y, residual, relu, copy, mask):
    nthreads, parallel = thread_plan(x.size, x.shape[0])
    affine_columns(x, scale, shift, y, residual, relu, copy, mask, nthreads, parallel=parallel)


def _plane(a):
    return None if a is None else a[:, :, 0]


def affine(x, scale, shift, y, residual=None, relu=None, copy=None, mask=None):
    """The affine pass over 3-D (outer, C, inner) views; scale/shift per channel in the
    working dtype; residual/copy/mask: 3-D views or None, relu: None or True."""
    arrays = (x, y, residual, copy, mask)
    short = short_rows(*arrays)
    if short is not None:  # columns of channel c's values, repeated per row element
        n_inner, planes = short
        scale, shift = np.repeat(scale, n_inner), np.repeat(shift, n_inner)
    elif x.shape[2] > 1:
        n_outer, nchan, n_inner = x.shape
        items = n_outer * nchan * ((n_inner + BLOCK - 1) // BLOCK)
        nthreads, parallel = thread_plan(x.size, items)
        affine_rows(x, scale, shift, y, residual, relu, copy, mask, nthreads,
                    parallel=parallel)
        return
    else:
        planes = tuple(_plane(a) for a in arrays)
    k, (xw, yw, rw, cw, mw), rest = widen(*planes)
    _affine_columns(xw, tiled(scale, k), tiled(shift, k), yw, rw, relu, cw, mw)
    if rest:
        xr, yr, rr, cr, mr = rest
        _affine_columns(xr, scale, shift, yr, rr, relu, cr, mr)
