"""The elementwise pass of batch norm: y = act(x * scale[g, c] + shift[g, c] + residual),
g the row's group (virtual batches; one group otherwise: see ``_blocks``).

Computed in ``elements.work_dtype`` (the coefficients come in it). The epilogue's
arrays are optional (None: absent, pruned at compile time): a residual added before
the activation (``relu``: None or True), and what a layer keeps for its backward, x's
values (``copy``) and the ReLU gate ``y > 0`` (``mask``, uint8), written in this pass
while x is read anyway.
"""
import numpy as np
from numba import prange

from ._jit import helper, kernel, share, thread_plan
from ._blocks import (AFFINE_STREAMS, next_block, row_block, row_items, run_stop, short_rows,
                      stream_step, tiled, widen)
from .elements import epilogue, keep, part, store, wide


@helper
def affine_items(x, scale, shift, y, residual, relu, copy, mask, group_rows, first, last):
    """The affine pass over row items first:last (BLOCK-sized pieces of the rows); scale and
    shift (groups, C), group o // group_rows."""
    n_outer, nchan, n_inner = x.shape
    o, c, start, stop = row_block(first, nchan, n_inner)
    for _ in range(first, last):
        src = x[o, c, start:stop]
        dst = y[o, c, start:stop]
        res = part(residual, o, c, start, stop)
        kept = part(copy, o, c, start, stop)
        gate = part(mask, o, c, start, stop)
        a = scale[o // group_rows, c]
        b = shift[o // group_rows, c]
        for i in range(src.shape[0]):
            v = epilogue(wide(src[i]) * a + b, res, i, relu)
            store(dst, i, v)
            keep(src, kept, gate, i, v, dst)
        o, c, start, stop = next_block(o, c, start, stop, nchan, n_inner)


@share
def affine_rows_share(x, scale, shift, y, residual, relu, copy, mask, group_rows, t, nthreads):
    """Thread t's share of ``affine_rows``: the t-th contiguous share of the row items."""
    n_outer, nchan, n_inner = x.shape
    n_items = row_items(x.shape)
    affine_items(x, scale, shift, y, residual, relu, copy, mask, group_rows,
                 t * n_items // nthreads, (t + 1) * n_items // nthreads)


@kernel
def affine_rows(x, scale, shift, y, residual, relu, copy, mask, group_rows, nthreads):
    """y[o, c, i] = act(x[o, c, i] * scale[g, c] + shift[g, c] + residual[o, c, i]), g =
    o // group_rows, rows split into BLOCK-sized items."""
    for t in prange(nthreads):
        affine_rows_share(x, scale, shift, y, residual, relu, copy, mask, group_rows,
                          np.int64(t), nthreads)


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


@share
def affine_columns_share(x, scale, shift, y, residual, relu, copy, mask, group_rows, t,
                         nthreads):
    """Thread t's share of channels-last rows x[r, c], in runs of one group (scale and shift
    (groups, C), group r // group_rows), each as lockstep streams (``_blocks``)."""
    n_rows = x.shape[0]
    r, stop = t * n_rows // nthreads, (t + 1) * n_rows // nthreads
    while r < stop:
        end = run_stop(r, stop, group_rows)
        a = scale[r // group_rows]
        b = shift[r // group_rows]
        step = stream_step(r, end, AFFINE_STREAMS)
        for q in range(r, r + step):
            affine_sweep(x, q, step, AFFINE_STREAMS, a, b, y, residual, relu, copy, mask)
        for q in range(r + AFFINE_STREAMS * step, end):
            affine_sweep(x, q, 0, 1, a, b, y, residual, relu, copy, mask)
        r = end


@kernel
def affine_columns(x, scale, shift, y, residual, relu, copy, mask, group_rows, nthreads):
    """The affine pass over channels-last rows x[r, c] (``affine_columns_share``)."""
    for t in prange(nthreads):
        affine_columns_share(x, scale, shift, y, residual, relu, copy, mask, group_rows,
                             np.int64(t), nthreads)


def _affine_columns(x, scale, shift, y, residual, relu, copy, mask, group_rows):
    nthreads, parallel = thread_plan(x.size, x.shape[0])
    affine_columns(x, scale, shift, y, residual, relu, copy, mask, group_rows, nthreads,
                   parallel=parallel)


def _plane(a):
    return None if a is None else a[:, :, 0]


def affine(x, scale, shift, y, residual=None, relu=None, copy=None, mask=None,
           group_rows=None):
    """The affine pass over 3-D (outer, C, inner) views; scale/shift per (group, channel),
    groups * C values (group-major), in the working dtype, per group of ``group_rows``
    outer rows (None: one group); residual/copy/mask: 3-D views or None, relu: None or
    True."""
    n_outer, nchan, n_inner = x.shape
    scale, shift = scale.reshape(-1, nchan), shift.reshape(-1, nchan)
    grouped = group_rows is not None
    group_rows = group_rows if grouped else max(n_outer, 1)
    arrays = (x, y, residual, copy, mask)
    short = None if grouped else short_rows(*arrays)
    if short is not None:  # columns of channel c's values, repeated per row element
        n_inner, planes = short
        scale, shift = np.repeat(scale, n_inner, axis=1), np.repeat(shift, n_inner, axis=1)
    elif n_inner > 1:
        items = row_items(x.shape)
        nthreads, parallel = thread_plan(x.size, items)
        affine_rows(x, scale, shift, y, residual, relu, copy, mask, group_rows, nthreads,
                    parallel=parallel)
        return
    else:
        planes = tuple(_plane(a) for a in arrays)
    k, (xw, yw, rw, cw, mw), rest = widen(*planes, group_rows=group_rows if grouped else None)
    _affine_columns(xw, tiled(scale, k), tiled(shift, k), yw, rw, relu, cw, mw,
                    max(group_rows // k, 1))
    if rest:
        xr, yr, rr, cr, mr = rest
        _affine_columns(xr, scale[-1:], shift[-1:], yr, rr, relu, cr, mr, xr.shape[0])
