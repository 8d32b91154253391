"""Lazy one-pass statistics of Dask arrays: ``moments``, ``mean``, ``mean_var``, ``var``, ``std``.

Each block is reduced by nbbn's kernels (``nbbn.moments``: one pass,
double-double sums) to a per-block state ``(count, mean, mean_low, m2)``; the
states are merged pairwise with Chan et al.'s formula, the mean as a
double-double (``Moments.merge``), up Dask's reduction tree
(``dask.array.reduction``'s chunk/combine/aggregate), so any chunking and any
axes give the accuracy of one nbbn reduction of the whole array. Results are
Dask arrays; nothing is computed until asked for.

Within a task the state travels as one structured array (fields ``count``,
``mean``, ``mean_low``, ``m2``, all float64), so one graph yields mean and
variance together.
"""
import warnings

import dask.array as da
import numpy as np

from . import _layout
from ._moments import Moments, array_moments

__all__ = ["mean", "mean_var", "moments", "std", "var"]

STATE = np.dtype([("count", np.float64), ("mean", np.float64), ("mean_low", np.float64),
                  ("m2", np.float64)])


def _state(m):
    """The structured array of Moments ``m``."""
    out = np.empty(np.shape(m.mean), STATE)
    out["count"], out["mean"], out["mean_low"], out["m2"] = m.count, m.mean, m.mean_low, m.m2
    return out


def _chunk(block, axis, keepdims):
    """One block's state over ``axis`` (dims kept), from nbbn's kernels."""
    return _state(array_moments(block, axis=axis, keepdims=True))


def _merge(states, axis, keepdims):
    """The states along ``axis`` (a tuple; any number of them, counts may be 0) merged
    pairwise (``Moments.combine``)."""
    axes = tuple(a % states.ndim for a in axis)
    kept = np.moveaxis(states, axes, range(states.ndim - len(axes), states.ndim))
    merged_shape = kept.shape[:kept.ndim - len(axes)]
    kept = kept.reshape(merged_shape + (int(np.prod(kept.shape[len(merged_shape):])),))
    total = Moments.combine(
        Moments.with_mean_low(s["count"], s["mean"], s["m2"], s["mean_low"])
        for s in np.moveaxis(kept, -1, 0))
    empty = np.asarray(total.count) == 0  # nan, as NumPy's statistics of nothing
    out = _state(Moments.with_mean_low(total.count, np.where(empty, np.nan, total.mean),
                                       np.where(empty, np.nan, total.m2), total.mean_low))
    return np.expand_dims(out, axes) if keepdims else out


def _reduce(a, axis, keepdims, split_every):
    """(the lazy state array, reduced axes, the static count or None)."""
    axes = _layout.reduced_axes(axis, a.ndim)
    shape = _layout.kept_shape(a.shape, axes, keepdims)
    state = da.reduction(a, _chunk, _merge, combine=_merge, axis=axes, keepdims=keepdims,
                         dtype=STATE, split_every=split_every, concatenate=True,
                         meta=np.empty((0,) * len(shape), STATE), name="nbbn-moments")
    sizes = [a.shape[i] for i in axes]
    count = None if any(np.isnan(s) for s in sizes) else int(np.prod(sizes, dtype=np.int64))
    return state, axes, count


def _as_dask(a):
    return a if isinstance(a, da.Array) else da.asarray(a)


def _field(state, name, dtype):
    return state.map_blocks(lambda b: b[name].astype(dtype), dtype=dtype,
                            meta=np.empty((0,) * state.ndim, dtype))


def _var_blocks(state, ddof, dtype, root):
    def finish(b):
        with np.errstate(invalid="ignore", divide="ignore"):
            v = b["m2"] / np.maximum(b["count"] - ddof, 0)
        return (np.sqrt(v) if root else v).astype(dtype)

    return state.map_blocks(finish, dtype=dtype, meta=np.empty((0,) * state.ndim, dtype))


