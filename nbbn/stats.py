"""NumPy-compatible statistics: mean, var, std, mean_var, moments, Moments."""
import warnings
from typing import NamedTuple

import numpy as np

from . import _dispatch, _layout
from ._cpu.moments import channel_moments

_UNSET = object()


class Moments(NamedTuple):
    """Mergeable Welford state: count, mean and m2 (sum of squared deviations).

    ``mean``/``m2`` are float64 (arrays or scalars); ``count`` is the number of
    values behind each entry. States of disjoint parts merge exactly with
    Chan et al.'s formula, for any counts including zero.
    """

    count: object
    mean: object
    m2: object

    def merge(self, other):
        """The moments of the union of the data behind ``self`` and ``other``."""
        n_a, n_b = np.asarray(self.count), np.asarray(other.count)
        n = n_a + n_b
        mean_a, mean_b = np.asarray(self.mean, np.float64), np.asarray(other.mean, np.float64)
        # The same cases as the kernels' _math.chan_merge, elementwise.
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            n_safe = np.where(n == 0, 1, n).astype(np.float64)
            delta = mean_b - mean_a
            mean = np.where(delta == 0, mean_a,
                            np.where(np.isfinite(delta), mean_a + delta * (n_b / n_safe),
                                     (n_a * mean_a + n_b * mean_b) / n_safe))
            m2 = np.asarray(self.m2, np.float64) + other.m2 + delta * delta * (n_a * (n_b / n_safe))
        # An empty side contributes nothing (its mean is nan, not a number to weigh).
        mean = np.where(n_b == 0, self.mean, np.where(n_a == 0, other.mean, mean))
        m2 = np.where(n_b == 0, self.m2, np.where(n_a == 0, other.m2, m2))
        return Moments(_scalar_or_array(n), _scalar_or_array(mean), _scalar_or_array(m2))

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


def _numpy_fallback(a, dtype):
    """True where NumPy must answer: complex/object/odd dtypes, or a non-float dtype= request."""
    if a.dtype.kind not in _layout.KERNEL_KINDS or a.dtype.itemsize > 8:
        return True
    return dtype is not None and np.dtype(dtype).kind != "f"


def _reduce(a, axis):
    """(count, mean[kept], m2[kept]) in float64 over ``axis``; kept is the C-order kept shape."""
    axes = _layout.reduced_axes(axis, a.ndim)
    x3 = _layout.three_d(_layout.kernel_input(a), axes)
    n_outer, n_chan, n_inner = x3.shape
    count = n_outer * n_inner
    if count == 0 or n_chan == 0:
        mean = np.full(n_chan, np.nan)  # NumPy's mean of nothing
        m2 = np.zeros(n_chan)  # a sum over nothing
    else:
        mean, m2 = channel_moments(x3)
    return count, axes, mean, m2


def _result_dtype(a, dtype):
    if dtype is not None:
        return np.dtype(dtype)
    return a.dtype.newbyteorder("=") if a.dtype.kind == "f" else np.dtype(np.float64)


def _finish(values, a, axes, keepdims, dtype, out):
    """Reshape to the kept shape, cast to the result dtype, honour ``out=``."""
    shape = _layout.kept_shape(a.shape, axes, keepdims)
    values = values.reshape(shape)
    if out is not None:
        _layout.check_out(out, shape, dtype)
        np.copyto(out, values, casting="unsafe")
        return out
    return _scalar_or_array(values.astype(dtype, copy=False))


def mean(a, axis=None, dtype=None, out=None, keepdims=False, *, where=_UNSET):
    """Arithmetic mean along ``axis``; drop-in for ``numpy.mean`` (float64 accumulation)."""
    _reject("where", where)
    if _dispatch.on_device(a=a, out=out):
        return _dispatch.cuda().mean(a, axis, dtype, out, keepdims)
    a = _layout.as_array(a, "a")
    if _numpy_fallback(a, dtype):
        return np.mean(a, axis=axis, dtype=dtype, out=out, keepdims=keepdims)
    count, axes, m, _ = _reduce(a, axis)
    if count == 0:
        warnings.warn("Mean of empty slice", RuntimeWarning, stacklevel=2)
    return _finish(m, a, axes, keepdims, _result_dtype(a, dtype), out)


def mean_var(a, axis=None, dtype=None, ddof=0, keepdims=False, *, correction=None):
    """(mean, var) along ``axis`` from one pass over ``a``."""
    ddof = _ddof(ddof, correction)
    if _dispatch.on_device(a=a):
        return _dispatch.cuda().mean_var(a, axis, dtype, ddof, keepdims)
    a = _layout.as_array(a, "a")
    if _numpy_fallback(a, dtype):
        return (np.mean(a, axis=axis, dtype=dtype, keepdims=keepdims),
                np.var(a, axis=axis, dtype=dtype, ddof=ddof, keepdims=keepdims))
    count, axes, m, m2 = _reduce(a, axis)
    v = np.asarray(_divide_m2(m2, count, ddof))
    rdtype = _result_dtype(a, dtype)
    return (_finish(m, a, axes, keepdims, rdtype, None),
            _finish(v, a, axes, keepdims, rdtype, None))


def var(a, axis=None, dtype=None, out=None, ddof=0, keepdims=False, *,
        where=_UNSET, mean=_UNSET, correction=None):
    """Variance along ``axis``; drop-in for ``numpy.var``, one pass, float64 accumulation."""
    return _var_or_std(a, axis, dtype, out, ddof, keepdims, where, mean, correction, "var")


def std(a, axis=None, dtype=None, out=None, ddof=0, keepdims=False, *,
        where=_UNSET, mean=_UNSET, correction=None):
    """Standard deviation along ``axis``; drop-in for ``numpy.std``."""
    return _var_or_std(a, axis, dtype, out, ddof, keepdims, where, mean, correction, "std")


def _var_or_std(a, axis, dtype, out, ddof, keepdims, where, mean_, correction, op):
    _reject("where", where)
    _reject("mean", mean_)
    ddof = _ddof(ddof, correction)
    if _dispatch.on_device(a=a, out=out):
        return _dispatch.cuda().var_or_std(a, axis, dtype, out, ddof, keepdims, op)
    a = _layout.as_array(a, "a")
    if _numpy_fallback(a, dtype):
        return getattr(np, op)(a, axis=axis, dtype=dtype, out=out, ddof=ddof, keepdims=keepdims)
    count, axes, _, m2 = _reduce(a, axis)
    v = np.asarray(_divide_m2(m2, count, ddof))
    if op == "std":
        v = np.sqrt(v)
    return _finish(v, a, axes, keepdims, _result_dtype(a, dtype), out)


def moments(a, axis=None, keepdims=False):
    """The mergeable ``Moments(count, mean, m2)`` of ``a`` along ``axis`` (float64)."""
    if _dispatch.on_device(a=a):
        return _dispatch.cuda().moments_(a, axis, keepdims)
    a = _layout.as_array(a, "a")
    if a.dtype.kind not in _layout.KERNEL_KINDS or a.dtype.itemsize > 8:
        raise TypeError(f"moments needs real numeric input, got dtype {a.dtype}")
    count, axes, m, m2 = _reduce(a, axis)
    shape = _layout.kept_shape(a.shape, axes, keepdims)
    return Moments(count, _scalar_or_array(m.reshape(shape)), _scalar_or_array(m2.reshape(shape)))
