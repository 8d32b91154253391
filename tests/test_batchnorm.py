"""Batch-norm functions against PyTorch (semantics) and float64 NumPy (values)."""
import numpy as np
import pytest

import nbbn
from tests.layouts import variants

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = [(6, 4), (5, 3, 7), (4, 3, 5, 6), (2, 3, 4, 3, 5)]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}


def make(shape, dtype, rng, affine=True):
    c = shape[1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    w = (rng.random(c) + 0.5).astype(dtype) if affine else None
    b = rng.standard_normal(c).astype(dtype) if affine else None
    return x, w, b


def t(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def torch_train(x, w, b, dy, rm=None, rv=None, momentum=0.1, eps=1e-5):
    """PyTorch's forward (training) and autograd gradients."""
    xt = t(x).requires_grad_()
    wt = None if w is None else t(w).requires_grad_()
    bt = None if b is None else t(b).requires_grad_()
    y = F.batch_norm(xt, rm, rv, wt, bt, training=True, momentum=momentum, eps=eps)
    y.backward(t(dy))
    grads = (xt.grad.numpy(), None if w is None else wt.grad.numpy(),
             None if b is None else bt.grad.numpy())
    return y.detach().numpy(), grads


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_training_matches_torch(shape, dtype, affine, rng):
    x, w, b = make(shape, dtype, rng, affine)
    c = shape[1]
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    trm, trv = t(rm.copy()), t(rv.copy())
    for step in range(3):  # running buffers over several steps
        x = (x * 1.1 + step).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        y_ref, (dx_ref, dw_ref, db_ref) = torch_train(x, w, b, dy, trm, trv, momentum=0.2)
        y = nbbn.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2)
        assert y.dtype == dtype and y.shape == shape
        np.testing.assert_allclose(y, y_ref, **TOL[dtype])
        np.testing.assert_allclose(rm, trm.numpy(), **TOL[dtype])
        np.testing.assert_allclose(rv, trv.numpy(), **TOL[dtype])
        y2, mean, var = nbbn.batch_norm_forward(x, w, b)
        np.testing.assert_array_equal(y2, y)
        assert mean.dtype == var.dtype == dtype
        dx, dw, db = nbbn.batch_norm_backward(dy, x, mean, var, w)
        np.testing.assert_allclose(dx, dx_ref, **TOL[dtype])
        if affine:
            np.testing.assert_allclose(dw, dw_ref, rtol=1e-4 if dtype == np.float32 else 1e-10)
            np.testing.assert_allclose(db, db_ref, rtol=1e-4 if dtype == np.float32 else 1e-10)
        else:
            assert dw is None and db is None


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_eval_matches_torch(shape, dtype, rng):
    x, w, b = make(shape, dtype, rng)
    c = shape[1]
    rm = rng.standard_normal(c).astype(dtype)
    rv = (rng.random(c) + 0.2).astype(dtype)
    before = (rm.copy(), rv.copy())
    y = nbbn.batch_norm(x, rm, rv, w, b, training=False)
    y_ref = F.batch_norm(t(x), t(rm), t(rv), t(w), t(b), training=False).numpy()
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])
    scale, shift = nbbn.fold(rm, rv, w, b)
    bshape = [1] * x.ndim
    bshape[1] = c
    np.testing.assert_allclose(x * scale.reshape(bshape) + shift.reshape(bshape), y_ref,
                               **TOL[dtype])


def test_finite_difference_gradients(rng):
    """float64 central differences of a scalar loss through the training forward."""
    x, w, b = make((3, 2, 4), np.float64, rng)
    proj = rng.standard_normal(x.shape)

    def loss(x_, w_, b_):
        return float((nbbn.batch_norm_forward(x_, w_, b_)[0] * proj).sum())

    _, mean, var = nbbn.batch_norm_forward(x, w, b)
    dx, dw, db = nbbn.batch_norm_backward(proj, x, mean, var, w)
    h = 1e-6
    for arr, grad in [(x, dx), (w, dw), (b, db)]:
        num = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            up = loss(x, w, b)
            arr[i] = old - h
            down = loss(x, w, b)
            arr[i] = old
            num[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 3, 4, 3, 5), (40, 7), (1500, 3), (7, 3, 25, 11)],
                         ids=str)
