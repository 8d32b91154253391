"""Issue 13's probes of the batch-norm functions and the layer: aliasing, missing and
mistyped arguments, odd buffers, threads. Each failed before its fix."""
import threading

import numpy as np
import pytest

import nbbn


def _forward_ref(x, axis=1):
    """float64 batch norm of a copy of x (no weight/bias)."""
    x = np.array(x, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + 1e-5)


# ---- out= overlapping an input -----------------------------------------------------------------


@pytest.mark.parametrize("shift", [1, 0], ids=["partly-overlapping", "exactly-x-in-place"])
def test_forward_out_overlapping_x(shift, rng):
    buf = rng.random((4, 3, 9))
    x, out = buf[..., :8], buf[..., shift:8 + shift]
    want = _forward_ref(x)
    y, _, _ = nbbn.batch_norm_forward(x, out=out)
    assert y is out
    np.testing.assert_allclose(out, want, atol=1e-9)


def test_out_is_the_transpose_of_x(rng):
    x = rng.random((5, 5))
    want = _forward_ref(x)
    y = nbbn.batch_norm(x, None, None, training=True, out=x.T)
    assert y.base is x
    np.testing.assert_allclose(y, want, atol=1e-9)
    rm, rv = rng.random(5), rng.random(5) + 0.5
    x = rng.random((5, 5))
    want = (x - rm) / np.sqrt(rv + 1e-5)
    nbbn.batch_norm(x, rm, rv, out=x.T)
    np.testing.assert_allclose(x.T, want, atol=1e-9)


def test_backward_out_overlapping_dy_or_the_statistics(rng):
    x = rng.random((6, 4))
    _, mean, var = nbbn.batch_norm_forward(x)
    dy = rng.random((6, 4))
    want, _, _ = nbbn.batch_norm_backward(dy, x, mean, var)
    buf = np.concatenate([dy.ravel(), [0.0]])
    shifted_dy, out = buf[1:].reshape(6, 4), buf[:-1].reshape(6, 4)
    shifted_dy[...] = dy
    dx, _, _ = nbbn.batch_norm_backward(shifted_dy, x, mean, var, out=out)
    np.testing.assert_allclose(dx, want, atol=1e-12)
    # mean/var read by the dx pass while out is written: they live inside out
    out = np.empty((6, 4))
    out[0], out[1] = mean, var
    dx, _, _ = nbbn.batch_norm_backward(dy, x, out[0], out[1], out=out)
    np.testing.assert_allclose(dx, want, atol=1e-12)
    same = dy.copy()  # out=dy exactly: in place
    assert nbbn.batch_norm_backward(same, x, mean, var, out=same)[0] is same
    np.testing.assert_allclose(same, want, atol=1e-12)


def test_ema_update_with_aliased_statistics():
    rm, rv = np.array([2.0, 3.0]), np.array([4.0, 5.0])
    nbbn.ema_update(rm, rv, np.zeros(2), rm, count=10, momentum=0.5)
    np.testing.assert_allclose(rm, [1.0, 1.5])
    np.testing.assert_allclose(rv, 0.5 * np.array([4.0, 5.0]) + 0.5 * 10 / 9 * np.array([2, 3]))


def test_running_buffers_sharing_memory_with_x_are_refused(rng):
    x = rng.random((4, 3))
    with pytest.raises(ValueError, match="running_mean shares memory"):
        nbbn.batch_norm(x, x[0], np.ones(3), training=True)


# ---- None and mistyped arguments ---------------------------------------------------------------


