"""Strided variants of an array: every memory layout a kernel must read correctly."""
import numpy as np


def variants(a):
    """(name, array) pairs with a's values in every layout; each equals ``a`` elementwise."""
    yield "C", np.ascontiguousarray(a)
    yield "F", np.asfortranarray(a)
    ro = a.copy()
    ro.flags.writeable = False
    yield "readonly", ro
    yield "byteswapped", a.astype(a.dtype.newbyteorder("S"))
    if a.ndim >= 1 and a.size:
        big = np.repeat(a, 2, axis=-1)
        yield "sliced", big[..., ::2]
        yield "negative", np.flip(np.flip(a, -1).copy(), -1)
    if a.ndim >= 2:
        yield "transposed", np.ascontiguousarray(np.swapaxes(a, 0, -1)).swapaxes(0, -1)
