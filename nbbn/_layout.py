"""Axis, dtype, shape and ``out=`` rules; every call becomes an (outer, C, inner) view.

This is the one module that reasons about axes. The kernels only ever see a
3-D strided view ``x[outer, C, inner]`` and reduce over axes 0 and 2: the
kept axes (channels) are collapsed into C, the reduced axes are split into
those laid out outside the channels in memory (outer) and inside them (inner).
No copy is made where the strides allow a view; otherwise one copy is made.
"""
import functools
import math
import operator

import numpy as np
from numpy.lib.array_utils import normalize_axis_index, normalize_axis_tuple


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
    if a.dtype.kind == "f" and a.dtype.itemsize == 2:  # float16, either byte order
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


def _merged_dims(dims):
    """(size, stride) of dims (outermost first) merged into one, or None if strides forbid."""
    size, stride = 1, 0
    for n, s in reversed(dims):
        if n == 1:
            continue
        if size == 1:
            size, stride = n, s
        elif s == stride * size:
            size *= n
        else:
            return None
    return size, stride


@functools.lru_cache(maxsize=256)
def _axis_order(shape, strides, axes):
    """(order, its inverse, (outer, kept, inner) axis groups, 3-D shape); cached: calls
    repeat shapes."""
    kept = [i for i in range(len(shape)) if i not in axes]
    c_stride = min((abs(strides[i]) for i in kept if shape[i] > 1), default=np.inf)
    red = sorted(axes, key=lambda i: -abs(strides[i]))
    outer = [i for i in red if abs(strides[i]) >= c_stride]
    inner = [i for i in red if abs(strides[i]) < c_stride]
    groups = (tuple(outer), tuple(kept), tuple(inner))
    order = tuple(outer + kept + inner)
    shape3 = tuple(math.prod(shape[i] for i in g) for g in groups)
    return order, tuple(np.argsort(order).tolist()), groups, shape3


class Layout:
    """An axis order that maps every array of one shape onto ``(outer, C, inner)``.

    The order is: reduced axes laid out outside the kept ones in memory, the
    kept axes (in their own order, so C enumerates the result in C order),
    then the reduced axes inside them; reduced axes by decreasing stride.
    All arrays of a call (x, y, dy, dx) use the order computed from x, so
    their views address the same element at the same (o, c, i).
    """

    def __init__(self, a, axes):
        """``a``: anything with ``shape`` and byte ``strides`` (NumPy, Numba device arrays)."""
        self.shape = tuple(a.shape)
        self.order, self.inverse, self.groups, self.shape3 = _axis_order(
            self.shape, tuple(a.strides), tuple(axes))

    def strides3(self, a):
        """Byte strides of the 3-D view of ``a`` (shaped like the source, given by its
        ``shape`` and ``strides``: device arrays too), or None where no view exists."""
        merged = [_merged_dims([(a.shape[i], a.strides[i]) for i in g]) for g in self.groups]
        if any(m is None for m in merged):
            return None
        return tuple(m[1] for m in merged)

    def view(self, a, writeable=False):
        """The 3-D view of ``a`` (of this layout's shape); one copy where strides forbid a view.

        Inputs come back read-only (one Numba specialization whatever the
        caller's flags). With ``writeable=True`` (outputs) None means no view exists.
        """
        t = a.transpose(self.order)
        try:
            v = t.reshape(self.shape3, copy=False)
        except ValueError:  # the axes of a group cannot merge without a copy
            if writeable:
                return None
            v = np.ascontiguousarray(t).reshape(self.shape3)
        if not writeable:
            v.flags.writeable = False
        return v

    def empty(self, dtype):
        """A new array of this shape, laid out like the source array: (array, its 3-D view)."""
        buf = np.empty([self.shape[i] for i in self.order], dtype)
        return buf.transpose(self.inverse), buf.reshape(self.shape3)


def flip_reduced(a, axes):
    """A view of ``a`` with reduced axes' negative strides flipped (reduction order is free)."""
    if all(s >= 0 for s in a.strides):
        return a
    return a[tuple(slice(None, None, -1) if i in axes and s < 0 else slice(None)
                   for i, s in enumerate(a.strides))]


