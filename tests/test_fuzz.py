"""Fuzzing the statistics against the float64 NumPy reference.

Random shapes (zeros and ones included, one long axis to cross kernel block
and tile edges), dtypes, axes, memory layouts and value regimes (tiny, huge,
overflowing, large offsets, NaN/Inf). ``HYPOTHESIS_PROFILE=long`` runs more.

Tolerances follow from float64 accumulation: a result may differ from the
reference by a few ulps of its own dtype plus n * eps64 times the channel's
scale (max |x| for the mean, max (x - mean)**2 for the variance).
"""
import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import nbbn
from tests import reference
from tests.layouts import variants

EPS64 = np.finfo(np.float64).eps
# float16 is read through float32; int8 and uint64 add range edges to test_stats' set.
DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8,
          np.uint64, np.bool_]
# Lengths at and around the kernels' block (4096) and tile (256) edges.
LONG = [255, 256, 257, 4095, 4097, 9000]
REGIMES = ["normal", "offset", "tiny", "huge", "overflow", "special"]


@st.composite
def shapes(draw):
    dims = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    if dims and draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))] = draw(st.sampled_from(LONG))
        # keep the array small: the other axes shrink to at most 3
        dims = [d if d in LONG else min(d, 3) for d in dims]
    return tuple(dims)


def values(regime, shape, dtype, rng):
    """An array of dtype in the given value regime."""
    dtype = np.dtype(dtype)
    return np.asarray(_values(regime, shape, dtype, rng))  # 0-d stays an array


def _values(regime, shape, dtype, rng):
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if regime in ("huge", "overflow"):
            return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        return rng.integers(max(info.min, -100), min(info.max, 100), shape, dtype=dtype,
                            endpoint=True)
    info = np.finfo(dtype)
    x = rng.standard_normal(shape)
    if regime == "offset":  # the textbook E[x^2] - E[x]^2 loses every digit here
        x = x * 0.01 + 1e3
    elif regime == "tiny":  # down into the subnormals
        x = x * float(info.smallest_normal) * 4
    elif regime == "huge":  # squares still fit in float64
        x = x * min(float(info.max) / 16, 1e150)
    elif regime == "overflow":  # squares overflow float64 (only float64 data gets there)
        x = x * (float(info.max) / 16)
    elif regime == "special" and x.size:
        mask = rng.random(shape)
        x = np.where(mask < 0.1, np.nan, x)
        x = np.where(mask > 0.93, np.inf, x)
        x = np.where((mask > 0.86) & (mask <= 0.93), -np.inf, x)
    return x.astype(dtype)


@st.composite
def axes(draw, ndim):
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none" or ndim == 0:
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    picked = draw(st.lists(st.integers(0, ndim - 1), unique=True, max_size=ndim))
    return tuple(draw(st.permutations(picked)))  # any order, () included


@st.composite
def cases(draw):
    shape = draw(shapes())
    dtype = draw(st.sampled_from(DTYPES))
    regime = draw(st.sampled_from(REGIMES))
    base = values(regime, shape, dtype, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    name, a = draw(st.sampled_from(list(variants(base))))
    assume(not (a.dtype.kind == "f" and a.dtype.itemsize == 2 and not a.dtype.isnative))  # see below
    return name, regime, a, draw(axes(a.ndim))


def _reduced_count(shape, axis):
    if axis is None:
        return int(np.prod(shape))
    axis = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([shape[i] for i in axis]))


def _finite_max(v, axis, keepdims):
    """max |v| over the reduced axes, ignoring non-finite entries (0 for empty)."""
    v = np.where(np.isfinite(v), np.abs(v), 0.0)
    if v.size == 0:
        return np.zeros(np.shape(np.sum(v, axis=axis, keepdims=keepdims)))
    return np.max(v, axis=axis, keepdims=keepdims)


def assert_close(got, want, atol, what):
    """got matches want (already in got's dtype): NaN where NaN, the same infinities,
    and within a few ulps of got's dtype plus atol elsewhere."""
    got_arr = np.asarray(got)
    eps = np.finfo(got_arr.dtype).eps if got_arr.dtype.kind == "f" else EPS64
    tiny = np.finfo(got_arr.dtype).smallest_subnormal if got_arr.dtype.kind == "f" else 0.0
    g = got_arr.astype(np.float64)
    w = np.asarray(want).astype(np.float64)
    ok = np.isclose(g, w, rtol=4 * eps, atol=0, equal_nan=True) | (
        np.isfinite(g) & np.isfinite(w) & (np.abs(g - w) <= 4 * eps * np.abs(w) + atol + tiny))
    assert ok.all(), f"{what}: got {g[~ok][:5]}, want {w[~ok][:5]}, atol {np.broadcast_to(atol, ok.shape)[~ok][:5]}"


