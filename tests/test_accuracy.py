"""Statistics against exact references (``tests/exact.py``), in ulps, beside NumPy.

Targets (issue "Statistics more accurate than NumPy on every input"): float64
means correctly rounded (within 0.5 ulp of the exact mean) and variances within
1e-14 relative, on data far from zero (``offset + N(0, 1) + drift``), on every
path the kernels take: flat (axis=None), rows (NCHW), columns (channels-last),
columns regrouped (few channels), strided views, serial and parallel builds;
float32/float16 results correctly rounded; constant data exact; finite results
near the float64 limit wherever the answer is finite. Where NumPy misses a
target, its error is printed (``pytest -s``) beside nbbn's.
"""
from fractions import Fraction

import numpy as np
import pytest
from numba import njit

import nbbn
from nbbn import _math
from nbbn._cpu import _blocks, _jit, moments

from . import exact

OFFSETS = [1e3, 1.7e9, 1e12]
VAR_TARGET = 1e-14


@pytest.fixture(params=["serial", "parallel"])
def build(request, monkeypatch):
    """Run every kernel serially, or the parallel build on two threads even for small data."""
    monkeypatch.setattr(_jit, "PARALLEL_MIN_ELEMENTS", 1 if request.param == "parallel" else 1 << 62)
    return request.param


# (name, per-channel values (C, n) -> (array, axis)): the same values on each path.
LAYOUTS = {
    "flat": lambda v: (v[0], None),
    "rows": lambda v: (v.reshape(len(v), 4, -1).transpose(1, 0, 2), (0, 2)),  # [4, C, n/4]
    "columns": lambda v: (np.ascontiguousarray(v.T), 0),                       # [n, C]
    "columns_strided": lambda v: (np.repeat(v.T, 2, axis=1)[::-1, ::2], 0),
    "rows_strided": lambda v: (np.repeat(v.reshape(len(v), 4, -1), 2, -1)[:, ::-1, ::2]
                               .transpose(1, 0, 2), (0, 2)),
}


def _check(a, axis, values, dtype=np.float64):
    """nbbn's mean and var of ``a`` along ``axis`` against the exact ones of ``values``
    (C, n); returns the worst (mean ulps, var relative error) of nbbn and of NumPy."""
    got_mean, got_var = (np.atleast_1d(r) for r in nbbn.mean_var(a, axis=axis))
    np_mean, np_var = np.atleast_1d(np.mean(a, axis=axis)), np.atleast_1d(np.var(a, axis=axis))
    worst = np.zeros((2, 2))
    for c in range(got_mean.size):  # the flat layout holds channel 0 only
        mean, m2 = exact.moments(values[c])
        var = m2 / values.shape[1]
        errors = [[exact.ulps(got_mean[c], mean, dtype), exact.ulps(np_mean[c], mean, dtype)],
                  [exact.relative_error(got_var[c], var), exact.relative_error(np_var[c], var)]]
        worst = np.maximum(worst, errors)
    return worst


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_offset_data_every_path(layout, offset, build, rng):
    values = exact.channels(offset, 24_000, 2, rng)
    (mean_ulps, np_mean_ulps), (var_err, np_var_err) = _check(*LAYOUTS[layout](values), values)
    print(f"{layout} {build} {offset:g}: mean ulps nbbn {mean_ulps:.2f} NumPy {np_mean_ulps:.2f}; "
          f"var relative error nbbn {var_err:.1e} NumPy {np_var_err:.1e}")
    assert mean_ulps <= 0.5
    assert var_err <= VAR_TARGET


