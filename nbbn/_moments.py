"""``Moments``: the mergeable per-channel (count, mean, m2) state, and the moments of an array.

Below the NumPy-facing statistics (``stats``) and the Dask ones (``dask``), which
both build on it.
"""
import warnings
from typing import NamedTuple

import numpy as np

from . import _dispatch, _layout, _math


class _MomentsFields(NamedTuple):
    count: object
    mean: object
    m2: object


class Moments(_MomentsFields):
    """Mergeable Welford state: count, mean and m2 (sum of squared deviations).

    ``mean``/``m2`` are float64 (arrays or scalars); ``count`` is the number of
    values behind each entry. States of disjoint parts merge exactly with
    Chan et al.'s formula, for any counts including zero.

    Moments computed by nbbn may also carry ``mean_low``, the rest of the mean
    (``mean + mean_low`` to double-double accuracy, ``mean`` correctly
    rounded): merges use it, so that merged states stay as accurate as one
    computation over all the data even far from zero (``1e12 + N(0, 1)``: a
    float64 mean alone is off by up to ``ulp(1e12) / 2``, which the merge
    formula multiplies into m2). It is not a tuple field (a Moments is still
    ``(count, mean, m2)``); where unknown it is 0.
    """

    mean_low = 0.0

    @classmethod
    def with_mean_low(cls, count, mean, m2, mean_low):
        """Moments whose mean is the double-double ``mean + mean_low``."""
        moments = cls(count, mean, m2)
        moments.mean_low = mean_low
        return moments

    def merge(self, other):
        """The moments of the union of the data behind ``self`` and ``other``."""
        n_a, n_b = np.asarray(self.count), np.asarray(other.count)
        n = n_a + n_b
        a_hi, b_hi = np.asarray(self.mean, np.float64), np.asarray(other.mean, np.float64)
        a_lo, b_lo = np.asarray(self.mean_low, np.float64), np.asarray(other.mean_low, np.float64)
        # The kernels' _math.chan_merge_dd, elementwise (the mean's step rounded once).
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            n_safe = np.where(n == 0, 1, n).astype(np.float64)
            w = n_b / n_safe
            d_hi, d_lo = _math.dd_add(b_hi, b_lo, -a_hi, -a_lo)
            hi, lo = _math.dd_add(a_hi, a_lo, d_hi * w, d_lo * w)
            finite = np.isfinite(d_hi)  # else inf/nan data: NumPy's (sum / n)
            hi = np.where(finite, hi, (n_a * a_hi + n_b * b_hi) / n_safe)
            lo = np.where(finite, lo, 0.0)
            m2 = np.asarray(self.m2, np.float64) + other.m2 + d_hi * d_hi * (n_a * w)
        # An empty side contributes nothing (its mean is nan, not a number to weigh).
        parts = [np.where(n_b == 0, mine, np.where(n_a == 0, theirs, merged))
                 for mine, theirs, merged in ((self.mean, other.mean, hi), (self.m2, other.m2, m2),
                                              (a_lo, b_lo, lo))]
        return Moments.with_mean_low(_scalar_or_array(n), *map(_scalar_or_array, parts))

    @classmethod
    def combine(cls, parts):
        """Merge an iterable of Moments (pairwise, which keeps rounding low)."""
        parts = list(parts)
        if not parts:
            raise ValueError("Moments.combine needs at least one Moments")
        while len(parts) > 1:
            merged = [a.merge(b) for a, b in zip(parts[::2], parts[1::2])]
            parts = merged + ([parts[-1]] if len(parts) % 2 else [])
        return parts[0]

    def var(self, ddof=0):
        """Variance, dividing m2 by ``count - ddof`` (nan and a warning when that is <= 0)."""
        return _divide_m2(self.m2, self.count, ddof)

    def std(self, ddof=0):
        return np.sqrt(self.var(ddof))


def _scalar_or_array(v):
    v = np.asarray(v)
    return v[()] if v.ndim == 0 else v


def _divide_m2(m2, count, ddof):
    if type(count) is int and count - ddof > 0:
        # The usual call (one count, enough values): no warning to decide, nothing
        # to guard; the general path below costs ~6 us, a third of a small call.
        return _scalar_or_array(np.asarray(m2, np.float64) / (count - ddof))
    dof = np.asarray(count) - ddof
    if np.any(dof <= 0):
        warnings.warn("Degrees of freedom <= 0 for slice", RuntimeWarning, stacklevel=3)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _scalar_or_array(np.asarray(m2, np.float64) / np.maximum(dof, 0))


def array_moments(a, axis=None, keepdims=False):
    """The ``Moments`` of an ndarray (or array-like) or a CUDA array along ``axis``."""
    be = _dispatch.backend(a=a)
    like, a = a, be.array(a, "a")
    if not _layout.kernels_read(a.dtype):
        raise TypeError(f"moments needs real numeric input, got dtype {a.dtype}")
    red = _layout.reduction(a, axis, keepdims)
    mean, m2, mean_low = be.statistics(like, a, red, ("mean", "m2", "mean_low"), 0,
                                       np.dtype(np.float64), None)
    return Moments.with_mean_low(red.count, mean, m2, mean_low)
