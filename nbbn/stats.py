"""NumPy-compatible statistics: mean, var, std, mean_var, moments, Moments."""
import warnings
from typing import NamedTuple

import numpy as np

from . import _dispatch, _layout

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


# NumPy's own functions, taken at import: they answer the calls nbbn hands to NumPy, and
# are not nbbn's even after ``np.mean = nbbn.mean`` (which would recurse).
_NUMPY = {name: getattr(np, name) for name in ("mean", "var", "std")}
_NOT_GIVEN = np._NoValue  # NumPy's "not given": its nan-functions pass it on explicitly


def _ddof(ddof, correction):
    """``ddof`` from NumPy's pair (both given: an error; ``correction`` may be ``_NoValue``)."""
    if correction is _NOT_GIVEN:
        return ddof
    if ddof != 0:
        raise _layout.ConflictError("ddof and correction can't be provided simultaneously.")
    if correction is None:
        raise TypeError("correction must be a number, got None")
    return correction


def _result_dtype(a, dtype):
    if dtype is not None:
        return np.dtype(dtype)
    return a.dtype.newbyteorder("=") if a.dtype.kind == "f" else np.dtype(np.float64)


def _overrides(x):
    """Whether NumPy would hand a call with argument ``x`` to x's ``__array_function__``."""
    impl = getattr(type(x), "__array_function__", None)
    return impl is not None and impl is not np.ndarray.__array_function__


def _answered_by_numpy(op, a, relevant):
    """NumPy's dispatch rules: True where NumPy would not run its own code on ``a`` (a host
    argument in ``relevant`` with its own ``__array_function__``, or ``a`` not an ndarray but
    with its own ``op`` method: ``np.ma.MaskedArray``, ``np.matrix``, pandas ...)."""
    if any(_overrides(x) for x in relevant if x is not None and not _layout.is_device(x)):
        return True
    if type(a) is np.ndarray or _layout.is_device(a):
        return False
    method = getattr(type(a), op, None)
    return method is not None and method is not getattr(np.ndarray, op, None)


def _check_unsupported(where, mean):
    """``where=``/``mean=`` other than their no-op values: TypeError naming them."""
    if where is not _NOT_GIVEN and where is not True and where is not np.True_:
        raise TypeError("nbbn does not implement the where= argument of NumPy's function")
    if mean is not _NOT_GIVEN and mean is not None:
        raise TypeError("nbbn does not implement the mean= argument of NumPy's function")


def _numpy_kwargs(**kwargs):
    return {k: v for k, v in kwargs.items() if v is not _NOT_GIVEN}


def _reduce(op, a, axis, dtype, out, keepdims, ddof=0, correction=_NOT_GIVEN,
            where=_NOT_GIVEN, mean=_NOT_GIVEN):
    """``numpy.<op>`` (op: "mean", "var", "std") with NumPy's dispatch, then nbbn's kernels."""
    if _answered_by_numpy(op, a, (a, out, where, mean)):
        extra = {} if op == "mean" else _numpy_kwargs(ddof=ddof, correction=correction,
                                                      mean=mean)
        if keepdims is False:  # nbbn's default: "not given" (np.matrix.mean has no keepdims)
            keepdims = _NOT_GIVEN
        return _NUMPY[op](a, axis=axis, dtype=dtype, out=out,
                          **_numpy_kwargs(keepdims=keepdims, where=where), **extra)
    _check_unsupported(where, mean)
    if keepdims is _NOT_GIVEN:
        keepdims = False
    ddof = _ddof(ddof, correction)
    result = _statistics(op, a, axis, dtype, out, ddof, keepdims, (op,))[0]
    if out is None and type(a) is not np.ndarray and isinstance(a, np.ndarray):
        # A subclass using ndarray's method: NumPy's result is wrapped by the subclass.
        return a.__array_wrap__(np.asarray(result), None, np.ndim(result) == 0)
    return result


# NumPy's functions that answer, per statistic, where the kernels can't (complex, object,
# timedelta, longdouble data or dtype=).
_NUMPY_OPS = {"mean": ("mean",), "var": ("var",), "std": ("std",), "mean_var": ("mean", "var")}


