"""The statistics kernels' work-splitting paths: multi-block rows, regrouped
channels-last columns with leftover rows, shifts that start on an outlier,
inf/nan arriving in a later block, and serial vs parallel builds."""
import warnings

import numpy as np
import pytest

import nbbn
from nbbn._cpu import _blocks, moments

from . import reference


def _check(a, axis, rtol=1e-10):
    m, v = nbbn.mean_var(a, axis=axis, dtype=np.float64)
    np.testing.assert_allclose(m, reference.mean(a, axis), rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(v, reference.var(a, axis), rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("n_inner", [1, 7, _blocks.BLOCK - 1, _blocks.BLOCK, 2 * _blocks.BLOCK + 5])
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


@pytest.mark.parametrize("n_inner", [2, 16, _blocks.SHORT_ROW])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_short_rows_read_as_columns(n_inner, dtype, rng):
    """[N, C, n] with short rows (n <= SHORT_ROW, large arrays) is summed as columns, a shift
    per channel; a channel-last view of the same data, and a drifting channel, agree."""
    n_outer = 2 * _blocks.AS_LAID_OUT // (5 * n_inner) + 3
    a = (100 + 3 * rng.standard_normal((n_outer, 5, n_inner))).astype(dtype)
    a[:, 2] += np.linspace(0, 1e4, n_outer)[:, None]  # a mean far from the first values
    assert _blocks.short_rows(a) is not None
    _check(a, (0, 2))
    m, v = nbbn.mean_var(a, axis=(0, 2), dtype=np.float64)
    m_cols, v_cols = nbbn.mean_var(np.ascontiguousarray(a.transpose(0, 2, 1)), axis=(0, 1),
                                   dtype=np.float64)
    np.testing.assert_allclose(m, m_cols, rtol=1e-14)
    np.testing.assert_allclose(v, v_cols, rtol=1e-12)


@pytest.mark.parametrize("shape,axis", [((2, 3, 3 * _blocks.BLOCK), (0, 2)), ((50_000, 3), 0)])
def test_first_value_an_outlier(shape, axis, rng):
    """The first block of a channel is shifted by its first value: make that a far outlier."""
    a = rng.standard_normal(shape)
    a[(0,) * a.ndim] = 1e8
    _check(a, axis, rtol=1e-9)


@pytest.mark.parametrize("shape,axis", [((2, 3, 3 * _blocks.BLOCK), (0, 2)), ((50_001, 3), 0),
                                        ((5_000, 3, 16), (0, 2))])
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
    np.arange(2 * 5 * 3 * _blocks.BLOCK, dtype=np.float64).reshape(2, 5, -1) % 97,
    np.arange(70_000 * 5, dtype=np.float64).reshape(-1, 5, 1) % 89,
])
def test_serial_and_parallel_builds_agree_exactly(x3):
    """Both builds split the work into the same parts: identical bits."""
    if x3.shape[2] == 1:
        run = lambda parallel: moments.moments_columns(x3[:, :, 0], len(x3), 2,  # noqa: E731
                                                       parallel=parallel)
    else:
        run = lambda parallel: moments.moments_rows(x3, len(x3), 2, parallel=parallel)  # noqa: E731
    (serial, _), (parallel, _) = run(False), run(True)
    np.testing.assert_array_equal(serial, parallel)


@pytest.mark.parametrize("shape,axis", [((3, 12, 7), (0, 2)), ((50, 12), 0), ((1, 12, 9000), (0, 2))])
def test_many_channels_in_tiles(shape, axis, monkeypatch, rng):
    """More channels than CHANNEL_TILE: the kernels run on tiles of channels."""
    monkeypatch.setattr(moments, "CHANNEL_TILE", 5)
    _check(1e6 + rng.standard_normal(shape), axis)


@pytest.mark.parametrize("shape", [(1003, 5, 1), (1003, 300, 1), (37, 3, 9), (37, 3, 2 * _blocks.BLOCK + 3)])
@pytest.mark.parametrize("group_rows", [1, 4, 333, 1003])
@pytest.mark.parametrize("nthreads", [1, 2, 3, 5])
def test_virtual_batches_every_split(shape, group_rows, nthreads, rng):
    """Per (group, channel) states over groups of outer rows (the last shorter) that threads'
    shares cut anywhere: each group's moments, exactly those of its rows alone (the heads of
    threads merged into their groups); a constant group stays exact."""
    x3 = 1e3 + rng.standard_normal(shape)
    x3[:group_rows] = 7.25  # the first group: constant data
    kernel = moments.moments_columns if shape[2] == 1 else moments.moments_rows
    data = x3[:, :, 0] if shape[2] == 1 else x3
    states, finite = kernel(data, group_rows, nthreads, parallel=nthreads > 1)
    assert finite and states.shape == (-(-shape[0] // group_rows), moments.FIELDS, shape[1])
    for g, state in enumerate(states):
        part = x3[g * group_rows:(g + 1) * group_rows]
        np.testing.assert_array_equal(state[moments.COUNT], part[:, 0].size)
        np.testing.assert_allclose(state[moments.MEAN], reference.mean(part, (0, 2)),
                                   rtol=1e-14)
        m2 = reference.var(part, (0, 2)) * part[:, 0].size
        np.testing.assert_allclose(state[moments.M2], m2, rtol=1e-12, atol=1e-9)
    assert np.all(states[0, moments.MEAN] == 7.25) and np.all(states[0, moments.M2] == 0)


@pytest.mark.parametrize("group_rows", [4, 333, 192, 960])
def test_virtual_batches_regrouped(group_rows, rng):
    """Few channels: wide rows of one group only (k divides group_rows, else no regrouping),
    the leftover rows the last group's."""
    x = 50 + rng.standard_normal((_blocks.AS_LAID_OUT // 3 + 7, 3))  # regrouped: not small
    assert (_blocks.widen(x, group_rows=group_rows)[0] > 1) == (group_rows % 96 == 0)  # k = 96
    mean, m2, _ = moments.channel_moments(x[:, :, None], group_rows)
    whole = len(x) // group_rows * group_rows  # the groups of group_rows rows, then the last
    parts = [(x[:whole].reshape(-1, group_rows, 3), slice(0, whole // group_rows * 3))]
    if whole < len(x):
        parts.append((x[whole:][None], slice(whole // group_rows * 3, None)))
    for part, got in parts:
        np.testing.assert_allclose(mean[got], reference.mean(part, 1).ravel(), rtol=1e-14)
        np.testing.assert_allclose(m2[got], reference.var(part, 1).ravel() * part.shape[1],
                                   rtol=1e-12)
