"""Calls in one compiled call each: the statistics (``nbbn.mean/var/std/mean_var``), the
running-statistics update, and batch norm's statistics, coefficients, elementwise pass and
running-statistics update together.

Below the size where the kernels run in parallel, a call's time is mostly its Python
steps, so each of these does a whole forward, inference or backward. Batch norm's do at
every size, by as many threads as the separate kernels would take (``nthreads``; None:
the small calls' serial builds): the general path's Python steps (the passes' launches,
per-channel NumPy arithmetic) cost 35-110 us a call, as much as the passes themselves on
[256, 1024] on two threads. Their threads run the separate kernels' own per-thread shares
(``_jit.share``: compiled once per type for every kernel that runs them), split as those
split the work (the serial builds' elementwise pass: plain loops, ``affine_all``), and the
coefficients' ``_math`` functions, so their results are those of the separate kernels, bit
for bit. ``x`` is the 3-D (outer, C, inner) view, or for
channels-last data (inner == 1) its 2-D (rows, C) plane, as the separate kernels
read it. Each kernel returns False, having written nothing, where a statistic or a
coefficient is not finite: the general path then applies NumPy's rules (and warnings).
"""
import math

import numpy as np
from numba import prange, types
from numba.extending import overload

from .. import _math
from ._blocks import head_groups, row_items
from ._jit import FASTMATH, helper, kernel
from .backward import (DXM_HI, DXM_LO, DY_HI, DY_LO, add_heads, dx_columns_share,
                       dx_rows_share, sums_columns_share, sums_rows_share, sums_items,
                       sums_share)
from .elements import store, store_if, wide
from .ema import ema_update
from .moments import (FIELDS, M2, MEAN, checked, columns_share, columns_state, merge_heads,
                      rows_share, rows_state)
from .normalize import affine_columns_share, affine_rows_share


# The small calls' passes are functions of their own, called, not inlined: each compiles
# once per type of its own arguments, not once per signature of the kernels (each
# combination of None and array arguments: inlined, a cold compile of the forward took
# ~10 s, all of test_batchnorm.py 7.6 min, then 4.7; the backward's 19 builds in the test
# suite 10 s each; 16 builds of a backward, forwards included, 104 s, now 44). The calls
# cost nothing measurable: the backward on 8x16x8x8, 32x64 and 64x256 took 9.2, 5.8 and
# 14.0 us either way.
PASS = {"fastmath": FASTMATH}


def units(x):
    """What the kernels split among threads: the row items (BLOCK-sized pieces of the rows)
    of a 3-D view, the rows of a 2-D plane."""


@overload(units, inline="always")
def _units(x):
    if x.ndim == 3:
        return lambda x: row_items(x.shape)
    return lambda x: x.shape[0]


@helper
def _rows(x):
    """The separate kernels' ``group_rows`` for one group: all of x's (outer) rows."""
    return max(x.shape[0], 1)


def threads(nthreads):
    """The kernels' ``nthreads`` argument as a count: None (the small calls' serial builds)
    is 1."""


@overload(threads, inline="always")
def _threads(nthreads):
    if isinstance(nthreads, types.NoneType):
        return lambda nthreads: 1
    return lambda nthreads: nthreads


def moments_all(x):
    """(state, finite): the (FIELDS, C) moments state of all of x (see ``moments``)."""


@overload(moments_all, jit_options=PASS)
def _moments_all(x):
    if x.ndim == 3:
        def rows(x):
            state = np.zeros((FIELDS, x.shape[1]))
            rows_state(x, 0, units(x), state)
            return checked(state)
        return rows

    def columns(x):
        state = np.zeros((FIELDS, x.shape[1]))
        columns_state(x, 0, x.shape[0], state)
        return checked(state)
    return columns


def split_moments(x, nthreads):
    """(state, finite): ``moments_all``, by ``nthreads`` threads as ``moments_rows``/
    ``moments_columns`` split one group (thread t's share, the threads' states merged)."""


@overload(split_moments, inline="always")
def _split_moments(x, nthreads):
    if isinstance(nthreads, types.NoneType):
        return lambda x, nthreads: moments_all(x)
    share = rows_share if x.ndim == 3 else columns_share

    def impl(x, nthreads):
        states = np.zeros((1, FIELDS, x.shape[1]))
        heads = np.zeros((nthreads, FIELDS, x.shape[1]))
        for t in prange(nthreads):
            share(x, _rows(x), np.int64(t), nthreads, states, heads)
        n = units(x)
        states, finite = merge_heads(states, heads, head_groups(n, n, nthreads))
        return states[0], finite
    return impl


def affine_all(x, scale, shift, y, copy, nthreads):
    """y = x * scale[c] + shift[c] over all of x, x's values into ``copy`` (None: not kept):
    by ``nthreads`` threads, split as the separate kernels split it; in the small calls'
    serial builds (None) by plain loops over x's rows and channels (each element's value is
    the same in any order; the shares' per-item steps took 1-2 us of a 3-5 us inference on
    8,192 values)."""


