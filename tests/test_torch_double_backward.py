"""nbbn.torch second-order gradients (issue 13): gradgradcheck and torch.nn's values;
forward-mode AD and vmap refused clearly; argument errors naming the argument."""
import pytest

torch = pytest.importorskip("torch")

import nbbn.torch as nt  # noqa: E402

CASES = [(nt.BatchNorm1d, (5, 3)), (nt.BatchNorm1d, (4, 3, 5)), (nt.BatchNorm2d, (3, 2, 3, 4)),
         (nt.BatchNorm3d, (2, 2, 3, 2, 3))]


def _module(cls, channels, training, affine=True):
    m = cls(channels, affine=affine).double().train(training)
    with torch.no_grad():
        if affine:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    return m


def _input(shape, channels_last, seed=0):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else
                 torch.channels_last_3d)
    return x.requires_grad_()


def _layouts(shape):
    return (False, True) if len(shape) in (4, 5) else (False,)


@pytest.mark.parametrize("cls,shape", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck_modules(cls, shape, training):
    for channels_last in _layouts(shape):
        for affine in (True, False):
            m = _module(cls, shape[1], training, affine)
            x = _input(shape, channels_last)
            params = tuple(m.parameters())

            def f(x, *p):
                return torch.func.functional_call(m, dict(zip(("weight", "bias"), p)), (x,))

            assert torch.autograd.gradgradcheck(f, (x, *params))


@pytest.mark.parametrize("cls,shape", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_second_order_matches_torch_nn(cls, shape, training):
    """d/dx [sum(dx**2) + sum(x)] (a gradient penalty), and d/dweight of it: torch.nn's."""
    ref_cls = {nt.BatchNorm1d: torch.nn.BatchNorm1d, nt.BatchNorm2d: torch.nn.BatchNorm2d,
               nt.BatchNorm3d: torch.nn.BatchNorm3d}[cls]
    for channels_last in _layouts(shape):
        results = []
        for build in (cls, ref_cls):
            m = _module(build, shape[1], training)
            torch.manual_seed(1)
            m.load_state_dict(_module(cls, shape[1], training).state_dict())
            x = _input(shape, channels_last)
            y = m(x)
            (dx,) = torch.autograd.grad((y * y.detach().cos()).sum(), x, create_graph=True)
            penalty = (dx ** 2).sum() + x.sum()
            results.append(torch.autograd.grad(penalty, (x, m.weight)))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_first_order_still_uses_nbbn_and_matches():
    m = _module(nt.BatchNorm2d, 3, True)
    ref = _module(torch.nn.BatchNorm2d, 3, True)
    ref.load_state_dict(m.state_dict())
    x1, x2 = _input((4, 3, 2, 2), False), _input((4, 3, 2, 2), False)
    m(x1).sum().backward()
    ref(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)


def test_forward_mode_and_vmap_raise_not_implemented():
    import torch.autograd.forward_ad as fwad
    x = torch.randn(5, 3, dtype=torch.float64)
    for training in (True, False):
        m = _module(nt.BatchNorm1d, 3, training)
        with fwad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
            m(fwad.make_dual(x, torch.ones_like(x)))
    m = _module(nt.BatchNorm1d, 3, False)
    with pytest.raises(NotImplementedError, match="vmap"):
        torch.vmap(m)(torch.randn(2, 5, 3, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda x: m(x).sum())(x)


def test_functional_errors_name_the_argument():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="running_mean should contain 3"):
        nt.batch_norm(x, torch.zeros(2), torch.ones(3), training=True)
    with pytest.raises(ValueError, match="running_var should contain 3"):
        nt.batch_norm(x, torch.zeros(3), torch.ones(2), training=False)
    with pytest.raises(ValueError, match="weight should contain 3"):
        nt.batch_norm(x, None, None, torch.ones(4), training=True)
    with pytest.raises(ValueError, match="both be None or neither"):
        nt.batch_norm(x, torch.zeros(3), None, training=True)


@pytest.mark.parametrize("shape", [(5, 3), (5, 2, 3)], ids=str)
def test_gradgradcheck_virtual_batches(shape):
    """Ghost batch norm's differentiable backward: each virtual batch (2, 2, 1 samples here:
    the last one a single sample of a 3-D input) normalized on its own, to second order."""
    m = _module(nt.BatchNorm1d, shape[1], True)
    m.virtual_batch_size = 2
    x = _input(shape, False)
    if len(shape) == 2:
        x = x[:4].detach().requires_grad_()  # (5, 3): the last group would hold one value

    def f(x, *p):
        return torch.func.functional_call(m, dict(zip(("weight", "bias"), p)), (x,))

    inputs = (x, *m.parameters())
    dy = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    recorded = torch.autograd.grad(f(*inputs), inputs, dy, create_graph=True)
    kernels = torch.autograd.grad(f(*inputs), inputs, dy)  # nbbn's kernels
    for a, b in zip(recorded, kernels):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradgradcheck(f, inputs)
