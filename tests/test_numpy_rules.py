"""nbbn's statistics follow NumPy's dispatch rules (issue 13): ndarray subclasses, masked
arrays, np.matrix, duck arrays, object and longdouble data, np._NoValue, np.errstate."""
import datetime
import warnings
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

import nbbn

OPS = ("mean", "var", "std")


def same(got, want):
    assert type(got) is type(want), (type(got), type(want))
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               rtol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_masked_arrays_respect_the_mask(op):
    for a in (np.ma.array([1.0, 2, 100], mask=[0, 0, 1]),
              np.ma.array(np.arange(12.0).reshape(3, 4), mask=np.eye(3, 4))):
        for axis in (None, 0, -1):
            got, want = getattr(nbbn, op)(a, axis=axis), getattr(np, op)(a, axis=axis)
            assert type(got) is type(want)
            np.testing.assert_allclose(np.ma.filled(got, np.nan), np.ma.filled(want, np.nan))
    assert nbbn.mean(np.ma.array([1.0, 2, 100], mask=[0, 0, 1])) == 1.5
    m, v = nbbn.mean_var(np.ma.array([1.0, 2, 100], mask=[0, 0, 1]))
    assert (m, v) == (1.5, 0.25)
    with pytest.raises(TypeError, match="MaskedArray"):  # a Welford state can't carry a mask
        nbbn.moments(np.ma.array([1.0, 2, 100], mask=[0, 0, 1]))


@pytest.mark.parametrize("op", OPS)
def test_matrix_gives_numpy_matrix_results(op):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        m = np.matrix([[1.0, 2.0], [3.0, 5.0]])
        for axis in (None, 0, 1):
            got, want = getattr(nbbn, op)(m, axis=axis), getattr(np, op)(m, axis=axis)
            assert type(got) is type(want)
            np.testing.assert_allclose(got, want)


@pytest.mark.parametrize("op", OPS)
def test_ndarray_subclasses_come_back_as_numpy_gives_them(op, tmp_path):
    class Sub(np.ndarray):
        pass

    a = np.arange(12.0).reshape(3, 4)
    mm = np.memmap(tmp_path / "a.bin", dtype=np.float64, mode="w+", shape=(3, 4))
    mm[...] = a
    for arr in (a.view(Sub), mm):
        for axis in (None, 0, (0, 1)):
            for keepdims in (False, True):
                same(getattr(nbbn, op)(arr, axis=axis, keepdims=keepdims),
                     getattr(np, op)(arr, axis=axis, keepdims=keepdims))


@pytest.mark.parametrize("values", [
    [Decimal(1), Decimal(2), Decimal(4)],
    [Fraction(1), Fraction(2), Fraction(4)],
], ids=["Decimal", "Fraction"])
@pytest.mark.parametrize("op", ["mean", "var"])
def test_object_data_is_numpys_answer(values, op):
    got, want = getattr(nbbn, op)(values), getattr(np, op)(values)
    assert type(got) is type(want) and got == want


def test_timedelta_and_longdouble_are_numpys_answer():
    td = [datetime.timedelta(seconds=1), datetime.timedelta(seconds=3)]
    assert nbbn.mean(np.array(td, "m8[s]")) == np.mean(np.array(td, "m8[s]"))
    assert nbbn.mean(td) == np.mean(td)
    big = np.arange(10) + 2**62
    assert nbbn.var(big, dtype=np.longdouble) == np.var(big, dtype=np.longdouble) == 8.25
    ld = np.arange(10, dtype=np.longdouble) + np.longdouble(2) ** 62
    assert nbbn.var(ld).dtype == np.longdouble and nbbn.var(ld) == 8.25


def test_duck_arrays_go_to_their_own_implementation():
    class Duck:
        def __array_function__(self, func, types, args, kwargs):
            return ("duck", func.__name__)

    assert nbbn.mean(Duck()) == ("duck", "mean")
    assert nbbn.std(np.ones(3), where=Duck()) == ("duck", "std")  # where= dispatches too
    assert nbbn.var(np.ones(3), out=Duck()) == ("duck", "var")


