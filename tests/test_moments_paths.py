"""The statistics kernels' work-splitting paths: multi-block rows, regrouped
channels-last columns with leftover rows, shifts that start on an outlier,
inf/nan arriving in a later block, and serial vs parallel builds."""
import warnings

import numpy as np
import pytest

import nbbn
from nbbn._cpu import moments

from . import reference


def _check(a, axis, rtol=1e-10):
    m, v = nbbn.mean_var(a, axis=axis, dtype=np.float64)
    np.testing.assert_allclose(m, reference.mean(a, axis), rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(v, reference.var(a, axis), rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("n_inner", [1, 7, moments.BLOCK - 1, moments.BLOCK, 2 * moments.BLOCK + 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_of_every_block_count(n_inner, dtype, rng):
    a = (5 + rng.standard_normal((3, 4, n_inner))).astype(dtype)
    _check(a, (0, 2))


@pytest.mark.parametrize("n_rows,nchan", [(100_003, 3), (20_001, 16), (5_000, 64), (3_000, 257)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_regrouped_with_leftover_rows(n_rows, nchan, dtype, rng):
    a = (100 + 3 * rng.standard_normal((n_rows, nchan))).astype(dtype)
    _check(a, 0)
    _check(a.reshape(n_rows, 1, nchan), (0, 1))


@pytest.mark.parametrize("shape,axis", [((2, 3, 3 * moments.BLOCK), (0, 2)), ((50_000, 3), 0)])
def test_first_value_an_outlier(shape, axis, rng):
    """The first block of a channel is shifted by its first value: make that a far outlier."""
    a = rng.standard_normal(shape)
    a[(0,) * a.ndim] = 1e8
    _check(a, axis, rtol=1e-9)


@pytest.mark.parametrize("shape,axis", [((2, 3, 3 * moments.BLOCK), (0, 2)), ((50_001, 3), 0)])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("where", ["first", "later"])
def test_non_finite_in_any_block(shape, axis, bad, where, rng):
    a = rng.standard_normal(shape) + 2
    pos = [0] * a.ndim if where == "first" else [s - 1 for s in a.shape]
    pos[1] = 1  # channel 1 only
    a[tuple(pos)] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_array_equal(np.isnan(nbbn.var(a, axis=axis)), np.isnan(np.var(a, axis=axis)))
        np.testing.assert_allclose(nbbn.mean(a, axis=axis), np.mean(a, axis=axis), rtol=1e-12)
        np.testing.assert_allclose(nbbn.var(a, axis=axis), np.var(a, axis=axis), rtol=1e-10)


@pytest.mark.parametrize("x3", [
    np.arange(2 * 5 * 3 * moments.BLOCK, dtype=np.float64).reshape(2, 5, -1) % 97,
    np.arange(70_000 * 5, dtype=np.float64).reshape(-1, 5, 1) % 89,
])
def test_serial_and_parallel_builds_agree_exactly(x3):
    """Both builds split the work into the same parts: identical bits."""
    if x3.shape[2] == 1:
        run = lambda parallel: moments.moments_columns(x3[:, :, 0], 2, parallel=parallel)  # noqa: E731
    else:
        run = lambda parallel: moments.moments_rows(x3, 2, parallel=parallel)  # noqa: E731
    (serial, _), (parallel, _) = run(False), run(True)
    np.testing.assert_array_equal(serial, parallel)


@pytest.mark.parametrize("shape,axis", [((3, 12, 7), (0, 2)), ((50, 12), 0), ((1, 12, 9000), (0, 2))])
def test_many_channels_in_tiles(shape, axis, monkeypatch, rng):
    """More channels than CHANNEL_TILE: the kernels run on tiles of channels."""
    monkeypatch.setattr(moments, "CHANNEL_TILE", 5)
    _check(1e6 + rng.standard_normal(shape), axis)