def _statistics(op, a, axis, dtype, out, ddof, keepdims, kinds):
    """The statistics ``kinds`` of ``a`` along ``axis`` (a tuple, see
    ``_backend.statistics``) from one pass over ``a``, on the backend where it lives."""
    be = _dispatch.backend(a=a, out=out)
    like, a = a, be.array(a, "a")
    if not _layout.kernels_read(a.dtype) or dtype is not None and (
            np.dtype(dtype).kind != "f" or not _layout.kernels_read(dtype)):
        opts = dict(axis=axis, dtype=dtype, keepdims=keepdims)
        if out is not None:
            opts["out"] = out
        return tuple(be.fallback(_NUMPY[name], a, **opts,
                                 **({} if name == "mean" else {"ddof": ddof}))
                     for name in _NUMPY_OPS[op])
    red = _layout.reduction(a, axis, keepdims)
    rdtype = _result_dtype(a, dtype)
    if op == "mean" and red.count == 0:
        warnings.warn("Mean of empty slice", RuntimeWarning, stacklevel=4)
    if ("var" in kinds or "std" in kinds) and red.count - ddof <= 0:
        warnings.warn("Degrees of freedom <= 0 for slice", RuntimeWarning, stacklevel=4)
    if out is not None:
        be.check_writable(out, "out")
        o = be.array(out, "out")
        _layout.check_out_shape_dtype(o.shape, o.dtype, red.shape, rdtype,
                                      "same_kind" if op == "std" else "unsafe")
    return be.statistics(like, a, red, kinds, ddof, rdtype, out)


def mean(a, axis=None, dtype=None, out=None, keepdims=False, *, where=_NOT_GIVEN):
    """Arithmetic mean along ``axis``; drop-in for ``numpy.mean`` (float64 accumulation)."""
    return _reduce("mean", a, axis, dtype, out, keepdims, where=where)


def mean_var(a, axis=None, dtype=None, ddof=0, keepdims=False, *, correction=_NOT_GIVEN):
    """(mean, var) along ``axis`` from one pass over ``a``."""
    if _answered_by_numpy("var", a, (a,)):
        return (mean(a, axis, dtype, keepdims=keepdims),
                var(a, axis, dtype, ddof=ddof, keepdims=keepdims, correction=correction))
    if keepdims is _NOT_GIVEN:
        keepdims = False
    return _statistics("mean_var", a, axis, dtype, None, _ddof(ddof, correction), keepdims,
                       ("mean", "var"))


def var(a, axis=None, dtype=None, out=None, ddof=0, keepdims=False, *,
        where=_NOT_GIVEN, mean=_NOT_GIVEN, correction=_NOT_GIVEN):
    """Variance along ``axis``; drop-in for ``numpy.var``, one pass, float64 accumulation."""
    return _reduce("var", a, axis, dtype, out, keepdims, ddof, correction, where, mean)


def std(a, axis=None, dtype=None, out=None, ddof=0, keepdims=False, *,
        where=_NOT_GIVEN, mean=_NOT_GIVEN, correction=_NOT_GIVEN):
    """Standard deviation along ``axis``; drop-in for ``numpy.std``."""
    return _reduce("std", a, axis, dtype, out, keepdims, ddof, correction, where, mean)


def moments(a, axis=None, keepdims=False):
    """The mergeable ``Moments(count, mean, m2)`` of ``a`` along ``axis`` (float64)."""
    if _answered_by_numpy("mean", a, (a,)):  # a mask, a duck array: no Welford state here
        raise TypeError(f"moments needs an ndarray or a CUDA array, got {type(a).__name__}")
    be = _dispatch.backend(a=a)
    like, a = a, be.array(a, "a")
    if not _layout.kernels_read(a.dtype):
        raise TypeError(f"moments needs real numeric input, got dtype {a.dtype}")
    red = _layout.reduction(a, axis, keepdims)
    return Moments(red.count, *be.statistics(like, a, red, ("mean", "m2"), 0,
                                             np.dtype(np.float64), None))