def test_channels_last_equals_transposed(shape, rng):
    x, w, b = make(shape, np.float32, rng)
    dy = rng.standard_normal(shape).astype(np.float32)
    xl, dyl = np.moveaxis(x, 1, -1).copy(), np.moveaxis(dy, 1, -1).copy()
    y, m, v = nbbn.batch_norm_forward(x, w, b)
    yl, ml, vl = nbbn.batch_norm_forward(xl, w, b, axis=-1)
    np.testing.assert_allclose(np.moveaxis(yl, -1, 1), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ml, m, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(vl, v, rtol=1e-5)
    dx, dw, db = nbbn.batch_norm_backward(dy, x, m, v, w)
    dxl, dwl, dbl = nbbn.batch_norm_backward(dyl, xl, m, v, w, axis=-1)
    np.testing.assert_allclose(np.moveaxis(dxl, -1, 1), dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dwl, dw, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dbl, db, rtol=1e-4, atol=1e-5)
    assert yl.flags.c_contiguous  # the output keeps the input's memory layout


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_any_channel_axis_and_layout(axis, rng):
    base = rng.standard_normal((4, 5, 6)) * 3 + 1
    dy = rng.standard_normal(base.shape)
    moved = np.moveaxis(base, axis, 1)
    c = moved.shape[1]
    w, b = rng.random(c) + 0.5, rng.standard_normal(c)
    y_ref, (dx_ref, dw_ref, db_ref) = torch_train(moved, w, b, np.moveaxis(dy, axis, 1))
    for name, x in variants(base):
        before = x.copy()
        y, mean, var = nbbn.batch_norm_forward(x, w, b, axis=axis)
        np.testing.assert_allclose(np.moveaxis(y, axis, 1), y_ref, rtol=1e-10, atol=1e-10,
                                   err_msg=name)
        dx, dw, db = nbbn.batch_norm_backward(dy, x, mean, var, w, axis=axis)
        np.testing.assert_allclose(np.moveaxis(dx, axis, 1), dx_ref, rtol=1e-9, atol=1e-10,
                                   err_msg=name)
        np.testing.assert_allclose(dw, dw_ref, rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(db, db_ref, rtol=1e-9, err_msg=name)
        np.testing.assert_array_equal(x, before)


def test_large_shapes_run_threaded_kernels(rng):
    for shape, axis in [((32, 16, 24, 24), 1), ((32, 24, 24, 16), -1), ((3, 4, 100000), 1)]:
        x = rng.standard_normal(shape).astype(np.float32) * 4 + 3
        dy = rng.standard_normal(shape).astype(np.float32)
        c = shape[axis]
        w, b = rng.random(c).astype(np.float32) + 0.5, rng.standard_normal(c).astype(np.float32)
        mv = lambda a: np.moveaxis(a, axis, 1)  # noqa: E731
        y_ref, (dx_ref, dw_ref, db_ref) = torch_train(mv(x).astype(np.float64), w.astype(float),
                                                      b.astype(float), mv(dy).astype(float))
        y, m, v = nbbn.batch_norm_forward(x, w, b, axis=axis)
        dx, dw, db = nbbn.batch_norm_backward(dy, x, m, v, w, axis=axis)
        np.testing.assert_allclose(mv(y), y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mv(dx), dx_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(db, db_ref, rtol=1e-4, atol=1e-3)


def test_out(rng):
    x, w, b = make((4, 3, 5), np.float32, rng)
    out = np.empty_like(x)
    y, m, v = nbbn.batch_norm_forward(x, w, b, out=out)
    assert y is out
    np.testing.assert_allclose(out, nbbn.batch_norm_forward(x, w, b)[0])
    out2 = np.empty_like(x)
    assert nbbn.batch_norm(x, None, None, w, b, training=True, out=out2) is out2
    np.testing.assert_array_equal(out2, out)
    dx_out = np.empty((5, 3, 4), np.float32).transpose(2, 1, 0)  # non-contiguous out
    dx, _, _ = nbbn.batch_norm_backward(x, x, m, v, w, out=dx_out)
    assert dx is dx_out
    np.testing.assert_allclose(dx_out, nbbn.batch_norm_backward(x, x, m, v, w)[0])
    inplace = x.copy()
    nbbn.batch_norm(inplace, None, None, w, b, training=True, out=inplace)
    np.testing.assert_allclose(inplace, out, rtol=1e-6, atol=1e-6)


# Small calls in every layout the fused path takes: NCHW, channels-last (few channels, which
# large arrays regroup), 2-D, short rows (which large arrays read as columns), 3-D
# channels-last, a reversed axis.
SMALL_CALLS = [((8, 16, 8, 8), None), ((8, 16, 8, 8), (0, 2, 3, 1)), ((512, 16), None),
               ((32, 3, 4, 4), None), ((16, 3, 11), (0, 2, 1)), ((9, 4, 6), "reversed")]


@pytest.mark.parametrize("shape,order", SMALL_CALLS, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_small_calls_equal_the_general_path_bit_for_bit(shape, order, dtype, rng):
    """A small call runs in one compiled call (``_cpu.backend.fused``); with ``out=`` the same
    call takes the general path: the results agree to the last bit, laid out as x."""
    from nbbn import batchnorm
    x, w, b = make(shape, dtype, rng)
    dy = rng.standard_normal(shape).astype(dtype)
    if order == "reversed":
        x, dy = x[::-1], dy[::-1]
    elif order is not None:
        x, dy = (np.ascontiguousarray(a.transpose(order)).transpose(np.argsort(order))
                 for a in (x, dy))
    assert batchnorm._small(1, x, w, b), "the fused path declined"
    y, m, v = nbbn.batch_norm_forward(x, w, b)
    y_out, m_out, v_out = nbbn.batch_norm_forward(x, w, b, out=np.empty_like(x))
    for got, want in ((y, y_out), (m, m_out), (v, v_out)):
        np.testing.assert_array_equal(got, want)
    assert y.strides == np.empty_like(x).strides
    running = (rng.standard_normal(shape[1]).astype(dtype), rng.random(shape[1]).astype(dtype))
    np.testing.assert_array_equal(nbbn.batch_norm(x, *running, w, b),
                                  nbbn.batch_norm(x, *running, w, b, out=np.empty_like(x)))
    dx, dw, db = nbbn.batch_norm_backward(dy, x, m, v, w)
    dx_out, dw_out, db_out = nbbn.batch_norm_backward(dy, x, m, v, w, out=np.empty_like(x))
    for got, want in ((dx, dx_out), (dw, dw_out), (db, db_out)):
        np.testing.assert_array_equal(got, want)
    y_ref, grads = torch_train(x, w, b, dy)
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_allclose(dx, grads[0], **TOL[dtype])


def test_float16_input(rng):
    x, w, b = make((8, 3, 4, 4), np.float16, rng)
    y, m, v = nbbn.batch_norm_forward(x, w, b)
    assert y.dtype == np.float16 and m.dtype == v.dtype == np.float32
    y64 = nbbn.batch_norm_forward(x.astype(np.float64), w.astype(float), b.astype(float))[0]
    np.testing.assert_allclose(y, y64, rtol=2e-3, atol=2e-3)
    rm, rv = np.zeros(3, np.float16), np.ones(3, np.float16)
    nbbn.batch_norm(x, rm, rv, w, b, training=True)
    np.testing.assert_allclose(rm, 0.1 * m, rtol=2e-3, atol=1e-3)
    dx, dw, db = nbbn.batch_norm_backward(x, x, m, v, w)
    assert dx.dtype == np.float16 and dw.dtype == np.float16


def test_nan_stays_in_its_channel(rng):
    x, w, b = make((4, 3, 5), np.float32, rng)
    x[1, 1, 2] = np.nan
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = nbbn.batch_norm(x, rm, rv, w, b, training=True)
    assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, [0, 2]]))
    assert np.isnan(rm[1]) and np.all(np.isfinite(rm[[0, 2]]))


@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (400, 3, 200, 2)])  # one call; the passes
def test_zero_variance_without_eps_follows_numpy_at_every_size(shape):
    """var + eps == 0 (evaluation and backward allow eps=0): NumPy's inf/nan, as the
    general path gives them, also from the small calls' one compiled call (it raised
    ZeroDivisionError)."""
    x, dy = np.ones(shape, np.float32), np.linspace(-1, 1, np.prod(shape), dtype=np.float32)
    dy = dy.reshape(shape)
    zeros, ones = np.zeros(3, np.float32), np.ones(3, np.float32)
    with np.errstate(all="ignore"):
        scale = 1 / np.sqrt(zeros.astype(np.float64))
        y_ref = (x * scale[:, None, None] + (0 - 0 * scale)[:, None, None]).astype(np.float32)
        y = nbbn.batch_norm(x, zeros, zeros, eps=0.0)
        dx, dw, db = nbbn.batch_norm_backward(dy, x, zeros, zeros, ones, eps=0.0)
        general = nbbn.batch_norm_backward(dy, x, zeros, zeros, ones, eps=0.0,
                                           out=np.empty_like(x))
    np.testing.assert_array_equal(y, y_ref)  # nan: 1 * inf + (0 - 0 * inf)
    for got, want in zip((dx, dw, db), general):
        np.testing.assert_array_equal(got, want)
    assert not np.isfinite(dx).any()


