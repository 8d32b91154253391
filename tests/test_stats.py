"""nbbn.mean/var/std/mean_var/moments against NumPy and a float64 reference."""
import itertools
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import nbbn
from tests import reference
from tests.layouts import variants

SHAPES = [(7,), (5, 6), (3, 4, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)]
DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_]
RTOL = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-12}


def all_axes(ndim):
    """None, every int (positive and negative) and every tuple of axes."""
    yield None
    for i in range(ndim):
        yield i
        yield i - ndim
    for r in range(2, ndim + 1):
        for combo in itertools.combinations(range(ndim), r):
            yield combo
    if ndim > 1:
        yield (-1, 0)


def sample(shape, dtype, rng):
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 100, shape).astype(dtype)
    return (rng.standard_normal(shape) * 3 + 1).astype(dtype)


def assert_matches(got, expected_numpy, ref, dtype):
    """Same shape and dtype as NumPy, values within the result dtype's rounding of the reference."""
    got_arr, exp_arr = np.asarray(got), np.asarray(expected_numpy)
    assert got_arr.shape == exp_arr.shape
    assert got_arr.dtype == exp_arr.dtype, (got_arr.dtype, exp_arr.dtype)
    assert np.isscalar(got) == np.isscalar(expected_numpy)
    rtol = RTOL.get(got_arr.dtype.type, 1e-12)
    scale = np.max(np.abs(ref)) if np.size(ref) else 1.0
    np.testing.assert_allclose(got_arr.astype(np.float64), ref, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_axis_matches_numpy(shape, dtype, rng):
    a = sample(shape, dtype, rng)
    for axis in all_axes(len(shape)):
        for keepdims in (False, True):
            assert_matches(nbbn.mean(a, axis=axis, keepdims=keepdims),
                           np.mean(a, axis=axis, keepdims=keepdims),
                           reference.mean(a, axis, keepdims), dtype)
            for ddof in (0, 1):
                ref_var = reference.var(a, axis, ddof, keepdims)
                assert_matches(nbbn.var(a, axis=axis, ddof=ddof, keepdims=keepdims),
                               np.var(a, axis=axis, ddof=ddof, keepdims=keepdims), ref_var, dtype)
                assert_matches(nbbn.std(a, axis=axis, ddof=ddof, keepdims=keepdims),
                               np.std(a, axis=axis, ddof=ddof, keepdims=keepdims),
                               np.sqrt(ref_var), dtype)
                m, v = nbbn.mean_var(a, axis=axis, ddof=ddof, keepdims=keepdims)
                assert_matches(m, np.mean(a, axis=axis, keepdims=keepdims),
                               reference.mean(a, axis, keepdims), dtype)
                assert_matches(v, np.var(a, axis=axis, ddof=ddof, keepdims=keepdims), ref_var, dtype)


@pytest.mark.parametrize("shape", [(4, 6), (3, 4, 5), (2, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16], ids=lambda d: np.dtype(d).name)
def test_every_layout(shape, dtype, rng):
    base = sample(shape, dtype, rng)
    for name, a in variants(base):
        np.testing.assert_array_equal(a, base)
        before = a.copy()
        for axis in all_axes(len(shape)):
            ref_var = reference.var(base, axis, 1)
            got = nbbn.var(a, axis=axis, ddof=1)
            assert np.asarray(got).dtype == np.var(base, axis=axis).dtype, name
            np.testing.assert_allclose(got, ref_var, rtol=RTOL.get(dtype, 1e-12), err_msg=name)
            np.testing.assert_allclose(nbbn.mean(a, axis=axis), reference.mean(base, axis),
                                       rtol=RTOL.get(dtype, 1e-12), err_msg=name)
        np.testing.assert_array_equal(a, before)  # input not modified
        assert a.dtype == before.dtype


@pytest.mark.parametrize("shape,axis", [((32, 64), 0), ((8, 16, 8, 8), (0, 2, 3)),
                                        ((8, 8, 8, 16), (0, 1, 2)), ((3, 5, 7), None),
                                        ((40, 9), 1), ((6, 4, 5), (0,)), ((7,), 0), ((), None)],
                         ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.filterwarnings("ignore:Degrees of freedom")  # ddof=1 of one value: the general path
def test_small_calls_equal_the_general_path_bit_for_bit(shape, axis, dtype, keepdims, rng):
    """A small plain call runs in one compiled call; with ``out=`` the same statistic takes
    the general path: the two agree to the last bit (also read-only and strided input)."""
    from nbbn import stats
    base = np.asarray(rng.standard_normal(shape) * 3 + 100, dtype)
    frozen = base.copy()
    frozen.flags.writeable = False
    for a in (base, frozen, base.T, base[..., ::2] if base.ndim else base):
        rshape = np.mean(a, axis=axis, keepdims=keepdims).shape
        stats._SMALL.clear()
        for name, kwargs in (("mean", {}), ("var", {}), ("var", dict(ddof=1)), ("std", {})):
            got = getattr(nbbn, name)(a, axis=axis, keepdims=keepdims, **kwargs)
            out = np.empty(rshape, dtype)
            getattr(nbbn, name)(a, axis=axis, keepdims=keepdims, out=out, **kwargs)
            np.testing.assert_array_equal(got, out)
            assert np.asarray(got).dtype == dtype and np.shape(got) == rshape
        m, v = nbbn.mean_var(a, axis=axis, keepdims=keepdims)
        np.testing.assert_array_equal(m, nbbn.mean(a, axis=axis, keepdims=keepdims))
        np.testing.assert_array_equal(v, nbbn.var(a, axis=axis, keepdims=keepdims))
        # a strided view without a 3-D view in the reduction's order takes the general path
        assert a is not base or all(stats._SMALL.values()), "the small path declined"


def test_broadcast_and_large_strides(rng):
    row = rng.standard_normal(50)
    a = np.broadcast_to(row, (40, 50))
    np.testing.assert_allclose(nbbn.var(a, axis=0), np.zeros(50), atol=1e-15)
    np.testing.assert_allclose(nbbn.var(a, axis=1), np.full(40, row.var()), rtol=1e-12)
    big = rng.standard_normal((6, 8, 10, 12))[::2, 1::3, ::-2, 5:]
    for axis in all_axes(4):
        np.testing.assert_allclose(nbbn.var(big, axis=axis), reference.var(big, axis), rtol=1e-12)


@pytest.mark.parametrize("shape,axis", [((256, 300, 20), (0, 2)), ((50000, 24), 0),
                                        ((3, 300000), 1), ((300000,), None),
                                        ((64, 16, 30, 30), (0, 2, 3)), ((20, 30, 30, 16), (0, 1, 2))])
def test_parallel_sizes(shape, axis, rng):
    """Shapes large enough to run the threaded kernels, with uneven splits."""
    a = rng.standard_normal(shape).astype(np.float32) * 5 - 2
    m, v = nbbn.mean_var(a, axis=axis, dtype=np.float64)
    np.testing.assert_allclose(m, reference.mean(a, axis), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(v, reference.var(a, axis), rtol=1e-12)


def test_zero_size_and_degenerate_ddof():
    for a, axis in [(np.ones((0, 3)), 0), (np.ones(0), None), (np.ones((2, 0, 3)), (0, 1))]:
        with pytest.warns(RuntimeWarning, match="empty"):
            m = nbbn.mean(a, axis=axis)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = np.mean(a, axis=axis)
        np.testing.assert_array_equal(m, exp)
        with pytest.warns(RuntimeWarning, match="Degrees of freedom"):
            v = nbbn.var(a, axis=axis)
        assert np.all(np.isnan(v)) and np.shape(v) == np.shape(exp)
    # kept axis of size zero: empty result, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nbbn.var(np.ones((0, 3)), axis=1).shape == (0,)
    with pytest.warns(RuntimeWarning, match="Degrees of freedom"):
        assert np.isinf(nbbn.var([1.0, 2.0], ddof=2))
    with pytest.warns(RuntimeWarning, match="Degrees of freedom"):
        assert np.isnan(nbbn.var([1.0], ddof=1))


def test_dtype_rules(rng):
    a32 = rng.standard_normal((4, 5)).astype(np.float32)
    assert nbbn.var(a32).dtype == np.float32
    assert nbbn.var(a32, dtype=np.float64).dtype == np.float64
    assert nbbn.mean(a32.astype(np.float16)).dtype == np.float16
    assert nbbn.mean(np.arange(5)).dtype == np.float64
    assert nbbn.var(np.ones(4, bool)).dtype == np.float64
    swapped = a32.astype(">f4")
    assert nbbn.var(swapped, axis=0).dtype == np.dtype("float32")
    assert isinstance(nbbn.mean(a32), np.float32)
    assert nbbn.mean([[1, 2], [3, 4]], axis=0).tolist() == [2.0, 3.0]


def test_out(rng):
    a = rng.standard_normal((4, 5, 6))
    out = np.empty(5)
    assert nbbn.var(a, axis=(0, 2), out=out) is out
    np.testing.assert_allclose(out, a.var(axis=(0, 2)), rtol=1e-12)
    out32 = np.empty((1, 5, 1), np.float32)
    assert nbbn.mean(a, axis=(0, 2), keepdims=True, out=out32) is out32
    np.testing.assert_allclose(out32, a.mean(axis=(0, 2), keepdims=True), rtol=1e-6)
    assert nbbn.std(a, axis=(0, 2), out=out) is out
    np.testing.assert_allclose(out, a.std(axis=(0, 2)), rtol=1e-12)
    bad = np.full(4, 7.0)
    with pytest.raises(ValueError, match="shape"):
        nbbn.var(a, axis=(0, 2), out=bad)
    assert np.all(bad == 7.0)
    for op in (nbbn.mean, nbbn.var):  # cast as NumPy casts (unsafe, truncating)
        out_int = np.empty(5, np.int64)
        assert op(a * 10, axis=(0, 2), out=out_int) is out_int
        np.testing.assert_array_equal(out_int, getattr(np, op.__name__)(a * 10, axis=(0, 2),
                                                                        out=np.empty(5, int)))
    with pytest.raises(TypeError, match="dtype"):  # std: NumPy's sqrt casts same_kind only
        nbbn.std(a, axis=(0, 2), out=np.empty(5, np.int64))
    with pytest.raises(TypeError):
        nbbn.mean(a, axis=(0, 2), out=[0.0] * 5)


def test_argument_errors(rng):
    a = rng.standard_normal((3, 4))
    with pytest.raises(np.exceptions.AxisError):
        nbbn.mean(a, axis=2)
    with pytest.raises(np.exceptions.AxisError):
        nbbn.var(a, axis=(0, -3))
    with pytest.raises(TypeError, match="where"):
        nbbn.mean(a, where=a > 0)
    with pytest.raises(TypeError, match="where"):
        nbbn.var(a, where=a > 0)
    with pytest.raises(TypeError, match="mean"):
        nbbn.std(a, mean=a.mean(keepdims=True))
    with pytest.raises(TypeError, match="correction"):
        nbbn.var(a, ddof=1, correction=1)
    with pytest.raises(ValueError, match="correction"):  # NumPy's type, too
        nbbn.std(a, ddof=1, correction=1)
    np.testing.assert_allclose(nbbn.var(a, correction=1), a.var(ddof=1), rtol=1e-12)
    for bad in (object(), "abc"):  # NumPy's own TypeError
        with pytest.raises(TypeError):
            nbbn.mean(bad)
        with pytest.raises(TypeError):
            np.mean(bad)
    with pytest.raises(TypeError, match="axis"):  # NumPy: an integer is required
        nbbn.var(a, axis=True)
    with pytest.raises(TypeError, match="axis"):
        nbbn.mean(a, axis=(0, False))
    with pytest.raises(ValueError, match="correction"):  # correction=None given: as NumPy
        nbbn.var(a, ddof=1, correction=None)


def test_complex_and_object_go_to_numpy(rng):
    z = rng.standard_normal((3, 4)) + 1j * rng.standard_normal((3, 4))
    np.testing.assert_array_equal(nbbn.mean(z, axis=0), np.mean(z, axis=0))
    np.testing.assert_array_equal(nbbn.var(z, axis=1), np.var(z, axis=1))
    np.testing.assert_array_equal(nbbn.std(z), np.std(z))
    ld = np.arange(6, dtype=np.longdouble)
    assert nbbn.var(ld) == np.var(ld)
    with pytest.raises(TypeError):
        nbbn.moments(z)


def test_accuracy_where_textbook_formula_fails(rng):
    a = (1e3 + 0.01 * rng.standard_normal(1_000_000)).astype(np.float32)
    exact = reference.var(a)
    assert abs(nbbn.var(a, dtype=np.float64) / exact - 1) < 1e-9
    assert abs(nbbn.var(a) / exact - 1) < 1e-6  # float32 result: rounding only
    naive = (a * a).mean(dtype=np.float32) - a.mean(dtype=np.float32) ** 2
    assert abs(naive / exact - 1) > 1e-2  # the textbook formula loses every digit here
    # the same data per channel, both layouts
    x = (1e3 + 0.01 * rng.standard_normal((32, 4, 64, 64))).astype(np.float32)
    for arr, axis in [(x, (0, 2, 3)), (np.moveaxis(x, 1, -1).copy(), (0, 1, 2))]:
        got = nbbn.var(arr, axis=axis, dtype=np.float64)
        np.testing.assert_allclose(got, reference.var(arr, axis), rtol=1e-9)


@pytest.mark.parametrize("shape,axis", [((40, 3, 50), (0, 2)), ((4000, 3), 0), ((3, 5000), 1)])
def test_constant_channels_give_exact_zero(shape, axis):
    for value in (0.1, 1e3, -7.3e-5, 3.4e38):
        a = np.full(shape, value, np.float32)
        assert np.all(nbbn.var(a, axis=axis) == 0)
        assert np.all(nbbn.var(a, axis=axis, dtype=np.float64) == 0)
        assert np.all(nbbn.mean(a, axis=axis) == np.float32(value))


def test_huge_values_do_not_overflow(rng):
    """Squares of ~1e30 overflow float32; float64 accumulation keeps them."""
    a = (1e30 * (1 + rng.standard_normal((8, 3, 100)))).astype(np.float32)
    v = nbbn.var(a, axis=(0, 2), dtype=np.float64)
    assert np.all(np.isfinite(v))
    np.testing.assert_allclose(v, reference.var(a, (0, 2)), rtol=1e-12)
    s = nbbn.std(a, axis=(0, 2))
    assert s.dtype == np.float32 and np.all(np.isfinite(s))
    np.testing.assert_allclose(s, np.sqrt(reference.var(a, (0, 2))), rtol=1e-6)
    np.testing.assert_allclose(nbbn.std(a.transpose(0, 2, 1), axis=(0, 1)), s, rtol=1e-6)


def test_nan_and_inf_stay_in_their_channel():
    for a, axis in [(np.ones((6, 4, 5)), (0, 2)), (np.ones((600, 4)), 0)]:
        a = a.copy()
        idx = (slice(None), 1) if a.ndim == 2 else (slice(None), 1, slice(None))
        a[idx][3] = np.nan
        idx2 = (slice(None), 2) if a.ndim == 2 else (slice(None), 2, slice(None))
        a[idx2][0] = np.inf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.testing.assert_array_equal(nbbn.mean(a, axis=axis), np.mean(a, axis=axis))
            np.testing.assert_array_equal(nbbn.var(a, axis=axis), np.var(a, axis=axis))


# ---- Moments -------------------------------------------------------------------------------


def test_moments_of_parts_merge_to_the_whole(rng):
    x = rng.standard_normal((37, 3, 11)) * 4 + 100
    whole = nbbn.moments(x, axis=(0, 2))
    assert whole.count == 37 * 11
    np.testing.assert_allclose(whole.m2, reference.m2(x, (0, 2)), rtol=1e-12)
    cuts = [0, 0, 1, 9, 9, 30, 37]  # uneven parts and empty ones
    parts = [nbbn.moments(x[a:b], axis=(0, 2)) for a, b in zip(cuts, cuts[1:])]
    assert parts[0].count == 0
    merged = nbbn.Moments.combine(parts)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-13)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-12)
    np.testing.assert_allclose(merged.var(ddof=1), reference.var(x, (0, 2), 1), rtol=1e-12)
    np.testing.assert_allclose(merged.std(), np.sqrt(reference.var(x, (0, 2))), rtol=1e-12)
    folded = parts[0]
    for p in parts[1:]:
        folded = folded.merge(p)
    np.testing.assert_allclose(folded.m2, whole.m2, rtol=1e-12)
    empty = nbbn.moments(x[:0], axis=(0, 2))
    assert empty.count == 0 and np.all(np.isnan(empty.mean)) and np.all(empty.m2 == 0)
    same = whole.merge(empty)
    np.testing.assert_array_equal(same.mean, whole.mean)
    np.testing.assert_array_equal(empty.merge(whole).m2, whole.m2)
    with pytest.warns(RuntimeWarning):
        assert np.all(np.isnan(empty.var()))


def test_moments_keepdims_and_scalar(rng):
    x = rng.standard_normal((4, 5))
    m = nbbn.moments(x, axis=0, keepdims=True)
    assert m.mean.shape == (1, 5) and m.m2.shape == (1, 5)
    s = nbbn.moments(x)
    assert s.count == 20 and np.ndim(s.mean) == 0
    assert isinstance(s, tuple) and s._fields == ("count", "mean", "m2")
    with pytest.raises(ValueError):
        nbbn.Moments.combine([])


finite = st.floats(-1e6, 1e6, allow_nan=False, width=64)


@given(hnp.arrays(np.float64, st.integers(0, 40), elements=finite), st.data())
def test_merge_is_associative_and_exact(x, data):
    i = data.draw(st.integers(0, len(x)))
    j = data.draw(st.integers(i, len(x)))
    a, b, c = (nbbn.moments(p) for p in (x[:i], x[i:j], x[j:]))
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    assert left.count == right.count == len(x)
    if len(x):
        scale = max(1.0, float(np.max(np.abs(x))))
        np.testing.assert_allclose(left.mean, right.mean, rtol=1e-12, atol=1e-12 * scale)
        np.testing.assert_allclose(left.m2, reference.m2(x), rtol=1e-9, atol=1e-9 * scale**2)
        np.testing.assert_allclose(right.m2, reference.m2(x), rtol=1e-9, atol=1e-9 * scale**2)


@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=4, max_side=6),
                  elements=st.floats(-100, 100)),
       st.floats(-1e4, 1e4))
def test_var_is_shift_invariant(x, shift):
    v = nbbn.var(x, axis=0)
    np.testing.assert_allclose(nbbn.var(x + shift, axis=0), v, rtol=1e-7, atol=1e-7)


@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=5, max_side=5),
                  elements=st.floats(-1e3, 1e3, width=32)),
       st.data())
def test_permuting_axes_permutes_the_result(x, data):
    perm = data.draw(st.permutations(range(x.ndim)))
    axis = data.draw(st.sets(st.integers(0, x.ndim - 1), max_size=x.ndim).map(tuple))
    got = nbbn.var(x, axis=axis, keepdims=True)
    moved = nbbn.var(x.transpose(perm), axis=tuple(perm.index(i) for i in axis), keepdims=True)
    np.testing.assert_allclose(moved, got.transpose(perm), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got, reference.var(x, axis, keepdims=True), rtol=1e-5, atol=1e-3)
