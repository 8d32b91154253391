"""Lazy one-pass statistics of Dask arrays: ``moments``, ``mean``, ``mean_var``, ``var``, ``std``.

Each block is reduced by nbbn's kernels (``nbbn.moments``: one pass, float64
accumulation) to a per-block Welford state ``(count, mean, m2)``; the states
are merged with Chan et al.'s formula up Dask's reduction tree
(``dask.array.reduction``'s chunk/combine/aggregate), so any chunking and any
axes give the float64 accuracy of a two-pass NumPy reduction of the whole
array. Results are Dask arrays; nothing is computed until asked for.

Within a task the state travels as one structured array (fields ``count``,
``mean``, ``m2``, all float64), so one graph yields mean and variance together.
"""
import warnings

import dask.array as da
import numpy as np

from . import _layout
from ._moments import Moments, array_moments

__all__ = ["mean", "mean_var", "moments", "std", "var"]

STATE = np.dtype([("count", np.float64), ("mean", np.float64), ("m2", np.float64)])


def _state(count, mean, m2):
    out = np.empty(np.shape(mean), STATE)
    out["count"], out["mean"], out["m2"] = count, mean, m2
    return out


def _chunk(block, axis, keepdims):
    """One block's Welford state over ``axis`` (dims kept), from nbbn's kernels."""
    m = array_moments(block, axis=axis, keepdims=True)
    return _state(m.count, m.mean, m.m2)


def _merge(states, axis, keepdims):
    """Chan et al.'s merge of the states along ``axis`` (any number of them, counts may be 0)."""
    n, mean, m2 = states["count"], states["mean"], states["m2"]
    filled = n > 0   # an empty state's nan mean/m2 stands for nothing, not for a nan in the data
    with np.errstate(invalid="ignore", divide="ignore"):
        total = n.sum(axis=axis, keepdims=True)
        mean_f = np.where(filled, mean, 0.0)
        merged_mean = (n * mean_f).sum(axis=axis, keepdims=True) / total
        delta = np.where(filled, mean_f - merged_mean, 0.0)
        merged_m2 = (np.where(filled, m2, 0.0).sum(axis=axis, keepdims=True)
                     + (n * delta * delta).sum(axis=axis, keepdims=True))
    empty = total == 0
    out = _state(total, np.where(empty, np.nan, merged_mean), np.where(empty, np.nan, merged_m2))
    return out if keepdims else out.squeeze(axis=axis)


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

    ``mean``/``m2`` are float64 Dask arrays; ``count`` (values per entry) is an
    int where the chunk sizes are known, else a Dask array. Merge with other
    ``Moments`` as usual (``Moments.merge`` works on Dask arrays too).
    """
    a = _as_dask(a)
    if not _layout.kernels_read(a.dtype):
        raise TypeError(f"moments needs real numeric input, got dtype {a.dtype}")
    state, _, count = _reduce(a, axis, keepdims, split_every)
    if count is None:
        count = _field(state, "count", np.int64)
    return Moments(count, _field(state, "mean", np.float64), _field(state, "m2", np.float64))


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