def _expected(a, axis, keepdims, ddof):
    """Reference mean/var/m2 and their tolerances, all float64."""
    x = np.asarray(a, np.float64)
    n = _reduced_count(a.shape, axis)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        mean = reference.mean(x, axis, keepdims)
        var = reference.var(x, axis, ddof, keepdims)
        m2 = reference.m2(x, axis)
        dev = x - reference.mean(x, axis, True)
        mean_tol = 8 * n * EPS64 * _finite_max(x, axis, keepdims)
        m2_tol = 8 * n * EPS64 * _finite_max(dev, axis, keepdims) ** 2 * n
    var_tol = m2_tol / max(n - ddof, 1)
    return mean, var, m2, mean_tol, var_tol, m2_tol


def _numpy(op, a, **kw):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return getattr(np, op)(a, **kw)


@given(cases(), st.booleans(), st.sampled_from([0, 1]))
def test_statistics_match_the_reference(case, keepdims, ddof):
    name, regime, a, axis = case
    before = a.copy()
    mean, var, m2, mean_tol, var_tol, m2_tol = _expected(a, axis, keepdims, ddof)
    n = _reduced_count(a.shape, axis)
    what = f"{a.dtype} {a.shape} {name} {regime} axis={axis}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got_mean = nbbn.mean(a, axis=axis, keepdims=keepdims)
        got_var = nbbn.var(a, axis=axis, ddof=ddof, keepdims=keepdims)
        got_std = nbbn.std(a, axis=axis, ddof=ddof, keepdims=keepdims)
        pair = nbbn.mean_var(a, axis=axis, ddof=ddof, keepdims=keepdims)
        mom = nbbn.moments(a, axis=axis, keepdims=keepdims)
    # Same shapes, dtypes and scalar-ness as NumPy.
    for got, op, kw in [(got_mean, "mean", {}), (got_var, "var", {"ddof": ddof}),
                        (got_std, "std", {"ddof": ddof}), (pair[0], "mean", {}),
                        (pair[1], "var", {"ddof": ddof})]:
        ref = _numpy(op, a, axis=axis, keepdims=keepdims, **kw)
        assert np.shape(got) == np.shape(ref) and np.asarray(got).dtype == np.asarray(ref).dtype, \
            (op, what, np.shape(got), np.shape(ref), np.asarray(got).dtype)
        assert np.isscalar(got) == np.isscalar(ref), (op, what)
    out_dtype = np.asarray(got_mean).dtype
    with np.errstate(all="ignore"):
        assert_close(got_mean, mean.astype(out_dtype), mean_tol, f"mean {what}")
        assert_close(pair[0], mean.astype(out_dtype), mean_tol, f"mean_var[0] {what}")
        assert_close(got_var, var.astype(out_dtype), var_tol, f"var {what}")
        assert_close(pair[1], var.astype(out_dtype), var_tol, f"mean_var[1] {what}")
        assert_close(got_std, np.sqrt(var).astype(out_dtype), np.sqrt(var_tol), f"std {what}")
        assert_close(mom.mean, mean, mean_tol, f"moments.mean {what}")
        if n:  # an empty reduction's m2 is nan here, 0 in the reference; both merge as nothing
            assert_close(mom.m2, np.reshape(m2, np.shape(mom.m2)),
                         np.reshape(m2_tol, np.shape(mom.m2)), f"moments.m2 {what}")
    assert mom.count == n
    # Empty reductions and ddof >= n warn, as in NumPy.
    if n - ddof <= 0 and np.size(got_var):
        assert any(issubclass(w.category, RuntimeWarning) for w in caught), what
    # Inputs are never modified (bitwise, NaN payloads included).
    assert a.tobytes() == before.tobytes()


def test_byteswapped_float16():
    a = np.arange(6, dtype=">f2").reshape(2, 3)
    np.testing.assert_allclose(nbbn.var(a, axis=0), np.var(a.astype(np.float64), axis=0))


@pytest.mark.parametrize("shape,axis", [((3000, 4), 0), ((4, 3000), 1), ((30, 4, 100), (0, 2))])
def test_overflowing_squares_give_inf(shape, axis):
    """Squares overflow float64 but sums do not: var is inf, as NumPy's."""
    x = np.random.default_rng(0).standard_normal(shape) * 1e200
    with np.errstate(over="ignore"):
        want = np.var(x, axis=axis)
    assert np.isposinf(want).all()
    np.testing.assert_array_equal(nbbn.var(x, axis=axis), want)
    np.testing.assert_allclose(nbbn.mean(x, axis=axis), np.mean(x, axis=axis), rtol=1e-9)


@pytest.mark.parametrize("shape,axis", [((3000, 4), 0), ((4, 3000), 1), ((255, 2), None)])
def test_overflowing_sums(shape, axis):
    """Sums overflow float64 (|x| near 1e307): var is inf (the true value overflows; NumPy
    says inf or nan depending on its summation order), and the mean stays finite and
    right where NumPy's overflows to +-inf."""
    x = np.random.default_rng(0).standard_normal(shape) * (np.finfo(np.float64).max / 16)
    assert np.isposinf(reference.var(x, axis)).all()
    assert np.isposinf(nbbn.var(x, axis=axis)).all()
    np.testing.assert_allclose(nbbn.mean(x, axis=axis), reference.mean(x, axis), rtol=1e-12)