def test_none_where_an_array_is_required(rng):
    x = rng.random((4, 3))
    _, m, v = nbbn.batch_norm_forward(x)
    rm, rv = np.zeros(3), np.ones(3)
    cases = [
        ("var", lambda: nbbn.batch_norm_backward(x, x, m, None)),
        ("mean", lambda: nbbn.batch_norm_backward(x, x, None, v)),
        ("dy", lambda: nbbn.batch_norm_backward(None, x, m, v)),
        ("x", lambda: nbbn.batch_norm_forward(None)),
        ("running_mean", lambda: nbbn.fold(None, rv)),
        ("running_var", lambda: nbbn.fold(rm, None)),
        ("running_mean", lambda: nbbn.fold_into(np.ones((3, 2)), None, None, rv)),
        ("w", lambda: nbbn.fold_into(None, None, rm, rv)),
        ("running_var", lambda: nbbn.ema_update(rm, None, m, v, count=4)),
        ("mean", lambda: nbbn.ema_update(rm, rv, None, v, count=4)),
        ("x", lambda: nbbn.BatchNorm(3)(None)),
    ]
    for name, call in cases:
        with pytest.raises(TypeError, match=name):
            call()
    with pytest.raises(ValueError, match="running_var is None"):  # PyTorch's type
        nbbn.batch_norm(x, rm, None, training=True)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_scalar_arguments_are_checked_and_named(rng):
    x = rng.random((4, 3))
    _, m, v = nbbn.batch_norm_forward(x)
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        nbbn.batch_norm(x, rm, rv, training=True, eps=0)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        nbbn.batch_norm_forward(x, eps=0.0)
    nbbn.batch_norm(x, rm, rv, training=False, eps=0)  # evaluation: eps=0 is allowed
    with pytest.raises(TypeError, match="eps"):
        nbbn.batch_norm(x, rm, rv, eps="1e-5")
    with pytest.raises(TypeError, match="momentum"):
        nbbn.batch_norm(x, rm, rv, training=True, momentum="0.1")
    with pytest.raises(TypeError, match="count"):
        nbbn.ema_update(rm, rv, m, v, count=2.9)
    with pytest.raises(TypeError, match="count"):
        nbbn.ema_update(rm, rv, m, v, count="4")
    with pytest.raises(TypeError, match="momentum"):
        nbbn.ema_update(rm, rv, m, v, count=4, momentum=None)
    np.testing.assert_array_equal(rm, 0)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        nbbn.fold(rm, np.ones(2))
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        nbbn.fold_into(np.ones((3, 2)), None, rm, np.ones(2))


def test_byte_swapped_running_buffers(rng):
    x = rng.random((6, 3)).astype(np.float32)
    rm, rv = np.zeros(3, ">f4"), np.ones(3, ">f4")
    rm_ref, rv_ref = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = nbbn.batch_norm(x, rm, rv, training=True)
    y_ref = nbbn.batch_norm(x, rm_ref, rv_ref, training=True)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-6)
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-6)
    _, m, v = nbbn.batch_norm_forward(x)
    nbbn.ema_update(rm, rv, m, v, count=6)
    nbbn.ema_update(rm_ref, rv_ref, m, v, count=6)
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-6)


def test_empty_batch_in_training_is_empty_as_in_pytorch():
    torch = pytest.importorskip("torch")
    x = np.empty((0, 3), np.float32)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    want = torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, training=True)
    y = nbbn.batch_norm(x, rm, rv, training=True)
    assert y.shape == tuple(want.shape) == (0, 3)
    np.testing.assert_array_equal(rm, trm.numpy())
    np.testing.assert_array_equal(rv, trv.numpy())
    layer = nbbn.BatchNorm(3)
    assert layer(x).shape == (0, 3)
    np.testing.assert_array_equal(layer.running_var, 1.0)


# ---- the layer ---------------------------------------------------------------------------------


def test_layer_rejects_longdouble_at_construction():
    with pytest.raises(TypeError, match="dtype"):
        nbbn.BatchNorm(3, dtype=np.longdouble)


