"""The elementwise pass of batch norm: y = x * scale[c] + shift[c], in float64."""
import numpy as np
from numba import prange

from ._jit import helper, kernel, thread_plan
from ._blocks import (AFFINE_STREAMS, BLOCK, row_block, stream_split, tiled,
                      widen)


@kernel
def affine_rows(x, scale, shift, y, nthreads):
    """y[o, c, i] = x[o, c, i] * scale[c] + shift[c], rows split into BLOCK-sized items."""
    n_outer, nchan, n_inner = x.shape
    blocks_per_row = (n_inner + BLOCK - 1) // BLOCK
    n_items = n_outer * nchan * blocks_per_row
    for t in prange(nthreads):
        for item in range(t * n_items // nthreads, (t + 1) * n_items // nthreads):
            o, c, start, stop = row_block(item, nchan, blocks_per_row, n_inner)
            src = x[o, c, start:stop]
            dst = y[o, c, start:stop]
            a = scale[c]
            b = shift[c]
            for i in range(src.shape[0]):
                dst[i] = np.float64(src[i]) * a + b


@helper
def affine_sweep(x, r, step, n_streams, scale, shift, y):
    """y = x * scale + shift on rows r, r + step, ... (n_streams rows), one sweep."""
    for c in range(scale.shape[0]):
        a = scale[c]
        b = shift[c]
        for s in range(n_streams):
            y[r + s * step, c] = np.float64(x[r + s * step, c]) * a + b


@kernel
def affine_columns(x, scale, shift, y, nthreads):
    """y[r, c] = x[r, c] * scale[c] + shift[c] for channels-last rows (``stream_split``)."""
    for t in prange(nthreads):
        first, step, stop = stream_split(t, nthreads, x.shape[0], AFFINE_STREAMS)
        for r in range(first, first + step):
            affine_sweep(x, r, step, AFFINE_STREAMS, scale, shift, y)
        for r in range(first + AFFINE_STREAMS * step, stop):
            affine_sweep(x, r, 0, 1, scale, shift, y)


def _affine_columns(x, scale, shift, y):
    nthreads, parallel = thread_plan(x.size, x.shape[0])
    affine_columns(x, scale, shift, y, nthreads, parallel=parallel)


def affine(x, scale, shift, y):
    """y = x * scale + shift over 3-D (outer, C, inner) views; scale/shift float64[C]."""
    n_outer, nchan, n_inner = x.shape
    if n_inner > 1:
        items = n_outer * nchan * ((n_inner + BLOCK - 1) // BLOCK)
        nthreads, parallel = thread_plan(x.size, items)
        affine_rows(x, scale, shift, y, nthreads, parallel=parallel)
        return
    k, (xw, yw), rest = widen(x[:, :, 0], y[:, :, 0])
    _affine_columns(xw, tiled(scale, k), tiled(shift, k), yw)
    if rest:
        _affine_columns(*rest[:1], scale, shift, *rest[1:])
