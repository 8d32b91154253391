"""NumPy-compatible statistics: mean, var, std, mean_var, moments, Moments."""
import warnings
from typing import NamedTuple

import numpy as np

from . import _dispatch, _layout, _math

_UNSET = object()


class _MomentsFields(NamedTuple):
    count: object
    mean: object
    m2: object


class Moments(_MomentsFields):
    """Mergeable Welford state: count, mean and m2 (sum of squared deviations).

    ``mean``/``m2`` are float64 (arrays or scalars); ``count`` is the number of
    values behind each entry. States of disjoint parts merge exactly with
    Chan et al.'s formula, for any counts including zero.

    Moments computed by nbbn also carry ``mean_low``, the rest of the mean
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


def _reject(name, value):
    if value is not _UNSET:
        raise TypeError(f"nbbn does not implement the {name}= argument of NumPy's function")


def _ddof(ddof, correction):
    if correction is not None:
        if ddof != 0:
            raise _layout.ConflictError("ddof and correction can't be provided simultaneously.")
        return correction
    return ddof


def _result_dtype(a, dtype):
    if dtype is not None:
        return np.dtype(dtype)
    return a.dtype.newbyteorder("=") if a.dtype.kind == "f" else np.dtype(np.float64)


# NumPy's functions that answer, per statistic, where the kernels can't (complex, object).
_NUMPY_OPS = {"mean": ("mean",), "var": ("var",), "std": ("std",), "mean_var": ("mean", "var")}


def _statistics(op, a, axis, dtype, out, ddof, keepdims, kinds):
    """The statistics ``kinds`` of ``a`` along ``axis`` (a tuple, see
    ``_backend.statistics``) from one pass over ``a``, on the backend where it lives."""
    be = _dispatch.backend(a=a, out=out)
    like, a = a, be.array(a, "a")
    if (a.dtype.kind not in _layout.KERNEL_KINDS or a.dtype.itemsize > 8
            or dtype is not None and np.dtype(dtype).kind != "f"):
        opts = dict(axis=axis, dtype=dtype, keepdims=keepdims)
        if out is not None:
            opts["out"] = out
        return tuple(be.fallback(name, a, **opts, **({} if name == "mean" else {"ddof": ddof}))
                     for name in _NUMPY_OPS[op])
    red = _layout.reduction(a, axis, keepdims)
    rdtype = _result_dtype(a, dtype)
    if op == "mean" and red.count == 0:
        warnings.warn("Mean of empty slice", RuntimeWarning, stacklevel=3)
    if ("var" in kinds or "std" in kinds) and red.count - ddof <= 0:
        warnings.warn("Degrees of freedom <= 0 for slice", RuntimeWarning, stacklevel=3)
    if out is not None:
        be.check_writable(out, "out")
        o = be.array(out, "out")
        _layout.check_out_shape_dtype(o.shape, o.dtype, red.shape, rdtype)
    return be.statistics(like, a, red, kinds, ddof, rdtype, out)


def mean(a, axis=None, dtype=None, out=None, keepdims=False, *, where=_UNSET):
    """Arithmetic mean along ``axis``; drop-in for ``numpy.mean`` (float64 accumulation)."""
    _reject("where", where)
    return _statistics("mean", a, axis, dtype, out, 0, keepdims, ("mean",))[0]


def mean_var(a, axis=None, dtype=None, ddof=0, keepdims=False, *, correction=None):
    """(mean, var) along ``axis`` from one pass over ``a``."""
    return _statistics("mean_var", a, axis, dtype, None, _ddof(ddof, correction), keepdims,
                       ("mean", "var"))


def var(a, axis=None, dtype=None, out=None, ddof=0, keepdims=False, *,
        where=_UNSET, mean=_UNSET, correction=None):
    """Variance along ``axis``; drop-in for ``numpy.var``, one pass, float64 accumulation."""
    _reject("where", where)
    _reject("mean", mean)
    return _statistics("var", a, axis, dtype, out, _ddof(ddof, correction), keepdims,
                       ("var",))[0]


def std(a, axis=None, dtype=None, out=None, ddof=0, keepdims=False, *,
        where=_UNSET, mean=_UNSET, correction=None):
    """Standard deviation along ``axis``; drop-in for ``numpy.std``."""
    _reject("where", where)
    _reject("mean", mean)
    return _statistics("std", a, axis, dtype, out, _ddof(ddof, correction), keepdims,
                       ("std",))[0]


def moments(a, axis=None, keepdims=False):
    """The mergeable ``Moments(count, mean, m2)`` of ``a`` along ``axis`` (float64)."""
    be = _dispatch.backend(a=a)
    like, a = a, be.array(a, "a")
    if a.dtype.kind not in _layout.KERNEL_KINDS or a.dtype.itemsize > 8:
        raise TypeError(f"moments needs real numeric input, got dtype {a.dtype}")
    red = _layout.reduction(a, axis, keepdims)
    return Moments(red.count, *be.statistics(like, a, red, ("mean", "m2"), 0,
                                             np.dtype(np.float64), None))
