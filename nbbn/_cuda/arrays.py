"""Device arrays as the kernels see them: (outer, C, inner) views, scratch, strided copies.

A view is made without a copy where the strides allow (``_layout.Layout``'s
rules, applied to the device array's shape and strides); otherwise the array
is copied once, on the device, into the layout's order (``copy_strided``).
"""
import numpy as np
from numba import cuda

from .. import _dispatch
from .launch import cdiv, target_blocks, threads


@cuda.jit
def copy_strided(src, src_base, src_strides, dst, dst_base, dst_strides, shape):
    """dst[...] = src[...] elementwise over ``shape``, both given as 1-D element views
    with the index of their first element (base) and element strides (any signs)."""
    total = 1
    for j in range(len(shape)):
        total *= shape[j]
    for flat in range(cuda.grid(1), total, cuda.gridsize(1)):
        rem = flat
        s = src_base
        d = dst_base
        for j in range(len(shape) - 1, -1, -1):
            n = shape[j]
            q = rem // n
            idx = rem - q * n
            rem = q
            s += idx * src_strides[j]
            d += idx * dst_strides[j]
        dst[d] = src[s]


@cuda.jit
def fill_kernel(a, value):
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        a[i] = value


KERNELS = ("copy_strided", "fill_kernel")


def fill(a, value):
    """a[:] = value for a 1-D device array."""
    if a.shape[0]:
        t = threads()
        fill_kernel[max(1, min(cdiv(a.shape[0], t), target_blocks() * 8)), t](a, value)


def _flat(a):
    """(1-D element view spanning a's memory, index of a's first element, element strides)."""
    item = a.dtype.itemsize
    lo = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s < 0)
    hi = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s > 0)
    view = _dispatch.strided(a, ((hi - lo) // item + 1,), (item,), lo)
    return view, -lo // item, tuple(int(s) // item for s in a.strides)


def copy(src, dst):
    """dst[...] = src (same shape, any strides and dtypes), on the device."""
    size = int(np.prod(src.shape, dtype=np.int64))
    if size == 0:
        return
    sv, sb, ss = _flat(src)
    dv, db, ds = _flat(dst)
    t = threads()
    grid = max(1, min(cdiv(size, t), target_blocks() * 8))
    copy_strided[grid, t](sv, sb, ss, dv, db, ds, tuple(int(n) for n in src.shape))


def scratch(shape, dtype):
    """A device work array (Numba's allocator: never returned to the caller)."""
    return cuda.device_array(tuple(int(n) for n in shape), np.dtype(dtype))


class _Meta:
    """Shape and byte strides of an array, as ``_layout.Layout`` reads them."""

    def __init__(self, shape, strides):
        self.shape = tuple(shape)
        self.strides = tuple(strides)
        self.ndim = len(self.shape)


def is_c_contiguous(a):
    expected = a.dtype.itemsize
    for n, s in zip(reversed(a.shape), reversed(a.strides)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def flat_view(a):
    """A C-contiguous device array as 1-D."""
    return _dispatch.strided(a, (int(np.prod(a.shape, dtype=np.int64)),), (a.dtype.itemsize,))


class DeviceLayout:
    """A device array's (outer, C, inner) layout for reducing ``axes`` (``_layout`` rules).

    ``flip``: reduced axes with negative strides are read backwards (a pure
    reduction's order is free; elementwise passes must not flip). Views never
    carry negative strides: such arrays take the copy.
    """

    def __init__(self, a, axes, flip):
        from .. import _layout
        self.axes = tuple(axes)
        self.flip = flip
        self.shape = tuple(int(n) for n in a.shape)
        self.layout = _layout.Layout(self._meta(a)[0], self.axes)
        self.shape3 = self.layout.shape3
        self.order = self.layout.order
        self.inverse = self.layout.inverse

    def _meta(self, a):
        from .. import _layout
        strides, offset = tuple(a.strides), 0
        if self.flip:
            strides, offset = _layout.flipped_strides(self.shape, strides, self.axes)
        return _Meta(self.shape, strides), offset

    def _strides3(self, meta, itemsize):
        s3 = self.layout.strides3(meta)
        if s3 is None or any(s < 0 or s % itemsize for s in s3):
            return None
        return s3

    def view(self, a):
        """Kernel view (outer, C, inner) of device array ``a`` shaped like the source."""
        meta, offset = self._meta(a)
        s3 = self._strides3(meta, a.dtype.itemsize)
        if s3 is not None:
            return _dispatch.strided(a, self.shape3, s3, offset)
        buf = scratch([self.shape[i] for i in self.order], a.dtype)
        copy(permuted(a, self.order), buf)
        return buf.reshape(self.shape3)

    def write_view(self, a):
        """A writable kernel view of ``a``, or None where a copy is needed."""
        s3 = self._strides3(_Meta(self.shape, tuple(a.strides)), a.dtype.itemsize)
        return None if s3 is None else _dispatch.strided(a, self.shape3, s3)


def permuted(a, axes):
    """Numba device array ``a`` with its axes reordered (a view)."""
    return _dispatch.strided(a, [a.shape[i] for i in axes], [a.strides[i] for i in axes])