def test_ema_update_conventions(rng):
    mean, var = rng.standard_normal(4), rng.random(4)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    trm, trv = torch.zeros(4), torch.ones(4)
    nbbn.ema_update(rm, rv, mean, var, count=10, momentum=0.3)
    np.testing.assert_allclose(rm, 0.3 * mean, rtol=1e-6)
    np.testing.assert_allclose(rv, 0.7 + 0.3 * var * 10 / 9, rtol=1e-6)
    # Keras/Flax: momentum=0.99 is a decay; biased variance
    krm, krv = np.full(4, 2.0), np.full(4, 3.0)
    nbbn.ema_update(krm, krv, mean, var, count=10, momentum=1 - 0.99, unbiased=False)
    np.testing.assert_allclose(krm, 0.99 * 2.0 + 0.01 * mean)
    np.testing.assert_allclose(krv, 0.99 * 3.0 + 0.01 * var)
    # equals what F.batch_norm does to its buffers
    x = rng.standard_normal((5, 4, 3)).astype(np.float32)
    F.batch_norm(t(x), trm, trv, training=True, momentum=0.3)
    rm2, rv2 = np.zeros(4, np.float32), np.ones(4, np.float32)
    _, m, v = nbbn.batch_norm_forward(x)
    nbbn.ema_update(rm2, rv2, m, v, count=15, momentum=0.3)
    np.testing.assert_allclose(rm2, trm.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rv2, trv.numpy(), rtol=1e-5)