def test_dask_arrays_go_to_nbbn_dask(monkeypatch):
    da = pytest.importorskip("dask.array")
    import nbbn.dask
    data = np.arange(12.0).reshape(3, 4) + 1e9
    x = da.from_array(data, chunks=2)
    seen = []
    for name in ("mean", "var", "std", "mean_var", "moments"):
        original = getattr(nbbn.dask, name)
        monkeypatch.setattr(nbbn.dask, name,
                            lambda *a, _f=original, _n=name, **k: seen.append(_n) or _f(*a, **k))
    lazy = nbbn.var(x, axis=0, ddof=1)
    assert isinstance(lazy, da.Array)  # not computed eagerly
    np.testing.assert_allclose(lazy.compute(), np.var(data, axis=0, ddof=1))
    np.testing.assert_allclose(nbbn.mean(x, axis=1).compute(), np.mean(data, axis=1))
    np.testing.assert_allclose(nbbn.std(x).compute(), np.std(data))
    m, v = nbbn.mean_var(x, axis=0)
    np.testing.assert_allclose(v.compute(), np.var(data, axis=0))
    assert nbbn.moments(x, axis=0).count == 3
    assert seen == ["var", "mean", "std", "mean_var", "moments"]


def test_numpy_fallback_does_not_recurse_once_patched_in(monkeypatch):
    for op in OPS:
        monkeypatch.setattr(np, op, getattr(nbbn, op))
    z = np.arange(4) + 1j
    assert nbbn.var(z) == 1.25
    assert np.mean(np.ma.array([1.0, 2, 100], mask=[0, 0, 1])) == 1.5
    assert np.var([Decimal(1), Decimal(3)]) == 1
    assert np.std(np.arange(4, dtype=np.longdouble)).dtype == np.longdouble


@pytest.mark.parametrize("op", OPS)
def test_no_value_means_not_given(op):
    a = np.arange(6.0).reshape(2, 3)
    f = getattr(nbbn, op)
    assert f(a, axis=0, keepdims=np._NoValue).shape == (3,)
    assert f(a, where=np._NoValue) == getattr(np, op)(a)
    assert f(a, where=True) == getattr(np, op)(a)
    if op != "mean":
        assert f(a, mean=np._NoValue, correction=np._NoValue) == getattr(np, op)(a)
        assert f(a, ddof=1, correction=np._NoValue) == getattr(np, op)(a, ddof=1)
        assert f(a, mean=None) == getattr(np, op)(a)
    np.testing.assert_allclose(np.nanmean(a, axis=0), a.mean(axis=0))


def _flags(f):
    """(FloatingPointError or None under np.errstate(all="raise"), the warnings' messages)."""
    with np.errstate(all="raise"):
        try:
            f()
        except FloatingPointError:
            raised = FloatingPointError
        else:
            raised = None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        f()
    # "invalid value encountered in <the ufunc>": the flag must match, not NumPy's step
    return raised, sorted({str(w.message).split(" encountered")[0] for w in seen})


@pytest.mark.parametrize("call", [
    lambda m: m.var([np.inf, np.inf]),
    lambda m: m.std(np.array([[1.0, np.inf], [2.0, 3.0]]), axis=0),
    lambda m: m.mean([np.inf, -np.inf]),
    lambda m: m.mean(np.empty((2, 0)), axis=1),
    lambda m: m.var([1.0, 2.0], ddof=2),
    lambda m: m.var([1.0, 1.0], ddof=3),
    lambda m: m.var([np.nan, np.inf]),  # nan in the data: no flag
    lambda m: m.var([1.0, 2.0]),
], ids=["var-inf", "std-inf-column", "mean-inf-minus-inf", "mean-empty", "var-ddof-n",
        "var-ddof-over-n-constant", "var-nan-data", "clean"])
def test_errstate_and_floating_point_warnings_as_numpy(call):
    assert _flags(lambda: call(nbbn)) == _flags(lambda: call(np))


def test_nan_where_numpy_has_nan(rng):
    a = rng.standard_normal((5, 4))
    a[1, 2] = np.inf
    a[3, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_array_equal(np.isnan(nbbn.var(a, axis=0)), np.isnan(np.var(a, axis=0)))
