"""Fused epilogues (``relu(BN(x) + residual)``) and bfloat16 on the host, against PyTorch's
float64 autograd of ``relu(F.batch_norm(x, ...) + r)`` (gradients w.r.t. x, weight, bias and
r) and float64 references: every layout (NCHW rows, channels-last columns, 2-D to 5-D,
strided inputs), serial and parallel builds, the layer, and argument errors.

Elements whose pre-activation is within rounding of 0 may fall on either side of the ReLU in
float32; the data has dy = 0 there, so the gradients do not depend on that side.
"""
import ml_dtypes
import numpy as np
import pytest

import nbbn
from nbbn._cpu import backward, normalize

from .layouts import variants

torch = pytest.importorskip("torch")
F = torch.nn.functional
BF16 = np.dtype(ml_dtypes.bfloat16)

# (shape, channel axis): 2-D to 5-D, NCHW and channels-last; the large ones run the parallel
# builds (rows in several blocks, channels regrouped into wide rows).
CASES = [((7, 5), 1), ((4, 3, 9), 1), ((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1),
         ((2, 3, 4, 3, 5), 1), ((2, 4, 3, 5, 3), -1),
         ((3, 8, 7001), 1), ((1031, 300), 1), ((9, 23, 31, 64), -1)]
TOL = {np.float32: 2e-5, np.float64: 1e-10}


def _moved(a, axis):
    return np.ascontiguousarray(np.moveaxis(np.asarray(a, np.float64), axis, 1))


def torch_fused(x, w, b, r, dy, axis, relu=True):
    """float64 ``(y, dx, dweight, dbias, dresidual, pre-activation)`` by PyTorch autograd of
    ``relu(F.batch_norm(x, None, None, w, b, training=True) + r)``."""
    xt, rt = (torch.from_numpy(_moved(a, axis)).requires_grad_() for a in (x, r))
    wt, bt = (torch.from_numpy(np.asarray(a, np.float64)).requires_grad_() for a in (w, b))
    pre = F.batch_norm(xt, None, None, wt, bt, training=True) + rt
    y = F.relu(pre) if relu else pre
    y.backward(torch.from_numpy(_moved(dy, axis)))
    back = lambda t: np.moveaxis(t.detach().numpy(), 1, axis)  # noqa: E731
    return back(y), back(xt.grad), wt.grad.numpy(), bt.grad.numpy(), back(rt.grad), back(pre)


def make(shape, axis, dtype, rng):
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = (rng.random(c) + 0.5).astype(dtype)
    b = (rng.standard_normal(c) * 0.5).astype(dtype)
    return x, r, dy, w, b


def clear_near_zero(dy, pre, width):
    """dy with zeros where the pre-activation is within ``width`` of the ReLU's kink."""
    dy = dy.copy()
    dy[np.abs(pre) < width] = 0
    return dy


def check(got, want, tol, n=1, name=""):
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.sqrt(n), err_msg=name)