@pytest.mark.parametrize("unbiased", [True, False])
def test_ema_update_small_call_equals_the_general_path(unbiased, rng):
    """A plain call (int count, float momentum) runs in one compiled call; a NumPy integer
    count takes the general path: bit for bit the same. Buffers sharing memory with the
    statistics decline it (the general path reads copies)."""
    from nbbn import _dispatch
    for dtypes in ((np.float32, np.float64), (np.float64, np.float32)):
        mean, var = rng.standard_normal(5).astype(dtypes[1]), rng.random(5).astype(dtypes[1])
        fast = [rng.standard_normal(5).astype(dtypes[0]) for _ in range(2)]
        general = [b.copy() for b in fast]
        expected = (0.7 * fast[0] + 0.3 * mean.astype(float),
                    0.7 * fast[1] + 0.3 * var.astype(float) * (7 / 6 if unbiased else 1))
        nbbn.ema_update(*fast, mean, var, 7, 0.3, unbiased=unbiased)
        nbbn.ema_update(*general, mean, var, np.int64(7), 0.3, unbiased=unbiased)
        for got, want, ref in zip(fast, general, expected):
            np.testing.assert_array_equal(got, want)
            np.testing.assert_allclose(got, ref, rtol=1e-6)
    both = rng.random(10)
    rm, rv = both[:5], both[5:]
    assert _dispatch.plain_host(rm).fused_ema(rm, rv, rm, rv, 0.5, 1.0) is None
    before = both.copy()
    nbbn.ema_update(rm, rv, rm, rv, 7, 0.5, unbiased=False)  # the batch is the buffers
    np.testing.assert_array_equal(both, before)


def test_fold_into_conv_and_linear(rng):
    c_out, c_in = 4, 3
    rm, rv = rng.standard_normal(c_out), rng.random(c_out) + 0.1
    gamma, beta = rng.random(c_out) + 0.5, rng.standard_normal(c_out)
    conv = torch.nn.Conv2d(c_in, c_out, 3, bias=True).double()
    x = torch.randn(2, c_in, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = F.batch_norm(conv(x), t(rm), t(rv), t(gamma), t(beta), training=False)
        wf, bf = nbbn.fold_into(conv.weight.numpy(), conv.bias.numpy(), rm, rv, gamma, beta)
        got = F.conv2d(x, t(wf), t(bf))
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-10, atol=1e-10)
    lin_w = rng.standard_normal((c_out, 5))
    xs = rng.standard_normal((7, 5))
    wf, bf = nbbn.fold_into(lin_w, None, rm, rv, gamma, beta)
    expected = nbbn.batch_norm(xs @ lin_w.T, rm, rv, gamma, beta)
    np.testing.assert_allclose(xs @ wf.T + bf, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="w must have 4 output channels"):
        nbbn.fold_into(lin_w.T, None, rm, rv)