def flipped_strides(shape, strides, axes):
    """``flip_reduced`` on metadata: (strides, byte offset of the flipped view's first element)."""
    offset = 0
    new = list(strides)
    for i, (n, st) in enumerate(zip(shape, strides)):
        if i in axes and st < 0 and n > 0:
            offset += (n - 1) * st
            new[i] = -st
    return tuple(new), offset


def three_d(a, axes):
    """The read-only (outer, C, inner) view of ``a`` reducing ``axes``."""
    a = flip_reduced(a, axes)
    return Layout(a, axes).view(a)


def check_out(out, shape, dtype, name="out"):
    """Validate an ``out=`` array for a result of ``shape``/``dtype``."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    check_out_shape_dtype(out.shape, out.dtype, shape, dtype, name)
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


# ---- batch-norm argument rules -------------------------------------------------------------


def check_float_dtype(dtype, name):
    """Batch-norm inputs are float16/32/64: integer and bool are TypeErrors."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f" or dtype.itemsize > 8:
        raise TypeError(f"{name} must be a floating-point array (float16/32/64), got dtype {dtype}")


def float_array(a, name):
    """A floating-point array (batch-norm inputs: integer and bool are TypeErrors)."""
    a = as_array(a, name)
    check_float_dtype(a.dtype, name)
    return a


def channel_axis(x, axis, name="x"):
    """Validate a batch-norm input's rank and normalize its channel axis."""
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (batch, channels, ...), "
                         f"got shape {x.shape}")
    return normalize_axis_index(operator.index(axis), x.ndim, "axis")


def channel_vector(p, name, nchan):
    """A per-channel float vector of shape (nchan,) (any length if nchan is None), or None."""
    if p is None:
        return None
    p = float_array(p, name)
    check_channel_shape(p.shape, name, nchan)
    return p


def check_channel_shape(shape, name, nchan):
    """A per-channel vector's shape: (nchan,), or any 1-D shape if nchan is None."""
    shape = tuple(shape)
    if nchan is None and len(shape) != 1:
        raise ValueError(f"{name} must be 1-D, one value per channel; got shape {shape}")
    if nchan is not None and shape != (nchan,):
        raise ValueError(f"{name} must have shape ({nchan},), one value per channel; "
                         f"got shape {shape}")


def running_buffer(p, name, nchan):
    """A running-statistics buffer: updated in place, so a writable float ndarray."""
    if p is None:
        return None
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), "
                        f"got {type(p).__name__}")
    p = channel_vector(p, name, nchan)
    if not p.flags.writeable:
        raise ValueError(f"{name} is read-only; running statistics are updated in place")
    return p


def check_eps(eps):
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return float(eps)


def check_momentum(momentum):
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return float(momentum)


def check_out_exact(out, shape, dtype, name="out"):
    """``out=`` of a batch-norm function: exactly the result's shape and dtype, writable."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    check_exact_shape_dtype(out.shape, out.dtype, shape, dtype, name)
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


def check_out_shape_dtype(out_shape, out_dtype, shape, dtype, name="out"):
    """A reduction's ``out=``: the result's shape, a dtype it can be cast to (same kind)."""
    if tuple(out_shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(out_shape)}, expected {tuple(shape)}")
    if not np.can_cast(dtype, out_dtype, "same_kind"):
        raise ConflictError(f"{name} has dtype {out_dtype}, cannot hold a {np.dtype(dtype)} result")


def check_exact_shape_dtype(out_shape, out_dtype, shape, dtype, name="out"):
    """A batch-norm function's ``out=``: exactly the result's shape and dtype."""
    if tuple(out_shape) != tuple(shape) or np.dtype(out_dtype) != dtype:
        raise ValueError(f"{name} must have shape {tuple(shape)} and dtype {np.dtype(dtype)}, "
                         f"got shape {tuple(out_shape)} and dtype {out_dtype}")
