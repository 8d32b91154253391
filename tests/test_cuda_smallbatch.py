"""Small batches on the device (CUDA simulator): batch renorm, virtual batches, precise
statistics against the host path, which tests/test_smallbatch.py checks against
independent references."""
import numpy as np
import pytest

import nbbn
from tests.test_cuda import TOL, close, cuda, dev, host, make, small_launches  # noqa: F401

CASES = [((4, 3, 5), 1), ((9, 3), 1), ((3, 2, 2, 3), -1)]


@pytest.mark.parametrize("shape,axis", CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_batch_renorm_matches_cpu(shape, axis, dtype, rng):
    x, w, b, dy = make(shape, axis, dtype, rng)
    c = shape[axis]
    rm, rv = np.array([3.0, -3.0, 0.1], dtype), np.array([0.2, 50.0, 4.0], dtype)
    drm, drv = dev(rm), dev(rv)
    for weights in ((w, b), (None, None)):
        dweights = [None if a is None else dev(a) for a in weights]
        got = nbbn.batch_renorm_forward(dev(x), drm, drv, *dweights, rmax=1.5, dmax=0.5,
                                        momentum=0.2, axis=axis)
        want = nbbn.batch_renorm_forward(x, rm, rv, *weights, rmax=1.5, dmax=0.5,
                                         momentum=0.2, axis=axis)
        assert host(got[0]).dtype == dtype and all(host(v).shape == (c,) for v in got[1:])
        for g, h in zip(got, want):
            close(g, h, dtype)
        close(drm, rm, dtype)
        close(drv, rv, dtype)
        grads = nbbn.batch_renorm_backward(dev(dy), dev(x), *got[1:], dweights[0], axis=axis)
        for g, h in zip(grads, nbbn.batch_renorm_backward(dy, x, *want[1:], weights[0],
                                                          axis=axis)):
            if h is None:
                assert g is None
            else:
                close(g, h, dtype)


def test_batch_renorm_layer_matches_cpu_on_the_device(rng, monkeypatch):
    layer = nbbn.BatchRenorm(3, momentum=0.3, rmax=1.2, dmax=0.2, device="cuda")
    ref = nbbn.BatchRenorm(3, momentum=0.3, rmax=1.2, dmax=0.2)
    xs = [(rng.standard_normal((4, 3, 2)) * 2 + step).astype(np.float32) for step in range(3)]
    dys = [rng.standard_normal((4, 3, 2)).astype(np.float32) for _ in range(3)]
    dxs, dys_dev = [dev(x) for x in xs], [dev(dy) for dy in dys]

    def refuse(*args, **kwargs):
        raise AssertionError("a host transfer")

    results = []
    with monkeypatch.context() as m:  # training and evaluation stay on the device
        m.setattr(cuda, "to_device", refuse)
        m.setattr(type(dxs[0]), "copy_to_host", refuse)
        for step in range(3):
            layer.train(step < 2)
            results.append((layer(dxs[step]), layer.backward(dys_dev[step]), layer.grad_weight,
                            layer.grad_bias))
    for step, (y, dx, gw, gb) in enumerate(results):
        ref.train(step < 2)
        close(y, ref(xs[step]), np.float32)
        close(dx, ref.backward(dys[step]), np.float32)
        close(gw, ref.grad_weight, np.float32)
        close(gb, ref.grad_bias, np.float32)
    close(layer.running_mean, ref.running_mean, np.float32)
    close(layer.running_var, ref.running_var, np.float32)


@pytest.mark.parametrize("convention", ["population", "batch_mean"])
def test_precise_statistics_on_the_device(convention, rng, monkeypatch):
    layer = nbbn.BatchNorm(3, dtype=np.float64, device="cuda")
    ref = nbbn.BatchNorm(3, dtype=np.float64)
    batches = [rng.standard_normal((n, 3, 2)) * 2 + 50 for n in (3, 5, 2)]
    dbatches = [dev(xb) for xb in batches]

    def refuse(*args, **kwargs):
        raise AssertionError("a host transfer")

    with layer.precise_statistics(convention), ref.precise_statistics(convention):
        with monkeypatch.context() as m:
            m.setattr(type(dbatches[0]), "copy_to_host", refuse)
            for xb, dxb in zip(batches, dbatches):
                layer(dxb)
                ref(xb)
    close(layer.running_mean, ref.running_mean)
    close(layer.running_var, ref.running_var)
    assert int(layer.num_batches_tracked) == 0


def test_ema_update_of_virtual_batches_on_the_device(rng):
    mean, var = rng.standard_normal((3, 4)), rng.random((3, 4)) + 0.1
    rm, rv = rng.standard_normal(4), rng.random(4) + 0.5
    drm, drv = dev(rm), dev(rv)
    nbbn.ema_update(drm, drv, dev(mean), dev(var), [6, 6, 3], momentum=0.3)
    nbbn.ema_update(rm, rv, mean, var, [6, 6, 3], momentum=0.3)
    close(drm, rm)
    close(drv, rv)


@pytest.mark.parametrize("shape,axis", [((7, 3, 5), 1), ((9, 3), 1), ((5, 2, 2, 3), -1),
                                        ((3, 2, 6), 1), ((6, 1, 9), 1), ((13, 1), 1)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_virtual_batches_match_cpu(shape, axis, dtype, rng):
    """Including few (group, channel) pairs: several blocks per pair and grid merges."""
    x, w, b, dy = make(shape, axis, dtype, rng)
    for size in (2, 3):
        got = nbbn.batch_norm_forward(dev(x), dev(w), dev(b), axis=axis,
                                      virtual_batch_size=size)
        want = nbbn.batch_norm_forward(x, w, b, axis=axis, virtual_batch_size=size)
        for g, h in zip(got, want):
            close(g, h, dtype)
        for weight in (w, None):
            grads = nbbn.batch_norm_backward(dev(dy), dev(x), *got[1:],
                                             None if weight is None else dev(weight),
                                             axis=axis, virtual_batch_size=size)
            want_grads = nbbn.batch_norm_backward(dy, x, *want[1:], weight, axis=axis,
                                                  virtual_batch_size=size)
            # dx of a group of two values is the residue of terms of dy's size that cancel
            # (analytically eps-sized): host and device agree on it to float32 rounding of
            # those terms, as plain batch norm of two values does.
            atol = max(TOL[dtype]["atol"], 16 * np.finfo(dtype).eps * np.abs(dy).max())
            np.testing.assert_allclose(host(grads[0]), want_grads[0], rtol=TOL[dtype]["rtol"],
                                       atol=atol)
            for g, h in zip(grads[1:], want_grads[1:]):
                if h is None:
                    assert g is None
                else:
                    close(g, h, dtype)


def test_virtual_batch_layer_on_the_device(rng):
    layer = nbbn.BatchNorm(3, momentum=0.3, virtual_batch_size=2, device="cuda")
    ref = nbbn.BatchNorm(3, momentum=0.3, virtual_batch_size=2)
    for step in range(3):
        layer.train(step < 2), ref.train(step < 2)
        x = (rng.standard_normal((5, 3, 2)) * 2 + step).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        close(layer(dev(x)), ref(x), np.float32)
        close(layer.backward(dev(dy)), ref.backward(dy), np.float32)
        close(layer.grad_weight, ref.grad_weight, np.float32)
    close(layer.running_mean, ref.running_mean, np.float32)
    close(layer.running_var, ref.running_var, np.float32)
