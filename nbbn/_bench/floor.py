"""Bandwidth-floor kernels: the plainest parallel Numba loops over the same bytes.

An operation's floor is the time these kernels take to move the bytes the
operation must move (its passes over memory), measured on the same machine in
the same run. Every benchmark result is read as a multiple of it.

    read    sum(x)                      reads x once
    read2   sum(x) + sum(y)             reads x and y once
    copy    y[:] = x                    reads x, writes y
    axpy    z[:] = x + y                reads x and y, writes z

The kernels are Numba's own parallel loops (``prange``, with its reduction)
over flat, contiguous arrays; small arrays run serially (waking the pool would
dominate), as the nbbn kernels do.
"""
import numpy as np
from numba import prange

from .._cpu._jit import kernel, thread_plan


def _read(x):
    s = x.dtype.type(0)
    for i in prange(x.size):
        s += x[i]
    return s


def _read2(x, y):
    s = x.dtype.type(0)
    for i in prange(x.size):
        s += x[i] + y[i]
    return s


def _copy(x, out):
    for i in prange(x.size):
        out[i] = x[i]
    return out


def _axpy(x, y, out):
    for i in prange(x.size):
        out[i] = x[i] + y[i]
    return out


# Compiled as nbbn's own kernels are (lazily, cached, a serial and a parallel
# build, the same launch policy), so that the floor pays what they pay.
_KERNELS = {"read": (kernel(_read), 1, 0), "read2": (kernel(_read2), 2, 0),
            "copy": (kernel(_copy), 1, 1), "axpy": (kernel(_axpy), 2, 1)}

#: Memory passes of each floor kernel, in units of one array: (reads, writes).
PASSES = {name: (r, w) for name, (_, r, w) in _KERNELS.items()}


def floor_kernel(name, size):
    """A ``f(*arrays)`` running floor kernel ``name`` over flat arrays of ``size`` elements."""
    kern = _KERNELS[name][0]
    parallel = thread_plan(size, size)[1]
    return lambda *arrays: kern(*arrays, parallel=parallel)


def floor_runner(steps, x):
    """A zero-argument callable running the floor ``steps`` (kernel names) over x-sized arrays.

    Scratch arrays are allocated here, once, so the timed call moves bytes only.
    """
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype.itemsize == 2:  # 16-bit floats: the same bytes, as integers Numba reads
        flat = flat.view(np.uint16)
    other = flat[::-1].copy()
    out = np.empty_like(flat)
    calls = []
    for name in steps:
        reads, writes = PASSES[name]
        args = (flat, other)[:reads] + ((out,) if writes else ())
        calls.append((floor_kernel(name, flat.size), args))

    def run():
        for kern, args in calls:
            kern(*args)

    return run