@pytest.mark.parametrize("nchan", [3, 5])
def test_offset_data_regrouped_columns(nchan, build, rng):
    """Few channels: rows regrouped into wide rows, with leftover rows (``_blocks.widen``)."""
    values = exact.channels(1e12, 22_013, nchan, rng)
    (mean_ulps, _), (var_err, _) = _check(np.ascontiguousarray(values.T), 0, values)
    assert mean_ulps <= 0.5
    assert var_err <= VAR_TARGET


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("n_inner", [3, 16])
def test_offset_data_short_rows(n_inner, offset, dtype, build, rng):
    """Rows of a few values (small feature maps, [N, C, n_inner]) are read as columns with
    one shift per channel (``moments.moments_short_rows``)."""
    values = exact.channels(offset if dtype == np.float64 else offset / 1e6, 24_000, 3, rng)
    values = values.astype(dtype)
    a = np.ascontiguousarray(values.reshape(3, -1, n_inner).transpose(1, 0, 2))
    assert _blocks.short_rows(a) is not None  # the path under test
    (mean_ulps, _), (var_err, _) = _check(a, (0, 2), values, dtype)
    assert mean_ulps <= 0.5
    if dtype == np.float64:
        assert var_err <= VAR_TARGET
    else:  # correctly rounded, as every float32 result
        got_var = nbbn.var(a, axis=(0, 2))
        for c in range(3):
            mean, m2 = exact.moments(values[c])
            assert exact.ulps(got_var[c], m2 / values.shape[1], dtype) <= 0.5


@pytest.mark.parametrize("offset", OFFSETS)
def test_offset_data_a_million_values(offset):
    values = exact.offset_data(offset, 10**6, np.random.default_rng(7))[None]
    (mean_ulps, _), (var_err, _) = _check(values[0], None, values)
    assert mean_ulps <= 0.5
    assert var_err <= VAR_TARGET


@pytest.mark.parametrize("values", [[3, 84, -86], [7, 1, 4, 9, 2, 8, 3, 3, 1, 6, 5, 0, 2, 9, 9, 1, 0, 4, 5, 11],
                                    np.arange(100_000) % 97 - 40.0])
def test_integer_data_mean_correctly_rounded(values):
    mean, _ = exact.moments(np.asarray(values, np.float64))
    assert exact.ulps(nbbn.mean(values), mean) <= 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("layout", ["flat", "rows", "columns"])
def test_narrow_floats_correctly_rounded(dtype, layout, build, rng):
    """float32/float16 in, the exact mean and variance of the stored values rounded once."""
    values = exact.channels(1e3 if dtype == np.float32 else 50, 6_000, 2, rng).astype(dtype)
    a, axis = LAYOUTS[layout](values)
    got_mean, got_var = nbbn.mean_var(a, axis=axis)
    assert np.asarray(got_mean).dtype == dtype
    for c in range(np.size(got_mean)):
        mean, m2 = exact.moments(values[c])
        v = values[c]
        assert exact.ulps(np.atleast_1d(got_mean)[c], mean, dtype) <= 0.5
        assert exact.ulps(np.atleast_1d(got_var)[c], m2 / v.size, dtype) <= 0.5


@pytest.mark.parametrize("value", [0.1, -3.3e-5, 1e12 + 0.5, 4.1261241019148086e167,
                                   0.9 * np.finfo(np.float64).max])
@pytest.mark.parametrize("layout", ["flat", "rows", "columns", "columns_strided"])
def test_constant_data_exact(value, layout, build):
    values = np.full((3, 5_000), value)
    for dtype in (np.float64, np.float32, np.float16):
        with np.errstate(over="ignore"):
            v = values.astype(dtype)
        if not np.isfinite(v).all():
            continue
        a, axis = LAYOUTS[layout](v)
        mean, var = nbbn.mean_var(a, axis=axis)
        assert (np.asarray(mean) == v[0, 0]).all()
        assert (np.asarray(var) == 0).all()


def test_near_the_float64_limit():
    """Finite, correct results wherever the answer is finite."""
    big = np.finfo(np.float64).max
    a = 0.9 * big * np.array([1, -1, 1, -1, 1, -1, 1.0])
    assert exact.ulps(nbbn.mean(a), exact.moments(a)[0]) <= 0.5   # NumPy: nan
    assert np.isposinf(nbbn.var(a))                                # the true variance overflows
    assert nbbn.var(np.full(262, 4.1261241019148086e167)) == 0     # was -inf
    rng = np.random.default_rng(3)
    for scale in (1e300, 1e150):  # sums of 1e300s and squares of 1e150s overflow
        v = (4 + rng.standard_normal((2, 3000))) * scale
        mean, var = nbbn.mean_var(v, axis=1)
        for c in range(2):
            m, m2 = exact.moments(v[c])
            assert exact.ulps(mean[c], m) <= 0.5
            want = m2 / v.shape[1]
            assert np.isposinf(var[c]) if want > big else exact.relative_error(var[c], want) <= 1e-15