@overload(affine_all, inline="always")
def _affine_all(x, scale, shift, y, copy, nthreads):
    if isinstance(nthreads, types.NoneType):
        if x.ndim == 3:
            def rows(x, scale, shift, y, copy, nthreads):
                for o in range(x.shape[0]):
                    for c in range(x.shape[1]):
                        a, b = scale[c], shift[c]
                        for i in range(x.shape[2]):
                            store(y, (o, c, i), wide(x[o, c, i]) * a + b)
                            store_if(copy, (o, c, i), x[o, c, i])
            return rows

        def columns(x, scale, shift, y, copy, nthreads):
            for r in range(x.shape[0]):
                for c in range(x.shape[1]):
                    store(y, (r, c), wide(x[r, c]) * scale[c] + shift[c])
                    store_if(copy, (r, c), x[r, c])
        return columns
    share = affine_rows_share if x.ndim == 3 else affine_columns_share

    def threaded(x, scale, shift, y, copy, nthreads):
        for t in prange(nthreads):
            share(x, scale.reshape((1, scale.size)), shift.reshape((1, shift.size)), y, None,
                  None, copy, None, _rows(x), np.int64(t), nthreads)
    return threaded


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


@overload(sums_all, jit_options=PASS)
def _sums_all(dy, x, mean):
    if x.ndim == 3:
        def rows(dy, x, mean):
            sums = np.zeros((4, x.shape[1]))
            sums_items(dy, x, mean, None, None, 0, units(x), sums)
            return _totals(sums)
        return rows

    def columns(dy, x, mean):
        sums = np.zeros((4, x.shape[1]))
        sums_share(dy, x, mean, None, None, 0, x.shape[0], sums, np.empty(x.shape[1]),
                   np.empty(x.shape[1]))
        return _totals(sums)
    return columns


def split_sums(dy, x, mean, nthreads):
    """``sums_all``, by ``nthreads`` threads as ``sums_rows``/``sums_columns`` split one group
    (the threads' double-double sums added)."""


@overload(split_sums, inline="always")
def _split_sums(dy, x, mean, nthreads):
    if isinstance(nthreads, types.NoneType):
        return lambda dy, x, mean, nthreads: sums_all(dy, x, mean)
    share = sums_rows_share if x.ndim == 3 else sums_columns_share

    def impl(dy, x, mean, nthreads):
        nchan = x.shape[1]
        sums = np.zeros((1, 4, nchan))
        heads = np.zeros((nthreads, 4, nchan))
        for t in prange(nthreads):
            share(dy, x, mean.reshape((1, nchan)), None, None, _rows(x), np.int64(t), nthreads,
                  sums, heads)
        n = units(x)
        return _totals(add_heads(sums, heads, head_groups(n, n, nthreads))[0])
    return impl


def dx_part(dy, x, mean, g, h, k, dx, t, nthreads):
    """dx = G * dy + H * (x - mean) + K over thread t's share of x, as the separate kernels
    split it."""


@overload(dx_part, inline="always")
def _dx_part(dy, x, mean, g, h, k, dx, t, nthreads):
    share = dx_rows_share if x.ndim == 3 else dx_columns_share

    def impl(dy, x, mean, g, h, k, dx, t, nthreads):
        n = mean.size
        share(dy, x, None, mean.reshape((1, n)), g.reshape((1, n)), h.reshape((1, n)),
              k.reshape((1, n)), dx, _rows(x), t, nthreads)
    return impl


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
    values into ``copy`` (None: not kept), by ``nthreads`` threads."""
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
    affine_all(x, scale, shift, y, copy, nthreads)
    for c in range(nchan):
        store_if(mean_out, c, state[MEAN, c])
        store_if(var_out, c, var[c])
    ema_update(running_mean, running_var, state[MEAN], var, momentum, var_factor)
    return True


@kernel
def inference(x, running_mean, running_var, weight, bias, eps, y, nthreads):
    """Evaluation forward: y normalized with the running statistics, by ``nthreads``
    threads."""
    nchan = running_mean.shape[0]
    work = np.empty((2, nchan))
    scale, shift = work[0], work[1]
    for c in range(nchan):
        scale[c], shift[c] = _math.affine_coefficients(
            np.float64(running_mean[c]), np.float64(running_var[c]), value_or(weight, c, 1.0),
            value_or(bias, c, 0.0), eps)
        if not (math.isfinite(scale[c]) and math.isfinite(shift[c])):
            return False
    affine_all(x, scale, shift, y, None, nthreads)
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
        dx_part(dy, x, m, g, h, k, dx, np.int64(t), n)
    for c in range(nchan):
        store_if(dweight, c, sums[1, c] * invstd[c])
        store_if(dbias, c, sums[0, c])
    return True
