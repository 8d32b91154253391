"""Slow, obviously correct float64 references shared by tests and benchmarks."""
import numpy as np


def mean(a, axis=None, keepdims=False):
    return np.asarray(a, np.float64).mean(axis=axis, keepdims=keepdims)


def var(a, axis=None, ddof=0, keepdims=False):
    """Two-pass variance in float64 (NumPy's algorithm on float64 data)."""
    return np.asarray(a, np.float64).var(axis=axis, ddof=ddof, keepdims=keepdims)


def m2(a, axis=None):
    a = np.asarray(a, np.float64)
    return ((a - a.mean(axis=axis, keepdims=True)) ** 2).sum(axis=axis)