def test_moments_combine_any_chunking(rng):
    """Merged states carry their mean's low part: as accurate as one pass over the whole."""
    a = 1e12 + rng.standard_normal(200_000)
    mean, m2 = exact.moments(a)
    for cuts in ([], [1], [100, 101, 50_000], list(range(0, 200_000, 28_571)), [199_999]):
        parts = []
        for chunk in np.split(a, cuts):
            m, q, low = moments.channel_moments(chunk[None, None, :])
            parts.append(nbbn.Moments.with_mean_low(chunk.size, m[0], q[0], low[0]))
        total = nbbn.Moments.combine(parts)
        assert exact.ulps(total.mean, mean) <= 1
        assert exact.relative_error(total.m2, m2) <= VAR_TARGET


BATCH_LAYOUTS = ["rows", "columns", "columns_strided", "rows_strided"]  # channels on axis 1


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("layout", BATCH_LAYOUTS)
def test_batch_norm_statistics_and_backward_sums(layout, offset, build, rng):
    """The forward's batch mean/var as the statistics' targets; the backward's sum(dy) (dbias)
    and sum(dy * (x - mean)) (dweight, with var 1 and eps 0) within 1e-14 of the exact sums
    for the given mean, beside NumPy's float64 sums of the same terms."""
    values = exact.channels(offset, 24_000, 2, rng)
    grads = rng.standard_normal(values.shape) + 0.3
    x, _ = LAYOUTS[layout](values)
    dy, _ = LAYOUTS[layout](grads)
    _, mean, var = nbbn.batch_norm_forward(x, np.ones(2), np.zeros(2))
    _, dweight, dbias = nbbn.batch_norm_backward(dy, x, mean, np.ones(2), np.ones(2), eps=0.0)
    worst = np.zeros((2, 2))
    for c in range(2):
        exact_mean, m2 = exact.moments(values[c])
        assert exact.ulps(mean[c], exact_mean) <= 0.5
        assert exact.relative_error(var[c], m2 / values.shape[1]) <= VAR_TARGET
        sum_dy, sum_dy_xmu = exact.backward_sums(grads[c], values[c], mean[c])
        errors = [[exact.relative_error(dbias[c], sum_dy),
                   exact.relative_error(np.sum(grads[c]), sum_dy)],
                  [exact.relative_error(dweight[c], sum_dy_xmu),
                   exact.relative_error(np.sum(grads[c] * (values[c] - mean[c])), sum_dy_xmu)]]
        worst = np.maximum(worst, errors)
    print(f"{layout} {build} {offset:g}: sum(dy) nbbn {worst[0, 0]:.1e} NumPy {worst[0, 1]:.1e}; "
          f"sum(dy*(x-mean)) nbbn {worst[1, 0]:.1e} NumPy {worst[1, 1]:.1e}")
    assert worst[:, 0].max() <= VAR_TARGET


def test_error_free_transformations_stay_exact_inside_fastmath_kernels():
    """``_math``'s functions compile without fastmath even when a fastmath kernel calls
    them (reassociation would cancel TwoSum's error term, contraction the remainder)."""
    @njit(fastmath=_jit.FASTMATH)
    def apply(a, b):
        return _math.two_sum(a, b), _math.quotient(a, b), _math.fma(a, b, -a * b)

    rng = np.random.default_rng(0)
    for a, b in rng.standard_normal((200, 2)) * [1e8, 3.0]:
        (s, e), (q, q_lo), f = apply(a, b)
        assert (s, e) == _math.two_sum(a, b) and e == Fraction(a) + Fraction(b) - Fraction(s)
        assert (q, q_lo) == _math.quotient(a, b)
        assert f == _math.fma(a, b, -a * b)
