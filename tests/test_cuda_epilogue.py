"""The CUDA backend's fused epilogue (residual add, ReLU, the gated backward, the residual's
gradient) and bfloat16 data, against the CPU path (itself checked against float64 and PyTorch
in test_epilogue.py). Runs in the CUDA simulator, as tests/test_cuda.py."""
import ml_dtypes
import numpy as np
import pytest

import nbbn
from tests.test_cuda import BN_CASES, SIM, dev, host, small_launches  # noqa: F401

cuda = pytest.importorskip("numba.cuda")
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float32, np.float64, np.float16, BF16]
# Device and host reduce in different orders: the statistics differ in their last bits, and
# a 16-bit result may round to the neighbouring value.
TOL = {np.dtype(np.float16): 2e-3, BF16: 1.6e-2, np.dtype(np.float32): 1e-5,
       np.dtype(np.float64): 1e-12}


def close(device_result, cpu_result):
    got = host(device_result)
    assert got.dtype == cpu_result.dtype
    tol = TOL[np.dtype(cpu_result.dtype)]
    np.testing.assert_allclose(got.astype(np.float64), cpu_result.astype(np.float64),
                               rtol=tol, atol=tol)


def make(shape, axis, dtype, rng):
    c = shape[axis]
    x, r, dy = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    w = (rng.random(c) + 0.5).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    return x, r, dy, w, b


@pytest.mark.parametrize("shape,axis", BN_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_fused_forward_and_backward_match_cpu(shape, axis, dtype, rng):
    x, r, dy, w, b = make(shape, axis, dtype, rng)
    y, mean, var = nbbn.batch_norm_forward(dev(x), dev(w), dev(b), axis=axis, residual=dev(r),
                                           activation="relu")
    y0, mean0, var0 = nbbn.batch_norm_forward(x, w, b, axis=axis, residual=r,
                                              activation="relu")
    close(y, y0)
    assert (host(y).astype(np.float64) >= 0).all()
    close(mean, mean0)
    close(var, var0)
    grads = nbbn.batch_norm_backward(dev(dy), dev(x), mean, var, dev(w), axis=axis, y=y,
                                     activation="relu", residual_grad=True)
    grads0 = nbbn.batch_norm_backward(dy, x, mean0, var0, w, axis=axis, y=y0,
                                      activation="relu", residual_grad=True)
    for got, want in zip(grads, grads0):
        close(got, want)
    np.testing.assert_array_equal(host(grads[3]) == 0, host(y).astype(np.float64) <= 0)


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=lambda d: np.dtype(d).name)
def test_strided_residual_evaluation_and_plain_relu(dtype, rng):
    """A residual without a 3-D view (copied once), running statistics, ReLU alone."""
    x, _, dy, w, b = make((4, 3, 5), 1, dtype, rng)
    wide = rng.standard_normal((4, 3, 10)).astype(dtype)
    rm, rv = np.float32([0.1, -0.2, 0.3]), np.float32([1.5, 0.5, 2.0])
    y = nbbn.batch_norm(dev(x), dev(rm), dev(rv), dev(w), dev(b), residual=dev(wide)[:, :, ::2],
                        activation="relu")
    close(y, nbbn.batch_norm(x, rm, rv, w, b, residual=wide[:, :, ::2], activation="relu"))
    r = rng.standard_normal((5, 3, 4)).astype(dtype)
    y = nbbn.batch_norm(dev(x), dev(rm), dev(rv), dev(w), dev(b), residual=dev(r).T)
    close(y, nbbn.batch_norm(x, rm, rv, w, b, residual=r.T))
    y, mean, var = nbbn.batch_norm_forward(dev(x), activation="relu")
    y0, mean0, var0 = nbbn.batch_norm_forward(x, activation="relu")
    close(y, y0)
    dx = nbbn.batch_norm_backward(dev(dy), dev(x), mean, var, y=y, activation="relu")[0]
    close(dx, nbbn.batch_norm_backward(dy, x, mean0, var0, y=y0, activation="relu")[0])


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=lambda d: np.dtype(d).name)
def test_layer_with_residual_matches_cpu(axis, dtype, rng):
    shape = (3, 4, 5) if axis == 1 else (3, 5, 4)
    x, r, dy, _, _ = make(shape, axis, dtype, rng)
    layers = [nbbn.BatchNorm(4, axis=axis, activation="relu", dtype=dtype, device=device)
              for device in ("cuda", "cpu")]
    for step in range(2):
        xs = (x.astype(np.float32) * (step + 1)).astype(dtype)
        y = layers[0](dev(xs), dev(r))
        y0 = layers[1](xs, r)
        close(y, y0)
        dx = layers[0].backward(dev(dy))
        close(dx, layers[1].backward(dy))
        close(layers[0].grad_residual, layers[1].grad_residual)
        close(layers[0].grad_weight, layers[1].grad_weight)
    close(layers[0].running_var, layers[1].running_var)
    layers[0](dev(x))  # no residual: none to differentiate
    layers[0].backward(dev(dy))
    assert layers[0].grad_residual is None


def test_bfloat16_statistics(rng):
    """NumPy's dtype rule: bfloat16 in, bfloat16 out (dtype= asks for another)."""
    x = (rng.standard_normal((6, 5)) * 3 + 1).astype(BF16)
    for op in (nbbn.mean, nbbn.var, nbbn.std):
        got = op(dev(x), axis=0)
        close(got, op(x, axis=0))
        close(op(dev(x), axis=1, dtype=np.float32), op(x, axis=1, dtype=np.float32))
    mean, var = nbbn.mean_var(dev(x), axis=0)
    close(mean, nbbn.mean(x, axis=0))
    close(var, nbbn.var(x, axis=0))


def test_inputs_not_modified(rng):
    x, r, dy, w, b = make((3, 2, 4), 1, BF16, rng)
    on = [dev(a) for a in (x, r, dy, w, b)]
    y, mean, var = nbbn.batch_norm_forward(on[0], on[3], on[4], residual=on[1],
                                           activation="relu")
    nbbn.batch_norm_backward(on[2], on[0], mean, var, on[3], y=y, activation="relu",
                             residual_grad=True)
    for a, d in zip((x, r, dy, w, b), on):
        np.testing.assert_array_equal(host(d).view(np.uint16), a.view(np.uint16))
