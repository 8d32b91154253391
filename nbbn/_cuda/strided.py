"""Copy and fill kernels over any strides (the device side of ``arrays.copy``/``arrays.fill``).

In a module of their own: the CUDA simulator swaps the ``cuda`` global of a kernel's
module while the kernel runs, which would break host code beside it in other threads.
"""
from numba import cuda

from .elements import store


@cuda.jit(cache=True)
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
        store(dst, d, src[s])


@cuda.jit(cache=True)
def fill_kernel(a, value):
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        store(a, i, value)


KERNELS = ("copy_strided", "fill_kernel")
