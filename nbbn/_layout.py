"""Axis, dtype and shape rules; every call becomes an (outer, C, inner) plan.

This is the one module that reasons about axes, and it is backend-neutral: it
reads only an array's description (shape, byte strides, dtype), so the same
rules and the same error messages serve NumPy arrays and CUDA arrays. The
kernels only ever see a 3-D strided view ``x[outer, C, inner]`` and reduce
over axes 0 and 2: the kept axes (channels) are collapsed into C, the reduced
axes are split into those laid out outside the channels in memory (outer) and
inside them (inner). A backend makes that view without a copy where the
strides allow, otherwise with one copy.
"""
import functools
import math
import numbers
import operator

import numpy as np
from numpy.lib.array_utils import normalize_axis_index, normalize_axis_tuple


class ConflictError(TypeError, ValueError):
    """Raised where NumPy's and PyTorch's conventions disagree on the exception type."""


# Kinds the kernels read natively (16-bit floats are widened inside them).
KERNEL_KINDS = "biuf"


def is_bfloat16(dtype):
    """Whether ``dtype`` is bfloat16 (``ml_dtypes.bfloat16``, the dtype JAX and PyTorch hand
    to NumPy), recognized without importing ml_dtypes."""
    dtype = np.dtype(dtype)
    return dtype.kind == "V" and dtype.name == "bfloat16" and dtype.itemsize == 2


