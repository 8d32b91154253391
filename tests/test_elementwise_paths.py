"""The host batch-norm kernels' work-splitting paths: NCHW rows in blocks, channels-last
columns walked as lockstep streams (leftover rows per thread and per stream), few
channels regrouped into wide rows (with leftover rows), serial and parallel builds;
each against a float64 reference, and through the public functions against PyTorch.

Errors against the float64 reference (``_reference``, the same formula in float64,
summed with ``math.fsum``): the elementwise passes round once into the output dtype
(``affine``: y = x*scale + shift; ``grad_input``: dx = g*dy + h*(x - mean) + k), so
they are within one unit in the last place of float32 (float64: 1e-15 relative);
the backward sums accumulate in float64 and are within 1e-13 of the sum of the
terms' magnitudes.
"""
import math

import numpy as np
import pytest

import nbbn
from nbbn._cpu import _blocks, backward, normalize

from .layouts import variants

torch = pytest.importorskip("torch")

ULP = {np.float32: 2.0 ** -23, np.float64: 1e-15}

# (shape of the (outer, C, inner) view, what it exercises)
VIEWS = [
    ((3, 4, 2 * _blocks.BLOCK + 5), "rows, several blocks per row"),
    ((5, 7, 33), "rows, one short block"),
    ((1003, 300, 1), "columns, leftover rows per thread and per stream"),
    ((2050, 1024, 1), "columns, wide rows"),
    ((22_013, 3, 1), "columns, 3 channels regrouped, leftover rows"),
    ((5_003, 64, 1), "columns, 64 channels regrouped, leftover rows"),
    ((997, 100, 1), "columns, 100 channels regrouped (k*C a whole number of quanta)"),
    ((4099, 5, 16), "short rows read as columns, 5 channels regrouped"),
    ((7, 5, 1), "columns, small: not regrouped"),
]


def _data(shape, dtype, rng):
    x = (rng.standard_normal(shape) * 3 + 10).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    return x, dy, [rng.standard_normal(c) for _ in range(5)]


def _reference(x, dy, mean, scale, shift, g, h, k):
    """float64 references: affine output, (sum(dy), sum(dy*(x - mean))) with fsum, dx."""
    xf, df = x.astype(np.float64), dy.astype(np.float64)
    per = (None, slice(None)) if x.ndim == 2 else (None, slice(None), None)
    y = xf * scale[per] + shift[per]
    terms = df * (xf - mean[per])
    axes = (0,) if x.ndim == 2 else (0, 2)
    moved = lambda a: np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)  # noqa: E731
    sums = (np.array([math.fsum(r) for r in moved(df)]),
            np.array([math.fsum(r) for r in moved(terms)]))
    magnitude = (np.abs(df).sum(axis=axes), np.abs(terms).sum(axis=axes))
    dx = g[per] * df + h[per] * (xf - mean[per]) + k[per]
    return y, sums, magnitude, dx


def _check(x, dy, coeffs, y, sums, dx):
    mean, scale, shift, g, h = coeffs
    k = scale  # any vector
    y_ref, sums_ref, magnitude, dx_ref = _reference(x, dy, mean, scale, shift, g, h, k)
    ulp = ULP[x.dtype.type]
    np.testing.assert_allclose(y, y_ref, rtol=ulp, atol=ulp * np.abs(y_ref).max())
    for got, want, size in zip(sums, sums_ref, magnitude):
        assert np.all(np.abs(got - want) <= 1e-13 * size)
    np.testing.assert_allclose(dx, dx_ref, rtol=ulp, atol=ulp * np.abs(dx_ref).max())


