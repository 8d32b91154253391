"""Axis, dtype, shape and ``out=`` rules; every call becomes an (outer, C, inner) view.

This is the one module that reasons about axes. The kernels only ever see a
3-D strided view ``x[outer, C, inner]`` and reduce over axes 0 and 2: the
kept axes (channels) are collapsed into C, the reduced axes are split into
those laid out outside the channels in memory (outer) and inside them (inner).
No copy is made where the strides allow a view; otherwise one copy is made.
"""
import math
import operator

import numpy as np
from numpy.exceptions import AxisError  # noqa: F401  (re-exported for callers)
from numpy.lib.array_utils import normalize_axis_tuple
from numpy.lib.stride_tricks import as_strided


class ConflictError(TypeError, ValueError):
    """Raised where NumPy's and PyTorch's conventions disagree on the exception type."""


# Kinds the CPU kernels read natively; float16 is widened to float32 first.
KERNEL_KINDS = "biuf"


def as_array(a, name):
    """``numpy.asarray(a)``, with a TypeError naming the argument when a is not array-like."""
    if isinstance(a, np.ndarray):
        return a
    try:
        arr = np.asarray(a)
    except Exception as exc:
        raise TypeError(f"{name} must be array-like, got {type(a).__name__}") from exc
    if arr.dtype == object or arr.dtype.kind in "SUV":
        raise TypeError(f"{name} must be a numeric array-like, got {type(a).__name__}")
    return arr


def kernel_input(a):
    """A native-byte-order array of a dtype the kernels read (widening float16)."""
    if a.dtype == np.float16:
        return a.astype(np.float32)
    if not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


def reduced_axes(axis, ndim):
    """Normalized, sorted tuple of reduced axes (None means all)."""
    if axis is None:
        return tuple(range(ndim))
    if not isinstance(axis, tuple):
        axis = (operator.index(axis),)
    return tuple(sorted(normalize_axis_tuple(axis, ndim, "axis")))


def kept_shape(shape, axes, keepdims):
    """Shape of a reduction's result."""
    if keepdims:
        return tuple(1 if i in axes else n for i, n in enumerate(shape))
    return tuple(n for i, n in enumerate(shape) if i not in axes)


def _collapse(dims):
    """(size, stride) of dims (outermost first) merged into one, or None if strides forbid."""
    size, stride = 1, 0
    for n, s in reversed(dims):
        if size == 1:
            size, stride = n, s
        elif s == stride * size:
            size *= n
        else:
            return None
    return size, stride


def three_d(a, axes):
    """The (outer, C, inner) view of ``a`` reducing ``axes``; a copy only where strides forbid."""
    if a.size == 0:
        n_chan = math.prod(n for i, n in enumerate(a.shape) if i not in axes)
        return np.empty((1, n_chan, 0), a.dtype) if n_chan else np.empty((1, 0, 1), a.dtype)
    # Reduction order is free: flip reduced axes with negative strides.
    flip = tuple(slice(None, None, -1) if i in axes and s < 0 else slice(None)
                 for i, s in enumerate(a.strides))
    a = a[flip]
    dims = [(n, s, i in axes) for i, (n, s) in enumerate(zip(a.shape, a.strides)) if n != 1]
    kept = _collapse([(n, s) for n, s, red in dims if not red])
    red = sorted(((n, s) for n, s, r in dims if r), key=lambda d: -d[1])
    if kept is not None:
        c_stride = abs(kept[1]) if kept[0] > 1 else np.inf
        inner = _collapse([d for d in red if d[1] < c_stride])
        outer = _collapse([d for d in red if d[1] >= c_stride])
        if inner is not None and outer is not None:
            shape = (outer[0], kept[0], inner[0])
            strides = (outer[1], kept[1], inner[1])
            return as_strided(a, shape, strides, writeable=False)
    # Strides that no view can express: one contiguous copy, channels first.
    order = [i for i in range(a.ndim) if i not in axes] + list(axes)
    copy = np.ascontiguousarray(a.transpose(order))
    n_red = math.prod(a.shape[i] for i in axes)
    return copy.reshape(1, copy.size // n_red if n_red else 0, n_red)


def check_out(out, shape, dtype, name="out"):
    """Validate an ``out=`` array for a result of ``shape``/``dtype``."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} has shape {out.shape}, expected {tuple(shape)}")
    if not np.can_cast(dtype, out.dtype, "same_kind"):
        raise ConflictError(f"{name} has dtype {out.dtype}, cannot hold a {np.dtype(dtype)} result")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out