# ---- errors: every row of API.md's table, and a failed call changes nothing ------------------


def test_errors_change_nothing(rng):
    x, w, b = make((4, 3, 5), np.float32, rng)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    out = np.full_like(x, 7.0)
    cases = [
        (TypeError, "x must be", dict(x=object())),
        (TypeError, "floating-point", dict(x=np.ones((4, 3), np.int32))),
        (TypeError, "floating-point", dict(x=np.ones((4, 3), bool))),
        (np.exceptions.AxisError, "axis", dict(axis=3)),
        (ValueError, r"weight must have shape \(3,\).*\(4,\)", dict(weight=np.ones(4, np.float32))),
        (ValueError, r"bias must have shape \(3,\).*\(2, 3\)", dict(bias=np.ones((2, 3), np.float32))),
        (ValueError, r"running_mean must have shape \(3,\)", dict(running_mean=np.zeros(5, np.float32))),
        (ValueError, r"running_var must have shape \(3,\)", dict(running_var=np.zeros(1, np.float32))),
        (ValueError, "out must have shape", dict(out=np.empty((4, 3, 4), np.float32))),
        (ValueError, "out must have shape.*dtype", dict(out=np.empty((4, 3, 5), np.float64))),
        (ValueError, "eps", dict(eps=-1.0)),
        (ValueError, "momentum", dict(momentum=1.5)),
        (ValueError, "momentum", dict(momentum=-0.1)),
        (ValueError, "Expected more than 1 value per channel when training",
         dict(x=np.ones((1, 3), np.float32), out=None)),
        (ValueError, "at least 2 dimensions", dict(x=np.ones(3, np.float32), out=None)),
    ]
    for exc, match, override in cases:
        args = dict(x=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True,
                    out=out)
        args.update(override)
        before = (rm.copy(), rv.copy(), out.copy(), x.copy())
        with pytest.raises(exc, match=match):
            nbbn.batch_norm(args.pop("x"), args.pop("running_mean"), args.pop("running_var"),
                            **args)
        for arr, old in zip((rm, rv, out, x), before):
            np.testing.assert_array_equal(arr, old)


def test_function_specific_errors(rng):
    x, w, b = make((4, 3, 5), np.float32, rng)
    _, m, v = nbbn.batch_norm_forward(x, w, b)
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        nbbn.batch_norm_backward(x[:2], x, m, v, w)
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
        nbbn.batch_norm_backward(x, x, m[:2], v, w)
    with pytest.raises(ValueError, match="required when training=False"):
        nbbn.batch_norm(x, None, None, w, b, training=False)
    with pytest.raises(TypeError, match="running_mean must be a numpy.ndarray"):
        nbbn.batch_norm(x, [0.0] * 3, np.ones(3, np.float32), training=True)
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        nbbn.batch_norm(x, ro, np.ones(3, np.float32), training=True)
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="count"):
        nbbn.ema_update(rm, rv, m, v, count=1)
    with pytest.raises(ValueError, match="momentum"):
        nbbn.ema_update(rm, rv, m, v, count=4, momentum=2)
    with pytest.raises(ValueError, match=r"var must have shape \(3,\)"):
        nbbn.ema_update(rm, rv, m, v[:1], count=4)
    assert np.all(rm == 0) and np.all(rv == 1)
    with pytest.raises(ValueError, match="eps"):
        nbbn.fold(rm, rv, eps=-1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        nbbn.fold(rm, rv, weight=np.ones(2))


@pytest.fixture
def fused_calls(monkeypatch):
    """Whether each call of the fused one-call path (forward, backward, evaluation) ran it
    (True) or declined it (False, the general path then ran), in order."""
    from nbbn._cpu import backend
    used = []
    for stage in ("fused_forward", "fused_backward", "fused_inference"):
        def spy(*args, _stage=getattr(backend, stage), **kwargs):
            done = _stage(*args, **kwargs)
            used.append(done is not None)
            return done
        monkeypatch.setattr(backend, stage, spy)
    return used


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, order", [((16, 64, 8, 8), (0, 1, 2, 3)),
                                          ((16, 256, 4, 4), (0, 2, 3, 1)), ((256, 256), (0, 1)),
                                          ((3, 5, 70_000), (0, 1, 2))],
                         ids=["NCHW", "NHWC", "NC", "NCL-long-rows"])
