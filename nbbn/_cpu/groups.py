"""Small virtual batches of channels-last rows, a group at a time (ghost batch norm of features).

A virtual batch of a few rows (8 of [4096, 256], say) has a statistic per channel for
every few values: an eighth of the data for 8 rows. Passed between the passes as
per-(group, channel) vectors (moment states, double-double sums, coefficients), those
cost more than the data's own passes (measured, one thread, float32 [4096, 256] in
groups of 8: forward 4x, backward 17x plain batch norm). Here one thread does a group
whole while its rows are in cache: the forward sums its statistics, makes its
coefficients and writes y; the backward sums g and g * (x - mean), makes dx's
coefficients, writes dx and adds the parameters' gradients per channel. Only the
caller's statistics go to memory.

Groups of at most ``moments.SHORT_RUN`` rows: their sums are plain float64, as the
general path's sums of so many rows (``moments.short_run_sums``, ``backward.sums_walk``'s
blocks), and the coefficients are ``_math``'s, in strict loops of their own (compiled
without fastmath). Those loops take a square root and a division per (group, channel)
pair, the cost that remains over plain batch norm (0.85 ns a pair vectorized, measured: a
quarter of plain batch norm's forward of [4096, 256] float32 in groups of 8). They are
compiled with NumPy's error model: Numba's default checks every division for a zero
divisor (to raise ZeroDivisionError), which keeps such a loop from vectorizing (2x slower
measured); a zero here gives inf, which the finiteness check sends to the general path.
"""
import math

import numba
import numpy as np
from numba import prange

from .. import _math
from ._blocks import AFFINE_STREAMS, SUMS_STREAMS, WIDE_ROW, stream_step
from ._jit import helper, kernel, thread_plan
from .backward import dx_share, sums_sweep
from .fused import value_or
from .elements import wide
from .moments import SHORT_RUN, short_moments, short_run_sums
from .normalize import affine_sweep


def applies(plan):
    """Whether ``plan``'s virtual batches are channels-last rows, at most SHORT_RUN a group."""
    return (plan.groups > 1 and plan.layout.shape3[2] == 1 and plan.group_rows <= SHORT_RUN
            and plan.size > 0)


