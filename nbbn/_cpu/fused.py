"""Calls in one compiled call each: the statistics (``nbbn.mean/var/std/mean_var``), the
running-statistics update, and batch norm's statistics, coefficients, elementwise pass and
running-statistics update together.

Below the size where the kernels run in parallel, a call's time is mostly its Python
steps, so each of these does a whole forward, inference or backward. Batch norm's do at
every size, by as many threads as the separate kernels would take: the general path's
Python steps (the passes' launches, per-channel NumPy arithmetic) cost 35-110 us a call,
as much as the passes themselves on [256, 1024] on two threads. They run the separate
kernels' own helpers, split among the threads as the kernels split them
(``split_moments``, ``split_sums``; one thread: the whole array), and the coefficients'
``_math`` functions, so their results are those of the separate kernels, bit for bit.
``x`` is the 3-D (outer, C, inner) view, or for
channels-last data (inner == 1) its 2-D (rows, C) plane, as the separate kernels
read it. Each kernel returns False, having written nothing, where a statistic or a
coefficient is not finite: the general path then applies NumPy's rules (and warnings).
"""
import math

import numpy as np
from numba import prange, types
from numba.extending import overload

from .. import _math
from ._blocks import BLOCK
from ._jit import FASTMATH, helper, kernel
from .backward import (DXM_HI, DXM_LO, DY_HI, DY_LO, dx_items, dx_share, split_columns_sums,
                       split_rows_sums, sums_items, sums_share)
from .elements import store_if
from .ema import ema_update
from .moments import (FIELDS, M2, MEAN, checked, columns_state, rows_state,
                      split_columns_moments, split_rows_moments)
from .normalize import affine_items, affine_stream_share


# The forward's passes are functions of their own, called, not inlined: each compiles once
# per type of its own arguments, not once per signature of the kernels (each combination of
# None and array arguments: inlined, a cold compile of the forward took ~10 s; all of
# test_batchnorm.py 7.6 min, now 4.7). A call costs ~0.3 us, so the backward's passes (fewer
# signatures, and slower than PyTorch's at 8x16x8x8) stay inlined.
PASS = {"fastmath": FASTMATH}