@pytest.mark.parametrize("shape,axis", CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_matches_torch_autograd(shape, axis, dtype, rng):
    x, r, dy, w, b = make(shape, axis, dtype, rng)
    pre = torch_fused(x, w, b, r, dy, axis)[5]
    dy = clear_near_zero(dy, pre, 1e-4)
    y_ref, dx_ref, dw_ref, db_ref, dr_ref, _ = torch_fused(x, w, b, r, dy, axis)
    tol, n = TOL[dtype], x.size // shape[axis]
    y, mean, var = nbbn.batch_norm_forward(x, w, b, axis=axis, residual=r, activation="relu")
    assert y.dtype == dtype and (y >= 0).all()
    check(y, y_ref, tol)
    dx, dw, db, dr = nbbn.batch_norm_backward(dy, x, mean, var, w, axis=axis, y=y,
                                              activation="relu", residual_grad=True)
    check(dx, dx_ref, tol, name="dx")
    check(dw, dw_ref, tol, n, "dweight")
    check(db, db_ref, tol, n, "dbias")
    assert dr.dtype == dtype and dr.shape == x.shape
    np.testing.assert_array_equal(dr, dr_ref.astype(dtype))  # dy where y > 0: exact
    # The same without asking for the residual's gradient: three results, the same dx.
    grads = nbbn.batch_norm_backward(dy, x, mean, var, w, axis=axis, y=y, activation="relu")
    assert len(grads) == 3
    np.testing.assert_array_equal(grads[0], dx)
    # batch_norm (training, running buffers) computes the same y.
    rm, rv = np.zeros(shape[axis], dtype), np.ones(shape[axis], dtype)
    np.testing.assert_array_equal(
        nbbn.batch_norm(x, rm, rv, w, b, training=True, axis=axis, residual=r,
                        activation="relu"), y)
    check(rv, 0.9 + 0.1 * var * (n / (n - 1)), tol)


@pytest.mark.parametrize("shape,axis", [((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1), ((1031, 300), 1)],
                         ids=str)
def test_residual_alone_relu_alone_and_evaluation(shape, axis, rng):
    x, r, dy, w, b = make(shape, axis, np.float64, rng)
    y_ref, dx_ref, dw_ref, db_ref, dr_ref, _ = torch_fused(x, w, b, r, dy, axis, relu=False)
    y, mean, var = nbbn.batch_norm_forward(x, w, b, axis=axis, residual=r)
    check(y, y_ref, 1e-10)
    dx, dw, db, dr = nbbn.batch_norm_backward(dy, x, mean, var, w, axis=axis,
                                              residual_grad=True)
    check(dx, dx_ref, 1e-10)
    np.testing.assert_array_equal(dr, dy)  # no ReLU: the residual's gradient is dy
    y = nbbn.batch_norm_forward(x, w, b, axis=axis, activation="relu")[0]
    np.testing.assert_allclose(y, np.maximum(nbbn.batch_norm_forward(x, w, b, axis=axis)[0],
                                             0), rtol=1e-15, atol=0)
    # Evaluation with running statistics: y = relu(x * scale + shift + r).
    rm = rng.standard_normal(shape[axis])
    rv = rng.random(shape[axis]) + 0.5
    per = [1] * len(shape)
    per[axis] = -1
    want = np.maximum((x - rm.reshape(per)) / np.sqrt(rv.reshape(per) + 1e-5) * w.reshape(per)
                      + b.reshape(per) + r, 0)
    check(nbbn.batch_norm(x, rm, rv, w, b, axis=axis, residual=r, activation="relu"), want,
          1e-12)


@pytest.mark.parametrize("shape,axis", [((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1)], ids=str)
def test_every_layout_of_every_operand(shape, axis, rng):
    """Strided, F-order, byte-swapped, read-only, negative-stride x, residual, dy and y; none
    modified; out= honoured."""
    x, r, dy, w, b = make(shape, axis, np.float32, rng)
    dy = clear_near_zero(dy, torch_fused(x, w, b, r, dy, axis)[5], 1e-4)
    y0, mean0, var0 = nbbn.batch_norm_forward(x, w, b, axis=axis, residual=r,
                                              activation="relu")
    grads0 = nbbn.batch_norm_backward(dy, x, mean0, var0, w, axis=axis, y=y0,
                                      activation="relu", residual_grad=True)
    for (name, xv), (_, rv_), (_, dyv) in zip(variants(x), variants(r), variants(dy)):
        before = [a.copy() for a in (xv, rv_, dyv)]
        out = np.empty_like(x)
        y, mean, var = nbbn.batch_norm_forward(xv, w, b, axis=axis, residual=rv_,
                                               activation="relu", out=out)
        assert y is out
        np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6, err_msg=name)
        for yv in (y, np.asfortranarray(y)):
            grads = nbbn.batch_norm_backward(dyv, xv, mean, var, w, axis=axis, y=yv,
                                             activation="relu", residual_grad=True)
            for got, want in zip(grads, grads0):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
        for a, was in zip((xv, rv_, dyv), before):
            np.testing.assert_array_equal(a, was)


@pytest.mark.parametrize("view", [(6, 5, 4003), (20_011, 64, 1), (7, 5, 1)], ids=str)
@pytest.mark.parametrize("nthreads", [2, 3])
def test_serial_and_parallel_builds_agree_exactly(view, nthreads, rng):
    """The epilogue's kernels, rows and columns, both builds: identical bits."""
    x, r, dy = (rng.standard_normal(view).astype(np.float32) for _ in range(3))
    c, rows = view[1], view[0]  # one group of every row: vectors (1, C)
    scale, shift, mean = (rng.standard_normal((1, c)) for _ in range(3))
    results = []
    for parallel in (False, True):
        y, copy, dres = (np.empty_like(x) for _ in range(3))
        mask = np.empty(view, np.uint8)
        kind = "rows" if view[2] > 1 else "columns"
        two = (lambda a: a) if kind == "rows" else (lambda a: a[:, :, 0])  # noqa: E731
        affine = getattr(normalize, f"affine_{kind}")
        affine(two(x), scale, shift, two(y), two(r), True, two(copy), two(mask), rows,
               nthreads, parallel=parallel)
        sums = getattr(backward, f"sums_{kind}")(two(dy), two(x), mean, two(y), two(dres),
                                                 rows, nthreads, parallel=parallel)
        results.append((y, copy, mask, sums, dres))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    y, copy, mask, sums, dres = results[0]
    np.testing.assert_array_equal(copy, x)
    np.testing.assert_array_equal(mask, y > 0)
    np.testing.assert_array_equal(dres, np.where(y > 0, dy, 0))
    np.testing.assert_allclose(y, np.maximum(x * scale[..., None] + shift[..., None] + r, 0),
                               rtol=2e-7, atol=1e-6)


# ---- the layer --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,axis", [((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1), ((50, 7), 1)],
                         ids=str)
def test_layer_matches_torch(shape, axis, rng):
    x, r, dy, w, b = make(shape, axis, np.float64, rng)
    layer = nbbn.BatchNorm(shape[axis], axis=axis, activation="relu", dtype=np.float64)
    layer.weight[:], layer.bias[:] = w, b
    assert "activation='relu'" in repr(layer)
    dy = clear_near_zero(dy, torch_fused(x, w, b, r, dy, axis)[5], 1e-6)
    y_ref, dx_ref, dw_ref, db_ref, dr_ref, _ = torch_fused(x, w, b, r, dy, axis)
    xv, rv_ = x.copy(), r.copy()
    y = layer(xv, rv_)
    check(y, y_ref, 1e-10)
    xv[...] = 0  # what the layer kept is its own
    y[...] = 1
    dx = layer.backward(dy)
    check(dx, dx_ref, 1e-10)
    check(layer.grad_weight, dw_ref, 1e-10, x.size)
    check(layer.grad_bias, db_ref, 1e-10, x.size)
    np.testing.assert_array_equal(layer.grad_residual, dr_ref)
    layer(x)  # no residual: relu(BN(x)), and no residual gradient
    layer.backward(dy)
    assert layer.grad_residual is None
    layer.eval()
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    per = [1] * len(shape)
    per[axis] = -1
    want = np.maximum((x - rm.reshape(per)) / np.sqrt(rv.reshape(per) + 1e-5)
                      * w.reshape(per) + b.reshape(per) + r, 0)
    check(layer(x, r), want, 1e-12)
    dx = layer.backward(dy)
    check(dx, np.where(want > 0, dy, 0) * (w / np.sqrt(rv + 1e-5)).reshape(per), 1e-12)


# ---- argument errors ---------------------------------------------------------------------------


def _unchanged(*arrays):
    return [a.copy() for a in arrays]


@pytest.mark.parametrize("call,error,names", [
    (lambda x, r, dy, rm, rv, out: nbbn.batch_norm_forward(x, residual=r, activation="gelu",
                                                           out=out), ValueError, "activation"),
    (lambda x, r, dy, rm, rv, out: nbbn.batch_norm_forward(x, residual=r[:, :2], out=out),
     ValueError, "residual"),
    (lambda x, r, dy, rm, rv, out: nbbn.batch_norm_forward(x, residual=r.astype(np.float64),
                                                           out=out), ValueError, "residual"),
    (lambda x, r, dy, rm, rv, out: nbbn.batch_norm_forward(x, residual=r.astype(np.int32),
                                                           out=out), TypeError, "residual"),
    (lambda x, r, dy, rm, rv, out: nbbn.batch_norm(x, rm, rv, training=True, residual=r,
                                                   activation=1, out=out),
     ValueError, "activation"),
    (lambda x, r, dy, rm, rv, out: nbbn.batch_norm(x, rm, rv, training=True, residual=r.T,
                                                   out=out), ValueError, "residual"),
    (lambda x, r, dy, rm, rv, out: nbbn.batch_norm_backward(dy, x, rm, rv, activation="relu",
                                                            out=out), ValueError, "y"),
    (lambda x, r, dy, rm, rv, out: nbbn.batch_norm_backward(dy, x, rm, rv, y=x, out=out),
     ValueError, "activation"),
    (lambda x, r, dy, rm, rv, out: nbbn.batch_norm_backward(dy, x, rm, rv, y=x[:1],
                                                            activation="relu", out=out),
     ValueError, "y"),
    (lambda x, r, dy, rm, rv, out: nbbn.BatchNorm(3, activation="sigmoid"), ValueError,
     "activation"),
])
def test_errors_name_the_argument_and_change_nothing(call, error, names, rng):
    x, r, dy, _, _ = make((4, 3, 5), 1, np.float32, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.full_like(x, 7)
    arrays = (x, r, dy, rm, rv, out)
    before = _unchanged(*arrays)
    with pytest.raises(error, match=names):
        call(*arrays)
    for a, was in zip(arrays, before):
        np.testing.assert_array_equal(a, was)


def test_layer_residual_error_changes_nothing(rng):
    x, r, _, _, _ = make((4, 3, 5), 1, np.float32, rng)
    layer = nbbn.BatchNorm(3, activation="relu")
    with pytest.raises(ValueError, match="residual"):
        layer(x, r[:2])
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, 0)


# ---- bfloat16 ---------------------------------------------------------------------------------


def nearest_bfloat16(values):
    """float64 values rounded once to the nearest bfloat16 (ties to even), by comparing the
    neighbours of ml_dtypes' conversion (which rounds through float32: twice)."""
    values = np.asarray(values, np.float64)
    first = values.astype(BF16)
    bits = first.view(np.uint16).astype(np.int32)
    candidates = [((bits + d) & 0xFFFF).astype(np.uint16).view(BF16) for d in (-1, 0, 1)]
    errors = [np.abs(c.astype(np.float64) - values) for c in candidates]
    best = np.argmin(errors, axis=0)
    out = np.choose(best, candidates)
    # On a tie, the even significand.
    tie = np.isclose(errors[0], errors[1], rtol=0, atol=0) | (errors[2] == errors[1])
    even = np.where(candidates[1].view(np.uint16) & 1, out, candidates[1])
    return np.where(tie & np.isfinite(values), even, out).astype(BF16)


@pytest.mark.parametrize("shape,axis", [((7, 5), 1), ((4, 3, 9), 1), ((3, 5, 6, 4), -1),
                                        ((3, 8, 7001), 1), ((1031, 300), 1)], ids=str)
def test_bfloat16_within_bfloat16_rounding_of_float64(shape, axis, rng):
    """y and dx are bfloat16 within one bfloat16 rounding (of float32 work) of the float64
    reference computed from the same bfloat16 values; mean/var are float32."""
    x, r, dy, w, b = make(shape, axis, BF16, rng)
    pre = torch_fused(x, w, b, r, dy, axis)[5]
    dy = clear_near_zero(dy, pre, 0.05).astype(BF16)
    y_ref, dx_ref, dw_ref, db_ref, dr_ref, _ = torch_fused(x, w, b, r, dy, axis)
    y, mean, var = nbbn.batch_norm_forward(x, w, b, axis=axis, residual=r, activation="relu")
    assert y.dtype == BF16 and mean.dtype == var.dtype == np.float32
    half_ulp = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
    err = np.abs(y.astype(np.float64) - y_ref)
    assert (err <= half_ulp * np.abs(y_ref) + 1e-5).all(), err.max()
    dx, dw, db, dr = nbbn.batch_norm_backward(dy, x, mean, var, w, axis=axis, y=y,
                                              activation="relu", residual_grad=True)
    assert dx.dtype == dr.dtype == dw.dtype == BF16
    err = np.abs(dx.astype(np.float64) - dx_ref)
    assert (err <= half_ulp * np.abs(dx_ref) + 1e-4).all(), err.max()
    np.testing.assert_array_equal(dr, dr_ref.astype(BF16))
    # The weight's gradients: float64 sums rounded once, from float32 statistics.
    np.testing.assert_allclose(dw.astype(np.float64), dw_ref, rtol=2 * half_ulp, atol=1e-3)
    np.testing.assert_allclose(db.astype(np.float64), db_ref, rtol=2 * half_ulp, atol=1e-3)


def test_bfloat16_statistics_follow_numpy_rule(rng):
    """bfloat16 in, bfloat16 out, correctly rounded from the exact statistic; dtype= asks for
    another."""
    x = (rng.standard_normal((1000, 17)) * 3 + 100).astype(BF16)
    exact = x.astype(np.float64)
    for name, ref in (("mean", exact.mean(axis=0)), ("var", exact.var(axis=0)),
                      ("std", exact.std(axis=0))):
        got = getattr(nbbn, name)(x, axis=0)
        assert got.dtype == BF16
        np.testing.assert_array_equal(got.view(np.uint16), nearest_bfloat16(ref).view(np.uint16),
                                      err_msg=name)
        wide = getattr(nbbn, name)(x, axis=0, dtype=np.float32)
        assert wide.dtype == np.float32
        np.testing.assert_allclose(wide, ref, rtol=1e-6)
    mean, var = nbbn.mean_var(x, axis=0)
    assert mean.dtype == var.dtype == BF16
    assert nbbn.mean(x).dtype == BF16
    moments = nbbn.moments(x, axis=0)
    np.testing.assert_allclose(moments.mean, exact.mean(axis=0), rtol=1e-12)


def test_bfloat16_layer_and_running_buffers(rng):
    x, r, dy, _, _ = make((8, 4, 6), 1, BF16, rng)
    layer = nbbn.BatchNorm(4, activation="relu", dtype=BF16)
    y = layer(x, r)
    assert y.dtype == BF16 and layer.running_mean.dtype == BF16
    dx = layer.backward(dy)
    assert dx.dtype == layer.grad_residual.dtype == layer.grad_weight.dtype == BF16
    mean = x.astype(np.float64).mean(axis=(0, 2))
    np.testing.assert_array_equal(layer.running_mean, nearest_bfloat16(0.1 * mean))
