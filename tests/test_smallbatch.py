"""Small batches: batch renorm, virtual batches (ghost batch norm), precise statistics.

Independent references: PyTorch autograd of Ioffe's batch-renorm formulas with r and
d detached; ``F.batch_norm`` on each virtual batch; ``np.mean``/``np.var(ddof=1)`` over
the concatenated batches for precise statistics.
"""
import copy
import pathlib
import re

import numpy as np
import pytest

import nbbn
from nbbn.distributed import SyncBatchRenorm
from tests.layouts import variants
from tests.test_batchnorm import make, t
from tests.test_distributed import ThreadGroup

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = [(6, 3), (5, 3, 7), (4, 3, 5, 6), (3, 3, 2, 3, 4)]


def _renorm_modules():
    import nbbn.torch as nt
    return {2: nt.BatchRenorm1d, 3: nt.BatchRenorm1d, 4: nt.BatchRenorm2d, 5: nt.BatchRenorm3d}
TOL = {np.float32: dict(rtol=3e-5, atol=3e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}


def channel_view(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def renorm_reference(x, w, b, dy, rm, rv, rmax, dmax, eps=1e-5):
    """The paper's formulas in float64 PyTorch autograd, r and d detached: (y, grads, r, d)."""
    xt = t(x).double().requires_grad_()
    wt = None if w is None else t(w).double().requires_grad_()
    bt = None if b is None else t(b).double().requires_grad_()
    axes = (0,) + tuple(range(2, x.ndim))
    mean = xt.mean(axes)
    sigma_b = torch.sqrt(xt.var(axes, unbiased=False) + eps)
    sigma = torch.sqrt(t(rv).double() + eps)
    r = torch.clamp(sigma_b / sigma, 1 / rmax, rmax).detach()
    d = torch.clamp((mean - t(rm).double()) / sigma, -dmax, dmax).detach()
    cv = lambda v: channel_view(v, x.ndim)  # noqa: E731
    y = (xt - cv(mean)) / cv(sigma_b) * cv(r) + cv(d)
    if w is not None:
        y = y * cv(wt) + cv(bt)
    y.backward(t(dy).double())
    grads = (xt.grad.numpy(), None if w is None else wt.grad.numpy(),
             None if b is None else bt.grad.numpy())
    return y.detach().numpy(), grads, r.numpy(), d.numpy()


def ghost_reference(x, w, b, dy, size):
    """F.batch_norm on each virtual batch (float64 autograd): (y, grads, mean, var)."""
    xt = t(x).double().requires_grad_()
    wt = None if w is None else t(w).double().requires_grad_()
    bt = None if b is None else t(b).double().requires_grad_()
    parts = [xt[i:i + size] for i in range(0, len(x), size)]
    y = torch.cat([F.batch_norm(p, None, None, wt, bt, training=True) for p in parts])
    y.backward(t(dy).double())
    axes = (0,) + tuple(range(2, x.ndim))
    mean = np.stack([x[i:i + size].astype(np.float64).mean(axes) for i in range(0, len(x), size)])
    var = np.stack([x[i:i + size].astype(np.float64).var(axes) for i in range(0, len(x), size)])
    grads = (xt.grad.numpy(), None if w is None else wt.grad.numpy(),
             None if b is None else bt.grad.numpy())
    return y.detach().numpy(), grads, mean, var


def assert_grads(got, want, dtype):
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else TOL[np.float64]
    np.testing.assert_allclose(got[0], want[0], **TOL[dtype])
    for g, w in zip(got[1:], want[1:]):
        if w is None:
            assert g is None
        else:
            np.testing.assert_allclose(g, w, **tol)


# ---- batch renorm: functions ---------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("limits", [(1.5, 0.5), (3.0, 5.0)], ids=["clipped", "wide"])
def test_renorm_matches_the_papers_formulas(shape, dtype, affine, limits, rng):
    x, w, b = make(shape, dtype, rng, affine)
    c = shape[1]
    # channel 0: r and d clipped high / low, channel 1: r clipped low, channel 2: inside
    rm = np.array([5.0, -5.0, 0.5], dtype)
    rv = np.array([0.1, 100.0, 4.0], dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    rmax, dmax = limits
    y_ref, grads_ref, r_ref, d_ref = renorm_reference(x, w, b, dy, rm, rv, rmax, dmax)
    rm1, rv1 = rm.copy(), rv.copy()
    before = x.copy()
    y, mean, var, r, d = nbbn.batch_renorm_forward(x, rm1, rv1, w, b, rmax=rmax, dmax=dmax,
                                                   momentum=0.2)
    np.testing.assert_array_equal(x, before)
    assert y.dtype == dtype and all(v.dtype == dtype and v.shape == (c,)
                                    for v in (mean, var, r, d))
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_allclose(r, r_ref, **TOL[dtype])
    np.testing.assert_allclose(d, d_ref, **TOL[dtype])
    if limits == (1.5, 0.5):  # the clipping ran
        assert r[0] == 1.5 and r[1] == dtype(1 / 1.5) and d[0] == -0.5 and d[1] == 0.5
    n = x.size // c
    axes = (0,) + tuple(range(2, x.ndim))
    np.testing.assert_allclose(rm1, 0.8 * rm + 0.2 * x.mean(axes, dtype=np.float64),
                               **TOL[dtype])
    np.testing.assert_allclose(rv1, 0.8 * rv + 0.2 * x.var(axes, ddof=1, dtype=np.float64),
                               **TOL[dtype])
    assert_grads(nbbn.batch_renorm_backward(dy, x, mean, var, r, d, w), grads_ref, dtype)


def layout_case(shape, axis, rng):
    """(x, dy, x with the channels moved to axis 1, weight, bias), float64."""
    base = rng.standard_normal(shape) * 3 + 1
    moved = np.moveaxis(base, axis, 1)
    c = moved.shape[1]
    return base, rng.standard_normal(shape), moved, rng.random(c) + 0.5, rng.standard_normal(c)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_renorm_any_axis_and_layout(axis, rng):
    base, dy, moved, w, b = layout_case((4, 5, 6), axis, rng)
    c = moved.shape[1]
    rm, rv = rng.standard_normal(c), rng.random(c) + 0.5
    y_ref, grads_ref, _, _ = renorm_reference(moved, w, b, np.moveaxis(dy, axis, 1), rm, rv,
                                              2.0, 1.0)
    for name, x in variants(base):
        y, mean, var, r, d = nbbn.batch_renorm_forward(x, rm.copy(), rv.copy(), w, b,
                                                       rmax=2.0, dmax=1.0, axis=axis)
        np.testing.assert_allclose(np.moveaxis(y, axis, 1), y_ref, rtol=1e-10, atol=1e-10,
                                   err_msg=name)
        dx, dw, db = nbbn.batch_renorm_backward(dy, x, mean, var, r, d, w, axis=axis)
        np.testing.assert_allclose(np.moveaxis(dx, axis, 1), grads_ref[0], rtol=1e-9,
                                   atol=1e-10, err_msg=name)
        np.testing.assert_allclose(dw, grads_ref[1], rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(db, grads_ref[2], rtol=1e-9, err_msg=name)


@pytest.mark.parametrize("shape,axis", [((8, 4, 5, 6), 1), ((8, 5, 6, 4), -1), ((40, 4), 1)],
                         ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_renorm_without_clipping_is_batch_norm_exactly(shape, axis, dtype, rng):
    c = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = (rng.random(c) + 0.5).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), (rng.random(c) + 0.5).astype(dtype)
    rm_bn, rv_bn = rm.copy(), rv.copy()
    y, mean, var, r, d = nbbn.batch_renorm_forward(x, rm, rv, w, b, rmax=1, dmax=0,
                                                   momentum=0.1, axis=axis)
    np.testing.assert_array_equal(r, 1)
    np.testing.assert_array_equal(d, 0)
    np.testing.assert_array_equal(y, nbbn.batch_norm(x, rm_bn, rv_bn, w, b, training=True,
                                                     axis=axis))
    np.testing.assert_array_equal(rm, rm_bn)
    np.testing.assert_array_equal(rv, rv_bn)
    _, mean_bn, var_bn = nbbn.batch_norm_forward(x, w, b, axis=axis)
    np.testing.assert_array_equal(mean, mean_bn)
    np.testing.assert_array_equal(var, var_bn)
    for got, want in zip(nbbn.batch_renorm_backward(dy, x, mean, var, r, d, w, axis=axis),
                         nbbn.batch_norm_backward(dy, x, mean, var, w, axis=axis)):
        np.testing.assert_array_equal(got, want)


def test_renorm_out_nan_and_errors(rng):
    x, w, b = make((4, 3, 5), np.float32, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.empty_like(x)
    y, mean, var, r, d = nbbn.batch_renorm_forward(x, rm.copy(), rv.copy(), w, b, out=out)
    assert y is out
    dx_out = np.empty_like(x)
    assert nbbn.batch_renorm_backward(x, x, mean, var, r, d, w, out=dx_out)[0] is dx_out
    xn = x.copy()
    xn[1, 1, 2] = np.nan
    rmn, rvn = rm.copy(), rv.copy()
    y, _, _, r, d = nbbn.batch_renorm_forward(xn, rmn, rvn, w, b)
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
    assert np.isnan(r[1]) and np.isnan(d[1]) and np.isfinite(r[[0, 2]]).all()
    assert np.isnan(rmn[1]) and np.isfinite(rmn[[0, 2]]).all()
    cases = [
        (ValueError, "rmax", dict(rmax=0.5)),
        (ValueError, "dmax", dict(dmax=-1.0)),
        (ValueError, "momentum", dict(momentum=2.0)),
        (ValueError, "eps", dict(eps=-1.0)),
        (TypeError, "running_mean is required", dict(running_mean=None)),
        (ValueError, r"running_var must have shape \(3,\)", dict(running_var=np.ones(2))),
        (ValueError, "Expected more than 1 value", dict(x=np.ones((1, 3), np.float32),
                                                       out=None)),
        (ValueError, "out must have shape", dict(out=np.empty((4, 3), np.float32))),
    ]
    for exc, match, override in cases:
        args = dict(x=x, running_mean=rm, running_var=rv, weight=w, bias=b, out=out)
        args.update(override)
        saved = (rm.copy(), rv.copy(), out.copy())
        with pytest.raises(exc, match=match):
            nbbn.batch_renorm_forward(args.pop("x"), args.pop("running_mean"),
                                      args.pop("running_var"), **args)
        for a, s in zip((rm, rv, out), saved):
            np.testing.assert_array_equal(a, s)
    with pytest.raises(TypeError, match="r is required"):
        nbbn.batch_renorm_backward(x, x, mean, var, None, d, w)
    with pytest.raises(ValueError, match=r"d must have shape \(3,\)"):
        nbbn.batch_renorm_backward(x, x, mean, var, r, d[:2], w)


# ---- batch renorm: layers ------------------------------------------------------------------


class RenormReference(torch.nn.Module):
    """Ioffe's batch renorm as a float64 PyTorch module (autograd, r and d detached)."""

    def __init__(self, c, momentum, rmax, dmax, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(c, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.zeros(c, dtype=torch.float64))
        self.running_mean = torch.zeros(c, dtype=torch.float64)
        self.running_var = torch.ones(c, dtype=torch.float64)
        self.momentum, self.rmax, self.dmax, self.eps = momentum, rmax, dmax, eps

    def forward(self, x):
        cv = lambda v: channel_view(v, x.dim())  # noqa: E731
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, eps=self.eps)
        axes = (0,) + tuple(range(2, x.dim()))
        mean, var = x.mean(axes), x.var(axes, unbiased=False)
        sigma_b, sigma = torch.sqrt(var + self.eps), torch.sqrt(self.running_var + self.eps)
        r = torch.clamp(sigma_b / sigma, 1 / self.rmax, self.rmax).detach()
        d = torch.clamp((mean - self.running_mean) / sigma, -self.dmax, self.dmax).detach()
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            self.running_mean += self.momentum * (mean - self.running_mean)
            self.running_var += self.momentum * (var * n / (n - 1) - self.running_var)
        return ((x - cv(mean)) / cv(sigma_b) * cv(r) + cv(d)) * cv(self.weight) + cv(self.bias)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_renorm_layers_match_reference_over_steps(shape, dtype, rng):
    """nbbn.BatchRenorm and nbbn.torch.BatchRenorm*d against the reference module over SGD
    steps with the paper's warm-up of rmax/dmax, then evaluation."""
    c = shape[1]
    ref = RenormReference(c, 0.3, 1.0, 0.0)
    layer = nbbn.BatchRenorm(c, momentum=0.3, rmax=1.0, dmax=0.0, dtype=dtype)
    tmod = _renorm_modules()[len(shape)](c, momentum=0.3, rmax=1.0, dmax=0.0)
    tmod = tmod.to(torch.float32 if dtype == np.float32 else torch.float64)
    opt = torch.optim.SGD(list(ref.parameters()) + list(tmod.parameters()), lr=0.1)
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    for step in range(6):
        for m in (ref, layer, tmod):  # the warm-up: from batch norm's limits outwards
            m.rmax, m.dmax = 1.0 + 0.5 * step, 0.5 * step
        if step == 5:
            ref.eval(), layer.eval(), tmod.eval()
        x = (rng.standard_normal(shape) * (step + 1) + step).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        xt = t(x).double().requires_grad_()
        yt = ref(xt)
        yt.backward(t(dy).double())
        y, dx, ym, dxm = step_both(layer, tmod, x, dy)
        for got in (y, ym):
            np.testing.assert_allclose(got, yt.detach().numpy(), **tol)
        for got in (dx, dxm):
            np.testing.assert_allclose(got, xt.grad.numpy(), **tol)
        for gw, gb in ((layer.grad_weight, layer.grad_bias),
                       (tmod.weight.grad.numpy(), tmod.bias.grad.numpy())):
            np.testing.assert_allclose(gw, ref.weight.grad.numpy(), **tol)
            np.testing.assert_allclose(gb, ref.bias.grad.numpy(), **tol)
        opt.step()
        opt.zero_grad()
        layer.weight -= (0.1 * layer.grad_weight).astype(dtype)
        layer.bias -= (0.1 * layer.grad_bias).astype(dtype)
        for name in ("running_mean", "running_var"):
            want = getattr(ref, name).numpy()
            np.testing.assert_allclose(getattr(layer, name), want, **tol, err_msg=name)
            np.testing.assert_allclose(getattr(tmod, name).numpy(), want, **tol, err_msg=name)
    assert int(tmod.num_batches_tracked) == int(layer.num_batches_tracked) == 5


def step_both(layer, module, x, dy):
    """A forward and backward of an nbbn layer and of a torch module: (y, dx) of each."""
    xm = t(x).requires_grad_()
    ym = module(xm)
    ym.backward(t(dy))
    y = layer(x)
    return y, layer.backward(dy), ym.detach().numpy(), xm.grad.numpy()


def test_renorm_layer_interface(rng):
    layer = nbbn.BatchRenorm(4, axis=-1, dtype=np.float64)
    assert (layer.rmax, layer.dmax, layer.momentum) == (3.0, 5.0, 0.01)
    assert repr(layer).startswith("BatchRenorm(4,") and "rmax=3.0" in repr(layer)
    with pytest.raises(ValueError, match="rmax"):
        layer.rmax = 0.9
    with pytest.raises(ValueError, match="dmax"):
        nbbn.BatchRenorm(4, dmax=-0.1)
    assert layer.rmax == 3.0
    x = rng.standard_normal((5, 3, 3, 4))
    y = layer(x)  # channels-last; r, d from the initial running buffers (0, 1)
    y_ref = renorm_reference(np.moveaxis(x, -1, 1), None, None, np.ones((5, 4, 3, 3)),
                             np.zeros(4), np.ones(4), 3.0, 5.0)[0]
    np.testing.assert_allclose(np.moveaxis(y, -1, 1), y_ref, rtol=1e-10, atol=1e-10)
    # evaluation is batch norm with the running buffers, and the state dict is BatchNorm2d's
    layer.eval()
    np.testing.assert_allclose(layer(x), nbbn.batch_norm(x, layer.running_mean,
                                                         layer.running_var, layer.weight,
                                                         layer.bias, axis=-1))
    import nbbn.torch as nt
    assert set(layer.state_dict()) == set(torch.nn.BatchNorm2d(4).state_dict())
    mod = nt.BatchRenorm2d(4, rmax=2.0, dmax=1.0)
    assert isinstance(mod, torch.nn.BatchNorm2d) and "rmax=2.0" in repr(mod)
    mod.load_state_dict({k: torch.from_numpy(np.asarray(v)).float()
                         for k, v in layer.state_dict().items()})
    with pytest.raises(ValueError, match="rmax"):
        nt.BatchRenorm2d(4, rmax=0.5)


def test_renorm_torch_gradcheck():
    import nbbn.torch as nt
    g = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(4, 3, 5, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    w = (1 + 0.2 * torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.2 * torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_()
    # r and d clipped in every channel: there they are constant, the gradient is exact
    rm, rv = torch.full((3,), 5.0, dtype=torch.float64), torch.full((3,), 0.01, dtype=torch.float64)

    def f(*args):
        return nt.BatchRenormFunction.apply(*args, rm.clone(), rv.clone(), 1.5, 0.5, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b))
    xl = x.detach().unsqueeze(-1).expand(4, 3, 5, 2).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(f, (xl, w, b))


def test_sync_batch_renorm_equals_one_layer_on_the_whole_batch(rng):
    x = (rng.standard_normal((7, 3, 4)) * 2 + 1).astype(np.float64)
    dy = rng.standard_normal(x.shape)
    splits = [3, 0, 4]
    starts = np.cumsum([0, *splits])
    ref = nbbn.BatchRenorm(3, momentum=0.2, rmax=1.2, dmax=0.3, dtype=np.float64)
    ref.running_mean[:] = [0.5, -1, 2]
    results_ref = [(ref(x), ref.backward(dy)) for _ in range(2)]

    def rank_fn(comm, rank):
        layer = SyncBatchRenorm(3, momentum=0.2, comm=comm, rmax=1.2, dmax=0.3,
                                dtype=np.float64)
        layer.running_mean[:] = [0.5, -1, 2]
        sl = slice(starts[rank], starts[rank + 1])
        return [(layer(x[sl]), layer.backward(dy[sl])) for _ in range(2)], layer

    results = ThreadGroup(len(splits)).run(rank_fn)
    assert repr(results[0][1]).startswith("SyncBatchRenorm(3,")
    for step, (y_ref, dx_ref) in enumerate(results_ref):
        np.testing.assert_allclose(np.concatenate([r[0][step][0] for r in results]), y_ref,
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.concatenate([r[0][step][1] for r in results]), dx_ref,
                                   rtol=1e-12, atol=1e-12)
    for _, layer in results:
        for k in ("grad_weight", "grad_bias", "running_mean", "running_var"):
            np.testing.assert_allclose(getattr(layer, k), getattr(ref, k), rtol=1e-12,
                                       atol=1e-12, err_msg=k)


# ---- virtual batches (ghost batch norm) ------------------------------------------------------


@pytest.mark.parametrize("shape", [(10, 3), (9, 3, 7), (10, 3, 5, 6), (7, 3, 2, 3, 4)], ids=str)
@pytest.mark.parametrize("size", [1, 2, 4, 16])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_virtual_batches_match_batch_norm_per_group(shape, size, dtype, rng):
    if size == 1 and len(shape) == 2:
        pytest.skip("one value per channel in a group")
    x, w, b = make(shape, dtype, rng)
    dy = rng.standard_normal(shape).astype(dtype)
    y_ref, grads_ref, mean_ref, var_ref = ghost_reference(x, w, b, dy, size)
    groups = -(-shape[0] // size)
    for axis, xs, dys in ((1, x, dy), (-1, np.moveaxis(x, 1, -1).copy(),
                                       np.moveaxis(dy, 1, -1).copy())):
        back = (lambda a: np.moveaxis(a, -1, 1)) if axis == -1 else (lambda a: a)  # noqa: E731
        y, mean, var = nbbn.batch_norm_forward(xs, w, b, axis=axis, virtual_batch_size=size)
        assert mean.shape == var.shape == (groups, shape[1]) and mean.dtype == dtype
        np.testing.assert_allclose(back(y), y_ref, **TOL[dtype])
        np.testing.assert_allclose(mean, mean_ref, **TOL[dtype])
        np.testing.assert_allclose(var, var_ref, **TOL[dtype])
        dx, dw, db = nbbn.batch_norm_backward(dys, xs, mean, var, w, axis=axis,
                                              virtual_batch_size=size)
        assert_grads((back(dx), dw, db), grads_ref, dtype)


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_virtual_batches_any_layout(axis, rng):
    base, dy, moved, w, b = layout_case((7, 4, 5), axis, rng)
    y_ref, grads_ref, mean_ref, _ = ghost_reference(moved, w, b, np.moveaxis(dy, axis, 1), 3)
    for name, x in variants(base):
        before = x.copy()
        y, mean, var = nbbn.batch_norm_forward(x, w, b, axis=axis, virtual_batch_size=3)
        np.testing.assert_allclose(np.moveaxis(y, axis, 1), y_ref, rtol=1e-10, atol=1e-10,
                                   err_msg=name)
        np.testing.assert_allclose(mean, mean_ref, rtol=1e-12, atol=1e-12, err_msg=name)
        for stats in ((mean, var), (np.asfortranarray(mean), var[::1])):
            dx, dw, db = nbbn.batch_norm_backward(dy, x, *stats, w, axis=axis,
                                                  virtual_batch_size=3)
            np.testing.assert_allclose(np.moveaxis(dx, axis, 1), grads_ref[0], rtol=1e-9,
                                       atol=1e-10, err_msg=name)
            np.testing.assert_allclose(dw, grads_ref[1], rtol=1e-9, err_msg=name)
            np.testing.assert_allclose(db, grads_ref[2], rtol=1e-9, err_msg=name)
        np.testing.assert_array_equal(x, before)


def test_virtual_batches_large_threaded(rng):
    """The threaded kernels, and the channels-last regrouping of few channels into wide rows
    (``_cpu._blocks.widen``): taken where a wide row stays in one group, the last group
    possibly among the leftover rows only; not taken where it would straddle groups."""
    for shape, axis, size in [((32, 16, 24, 24), 1, 12), ((32, 24, 24, 16), -1, 12),
                              ((4096, 64), 1, 12), ((4100, 16), 1, 32), ((4097, 64), 1, 3),
                              ((9, 40, 40, 8), -1, 4)]:
        x = rng.standard_normal(shape) * 4 + 3
        dy = rng.standard_normal(shape)
        c = shape[axis]
        w = rng.random(c) + 0.5
        mv = lambda a: np.moveaxis(a, axis, 1)  # noqa: E731
        y_ref, grads_ref, _, _ = ghost_reference(mv(x), w, w, mv(dy), size)
        y, m, v = nbbn.batch_norm_forward(x, w, w, axis=axis, virtual_batch_size=size)
        dx, dw, db = nbbn.batch_norm_backward(dy, x, m, v, w, axis=axis,
                                              virtual_batch_size=size)
        np.testing.assert_allclose(mv(y), y_ref, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(mv(dx), grads_ref[0], rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(dw, grads_ref[1], rtol=1e-9, atol=1e-8)
        np.testing.assert_allclose(db, grads_ref[2], rtol=1e-9, atol=1e-8)


def test_virtual_batches_of_features_a_group_at_a_time(rng):
    """Small virtual batches of channels-last rows go a group at a time (``_cpu/groups.py``):
    threaded, with the epilogue and the ReLU's backward, without weight, with 16-bit data
    and statistics as given (other dtypes, other byte orders); out= in place; a group whose
    statistics are not finite declines and the general path gives NumPy's results."""
    shape, size = (4099, 40), 8  # a short last group
    x = rng.standard_normal(shape) * 3 + 2
    dy, res = rng.standard_normal(shape), rng.standard_normal(shape)
    w, b = rng.random(40) + 0.5, rng.standard_normal(40)
    xt, rt = t(x).requires_grad_(), t(res).requires_grad_()
    wt, bt = t(w).requires_grad_(), t(b).requires_grad_()
    y_ref = torch.relu(torch.cat([F.batch_norm(p, None, None, wt, bt, training=True)
                                  for p in xt.split(size)]) + rt)
    y_ref.backward(t(dy))
    y, mean, var = nbbn.batch_norm_forward(x, w, b, residual=res, activation="relu",
                                           virtual_batch_size=size)
    np.testing.assert_allclose(y, y_ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    dx, dw, db, dres = nbbn.batch_norm_backward(dy, x, mean, var, w, y=y, activation="relu",
                                                residual_grad=True, virtual_batch_size=size)
    for got, want in ((dx, xt.grad), (dw, wt.grad), (db, bt.grad), (dres, rt.grad)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-10)
    swapped = [v.astype(v.dtype.newbyteorder()) for v in (mean, var)]
    np.testing.assert_allclose(
        nbbn.batch_norm_backward(dy, x, *swapped, w, y=y, activation="relu",
                                 virtual_batch_size=size)[0], dx, rtol=1e-14, atol=1e-14)
    y_ref, grads_ref, mean_ref, var_ref = ghost_reference(x, None, None, dy, size)
    y, mean, var = nbbn.batch_norm_forward(x, virtual_batch_size=size)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dx, dw, db = nbbn.batch_norm_backward(dy, x, mean, var, virtual_batch_size=size)
    np.testing.assert_allclose(dx, grads_ref[0], rtol=1e-10, atol=1e-10)
    assert dw is None and db is None
    inplace = x.copy()
    assert nbbn.batch_norm_forward(inplace, virtual_batch_size=size, out=inplace)[0] is inplace
    np.testing.assert_allclose(inplace, y_ref, rtol=1e-12, atol=1e-12)
    half = x.astype(np.float16)
    y16, mean16, var16 = nbbn.batch_norm_forward(half, virtual_batch_size=size)
    y_ref, grads_ref, _, _ = ghost_reference(half, None, None, dy.astype(np.float16), size)
    np.testing.assert_allclose(y16.astype(np.float64), y_ref, rtol=2e-3, atol=2e-3)
    dx16 = nbbn.batch_norm_backward(dy.astype(np.float16), half, mean16.astype(np.float16),
                                    var16, virtual_batch_size=size)[0]
    np.testing.assert_allclose(dx16.astype(np.float64), grads_ref[0], rtol=2e-2, atol=2e-2)
    bad = x.copy()
    bad[9, 3], bad[17, 5] = np.inf, 1.4e154  # the second group: an inf; the third: x**2 overflows
    with np.errstate(invalid="ignore", over="ignore"):
        y, mean, var = nbbn.batch_norm_forward(bad, virtual_batch_size=size)
        dx = nbbn.batch_norm_backward(dy, bad, mean, var, virtual_batch_size=size)[0]
    assert np.isnan(var[1, 3]) and mean[1, 3] == np.inf and np.isnan(y[8:16, 3]).all()
    np.testing.assert_allclose(var[2, 5], np.ldexp(np.ldexp(bad[16:24, 5], -600).var(), 1200),
                               rtol=1e-12)
    assert np.isfinite(y[16:24, 5]).all() and np.isnan(dx[8:16, 3]).all()
    np.testing.assert_allclose(y[:8], nbbn.batch_norm_forward(x[:8])[0], rtol=1e-12,
                               atol=1e-12)


def test_virtual_batches_far_apart_stay_exact(rng):
    """Virtual batches whose means lie far apart (non-i.i.d.), channels-last: a group's first
    tile is shifted by the previous group's mean where that is close, else computed exactly."""
    for size, channels in ((128, 1024), (8, 1024), (32, 16)):
        x = rng.standard_normal((4096, channels)) + (np.arange(4096) // size % 4 * 1e6)[:, None]
        _, _, var = nbbn.batch_norm_forward(x, virtual_batch_size=size)
        parts = [x[i:i + size] for i in range(0, 4096, size)]
        exact = np.stack([(p - p[0]).var(0) for p in parts])  # p - p[0]: exact (Sterbenz)
        np.testing.assert_allclose(var, exact, rtol=1e-9)


def test_virtual_batches_edge_cases_and_errors(rng):
    x, w, b = make((5, 3, 4), np.float64, rng)
    y, mean, var = nbbn.batch_norm_forward(x, w, b, virtual_batch_size=8)  # one group
    assert mean.shape == (1, 3)
    np.testing.assert_allclose(y, nbbn.batch_norm_forward(x, w, b)[0], rtol=1e-14, atol=1e-14)
    y, mean, var = nbbn.batch_norm_forward(x[:0], w, b, virtual_batch_size=2)
    assert y.shape == (0, 3, 4) and mean.shape == (0, 3)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive integer"):
        nbbn.batch_norm_forward(x, virtual_batch_size=0)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive integer"):
        nbbn.batch_norm_forward(x, virtual_batch_size=2.5)
    with pytest.raises(ValueError, match="channel axis"):
        nbbn.batch_norm_forward(x, axis=0, virtual_batch_size=2)
    _, mean, var = nbbn.batch_norm_forward(x, w, b, virtual_batch_size=2)
    assert mean.shape == (3, 3)
    with pytest.raises(ValueError, match=r"mean must have shape \(3, 3\)"):
        nbbn.batch_norm_backward(x, x, mean[:2], var, w, virtual_batch_size=2)
    with pytest.raises(ValueError, match=r"var must have shape \(3,\)"):
        nbbn.batch_norm_backward(x, x, mean[0], var, w)
    layer = nbbn.BatchNorm(3, virtual_batch_size=2, dtype=np.float64)
    with pytest.raises(ValueError, match="last virtual batch has 1 value"):
        layer(x[:, :, :1])  # groups of 2, 2, 1 samples with one value each
    assert int(layer.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="virtual_batch_size"):
        nbbn.BatchNorm(3, virtual_batch_size=-1)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_virtual_batch_layers_over_steps(size, dtype, rng):
    """nbbn.BatchNorm and nbbn.torch.BatchNorm2d with virtual batches: outputs and gradients
    per group as F.batch_norm's; running buffers moved by the groups' count-weighted mean
    statistics (unbiased within each group); evaluation as batch norm."""
    import nbbn.torch as nt
    shape, c, momentum = (8, 3, 2, 3), 3, 0.2
    layer = nbbn.BatchNorm(c, momentum=momentum, virtual_batch_size=size, dtype=dtype)
    tmod = nt.BatchNorm2d(c, momentum=momentum, virtual_batch_size=size)
    tmod = tmod.to(torch.float32 if dtype == np.float32 else torch.float64)
    assert f"virtual_batch_size={size}" in repr(tmod) and f"virtual_batch_size={size}" in \
        repr(layer)
    rm, rv = np.zeros(c), np.ones(c)
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-10)
    for step in range(4):
        x = (rng.standard_normal(shape) * (step + 1) + step).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        if step == 3:
            layer.eval(), tmod.eval()
            y_ref = F.batch_norm(t(x).double(), t(rm), t(rv), training=False).numpy()
            grads_ref = None
        else:
            y_ref, grads_ref, mean, var = ghost_reference(x, np.ones(c), np.zeros(c), dy, size)
            counts = np.array([min(size, 8 - s) * 6 for s in range(0, 8, size)])[:, None]
            group_mean = (counts * mean).sum(0) / counts.sum()
            group_var = (counts * var * counts / (counts - 1)).sum(0) / counts.sum()
            rm = (1 - momentum) * rm + momentum * group_mean
            rv = (1 - momentum) * rv + momentum * group_var
        y, dx, ym, dxm = step_both(layer, tmod, x, dy)
        for got in (y, ym):
            np.testing.assert_allclose(got, y_ref, **tol)
        if grads_ref is not None:
            for got in (dx, dxm):
                np.testing.assert_allclose(got, grads_ref[0], **tol)
            np.testing.assert_allclose(layer.grad_weight, grads_ref[1], **tol)
            np.testing.assert_allclose(tmod.weight.grad.numpy(), grads_ref[1], **tol)
            tmod.weight.grad = tmod.bias.grad = None
        for got in (layer.running_mean, tmod.running_mean.numpy()):
            np.testing.assert_allclose(got, rm, **tol)
        for got in (layer.running_var, tmod.running_var.numpy()):
            np.testing.assert_allclose(got, rv, **tol)


def test_ema_update_of_virtual_batches(rng):
    x = rng.standard_normal((7, 3, 4))
    _, mean, var = nbbn.batch_norm_forward(x, virtual_batch_size=3)
    rm, rv = np.zeros(3), np.ones(3)
    nbbn.ema_update(rm, rv, mean, var, [12, 12, 4], momentum=0.5)
    groups = [x[0:3], x[3:6], x[6:]]
    counts = np.array([12, 12, 4])[:, None]
    unbiased = np.stack([g.var((0, 2), ddof=1) for g in groups])
    np.testing.assert_allclose(rm, 0.5 * x.mean((0, 2)), rtol=1e-12)
    np.testing.assert_allclose(rv, 0.5 + 0.5 * (counts * unbiased).sum(0) / 28, rtol=1e-12)
    for bad in ([12, 4, 4], [12, 12, 13], [12, 12, 1], []):
        with pytest.raises(ValueError, match="count"):
            nbbn.ema_update(rm, rv, mean[:len(bad)], var[:len(bad)], bad)
    with pytest.raises(ValueError, match="unbiased=True"):
        nbbn.ema_update(rm, rv, mean, var, [12, 12, 4], unbiased=False)
    with pytest.raises(ValueError, match=r"mean must have shape \(2, 3\)"):
        nbbn.ema_update(rm, rv, mean, var, [12, 12])


# ---- precise statistics -----------------------------------------------------------------------


def batch_list(rng, sizes, c=3, axis=1, tail=(4, 5)):
    shape = lambda n: (n, c, *tail) if axis == 1 else (n, *tail, c)  # noqa: E731
    return [(rng.standard_normal(shape(n)) * 3 + 100 + i).astype(np.float32)
            for i, n in enumerate(sizes)]


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("cls", ["BatchNorm", "BatchRenorm", "ghost"])
def test_precise_statistics_of_a_layer(axis, cls, rng):
    batches = batch_list(rng, [4, 7, 2, 5], axis=axis)
    kwargs = dict(virtual_batch_size=3) if cls == "ghost" else {}
    layer = (nbbn.BatchRenorm if cls == "BatchRenorm" else nbbn.BatchNorm)(3, axis=axis,
                                                                          **kwargs)
    layer.weight[:] = [0.5, 1, 2]
    layer(batches[0])
    state = {k: np.copy(v) for k, v in layer.state_dict().items()}
    axes = tuple(i for i in range(4) if i != axis % 4)
    every = np.concatenate(batches).astype(np.float64)
    for convention in ("population", "batch_mean"):
        with layer.precise_statistics(convention=convention) as same:
            assert same is layer
            ys = [layer(xb) for xb in batches]
        if convention == "population":
            want_mean, want_var = every.mean(axes), every.var(axes, ddof=1)
        else:  # count-weighted means of the normalization batches' statistics
            parts = [xb[i:i + 3] for xb in batches for i in range(0, len(xb), 3)] \
                if cls == "ghost" else batches
            n = np.array([p.size // 3 for p in parts])[:, None]
            means = np.stack([p.astype(np.float64).mean(axes) for p in parts])
            variances = np.stack([p.astype(np.float64).var(axes, ddof=1) for p in parts])
            want_mean = (n * means).sum(0) / n.sum()
            want_var = (n * variances).sum(0) / n.sum()
        np.testing.assert_allclose(layer.running_mean, want_mean, rtol=1e-6)
        np.testing.assert_allclose(layer.running_var, want_var, rtol=1e-5)
        assert int(layer.num_batches_tracked) == 1  # nothing else changes
        for k in ("weight", "bias"):
            np.testing.assert_array_equal(layer.state_dict()[k], state[k])
        layer.load_state_dict(state)
    # the forwards inside are ordinary training forwards
    layer.load_state_dict(state)
    np.testing.assert_array_equal(ys[-1], layer(batches[-1]))


def test_precise_statistics_exact_and_guarded(rng):
    layer = nbbn.BatchNorm(2, dtype=np.float64)
    x = 1e8 + rng.standard_normal((50, 2, 3))  # a large offset: averaging would lose digits
    with layer.precise_statistics():
        for i in range(0, 50, 7):
            layer(x[i:i + 7])
    np.testing.assert_allclose(layer.running_mean, x.mean((0, 2)), rtol=1e-15)
    np.testing.assert_allclose(layer.running_var, x.var((0, 2), ddof=1), rtol=1e-7)
    before = layer.state_dict()
    with pytest.raises(KeyError):
        with layer.precise_statistics():
            layer(x[:4])
            raise KeyError("a failed pass leaves the running statistics alone")
    with layer.precise_statistics():  # no batch: nothing to set
        pass
    with layer.precise_statistics():
        layer.eval()(x[:4])  # evaluation forwards see nothing either
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(ValueError, match="convention"):
        with layer.precise_statistics("mean"):
            pass
    with pytest.raises(ValueError, match="track_running_stats"):
        with nbbn.BatchNorm(2, track_running_stats=False).precise_statistics():
            pass
    with layer.precise_statistics():
        with pytest.raises(RuntimeError, match="already active"):
            with layer.precise_statistics():
                pass


class FrozenScaleBatchNorm(torch.nn.BatchNorm2d):
    """A user subclass nbbn does not compute: recompute_batch_norm_stats reads its input."""


@pytest.mark.parametrize("convention", ["population", "batch_mean"])
def test_recompute_batch_norm_stats(convention, rng):
    import nbbn.torch as nt
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 1), nt.BatchNorm2d(5, virtual_batch_size=3), torch.nn.ReLU(),
        torch.nn.Conv2d(5, 6, 1), nt.BatchRenorm2d(6), FrozenScaleBatchNorm(6),
        torch.nn.Flatten(), torch.nn.Linear(6 * 25, 4), torch.nn.BatchNorm1d(4, momentum=None))
    model.eval()
    model[4].train()  # a mixed mode, restored as it was
    batches = [torch.from_numpy(xb) for xb in batch_list(rng, [4, 6, 5], tail=(7, 7))]
    with torch.no_grad():
        model(batches[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    # Reference: each norm's input as training-mode forwards of the model as it is produce it
    norms = [1, 4, 7, 8, 11]
    inputs = {i: [] for i in norms}
    for xb in batches:
        ref = copy.deepcopy(model).train()
        for i in norms:
            ref[i].register_forward_pre_hook(
                lambda m, a, i=i: inputs[i].append(a[0].double().numpy()))
        with torch.no_grad():
            ref(xb)
    assert nt.recompute_batch_norm_stats(model, batches, convention=convention) is model
    assert [m.training for m in model.modules()] == modes
    assert type(model[1]) is torch.nn.BatchNorm2d and type(model[8]) is FrozenScaleBatchNorm
    for k, v in model.state_dict().items():
        if "running" not in k:
            assert torch.equal(v, before[k]), k
    for i in norms:
        axes = (0,) + tuple(range(2, inputs[i][0].ndim))
        parts = inputs[i]
        if i == 4 and convention == "batch_mean":
            parts = [p[j:j + 3] for p in parts for j in range(0, len(p), 3)]
        if convention == "population":
            every = np.concatenate(parts)
            want = every.mean(axes), every.var(axes, ddof=1)
        else:
            n = np.array([p.size // p.shape[1] for p in parts])[:, None]
            want = ((n * np.stack([p.mean(axes) for p in parts])).sum(0) / n.sum(),
                    (n * np.stack([p.var(axes, ddof=1) for p in parts])).sum(0) / n.sum())
        np.testing.assert_allclose(model[i].running_mean.numpy(), want[0], rtol=1e-5,
                                   atol=1e-6, err_msg=str(i))
        np.testing.assert_allclose(model[i].running_var.numpy(), want[1], rtol=1e-5,
                                   atol=1e-6, err_msg=str(i))
    with pytest.raises(ValueError, match="convention"):
        nt.recompute_batch_norm_stats(model, batches, convention="average")


def test_recompute_leaves_a_failed_model_as_it_was(rng):
    import nbbn.torch as nt
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def batches():
        yield torch.randn(4, 3)
        raise RuntimeError("data loader failed")

    with pytest.raises(RuntimeError, match="data loader"):
        nt.recompute_batch_norm_stats(model, batches())
    assert not model.training and type(model[0]) is torch.nn.BatchNorm1d
    assert "_nbbn_pooled" not in vars(model[0])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_readme_section_runs():
    """The README's small-batch examples run as written."""
    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## Small batches"):]
    section = section[:section.index("\n## ")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    namespace = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["mean"].shape == (2, 64) and namespace["dx"].shape == (8, 64, 28, 28)
    layer, x = namespace["layer"], namespace["x"].astype(np.float64)
    np.testing.assert_allclose(layer.running_var, x.var((0, 2, 3), ddof=1), rtol=1e-5)