def test_large_calls_take_the_fused_call_with_the_general_results(shape, order, threads, rng,
                                                                   fused_calls):
    """Arrays above the parallel threshold (here 2x the backward's) take the fused one-call
    path too, channels-last included, split among the threads as the general path's
    kernels split them (one thread: serially); it gives the general path's results (out=)
    bit for bit, running buffers included."""
    import numba
    from numba.core import config
    if threads > config.NUMBA_NUM_THREADS:
        pytest.skip(f"Numba runs at most {config.NUMBA_NUM_THREADS} thread(s) here")
    dims = [shape[i] for i in order]
    x, dy = ((rng.standard_normal(dims) * 3 + 2).astype(np.float32).transpose(np.argsort(order))
             for _ in range(2))
    _, w, b = make(shape, np.float32, rng)
    running = [rng.random(shape[1]).astype(np.float32) + 0.5 for _ in range(2)]
    running_out = [v.copy() for v in running]
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        y, mean, var = nbbn.batch_norm_forward(x, w, b)
        grads = nbbn.batch_norm_backward(dy, x, mean, var, w)
        y_train = nbbn.batch_norm(x, *running, w, b, training=True)
        y_eval = nbbn.batch_norm(x, *running, w, b)
        y_out, mean_out, var_out = nbbn.batch_norm_forward(x, w, b, out=np.empty_like(x))
        dx_out = nbbn.batch_norm_backward(dy, x, mean, var, w, out=np.empty_like(x))
        y_train_out = nbbn.batch_norm(x, *running_out, w, b, training=True, out=np.empty_like(x))
        y_eval_out = nbbn.batch_norm(x, *running_out, w, b, out=np.empty_like(x))
    finally:
        numba.set_num_threads(before)
    assert fused_calls == [True, True, True, True]
    assert y.strides == x.strides and grads[0].strides == x.strides  # x's memory layout
    for got, want in zip((y, mean, var, *grads, y_train, *running, y_eval),
                         (y_out, mean_out, var_out, *dx_out, y_train_out, *running_out,
                          y_eval_out)):
        np.testing.assert_array_equal(got, want)


def test_large_fused_calls_read_any_vectors_as_float64(rng, fused_calls):
    """The threaded one-call path takes its per-channel vectors as float64 and rounds its
    per-channel results once (one build per dtype and layout of x): no weight, a float64
    bias, float64 running buffers or statistics with float32 data give the general path's
    results (out=) bit for bit; a running buffer that is a view of x is declined (the
    general path then raises, nothing written)."""
    import numba
    from numba.core import config
    if config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    x, w, b = make((16, 64, 8, 8), np.float32, rng)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    b64 = b.astype(np.float64)
    running = [rng.random(64) + 0.5 for _ in range(2)]
    running_out = [v.copy() for v in running]
    aliased = np.zeros((16, 64, 8, 8), np.float32)
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        y, mean, var = nbbn.batch_norm_forward(x, None, b64)
        mean64, var64 = mean.astype(np.float64), var.astype(np.float64)
        grads = nbbn.batch_norm_backward(dy, x, mean64, var64)
        grads_w = nbbn.batch_norm_backward(dy, x, mean, var, w.astype(np.float64))
        y_train = nbbn.batch_norm(x, *running, None, b64, training=True)
        y_eval = nbbn.batch_norm(x, *running, w, None)
        assert fused_calls == [True] * 5
        with pytest.raises(ValueError, match="running_mean shares memory with x"):
            nbbn.batch_norm(aliased, aliased[0, :, 0, 0], aliased[1, :, 0, 0], training=True)
        assert fused_calls[-1] is False and not aliased.any()
        y_out, mean_out, var_out = nbbn.batch_norm_forward(x, None, b64, out=np.empty_like(x))
        dx_out = nbbn.batch_norm_backward(dy, x, mean64, var64, out=np.empty_like(x))
        dx_w_out = nbbn.batch_norm_backward(dy, x, mean, var, w.astype(np.float64),
                                            out=np.empty_like(x))
        y_train_out = nbbn.batch_norm(x, *running_out, None, b64, training=True,
                                      out=np.empty_like(x))
        y_eval_out = nbbn.batch_norm(x, *running_out, w, None, out=np.empty_like(x))
    finally:
        numba.set_num_threads(before)
    assert grads[1] is None and grads[2] is None and grads_w[1].dtype == np.float64
    for got, want in zip((y, mean, var, grads[0], *grads_w, y_train, *running, y_eval),
                         (y_out, mean_out, var_out, dx_out[0], *dx_w_out, y_train_out,
                          *running_out, y_eval_out)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