def is_float(dtype):
    """Whether ``dtype`` is a float the kernels compute with: float16/32/64 or bfloat16."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" and dtype.itemsize <= 8 or is_bfloat16(dtype)


def kernels_read(dtype):
    """Whether the kernels read data of ``dtype`` (bool, integer, float up to 64 bits,
    bfloat16)."""
    dtype = np.dtype(dtype)
    return dtype.kind in KERNEL_KINDS and dtype.itemsize <= 8 or is_bfloat16(dtype)

_HOST_TYPES = (np.ndarray, np.generic, int, float, bool, list, tuple)


def is_device(a):
    """Where ``a`` lives: True for a CUDA array (``__cuda_array_interface__``, or Numba's
    ``__cuda_ndarray__`` marker, which is all the CUDA simulator's device arrays carry)."""
    if a is None or isinstance(a, _HOST_TYPES):
        return False
    if hasattr(a, "__cuda_ndarray__"):
        return True
    try:
        a.__cuda_array_interface__
    except Exception:  # a property: torch raises for CPU tensors (AttributeError) and for
        return bool(getattr(a, "is_cuda", False))  # CUDA tensors that require grad
    return True


NOT_GIVEN = np._NoValue  # NumPy's "not given": its nan-functions pass it on explicitly


def ddof(ddof, correction):
    """``ddof`` from NumPy's pair (both given: an error; ``correction`` may be NOT_GIVEN)."""
    if correction is NOT_GIVEN:
        return ddof
    if ddof != 0:
        raise ConflictError("ddof and correction can't be provided simultaneously.")
    if correction is None:
        raise TypeError("correction must be a number, got None")
    return correction


def result_dtype(dtype, requested):
    """A statistic's dtype, as NumPy's: ``requested``, else a float input's (native byte
    order), else float64."""
    if requested is not None:
        return np.dtype(requested)
    return dtype.newbyteorder("=") if is_float(dtype) else np.dtype(np.float64)


def reduced_axes(axis, ndim):
    """Normalized, sorted tuple of reduced axes (None means all)."""
    if axis is None:
        return tuple(range(ndim))
    if not isinstance(axis, tuple):
        axis = (axis,)
    if any(isinstance(i, (bool, np.bool_)) for i in axis):  # NumPy: an integer is required
        raise TypeError(f"axis must be an integer or a tuple of integers, got {axis!r}")
    axis = tuple(operator.index(i) for i in axis)
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


class Layout:
    """An axis order that maps every array of one shape onto ``(outer, C, inner)``.

    The order is: reduced axes laid out outside the kept ones in memory, the
    kept axes (in their own order, so C enumerates the result in C order),
    then the reduced axes inside them; reduced axes by decreasing stride.
    All arrays of a call (x, y, dy, dx) use the order computed from x, so
    their views address the same element at the same (o, c, i). ``lead``, a
    reduced axis, is put first whatever its stride (virtual batches: then the
    samples of one group are consecutive outer rows).
    """

    def __init__(self, shape, strides, axes, lead=None):
        kept = [i for i in range(len(shape)) if i not in axes]
        c_stride = min((abs(strides[i]) for i in kept if shape[i] > 1), default=np.inf)
        red = sorted((i for i in axes if i != lead), key=lambda i: -abs(strides[i]))
        outer = ([] if lead is None else [lead]) + [i for i in red if abs(strides[i]) >= c_stride]
        inner = [i for i in red if abs(strides[i]) < c_stride]
        self.shape = tuple(shape)
        self.groups = (tuple(outer), tuple(kept), tuple(inner))
        self.order = tuple(outer + kept + inner)
        self.inverse = tuple(np.argsort(self.order).tolist())
        self.shape3 = tuple(math.prod(shape[i] for i in g) for g in self.groups)

    def strides3(self, strides):
        """Byte strides of the 3-D view of an array of this shape with ``strides``, or None
        where no view exists (the axes of a group cannot merge)."""
        merged = [_merged_dims([(self.shape[i], strides[i]) for i in g]) for g in self.groups]
        if any(m is None for m in merged):
            return None
        return tuple(m[1] for m in merged)


# Calls repeat shapes: the layouts and plans are cached by the arrays' descriptions.
layout = functools.lru_cache(maxsize=512)(Layout)


def flipped_strides(shape, strides, axes):
    """Strides with the reduced axes' negative strides flipped (a reduction's order is
    free), and the byte offset of the flipped view's first element."""
    offset = 0
    new = list(strides)
    for i, (n, st) in enumerate(zip(shape, strides)):
        if i in axes and st < 0 and n > 0:
            offset += (n - 1) * st
            new[i] = -st
    return tuple(new), offset


class Reduction:
    """A statistic over ``axes`` of an array: its layout (negative strides of reduced axes
    flipped), count per result, number of results and the result's shape."""

    def __init__(self, shape, strides, axes, keepdims):
        self.axes = axes
        self.strides, self.offset = flipped_strides(shape, strides, axes)
        self.layout = layout(tuple(shape), self.strides, axes)
        outer, self.nchan, inner = self.layout.shape3
        self.count = outer * inner
        self.shape = kept_shape(shape, axes, keepdims)


@functools.lru_cache(maxsize=512)
def _reduction(shape, strides, axes, keepdims):
    return Reduction(shape, strides, axes, keepdims)


def reduction(a, axis, keepdims):
    """The cached ``Reduction`` of array ``a`` (anything with shape and byte strides)."""
    axes = reduced_axes(axis, len(a.shape))
    return _reduction(tuple(a.shape), tuple(a.strides), axes, bool(keepdims))


class ChannelPlan:
    """A batch-norm input's plan: channel axis, layout, channels, values per channel,
    and the dtypes of the results (x's float dtype, native byte order) and of the
    batch statistics (at least float32).

    Virtual batches (``virtual_batch_size``, ghost batch norm) split axis 0 into
    ``groups`` consecutive groups, each normalized with its own statistics: group g
    is the outer rows ``[g * group_rows, (g + 1) * group_rows)`` of the layout (axis 0
    leads it) and holds ``group_count`` values per channel, the last ``last_count``.
    Statistics are then per (group, channel): vectors of ``groups * nchan`` values,
    group-major. Without virtual batches there is one group, the whole batch.
    """

    def __init__(self, shape, strides, dtype, axis, virtual_batch_size=None):
        self.shape = shape
        self.axis = axis
        self.size = math.prod(shape)
        self.nchan = shape[axis]
        self.count = self.size // self.nchan if self.nchan else 0
        self.layout = layout(shape, strides, tuple(i for i in range(len(shape)) if i != axis),
                             None if virtual_batch_size is None else 0)
        self.dtype = dtype.newbyteorder("=")
        self.stats_dtype = np.promote_types(self.dtype, np.float32)
        self.groups, self.group_rows = 1, self.layout.shape3[0]
        self.group_count = self.last_count = self.count
        if virtual_batch_size is not None:
            batch = shape[0]
            per_sample = self.count // batch if batch else 0
            self.groups = -(-batch // virtual_batch_size)
            self.group_rows = virtual_batch_size * (self.layout.shape3[0] // batch if batch else 0)
            self.group_count = min(virtual_batch_size, batch) * per_sample
            self.last_count = (batch - (self.groups - 1) * virtual_batch_size) * per_sample


@functools.lru_cache(maxsize=512)
def _channel_plan(shape, strides, dtype, axis, virtual_batch_size):
    return ChannelPlan(shape, strides, dtype, axis, virtual_batch_size)


def channel_plan(a, axis, name="x", min_ndim=2, virtual_batch_size=None):
    """The cached ``ChannelPlan`` of a batch-norm input ``a`` (rank, axis and virtual batch
    size validated)."""
    shape = tuple(a.shape)
    if len(shape) < min_ndim:
        raise ValueError(f"{name} must have at least 2 dimensions (batch, channels, ...), "
                         f"got shape {shape}")
    axis = normalize_axis_index(operator.index(axis), len(shape), "axis")
    if virtual_batch_size is not None:
        virtual_batch_size = check_virtual_batch_size(virtual_batch_size)
        if axis == 0:
            raise ValueError("virtual_batch_size splits the batch on axis 0, which is the "
                             "channel axis here (axis=0)")
    return _channel_plan(shape, tuple(a.strides), np.dtype(a.dtype), axis, virtual_batch_size)


# ---- argument rules (each names the argument it blames) -------------------------------------


class PlanCache(dict):
    """The small calls' plans (``batchnorm._small``, ``stats._small_statistics``), keyed by
    their arrays' description: a dict's lookup, cheaper than ``lru_cache``'s on this hot
    path, forgotten all at once past LIMIT entries (as many as the plan caches above)."""

    LIMIT = 512

    def keep(self, key, entry):
        """Store and return ``entry``."""
        if len(self) >= self.LIMIT:
            self.clear()
        self[key] = entry
        return entry


def check_float_dtype(dtype, name):
    """Batch-norm inputs are float16/32/64 or bfloat16: integer and bool are TypeErrors."""
    if not is_float(dtype):
        raise TypeError(f"{name} must be a floating-point array (float16/32/64, bfloat16), "
                        f"got dtype {np.dtype(dtype)}")


def check_channel_shape(shape, name, nchan):
    """A per-channel vector's shape: (nchan,), or any 1-D shape if nchan is None."""
    shape = tuple(shape)
    if nchan is None and len(shape) != 1:
        raise ValueError(f"{name} must be 1-D, one value per channel; got shape {shape}")
    if nchan is not None and shape != (nchan,):
        raise ValueError(f"{name} must have shape ({nchan},), one value per channel; "
                         f"got shape {shape}")


def _real(value, name):
    """A real number (not bool) as a float, or a TypeError naming the argument."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_eps(eps, training=False):
    """eps >= 0, and > 0 in training (PyTorch: a constant channel would divide by zero)."""
    eps = _real(eps, "eps")
    if training and not eps > 0:
        raise ValueError(f"eps must be positive during training, got {eps}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


def check_activation(activation):
    """An epilogue's activation: None or "relu" (ValueError naming it otherwise)."""
    if activation is None or isinstance(activation, str) and activation == "relu":
        return activation
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def check_virtual_batch_size(size):
    """A positive integer (samples per virtual batch)."""
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)) \
            or size < 1:
        raise ValueError(f"virtual_batch_size must be a positive integer (or None), got {size!r}")
    return int(size)


def check_renorm_limits(rmax, dmax):
    """Batch renorm's clipping limits: rmax >= 1, dmax >= 0 (floats)."""
    if not rmax >= 1:
        raise ValueError(f"rmax must be >= 1, got {rmax}")
    if not dmax >= 0:
        raise ValueError(f"dmax must be >= 0, got {dmax}")
    return float(rmax), float(dmax)


def check_momentum(momentum):
    momentum = _real(momentum, "momentum")
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return momentum


def check_count(count, minimum):
    """A whole number of values per channel, at least ``minimum``."""
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral):
        raise TypeError(f"count must be an integer (values per channel), got "
                        f"{type(count).__name__} {count!r}")
    if count < minimum:
        raise ValueError(f"count must be >= {minimum}, got {count}")
    return int(count)


def check_out_shape_dtype(out_shape, out_dtype, shape, dtype, casting, name="out"):
    """A reduction's ``out=``: the result's shape, a dtype the result can be cast to under
    NumPy's ``casting`` rule for that statistic ("unsafe" for mean/var, "same_kind" for std)."""
    if tuple(out_shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(out_shape)}, expected {tuple(shape)}")
    if not np.can_cast(dtype, out_dtype, casting):
        raise ConflictError(f"{name} has dtype {out_dtype}, cannot hold a {np.dtype(dtype)} result")


def check_exact_shape_dtype(out_shape, out_dtype, shape, dtype, name="out"):
    """A batch-norm function's ``out=``: exactly the result's shape and dtype."""
    if tuple(out_shape) != tuple(shape) or np.dtype(out_dtype) != dtype:
        raise ValueError(f"{name} must have shape {tuple(shape)} and dtype {np.dtype(dtype)}, "
                         f"got shape {tuple(out_shape)} and dtype {out_dtype}")