def plan_groups(x, group_rows):
    """(nthreads, parallel) for the groups of 2-D x."""
    return thread_plan(x.size, -(-x.shape[0] // group_rows))


@numba.njit(fastmath=False, error_model="numpy", cache=False)
def affine_coefficients(k, s1, s2, count, weight, bias, eps, mean, var, scale, shift):
    """A group's mean and biased variance (into its rows of the caller's ``mean``/``var``)
    and (scale, shift) from its sums shifted by ``k`` (``moments.short_run_sums``), which
    becomes the mean (the shift of a second pass). Returns (whether all are finite,
    whether the shift cancelled too much: sum again)."""
    n = np.float64(count)
    inverse = _math.exact_inverse(count)
    finite = True
    again = False
    for c in range(k.shape[0]):
        m, m2, cancelled = short_moments(k[c], s1[c], s2[c], n, inverse)
        v = _math.per_count(m2, n, inverse)
        k[c] = m
        mean[c] = m
        var[c] = v
        scale[c], shift[c] = _math.affine_coefficients(m, v, value_or(weight, c, 1.0),
                                                       value_or(bias, c, 0.0), eps)
        finite &= math.isfinite(scale[c]) & math.isfinite(shift[c])
        again |= cancelled
    return finite, again


@helper
def group_sums(dy, x, gate, dres, r0, r1, mean, s_dy, s_dxm):
    """sum(g) and sum(g * (x - mean)) of a group's rows r0:r1 per column into s_dy, s_dxm:
    plain float64 sums (at most SHORT_RUN rows: as the general path's plain sums of a block,
    ``backward.sums_walk``), in that path's lockstep streams (SUMS_STREAMS, by the rows'
    width; 8 streams each of dy and x were 1.6x slower on 1024 channels, measured)."""
    s_dy[:] = 0.0
    s_dxm[:] = 0.0
    if x.shape[1] >= WIDE_ROW:  # each call with its constant: the sweep's loop unrolls
        group_walk(dy, x, gate, dres, r0, r1, SUMS_STREAMS[1], mean, s_dy, s_dxm)
    else:
        group_walk(dy, x, gate, dres, r0, r1, SUMS_STREAMS[0], mean, s_dy, s_dxm)


@helper
def group_walk(dy, x, gate, dres, r0, r1, n_streams, mean, s_dy, s_dxm):
    """``group_sums``'s rows as n_streams lockstep streams (``_blocks.stream_step``)."""
    step = stream_step(r0, r1, n_streams)
    for r in range(r0, r0 + step):
        sums_sweep(dy, x, gate, dres, r, step, n_streams, mean, s_dy, s_dxm)
    for r in range(r0 + n_streams * step, r1):
        sums_sweep(dy, x, gate, dres, r, 0, 1, mean, s_dy, s_dxm)


@numba.njit(fastmath=False, error_model="numpy", cache=False)
def grad_coefficients(s_dy, s_dxm, count, mean, var, weight, eps, m, g, h, k, grads):
    """dx's coefficients of a group (its mean in the working dtype into ``m``) from its
    sums (``group_sums``), its (mean, var), and the group's part of sum(g * (x - mean)
    / sqrt(var + eps)) and sum(g) added into ``grads`` (2, C); whether all are finite."""
    inverse = _math.exact_inverse(count)
    finite = True
    for c in range(m.shape[0]):
        m[c] = mean[c]
        g[c], h[c], k[c], invstd = _math.grad_of_std(
            math.sqrt(np.float64(var[c]) + eps), value_or(weight, c, 1.0), s_dy[c], s_dxm[c],
            count, inverse)
        grads[0, c] += s_dxm[c] * invstd
        grads[1, c] += s_dy[c]
        finite &= math.isfinite(g[c]) & math.isfinite(h[c]) & math.isfinite(k[c])
    return finite


@kernel
def forward_groups(x, weight, bias, eps, y, mean, var, residual, relu, copy, mask, group_rows,
                   coefficients, nthreads):
    """Ghost batch norm of x[rows, C]: y (and the epilogue, as ``normalize``), the groups'
    mean and biased variance into (groups, C) ``mean``/``var``; ``coefficients`` (nthreads,
    2, C) in the working dtype, each thread's scale and shift. False where a statistic or
    coefficient is not finite (y then partly written: the general path redoes it all)."""
    n_rows, nchan = x.shape
    groups = (n_rows + group_rows - 1) // group_rows
    finite = np.ones(nthreads, np.bool_)
    for t in prange(nthreads):
        k, s1, s2 = np.empty(nchan), np.empty(nchan), np.empty(nchan)
        scale, shift = coefficients[t, 0], coefficients[t, 1]
        for q in range(t * groups // nthreads, (t + 1) * groups // nthreads):
            r0 = q * group_rows
            r1 = min(n_rows, r0 + group_rows)
            for j in range(nchan):
                k[j] = wide(x[r0, j])
            for _ in range(2):  # a second pass only where the first row was too far
                short_run_sums(x, r0, r1, k, s1, s2)
                done, again = affine_coefficients(k, s1, s2, r1 - r0, weight, bias, eps, mean[q],
                                                  var[q], scale, shift)
                if not again:
                    break
            finite[t] &= done
            step = stream_step(r0, r1, AFFINE_STREAMS)
            for r in range(r0, r0 + step):
                affine_sweep(x, r, step, AFFINE_STREAMS, scale, shift, y, residual, relu, copy,
                             mask)
            for r in range(r0 + AFFINE_STREAMS * step, r1):
                affine_sweep(x, r, 0, 1, scale, shift, y, residual, relu, copy, mask)
    return finite.all()


@kernel
def backward_groups(dy, x, gate, dres, mean, var, weight, eps, dx, grads, group_rows,
                    coefficients, nthreads):
    """The training backward of ghost batch norm over x[rows, C], dy through the ReLU's
    ``gate`` (None: no ReLU; also into ``dres``, None: not written), with the groups'
    (groups, C) ``mean``/``var``: dx, and each thread's per-channel sum(g * (x - mean) /
    sqrt(var + eps)) and sum(g) into ``grads`` (nthreads, 2, C) float64 (dweight and dbias
    before the threads' sum). ``coefficients`` (nthreads, 4, C) in the working dtype.
    False where a coefficient is not finite."""
    n_rows, nchan = x.shape
    groups = (n_rows + group_rows - 1) // group_rows
    finite = np.ones(nthreads, np.bool_)
    for t in prange(nthreads):
        grads[t] = 0.0
        s_dy, s_dxm = np.empty(nchan), np.empty(nchan)
        m, g, h, k = (coefficients[t, 0], coefficients[t, 1], coefficients[t, 2],
                      coefficients[t, 3])
        for q in range(t * groups // nthreads, (t + 1) * groups // nthreads):
            r0 = q * group_rows
            r1 = min(n_rows, r0 + group_rows)
            group_sums(dy, x, gate, dres, r0, r1, mean[q], s_dy, s_dxm)
            finite[t] &= grad_coefficients(s_dy, s_dxm, r1 - r0, mean[q], var[q], weight, eps, m,
                                           g, h, k, grads[t])
            dx_share(dy, x, gate, m, g, h, k, dx, r0, r1)
    return finite.all()
