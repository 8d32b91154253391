"""Slow, obviously correct float64 references shared by tests and benchmarks.

Data near the float64 limit is first scaled down by a power of two (exact), so
that a sum that would overflow does not: the reference is the true value,
rounded once (inf where the true value itself overflows).
"""
import numpy as np


def _scaled(a):
    """(x / scale, scale): float64 data and a power of two that keeps its sums finite."""
    x = np.asarray(a, np.float64)
    finite = np.abs(x[np.isfinite(x)])
    scale = 2.0 ** 64 if finite.size and finite.max() > 1e300 else 1.0
    return x / scale, scale


def mean(a, axis=None, keepdims=False):
    x, scale = _scaled(a)
    return x.mean(axis=axis, keepdims=keepdims) * scale


def var(a, axis=None, ddof=0, keepdims=False):
    """Two-pass variance in float64 (NumPy's algorithm on float64 data)."""
    x, scale = _scaled(a)
    with np.errstate(over="ignore"):
        return x.var(axis=axis, ddof=ddof, keepdims=keepdims) * scale * scale


def m2(a, axis=None):
    x, scale = _scaled(a)
    with np.errstate(over="ignore"):
        return ((x - x.mean(axis=axis, keepdims=True)) ** 2).sum(axis=axis) * scale * scale
