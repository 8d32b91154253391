"""NumPy-compatible statistics: mean, var, std, mean_var, moments (and ``Moments``).

NumPy's dispatch rules are kept: subclasses, masked arrays and other arrays with
their own methods or ``__array_function__`` get NumPy's answer (Dask arrays go to
``nbbn.dask``, lazily); ndarrays and CUDA arrays go to nbbn's kernels.
"""
import warnings

import numpy as np

from . import _dispatch, _layout
from ._moments import Moments, array_moments

# NumPy's own functions, taken at import: they answer the calls nbbn hands to NumPy, and
# are not nbbn's even after ``np.mean = nbbn.mean`` (which would recurse).
_NUMPY = {name: getattr(np, name) for name in ("mean", "var", "std")}
_NOT_GIVEN = _layout.NOT_GIVEN


def _is_dask(a):
    return type(a).__module__.split(".", 1)[0] == "dask"


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
    if _is_dask(a) and out is None and where is _NOT_GIVEN and mean is _NOT_GIVEN:
        from . import dask
        extra = {} if op == "mean" else dict(ddof=ddof, correction=correction)
        return getattr(dask, op)(a, axis=axis, dtype=dtype,
                                 keepdims=False if keepdims is _NOT_GIVEN else keepdims, **extra)
    if _answered_by_numpy(op, a, (a, out, where, mean)):
        extra = {} if op == "mean" else _numpy_kwargs(ddof=ddof, correction=correction,
                                                      mean=mean)
        if keepdims is False:  # nbbn's default: "not given" (np.matrix.mean has no keepdims)
            keepdims = _NOT_GIVEN
        return _NUMPY[op](a, axis=axis, dtype=dtype, out=out,
                          **_numpy_kwargs(keepdims=keepdims, where=where), **extra)
    if (out is None and dtype is None and where is _NOT_GIVEN and mean is _NOT_GIVEN
            and correction is _NOT_GIVEN):
        done = _small_statistics(a, axis, keepdims, ddof, (op,))
        if done is not None:
            return done[0]
    _check_unsupported(where, mean)
    if keepdims is _NOT_GIVEN:
        keepdims = False
    ddof = _layout.ddof(ddof, correction)
    result = _statistics(op, a, axis, dtype, out, ddof, keepdims, (op,))[0]
    if out is None and type(a) is not np.ndarray and isinstance(a, np.ndarray):
        # A subclass using ndarray's method: NumPy's result is wrapped by the subclass.
        return a.__array_wrap__(np.asarray(result), None, np.ndim(result) == 0)
    return result


# NumPy's functions that answer, per statistic, where the kernels can't (complex, object,
# timedelta, longdouble data or dtype=).
_NUMPY_OPS = {"mean": ("mean",), "var": ("var",), "std": ("std",), "mean_var": ("mean", "var")}


# ---- small calls: one compiled call each, where the backend has one ---------------------------
# A small call's time is its Python steps, so the plain cases (a plain host ndarray, no out=,
# dtype=, where=, mean= or correction=, an int ddof) skip them: the reduction and the
# backend's fused plan are cached by the array's description, and the backend does the rest
# in one call. Anything else, or a backend that declines, takes the general path.

_SMALL = _layout.PlanCache()


def _small_reduction(be, a, axis, keepdims):
    """(count, the backend's fused plan) for a reduction of arrays like ``a``, or False
    (invalid: the general path raises; or not fused)."""
    try:
        red = _layout.reduction(a, axis, keepdims)
    except (TypeError, ValueError):
        return False
    small = be.fused_reduction(red, a)
    return False if small is None else (red.count, small)


def _small_statistics(a, axis, keepdims, ddof, kinds):
    """The statistics ``kinds`` of a small host array in one compiled call, or None."""
    be = _dispatch.plain_host(a)
    if keepdims is _NOT_GIVEN:
        keepdims = False
    if be is None or type(ddof) is not int or type(keepdims) is not bool or not (
            axis is None or type(axis) is int or type(axis) is tuple):
        return None
    key = (a.shape, a.strides, a.dtype, axis, keepdims)
    entry = _SMALL.get(key)
    if entry is None:
        entry = _SMALL.keep(key, _small_reduction(be, a, axis, keepdims))
    if entry is False or entry[0] - ddof <= 0:
        return None
    return be.fused_statistics(entry[1], a, kinds, ddof)


def _statistics(op, a, axis, dtype, out, ddof, keepdims, kinds):
    """The statistics ``kinds`` of ``a`` along ``axis`` (a tuple, see
    ``_backend.statistics``) from one pass over ``a``, on the backend where it lives."""
    be = _dispatch.backend(a=a, out=out)
    like, a = a, be.array(a, "a")
    if not _layout.kernels_read(a.dtype) or dtype is not None and not _layout.is_float(dtype):
        opts = dict(axis=axis, dtype=dtype, keepdims=keepdims)
        if out is not None:
            opts["out"] = out
        return tuple(be.fallback(_NUMPY[name], a, **opts,
                                 **({} if name == "mean" else {"ddof": ddof}))
                     for name in _NUMPY_OPS[op])
    red = _layout.reduction(a, axis, keepdims)
    rdtype = _layout.result_dtype(a.dtype, dtype)
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
    if _is_dask(a):
        from . import dask
        return dask.mean_var(a, axis, dtype, ddof, keepdims, correction=correction)
    if _answered_by_numpy("var", a, (a,)):
        return (mean(a, axis, dtype, keepdims=keepdims),
                var(a, axis, dtype, ddof=ddof, keepdims=keepdims, correction=correction))
    if dtype is None and correction is _NOT_GIVEN:
        done = _small_statistics(a, axis, keepdims, ddof, ("mean", "var"))
        if done is not None:
            return done
    if keepdims is _NOT_GIVEN:
        keepdims = False
    return _statistics("mean_var", a, axis, dtype, None, _layout.ddof(ddof, correction), keepdims,
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
    if _is_dask(a):
        from . import dask
        return dask.moments(a, axis=axis, keepdims=keepdims)
    if _answered_by_numpy("mean", a, (a,)):  # a mask, a duck array: no Welford state here
        raise TypeError(f"moments needs an ndarray or a CUDA array, got {type(a).__name__}")
    return array_moments(a, axis, keepdims)
