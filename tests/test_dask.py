"""nbbn.dask against NumPy float64 on the whole array: any chunking, any axes, lazy."""
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbbn

from . import exact

da = pytest.importorskip("dask.array", reason="dask is not installed (pip install 'nbbn[dask]')")
dask = pytest.importorskip("dask")
nd = pytest.importorskip("nbbn.dask")

RTOL64 = 1e-12   # float64 results against NumPy float64 on the whole array


@pytest.fixture(autouse=True)
def synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


SHAPE = (9, 5, 4, 6)   # [b, c, h, w]
CHUNKINGS = {
    "one-chunk": SHAPE,
    "odd-batch": ((2, 0, 4, 3), 5, 4, 6),                 # an empty chunk too
    "odd-channels": (9, (1, 3, 1), 4, 6),
    "everything-odd": ((5, 1, 3), (2, 2, 1), (3, 1), (1, 4, 1)),
    "ones": (1, 1, 2, 6),
}
AXES = [None, 0, 1, -1, (0, 2, 3), (0, 2), (1, 3), (0, 1, 2, 3)]


def data(rng, dtype=np.float64, offset=1e3):
    return (offset + rng.standard_normal(SHAPE) * 2).astype(dtype)


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("axis", AXES, ids=str)
def test_mean_var_matches_numpy(chunks, axis, rng):
    x = data(rng)
    a = da.from_array(x, chunks=chunks)
    for keepdims in (False, True):
        for split_every in (None, 2):
            m, v = nd.mean_var(a, axis=axis, keepdims=keepdims, split_every=split_every)
            assert isinstance(m, da.Array) and isinstance(v, da.Array)
            m, v = dask.compute(m, v)
            np.testing.assert_allclose(m, np.mean(x, axis=axis, keepdims=keepdims), rtol=1e-15)
            np.testing.assert_allclose(v, np.var(x, axis=axis, keepdims=keepdims), rtol=RTOL64)
            assert m.shape == np.mean(x, axis=axis, keepdims=keepdims).shape
    np.testing.assert_allclose(nd.var(a, axis=axis, ddof=1).compute(),
                               np.var(x, axis=axis, ddof=1), rtol=RTOL64)
    np.testing.assert_allclose(nd.std(a, axis=axis, correction=2).compute(),
                               np.std(x, axis=axis, ddof=2), rtol=RTOL64)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.bool_, ">f8"], ids=str)
def test_dtypes_follow_nbbn(dtype, rng):
    x = data(rng, dtype, offset=3)
    a = da.from_array(x, chunks=((4, 5), (2, 3), 4, (5, 1)))
    axis = (0, 2, 3)
    for fn in ("var", "std"):
        got = getattr(nd, fn)(a, axis=axis).compute()
        want = getattr(nbbn, fn)(x, axis=axis)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-6 if got.dtype.itemsize < 8 else RTOL64)
    m, v = nd.mean_var(a, axis=axis, dtype=np.float64)
    assert m.dtype == v.dtype == np.float64
    np.testing.assert_allclose(v.compute(), np.var(x.astype(np.float64), axis=axis), rtol=RTOL64)


def test_accuracy_where_float32_loses_digits(rng):
    """float32 data 1e3 + 0.01*N(0,1): float64 accumulation per chunk and in the merge."""
    x = (1e3 + 0.01 * rng.standard_normal(200_000)).astype(np.float32)
    exact = np.var(x.astype(np.float64))
    got = nd.var(da.from_array(x, chunks=7_777), dtype=np.float64).compute()
    assert abs(got / exact - 1) < 1e-11


@pytest.mark.parametrize("chunks", [(1, 2999), (1000, 7, 993, 1000), (150,) * 20],
                         ids=["one-and-rest", "uneven", "twenty"])
def test_offset_data_any_chunking_against_exact(chunks):
    """1e12 + N(0, 1): the chunks' means carry their low parts through the merges, so any
    chunking gives nbbn's accuracy on the whole (issue 12: mean within 1 ulp, var 1e-14)."""
    values = exact.channels(1e12, 3_000, 2, np.random.default_rng(11))
    a = da.from_array(values.T, chunks=(chunks, 1))
    for axis, want in ((0, values), (None, values.reshape(1, -1))):
        for split_every in (None, 2):
            mean, var = dask.compute(*nd.mean_var(a, axis=axis, split_every=split_every))
            for c, (m, v) in enumerate(zip(np.atleast_1d(mean), np.atleast_1d(var))):
                mean_exact, m2_exact = exact.moments(want[c])
                assert exact.ulps(m, mean_exact) <= 1
                assert exact.relative_error(v, m2_exact / want.shape[1]) <= 1e-14


