"""Exact statistics of float data, and errors measured against them.

Every finite float is an integer times a power of two, so a set of them scaled
by its smallest power is a set of integers: Python's integers then give the
exact sum and sum of squares, and ``fractions.Fraction`` the exact mean and m2
(the sum of squared deviations from the mean). Used by the accuracy tests and
by ``python -m bench.accuracy`` (the README's Accuracy table).
"""
from fractions import Fraction

import numpy as np


def _integers(values):
    """(ints, low): finite floats as Python integers (an object array) times 2**low, exactly."""
    mantissa, exponent = np.frexp(np.asarray(values, np.float64).ravel())
    ints = (mantissa * 2.0 ** 53).astype(np.int64).astype(object)   # exact: 53-bit mantissas
    exponent = exponent.astype(np.int64) - 53
    low = int(exponent.min())
    return ints * np.array([1 << int(e - low) for e in exponent], dtype=object), low


def moments(values):
    """(mean, m2) of a 1-D array of finite floats, as exact Fractions."""
    ints, low = _integers(values)
    n = len(ints)
    s1 = int(ints.sum())
    s2 = int((ints * ints).sum())
    scale = Fraction(2) ** low
    return Fraction(s1, n) * scale, Fraction(n * s2 - s1 * s1, n) * scale * scale


def backward_sums(dy, x, mean):
    """(sum(dy), sum(dy * (x - mean))) of 1-D arrays of finite floats, as exact Fractions."""
    g, g_low = _integers(dy)
    v, v_low = _integers(np.append(x, mean))  # one scale for x and the mean
    centered = v[:-1] - v[-1]
    return (Fraction(int(g.sum())) * Fraction(2) ** g_low,
            Fraction(int((g * centered).sum())) * Fraction(2) ** (g_low + v_low))


def ulps(value, exact, dtype=np.float64):
    """|value - exact| in units in the last place of ``exact`` rounded to ``dtype``."""
    ulp = Fraction(float(np.spacing(np.abs(dtype(float(exact))))))
    return float(abs(Fraction(float(value)) - exact) / ulp)


def relative_error(value, exact):
    """|value - exact| / |exact| (0 where both are 0)."""
    if exact == 0:
        return 0.0 if value == 0 else float("inf")
    return float(abs(Fraction(float(value)) - exact) / abs(exact))


def offset_data(offset, n, rng):
    """``offset + N(0, 1) + drift``: unit spread, a slow linear drift of 4 over the run."""
    return offset + rng.standard_normal(n) + np.linspace(0.0, 4.0, n)


def channels(offset, n, nchan, rng):
    """(nchan, n) values: channel c is ``offset * (c + 1) + N(0, 1) + drift``."""
    return np.stack([offset_data(offset * (c + 1), n, rng) for c in range(nchan)])