def test_layer_load_state_dict_is_all_or_nothing():
    layer = nbbn.BatchNorm(3)
    good = layer.state_dict()
    bad = dict(good, weight=np.full(3, 2.0), bias=np.array(["a", "b", "c"]))
    with pytest.raises(TypeError, match="bias"):
        layer.load_state_dict(bad)
    np.testing.assert_array_equal(layer.weight, 1.0)
    bad = dict(good, weight=np.full(3, 2.0), running_var=[1.0, None, 2.0])
    with pytest.raises(TypeError, match="running_var"):
        layer.load_state_dict(bad)
    np.testing.assert_array_equal(layer.weight, 1.0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_backward_ignores_later_changes_to_x(training, rng):
    ref, layer = nbbn.BatchNorm(3).train(training), nbbn.BatchNorm(3).train(training)
    for step in range(3):  # later steps reuse the kept copy's buffer
        x = rng.random((8, 3, 4)).astype(np.float32)
        dy = rng.random((8, 3, 4)).astype(np.float32)
        ref(x.copy())
        want = ref.backward(dy)
        layer(x)
        x[...] = 0.0
        np.testing.assert_array_equal(layer.backward(dy), want)
        np.testing.assert_array_equal(layer.grad_weight, ref.grad_weight)


def test_layer_from_several_threads_pairs_each_threads_calls(rng):
    layer = nbbn.BatchNorm(4, momentum=None)
    inputs = [rng.random((16, 4)) * (i + 1) for i in range(8)]
    wants = []
    for x in inputs:
        one = nbbn.BatchNorm(4)
        one(x)
        wants.append(one.backward(np.ones_like(x) + x))
    got = [None] * len(inputs)
    barrier = threading.Barrier(len(inputs))

    def work(i):
        for _ in range(8):
            barrier.wait()
            layer(inputs[i])
            barrier.wait()
            got[i] = layer.backward(np.ones_like(inputs[i]) + inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for g, w in zip(got, wants):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    assert layer.num_batches_tracked == 64  # no update lost
    # the cumulative average of 64 batch means, whatever the order of the updates
    np.testing.assert_allclose(layer.running_mean,
                               np.mean([x.mean(0) for x in inputs], axis=0), rtol=1e-6)


def test_device_out_overlapping_an_input(rng, threaded_cuda):
    """The device's overlap rule (address ranges): the same results as on the host."""
    cuda = threaded_cuda
    buf = rng.random((4, 3, 9))
    d = cuda.to_device(buf)
    y, _, _ = nbbn.batch_norm_forward(d[..., :-1], out=d[..., 1:])
    np.testing.assert_allclose(y.copy_to_host(), _forward_ref(buf[..., :-1]), atol=1e-9)
    x = rng.random((5, 5))
    dx = cuda.to_device(x)
    y = nbbn.batch_norm(dx, None, None, training=True, out=dx.T)
    np.testing.assert_allclose(y.copy_to_host(), _forward_ref(x), atol=1e-9)
    dx = cuda.to_device(x)
    assert nbbn.batch_norm_forward(dx, out=dx)[0] is dx  # exactly x: in place
    np.testing.assert_allclose(dx.copy_to_host(), _forward_ref(x), atol=1e-9)
    rm, rv = cuda.to_device(np.array([2.0, 3.0])), cuda.to_device(np.array([4.0, 5.0]))
    nbbn.ema_update(rm, rv, cuda.to_device(np.zeros(2)), rm, count=10, momentum=0.5)
    np.testing.assert_allclose(rv.copy_to_host(), [2 + 10 / 9, 2.5 + 1.5 * 10 / 9])


def test_device_layer_backward_ignores_later_changes_to_x(rng, threaded_cuda):
    cuda = threaded_cuda
    ref, layer = nbbn.BatchNorm(3, device="cuda"), nbbn.BatchNorm(3, device="cuda")
    for step in range(2):
        x = rng.random((4, 3, 2)).astype(np.float32)
        dy = cuda.to_device(rng.random((4, 3, 2)).astype(np.float32))
        ref(cuda.to_device(x))
        want = ref.backward(dy).copy_to_host()
        dx = cuda.to_device(x)
        layer(dx)
        dx.copy_to_device(np.zeros_like(x))
        np.testing.assert_array_equal(layer.backward(dy).copy_to_host(), want)


# ---- 16-bit floats and negative strides are read in place ------------------------------------


def _peak_bytes(f):
    """Peak bytes NumPy allocated while ``f`` ran (after a warm-up call: compiles, pools)."""
    import tracemalloc
    f()
    tracemalloc.start()
    try:
        f()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "reversed"])
def test_16_bit_and_reversed_input_is_not_converted_or_copied(dtype, layout, rng):
    """Statistics allocate nothing the size of x; forward and backward only their result."""
    import ml_dtypes
    dt = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    x = rng.standard_normal((16, 16, 64, 64)).astype(dt)
    axis, axes = 1, (0, 2, 3)
    if layout == "NHWC":
        x, axis, axes = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), -1, (0, 1, 2)
    elif layout == "reversed":
        x = x[::-1, :, ::-1]
    dy = np.ones_like(x)
    _, mean, var = nbbn.batch_norm_forward(x, axis=axis)
    assert _peak_bytes(lambda: nbbn.mean_var(x, axis=axes)) < x.nbytes / 8
    assert _peak_bytes(lambda: nbbn.batch_norm_forward(x, axis=axis)) < 1.25 * x.nbytes
    assert _peak_bytes(lambda: nbbn.batch_norm_backward(dy, x, mean, var, axis=axis)) \
        < 1.25 * x.nbytes