def _check_dof(count, ddof):
    if count is not None and count - ddof <= 0:
        warnings.warn("Degrees of freedom <= 0 for slice", RuntimeWarning, stacklevel=3)


def moments(a, axis=None, keepdims=False, *, split_every=None):
    """Lazy ``Moments(count, mean, m2)`` of a Dask array along ``axis``.

    ``mean``/``m2`` (and ``mean_low``, see ``Moments``) are float64 Dask arrays;
    ``count`` (values per entry) is an int where the chunk sizes are known, else a Dask
    array. Merge with other ``Moments`` as usual (``Moments.merge`` works on Dask arrays
    too).
    """
    a = _as_dask(a)
    if not _layout.kernels_read(a.dtype):
        raise TypeError(f"moments needs real numeric input, got dtype {a.dtype}")
    state, _, count = _reduce(a, axis, keepdims, split_every)
    if count is None:
        count = _field(state, "count", np.int64)
    return Moments.with_mean_low(count, _field(state, "mean", np.float64),
                                 _field(state, "m2", np.float64),
                                 _field(state, "mean_low", np.float64))


def mean_var(a, axis=None, dtype=None, ddof=0, keepdims=False, *, correction=np._NoValue,
             split_every=None):
    """Lazy ``(mean, var)`` along ``axis`` from one pass over ``a``; as ``nbbn.mean_var``."""
    a = _as_dask(a)
    ddof = _layout.ddof(ddof, correction)
    if not _layout.kernels_read(a.dtype) or (dtype is not None and np.dtype(dtype).kind != "f"):
        return (da.mean(a, axis=axis, dtype=dtype, keepdims=keepdims),
                da.var(a, axis=axis, dtype=dtype, ddof=ddof, keepdims=keepdims))
    rdtype = _layout.result_dtype(a.dtype, dtype)
    state, _, count = _reduce(a, axis, keepdims, split_every)
    _check_dof(count, ddof)
    return _field(state, "mean", rdtype), _var_blocks(state, ddof, rdtype, root=False)


def mean(a, axis=None, dtype=None, keepdims=False, *, split_every=None):
    """Lazy mean along ``axis``; as ``nbbn.mean``."""
    a = _as_dask(a)
    if not _layout.kernels_read(a.dtype) or (dtype is not None and np.dtype(dtype).kind != "f"):
        return da.mean(a, axis=axis, dtype=dtype, keepdims=keepdims)
    state, _, count = _reduce(a, axis, keepdims, split_every)
    if count == 0:
        warnings.warn("Mean of empty slice", RuntimeWarning, stacklevel=2)
    return _field(state, "mean", _layout.result_dtype(a.dtype, dtype))


def _var_or_std(a, axis, dtype, ddof, keepdims, correction, split_every, root):
    a = _as_dask(a)
    ddof = _layout.ddof(ddof, correction)
    if not _layout.kernels_read(a.dtype) or (dtype is not None and np.dtype(dtype).kind != "f"):
        fn = da.std if root else da.var
        return fn(a, axis=axis, dtype=dtype, ddof=ddof, keepdims=keepdims)
    state, _, count = _reduce(a, axis, keepdims, split_every)
    _check_dof(count, ddof)
    return _var_blocks(state, ddof, _layout.result_dtype(a.dtype, dtype), root)


def var(a, axis=None, dtype=None, ddof=0, keepdims=False, *, correction=np._NoValue,
        split_every=None):
    """Lazy variance along ``axis``; as ``nbbn.var`` (one pass per block, float64 merge)."""
    return _var_or_std(a, axis, dtype, ddof, keepdims, correction, split_every, root=False)


def std(a, axis=None, dtype=None, ddof=0, keepdims=False, *, correction=np._NoValue,
        split_every=None):
    """Lazy standard deviation along ``axis``; as ``nbbn.std``."""
    return _var_or_std(a, axis, dtype, ddof, keepdims, correction, split_every, root=True)
