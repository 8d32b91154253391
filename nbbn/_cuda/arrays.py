"""Device arrays: interop with torch/CuPy/Numba, (outer, C, inner) views, scratch, copies.

Any CUDA array is handled as a Numba device array over its memory (``to_numba``:
zero-copy); results are allocated by the input's own library (``Family``), so
CuPy in gives CuPy out and torch in gives torch out, in that library's memory
pool. A view is made without a copy where the strides allow (``_layout``'s
rules, applied to the device array's shape and strides); otherwise the array
is copied once, on the device, into the layout's order (``copy_strided``).
"""
import numpy as np
from numba import cuda

from .launch import SIMULATOR, cdiv, target_blocks, threads


# ---- interop: Numba views of any CUDA array, results of the input's own kind ----------------


def library(a):
    """'torch', 'cupy' or 'numba': who allocates results for input ``a``."""
    top = type(a).__module__.split(".", 1)[0]
    return top if top in ("torch", "cupy") else "numba"


def to_numba(a):
    """A Numba device array over ``a``'s memory (zero-copy)."""
    if hasattr(a, "__cuda_ndarray__"):
        return a
    if SIMULATOR:
        raise RuntimeError(f"nbbn: the CUDA simulator cannot read a {type(a).__name__} "
                           "(only Numba device arrays exist there); unset NUMBA_ENABLE_CUDASIM")
    if getattr(a, "requires_grad", False):  # torch hides the interface of such tensors
        a = a.detach()
    return cuda.as_cuda_array(a)


class _HostInterface:
    """Exposes an ``__array_interface__`` while keeping the memory's owner alive."""

    def __init__(self, interface, owner):
        self.__array_interface__ = interface
        self.owner = owner


def strided(a, shape, strides, offset=0):
    """A Numba device array over ``a``'s memory: origin at a's first element + ``offset``
    bytes, any ``shape``/``strides`` (bytes). ``a`` is a Numba device array."""
    shape, strides = tuple(int(n) for n in shape), tuple(int(s) for s in strides)
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        host = a._ary  # the simulator's device memory is this NumPy array
        desc = {"data": (host.__array_interface__["data"][0] + offset, False), "shape": shape,
                "strides": strides, "typestr": host.dtype.str, "version": 3}
        return FakeCUDAArray(np.asarray(_HostInterface(desc, host)))
    cai = a.__cuda_array_interface__
    desc = {"data": (cai["data"][0] + offset, False), "shape": shape, "strides": strides,
            "typestr": cai["typestr"], "version": 3}
    return cuda.from_cuda_array_interface(desc, owner=a, sync=False)


class Family:
    """Allocation and reshaping in the library of an input array (torch, CuPy or Numba)."""

    def __init__(self, like):
        self.like = like
        self.kind = library(like)

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        shape = tuple(int(n) for n in shape)
        if self.kind == "torch":
            import torch
            return torch.empty(shape, dtype=getattr(torch, dtype.name), device=self.like.device)
        if self.kind == "cupy":
            import cupy
            with self.like.device:
                return cupy.empty(shape, dtype)
        return cuda.device_array(shape, dtype)

    def permute(self, a, axes):
        """``a`` with its axes reordered (a view, as numpy.transpose)."""
        axes = tuple(int(i) for i in axes)
        if axes == tuple(range(len(axes))):
            return a
        if self.kind == "torch":
            return a.permute(*axes)
        if self.kind == "cupy":
            return a.transpose(axes)
        return permuted(a, axes)


# ---- kernels over any strides ----------------------------------------------------------------


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
    view = strided(a, ((hi - lo) // item + 1,), (item,), lo)
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


def is_c_contiguous(a):
    expected = a.dtype.itemsize
    for n, s in zip(reversed(a.shape), reversed(a.strides)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def flat_view(a):
    """A C-contiguous device array as 1-D."""
    return strided(a, (int(np.prod(a.shape, dtype=np.int64)),), (a.dtype.itemsize,))


def view3(a, layout, strides=None, offset=0):
    """The (outer, C, inner) kernel view of device array ``a`` in ``layout`` (``strides``/
    ``offset``: a's, possibly with reduced axes flipped); one device copy into the layout's
    order where the strides forbid a view. Views never carry negative strides: such
    arrays take the copy."""
    s3 = layout.strides3(tuple(a.strides) if strides is None else strides)
    if s3 is not None and not any(s < 0 or s % a.dtype.itemsize for s in s3):
        return strided(a, layout.shape3, s3, offset)
    buf = scratch([layout.shape[i] for i in layout.order], a.dtype)
    copy(permuted(a, layout.order), buf)
    return buf.reshape(layout.shape3)


def write_view(a, layout):
    """A writable kernel view of ``a`` in ``layout``, or None where a copy is needed."""
    s3 = layout.strides3(tuple(a.strides))
    if s3 is None or any(s < 0 or s % a.dtype.itemsize for s in s3):
        return None
    return strided(a, layout.shape3, s3)


def permuted(a, axes):
    """Numba device array ``a`` with its axes reordered (a view)."""
    return strided(a, [a.shape[i] for i in axes], [a.strides[i] for i in axes])