@helper
def _items(x):
    """Row items (BLOCK-sized pieces of the rows) of a 3-D view."""
    return x.shape[0] * x.shape[1] * ((x.shape[2] + BLOCK - 1) // BLOCK)


def moments_all(x):
    """(state, finite): the (FIELDS, C) moments state of all of x (see ``moments``)."""


@overload(moments_all, jit_options=PASS)
def _moments_all(x):
    if x.ndim == 3:
        def rows(x):
            state = np.zeros((FIELDS, x.shape[1]))
            rows_state(x, 0, _items(x), state)
            return checked(state)
        return rows

    def columns(x):
        state = np.zeros((FIELDS, x.shape[1]))
        columns_state(x, 0, x.shape[0], state)
        return checked(state)
    return columns


def threads(nthreads):
    """The kernels' ``nthreads`` argument as a count: None (the small calls' serial builds,
    which then compile no code for splitting the work) is 1."""


@overload(threads, inline="always")
def _threads(nthreads):
    if isinstance(nthreads, types.NoneType):
        return lambda nthreads: 1
    return lambda nthreads: nthreads


def split_moments(x, nthreads):
    """(state, finite): ``moments_all``, its work split among ``nthreads`` threads as the
    separate kernels split it (``moments_rows``/``moments_columns``), so that a fused call
    of any size gives their results (None: one thread, compiled without the split)."""


@overload(split_moments, inline="always")
def _split_moments(x, nthreads):
    if isinstance(nthreads, types.NoneType):
        return lambda x, nthreads: moments_all(x)
    split = split_rows_moments if x.ndim == 3 else split_columns_moments

    def impl(x, nthreads):
        if nthreads == 1:
            return moments_all(x)
        states, finite = split(x, max(x.shape[0], 1), nthreads)
        return states[0], finite
    return impl


def affine_share(x, scale, shift, y, copy, t, nthreads):
    """y = x * scale[c] + shift[c] over thread t's share of x (of nthreads equal shares of
    its row items, or of its rows for a 2-D plane); x's values into ``copy`` (None: not).
    Elementwise: any split gives the same values."""


@overload(affine_share, jit_options=PASS)
def _affine_share(x, scale, shift, y, copy, t, nthreads):
    if x.ndim == 3:
        def rows(x, scale, shift, y, copy, t, nthreads):
            n = _items(x)
            affine_items(x, scale.reshape((1, scale.size)), shift.reshape((1, shift.size)), y,
                         None, None, copy, None, max(x.shape[0], 1), t * n // nthreads,
                         (t + 1) * n // nthreads)
        return rows
    return lambda x, scale, shift, y, copy, t, nthreads: affine_stream_share(
        x, scale.reshape((1, scale.size)), shift.reshape((1, shift.size)), y, None, None, copy,
        None, max(x.shape[0], 1), t, nthreads)


def sums_all(dy, x, mean):
    """(2, C) float64: sum(dy) and sum(dy * (x - mean)) per channel over all of x, each
    from double-double sums (as ``backward.backward_sums``)."""


@helper
def _totals(sums):
    """(2, C): (4, C) double-double sums, each pair added."""
    out = np.empty((2, sums.shape[1]))
    out[0] = sums[DY_HI] + sums[DY_LO]
    out[1] = sums[DXM_HI] + sums[DXM_LO]
    return out


@overload(sums_all, inline="always")
def _sums_all(dy, x, mean):
    if x.ndim == 3:
        def rows(dy, x, mean):
            sums = np.zeros((4, x.shape[1]))
            sums_items(dy, x, mean, None, None, 0, _items(x), sums)
            return _totals(sums)
        return rows

    def columns(dy, x, mean):
        sums = np.zeros((4, x.shape[1]))
        sums_share(dy, x, mean, None, None, 0, x.shape[0], sums, np.empty(x.shape[1]),
                   np.empty(x.shape[1]))
        return _totals(sums)
    return columns


def split_sums(dy, x, mean, nthreads):
    """``sums_all``, its work split among ``nthreads`` threads as ``sums_rows``/
    ``sums_columns`` split it."""


@overload(split_sums, inline="always")
def _split_sums(dy, x, mean, nthreads):
    if isinstance(nthreads, types.NoneType):
        return lambda dy, x, mean, nthreads: sums_all(dy, x, mean)
    split = split_rows_sums if x.ndim == 3 else split_columns_sums

    def impl(dy, x, mean, nthreads):
        if nthreads == 1:
            return sums_all(dy, x, mean)
        return _totals(split(dy, x, mean.reshape((1, mean.size)), None, None,
                             max(x.shape[0], 1), nthreads)[0])
    return impl


def dx_part(dy, x, mean, g, h, k, dx, t, nthreads):
    """dx = G * dy + H * (x - mean) + K over thread t's share of x (of nthreads equal shares
    of its row items, or rows of a 2-D plane; elementwise: any split gives the same)."""


@overload(dx_part, inline="always")
def _dx_part(dy, x, mean, g, h, k, dx, t, nthreads):
    if x.ndim == 3:
        def rows(dy, x, mean, g, h, k, dx, t, nthreads):
            n = _items(x)
            dx_items(dy, x, None, mean, g, h, k, dx, t * n // nthreads, (t + 1) * n // nthreads)
        return rows

    def columns(dy, x, mean, g, h, k, dx, t, nthreads):
        n = x.shape[0]
        dx_share(dy, x, None, mean, g, h, k, dx, t * n // nthreads, (t + 1) * n // nthreads)
    return columns


def value_or(a, c, default):
    """``a[c]`` as float64, or ``default`` where ``a`` is None (weight, bias)."""


@overload(value_or, inline="always")
def _value_or(a, c, default):
    if isinstance(a, types.NoneType):
        return lambda a, c, default: default
    return lambda a, c, default: np.float64(a[c])


@helper
def _extent(a):
    """The byte addresses [lo, hi) that array ``a`` (not empty) spans."""
    low = 0
    high = a.itemsize
    for d in range(a.ndim):
        step = (a.shape[d] - 1) * a.strides[d]
        low += min(step, 0)
        high += max(step, 0)
    return a.ctypes.data + low, a.ctypes.data + high


def apart(buffer, x):
    """Whether ``buffer`` (None: True) spans no byte of x's span: a buffer written in place
    shares no memory with the data (``np.may_share_memory``'s test)."""


@overload(apart)
def _apart(buffer, x):
    if isinstance(buffer, types.NoneType):
        return lambda buffer, x: True

    def impl(buffer, x):
        b_lo, b_hi = _extent(buffer)
        x_lo, x_hi = _extent(x)
        return b_hi <= x_lo or x_hi <= b_lo
    return impl


@kernel
def statistics(x, divisor, root):
    """(2, C) float64: per channel the mean and m2 / divisor (its square root with ``root``),
    and whether the moments are finite (else the general path gives NumPy's results)."""
    state, finite = moments_all(x)
    out = np.empty((2, state.shape[1]))
    if finite:
        for c in range(state.shape[1]):
            out[0, c] = state[MEAN, c]
            out[1, c] = state[M2, c] / divisor
            if root:
                out[1, c] = math.sqrt(out[1, c])
    return out, finite


@kernel
def running_update(running_mean, running_var, mean, var, momentum, var_factor):
    """``ema_update``; False, nothing written, where a buffer shares memory with another
    vector (the general path reads copies)."""
    if not (apart(running_mean, running_var) and apart(running_mean, mean)
            and apart(running_mean, var) and apart(running_var, mean) and apart(running_var, var)):
        return False
    ema_update(running_mean, running_var, mean, var, momentum, var_factor)
    return True


@kernel
def forward(x, weight, bias, eps, y, mean_out, var_out, running_mean, running_var, momentum,
            var_factor, copy, nthreads):
    """Training forward: the batch moments (into mean_out/var_out, None: not kept), y, the
    running buffers updated (None: none; declined where they share memory with x), and x's
    values into ``copy`` (None: not kept), by ``nthreads`` threads (None: see ``threads``)."""
    if not (apart(running_mean, x) and apart(running_var, x)):
        return False
    state, finite = split_moments(x, nthreads)
    if not finite:
        return False
    nchan = state.shape[1]
    count = x.size // nchan
    work = np.empty((3, nchan))
    var, scale, shift = work[0], work[1], work[2]
    for c in range(nchan):
        var[c] = state[M2, c] / count
        scale[c], shift[c] = _math.affine_coefficients(
            state[MEAN, c], var[c], value_or(weight, c, 1.0), value_or(bias, c, 0.0), eps)
        if not (math.isfinite(scale[c]) and math.isfinite(shift[c])):
            return False
    n = threads(nthreads)
    for t in prange(n):
        affine_share(x, scale, shift, y, copy, t, n)
    for c in range(nchan):
        store_if(mean_out, c, state[MEAN, c])
        store_if(var_out, c, var[c])
    ema_update(running_mean, running_var, state[MEAN], var, momentum, var_factor)
    return True


@kernel
def inference(x, running_mean, running_var, weight, bias, eps, y, nthreads):
    """Evaluation forward: y normalized with the running statistics, by ``nthreads``
    threads (elementwise: its one call serves every size, the general path's Python steps
    cost 35 us a call, as much as the pass itself on [256, 1024] on two threads)."""
    nchan = running_mean.shape[0]
    work = np.empty((2, nchan))
    scale, shift = work[0], work[1]
    for c in range(nchan):
        scale[c], shift[c] = _math.affine_coefficients(
            np.float64(running_mean[c]), np.float64(running_var[c]), value_or(weight, c, 1.0),
            value_or(bias, c, 0.0), eps)
        if not (math.isfinite(scale[c]) and math.isfinite(shift[c])):
            return False
    n = threads(nthreads)
    for t in prange(n):
        affine_share(x, scale, shift, y, None, t, n)
    return True


@kernel
def backward(dy, x, mean, var, weight, eps, dx, dweight, dbias, nthreads):
    """Training backward: dx, and dweight/dbias (None: not wanted) in their arrays' dtype,
    by ``nthreads`` threads."""
    nchan = mean.shape[0]
    count = x.size // nchan
    work = np.empty((5, nchan))
    m, g, h, k, invstd = work[0], work[1], work[2], work[3], work[4]
    for c in range(nchan):
        m[c] = np.float64(mean[c])
    sums = split_sums(dy, x, m, nthreads)
    for c in range(nchan):
        g[c], h[c], k[c], invstd[c] = _math.grad_coefficients(
            np.float64(var[c]), value_or(weight, c, 1.0), eps, sums[0, c], sums[1, c], count)
        if not (math.isfinite(g[c]) and math.isfinite(h[c]) and math.isfinite(k[c])):
            return False
    n = threads(nthreads)
    for t in prange(n):
        dx_part(dy, x, m, g, h, k, dx, t, n)
    for c in range(nchan):
        store_if(dweight, c, sums[1, c] * invstd[c])
        store_if(dbias, c, sums[0, c])
    return True
