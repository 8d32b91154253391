"""The elementwise pass of batch norm: y = x * scale[c] + shift[c], in float64.

With virtual batches the coefficients are per (group, channel) (``_blocks``):
scale[g * C + c], g the row's group.
"""
import numpy as np
from numba import prange

from ._jit import kernel, thread_plan
from ._blocks import BLOCK, group_segment, group_size, row_block, tiled, widen


@kernel
def affine_rows(x, scale, shift, y, nthreads, group_rows):
    """y[o, c, i] = x[o, c, i] * scale[c] + shift[c], rows split into BLOCK-sized items."""
    n_outer, nchan, n_inner = x.shape
    rows = group_size(group_rows, n_outer)
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    n_items = n_outer * nchan * blocks_per_row
    for t in prange(nthreads):
        for item in range(t * n_items // nthreads, (t + 1) * n_items // nthreads):
            o, c, start, stop = row_block(item, nchan, blocks_per_row, n_inner)
            src = x[o, c, start:stop]
            dst = y[o, c, start:stop]
            a = scale[o // rows * nchan + c]
            b = shift[o // rows * nchan + c]
            for i in range(src.shape[0]):
                dst[i] = np.float64(src[i]) * a + b


@kernel
def affine_columns(x, scale, shift, y, nthreads, group_rows):
    """y[r, c] = x[r, c] * scale[c] + shift[c] for channels-last rows."""
    n_rows, nchan = x.shape
    rows = group_size(group_rows, n_rows)
    for t in prange(nthreads):
        r = t * n_rows // nthreads
        end = (t + 1) * n_rows // nthreads
        while r < end:
            s, stop = group_segment(r, end, rows, nchan)
            a = scale[s:s + nchan]
            b = shift[s:s + nchan]
            for i in range(r, stop):
                src = x[i]
                dst = y[i]
                for c in range(nchan):
                    dst[c] = np.float64(src[c]) * a[c] + b[c]
            r = stop


def _affine_columns(x, scale, shift, y, group_rows):
    nthreads, parallel = thread_plan(x.size, x.shape[0])
    affine_columns(x, scale, shift, y, nthreads, group_rows, parallel=parallel)


def affine(x, scale, shift, y, group_rows=0):
    """y = x * scale + shift over 3-D (outer, C, inner) views; scale/shift float64, per
    channel or per (group, channel) with virtual batches of ``group_rows`` outer rows."""
    n_outer, nchan, n_inner = x.shape
    if n_inner > 1:
        items = n_outer * nchan * ((n_inner + BLOCK - 1) // BLOCK)
        nthreads, parallel = thread_plan(x.size, items)
        affine_rows(x, scale, shift, y, nthreads, group_rows, parallel=parallel)
        return
    k, (xw, yw), rest = widen(x[:, :, 0], y[:, :, 0], group_rows=group_rows)
    _affine_columns(xw, tiled(scale, k, nchan), tiled(shift, k, nchan), yw, group_rows // k)
    if rest:  # the last group's
        _affine_columns(rest[0], scale[-nchan:], shift[-nchan:], rest[1], 0)
