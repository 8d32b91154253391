"""nbbn.BatchNorm against torch.nn.BatchNorm{1,2,3}d over several training steps."""
import numpy as np
import pytest

import nbbn

torch = pytest.importorskip("torch")

MODULES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}
SHAPES = [(8, 4), (6, 4, 5), (4, 4, 3, 5), (2, 4, 3, 2, 3)]


def torch_state(mod):
    return {k: v.detach().numpy().copy() for k, v in mod.state_dict().items()}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)],
                         ids=["affine", "no-affine", "no-tracking"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_steps_match_torch(shape, momentum, affine, track, dtype, rng):
    c = shape[1]
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    ref = MODULES[len(shape)](c, momentum=momentum, affine=affine,
                              track_running_stats=track).to(tdtype)
    layer = nbbn.BatchNorm(c, momentum=momentum, affine=affine, track_running_stats=track,
                           dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-10)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1) if affine else None
    for step in range(4):
        if step == 3:  # last step in eval mode
            ref.eval()
            assert layer.eval() is layer and not layer.training
        x = (rng.standard_normal(shape) * (step + 1) + step).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        xt = torch.from_numpy(x).requires_grad_()
        yt = ref(xt)
        yt.backward(torch.from_numpy(dy))
        y = layer(x)
        dx = layer.backward(dy)
        np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
        np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
        if affine:
            np.testing.assert_allclose(layer.grad_weight, ref.weight.grad.numpy(), **tol)
            np.testing.assert_allclose(layer.grad_bias, ref.bias.grad.numpy(), **tol)
            opt.step()
            opt.zero_grad()
            layer.weight -= 0.1 * layer.grad_weight
            layer.bias -= 0.1 * layer.grad_bias
        else:
            assert layer.grad_weight is None and layer.grad_bias is None
        mine, theirs = layer.state_dict(), torch_state(ref)
        assert mine.keys() == theirs.keys()
        for k in mine:
            np.testing.assert_allclose(mine[k], theirs[k], **tol, err_msg=k)


def test_state_dict_round_trip(rng):
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
        ref.running_mean.normal_()
        ref.running_var.uniform_(0.5, 2)
        ref.num_batches_tracked.fill_(7)
    layer = nbbn.BatchNorm(3)
    layer.load_state_dict(torch_state(ref))
    assert int(layer.num_batches_tracked) == 7
    layer.eval()
    ref.eval()
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(layer(x), ref(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    back = torch.nn.BatchNorm2d(3)
    back.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in
                          layer.state_dict().items()})
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), ref.state_dict()[k].numpy())


def test_state_dict_errors_change_nothing():
    layer = nbbn.BatchNorm(3)
    state = layer.state_dict()
    bad = dict(state, running_var=np.ones(4, np.float32), weight=np.full(3, 9, np.float32))
    with pytest.raises(ValueError, match="running_var"):
        layer.load_state_dict(bad)
    assert np.all(layer.weight == 1)
    with pytest.raises(KeyError, match="unexpected"):
        layer.load_state_dict(dict(state, extra=np.ones(1)))
    with pytest.raises(KeyError, match="missing"):
        layer.load_state_dict({"weight": state["weight"]})
    state.pop("num_batches_tracked")  # old PyTorch checkpoints lack it
    layer.load_state_dict(state)


def test_channels_last_layer_and_errors(rng):
    layer = nbbn.BatchNorm(5, axis=-1)
    x = rng.standard_normal((6, 4, 4, 5)).astype(np.float32)
    y = layer(x)
    ref = nbbn.batch_norm_forward(x, layer.weight, layer.bias, axis=-1)[0]
    np.testing.assert_array_equal(y, ref)
    with pytest.raises(ValueError, match="channels"):
        layer(rng.standard_normal((6, 4, 4, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="Expected more than 1 value"):
        nbbn.BatchNorm(5, axis=-1)(np.ones((1, 5), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        nbbn.BatchNorm(5).backward(np.ones((2, 5)))
    with pytest.raises(ValueError, match="momentum"):
        nbbn.BatchNorm(5, momentum=2.0)
    with pytest.raises(ValueError, match="eps"):
        nbbn.BatchNorm(5, eps=-1)
    with pytest.raises(ValueError, match="num_features"):
        nbbn.BatchNorm(0)
    assert nbbn.BatchNorm(5).train().training