def test_moments_lazy_and_mergeable(rng):
    x = data(rng)
    calls = []

    def touch(block):
        calls.append(block.shape)
        return block

    a = da.from_array(x, chunks=(4, 2, 4, 6)).map_blocks(touch, dtype=x.dtype,
                                                         meta=np.empty((0,) * 4))
    m = nd.moments(a, axis=(0, 2, 3))
    v = nd.var(a, axis=1)
    assert calls == [] and isinstance(m.mean, da.Array) and isinstance(v, da.Array)
    want = nbbn.moments(x, axis=(0, 2, 3))
    assert m.count == want.count == 9 * 4 * 6 and isinstance(m.count, int)
    np.testing.assert_allclose(m.mean.compute(), want.mean, rtol=1e-15)
    np.testing.assert_allclose(m.m2.compute(), want.m2, rtol=RTOL64)
    assert calls
    # The lazy state merges with in-memory Moments like any other.
    extra = rng.standard_normal((3, 5, 4, 6))
    both = nbbn.Moments(m.count, *dask.compute(m.mean, m.m2)).merge(
        nbbn.moments(extra, axis=(0, 2, 3)))
    np.testing.assert_allclose(both.var(), np.var(np.concatenate([x, extra]), axis=(0, 2, 3)),
                               rtol=RTOL64)
    with pytest.raises(TypeError, match="real numeric"):
        nd.moments(da.ones(3, dtype=complex))


def test_unknown_chunk_sizes(rng):
    x = data(rng)
    a = da.from_array(x, chunks=(3, 5, 4, 6))
    a = a[a[:, 0, 0, 0] > -np.inf]           # boolean index: chunk sizes become unknown
    assert np.isnan(a.shape[0])
    m = nd.moments(a, axis=(0, 2, 3))
    assert isinstance(m.count, da.Array)
    np.testing.assert_array_equal(m.count.compute(), 9 * 4 * 6)
    np.testing.assert_allclose(nd.var(a, axis=0).compute(), np.var(x, axis=0), rtol=RTOL64)


def test_empty_nan_and_fallbacks():
    with pytest.warns(RuntimeWarning, match="Degrees of freedom"):
        v = nd.var(da.zeros((0, 3), chunks=(1, 2)), axis=0)
    assert v.shape == (3,) and np.isnan(v.compute()).all()
    with pytest.warns(RuntimeWarning, match="Degrees of freedom"):
        nd.var(da.ones((1, 3), chunks=1), axis=0, ddof=1)
    x = np.arange(24.0).reshape(6, 4)
    x[2, 1] = np.nan
    x[4, 3] = np.inf
    got = nd.mean_var(da.from_array(x, chunks=(2, 3)), axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.mean(x, axis=0), np.var(x, axis=0)
    for g, w in zip(dask.compute(*got), want):
        np.testing.assert_allclose(g, w, rtol=RTOL64)     # nan/inf only in their channels
    z = np.arange(6) + 1j * np.arange(6)[::-1]
    zd = da.from_array(z, chunks=4)
    np.testing.assert_allclose(nd.var(zd).compute(), np.var(z))
    with pytest.raises(TypeError):
        nd.var(da.ones(3, chunks=1), ddof=1, correction=1)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_any_chunking_any_axes(data):
    ndim = data.draw(st.integers(1, 4))
    shape = data.draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim))
    chunks = tuple(_random_chunks(data, n) for n in shape)
    axis = data.draw(st.one_of(st.none(), st.lists(st.integers(-ndim, ndim - 1), min_size=1,
                                                   max_size=ndim, unique_by=lambda i: i % ndim)
                               .map(tuple)))
    seed = data.draw(st.integers(0, 2**32 - 1))
    x = 10 + np.random.default_rng(seed).standard_normal(shape)
    a = da.from_array(x, chunks=chunks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.var(x, axis=axis)
        got = nd.var(a, axis=axis, split_every=data.draw(st.sampled_from([None, 2, 3]))).compute()
    np.testing.assert_allclose(got, want, rtol=RTOL64, atol=1e-13)


def _random_chunks(data, n):
    parts, left = [], n
    while left > 0:
        k = data.draw(st.integers(0, left))
        parts.append(k)
        left -= k
    return tuple(parts) or (0,)


def test_local_cluster(rng):
    """Two worker processes over TCP on 127.0.0.1: the functions travel and the merge holds."""
    distributed = pytest.importorskip("dask.distributed",
                                      reason="distributed is not installed (nbbn[dask])")
    x = data(rng)
    a = da.from_array(x, chunks=((2, 3, 4), (2, 3), 4, (5, 1)))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster, timeout=60) as client:
        m, v = nd.mean_var(a, axis=(0, 2, 3), split_every=2)
        m, v = [f.result(timeout=120) for f in client.compute([m, v])]
    np.testing.assert_allclose(m, np.mean(x, axis=(0, 2, 3)), rtol=1e-15)
    np.testing.assert_allclose(v, np.var(x, axis=(0, 2, 3)), rtol=RTOL64)


def test_example():
    """README's example runs and reports float64 accuracy."""
    script = Path(__file__).resolve().parents[1] / "examples" / "dask_stats.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=script.parents[1])
    assert out.returncode == 0, out.stdout + out.stderr
    error = float(out.stdout.split("whole array:")[1].split()[0])
    assert error < 1e-10