@pytest.mark.parametrize("shape,what", VIEWS, ids=[v[1] for v in VIEWS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_entry_points_against_float64(shape, what, dtype, rng):
    x, dy, coeffs = _data(shape, dtype, rng)
    mean, scale, shift, g, h = coeffs
    before = (x.copy(), dy.copy())
    y, dx = np.empty_like(x), np.empty_like(x)
    normalize.affine(x, scale, shift, y)
    sums = backward.backward_sums(dy, x, mean)
    backward.grad_input(dy, x, mean, g, h, scale, dx)
    _check(x, dy, coeffs, y, sums, dx)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(dy, before[1])


@pytest.mark.parametrize("n_rows,nchan", [(4001, 300), (1027, 1024), (9, 5), (1, 7)])
@pytest.mark.parametrize("nthreads", [1, 2, 3, 5])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("group_rows", [None, 4, 333])
def test_column_kernels_every_split(n_rows, nchan, nthreads, parallel, group_rows, rng):
    """Threads with fewer rows than streams, leftovers in every thread, virtual batches
    (groups of group_rows rows, the last shorter) across thread boundaries; both builds."""
    x, dy, _ = _data((n_rows, nchan), np.float64, rng)
    rows = n_rows if group_rows is None else group_rows
    groups = -(-n_rows // rows)
    mean, scale, shift, g, h = (rng.standard_normal((groups, nchan)) for _ in range(5))
    y, dx = np.empty_like(x), np.empty_like(x)
    normalize.affine_columns(x, scale, shift, y, None, None, None, None, rows, nthreads,
                             parallel=parallel)
    sum_dy, sum_dxm = backward.total_sums(
        backward.sums_columns(dy, x, mean, None, None, rows, nthreads, parallel=parallel)[:, None],
        parallel=False)
    backward.dx_columns(dy, x, None, mean, g, h, scale, dx, rows, nthreads, parallel=parallel)
    for q in range(groups):
        part = slice(q * rows, (q + 1) * rows)
        _check(x[part], dy[part], [a[q] for a in (mean, scale, shift, g, h)], y[part],
               (sum_dy[q], sum_dxm[q]), dx[part])


@pytest.mark.parametrize("nthreads", [2, 3])
def test_serial_and_parallel_builds_agree_exactly(nthreads, rng):
    """Both builds split the work into the same parts: identical bits."""
    x, dy, (mean, *_) = _data((30_001, 96), np.float32, rng)
    sums = [backward.sums_columns(dy, x, mean[None], None, None, x.shape[0], nthreads,
                                  parallel=p) for p in (False, True)]
    np.testing.assert_array_equal(*sums)
    x3, dy3 = x[:30_000].reshape(3, 96, -1), dy[:30_000].reshape(3, 96, -1)
    sums = [backward.sums_rows(dy3, x3, mean[None], None, None, 3, nthreads, parallel=p)
            for p in (False, True)]
    np.testing.assert_array_equal(*sums)


def test_strided_columns_are_not_regrouped(rng):
    """Rows that do not follow each other in memory take the plain column walk."""
    base, dy, _ = _data((6000, 2, 3), np.float32, rng)
    x, dyv = base[:, 0, :], dy[:, 0, :]
    assert _blocks.widen(x, dyv)[0] == 1
    coeffs = mean, scale, shift, g, h = [rng.standard_normal(3) for _ in range(5)]
    y, dx = np.empty(x.shape, x.dtype), np.empty(x.shape, x.dtype)
    normalize.affine(x[:, :, None], scale, shift, y[:, :, None])
    sums = backward.backward_sums(dyv[:, :, None], x[:, :, None], mean)
    backward.grad_input(dyv[:, :, None], x[:, :, None], mean, g, h, scale, dx[:, :, None])
    _check(x, dyv, coeffs, y, sums, dx)


def test_widen_rounds_rows_to_whole_quanta():
    for nchan in (1, 3, 5, 64, 100, 255):
        k, (wide,), rest = _blocks.widen(np.zeros((100_003, nchan), np.float32))
        assert wide.shape[1] % _blocks.ROW_QUANTUM == 0 and wide.shape[1] >= _blocks.MIN_ROW_WIDTH
        assert wide.shape[0] * k + (0 if rest is None else rest[0].shape[0]) == 100_003


def _torch_train(x, w, b, dy, axis):
    """PyTorch's float64 forward and gradients, for a channel axis moved to 1."""
    mv = lambda a: np.ascontiguousarray(np.moveaxis(a, axis, 1), np.float64)  # noqa: E731
    xt = torch.from_numpy(mv(x)).requires_grad_()
    wt = torch.from_numpy(w.astype(np.float64)).requires_grad_()
    bt = torch.from_numpy(b.astype(np.float64)).requires_grad_()
    y = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True)
    y.backward(torch.from_numpy(mv(dy)))
    back = lambda a: np.moveaxis(a.detach().numpy(), 1, axis)  # noqa: E731
    return back(y), back(xt.grad), wt.grad.numpy(), bt.grad.numpy()


# Large enough for the parallel builds and the regrouping, with leftover rows.
PUBLIC = [((13, 61, 59, 3), -1), ((9, 23, 31, 64), -1), ((1031, 300), 1), ((3, 8, 7001), 1)]
TOL = {np.float16: 5e-3, np.float32: 2e-5, np.float64: 1e-10}


@pytest.mark.parametrize("shape,axis", PUBLIC, ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_public_functions_on_every_layout_match_torch(shape, axis, dtype, rng):
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    w, b = (rng.random(c) + 0.5).astype(dtype), rng.standard_normal(c).astype(dtype)
    y_ref, dx_ref, dw_ref, db_ref = _torch_train(x, w, b, dy, axis)
    tol = TOL[dtype]
    for name, xv in variants(x):
        before = xv.copy()
        y, mean, var = nbbn.batch_norm_forward(xv, w, b, axis=axis)
        np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol, err_msg=name)
        dx, dw, db = nbbn.batch_norm_backward(dy, xv, mean, var, w, axis=axis)
        np.testing.assert_allclose(dx, dx_ref, rtol=tol, atol=tol, err_msg=name)
        np.testing.assert_allclose(dw, dw_ref, rtol=10 * tol, atol=10 * tol * x.size ** 0.5,
                                   err_msg=name)
        np.testing.assert_allclose(db, db_ref, rtol=10 * tol, atol=10 * tol * x.size ** 0.5,
                                   err_msg=name)
        y_eval = nbbn.batch_norm(xv, mean, var, w, b, training=False, axis=axis)
        np.testing.assert_allclose(y_eval, y_ref, rtol=tol, atol=tol, err_msg=name)
        np.testing.assert_array_equal(xv, before)
