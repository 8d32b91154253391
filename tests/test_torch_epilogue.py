"""nbbn.torch's fused epilogue (BatchNormAct1d/2d/3d, ``batch_norm(..., residual=,
activation=)``) against PyTorch's composition ``relu(BatchNorm(x) + r)``, and bfloat16 tensors
computed by nbbn (no fallback to PyTorch's kernel)."""
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
nt = pytest.importorskip("nbbn.torch")

F64 = torch.float64
ACT = {1: (nt.BatchNormAct1d, nn.BatchNorm1d, (16, 5)), 2: (nt.BatchNormAct2d, nn.BatchNorm2d,
                                                          (6, 5, 7, 4)),
       3: (nt.BatchNormAct3d, nn.BatchNorm3d, (3, 5, 3, 4, 5))}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4),
       torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}


@pytest.fixture
def no_torch_batch_norm(monkeypatch):
    """nbbn.torch's fallback to PyTorch's operations raises: every call must be nbbn's."""
    def refuse(*args, **kwargs):
        raise AssertionError("fell back to PyTorch's batch norm")
    monkeypatch.setattr(nt, "_composed", refuse)


def _pair(dim, dtype, **config):
    ours_cls, theirs_cls, shape = ACT[dim]
    ours = ours_cls(shape[1], **config).to(dtype)
    theirs = theirs_cls(shape[1], **{k: v for k, v in config.items() if k != "activation"})
    theirs = theirs.to(dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs, shape


def _grads(module, x, r, dy, compose):
    x = x.detach().clone().requires_grad_()
    r = None if r is None else r.detach().clone().requires_grad_()
    y = compose(module, x, r)
    y.backward(dy)
    return y.detach(), x.grad, None if r is None else r.grad, module.weight.grad, \
        module.bias.grad


def _away_from_kink(module, x, r, dy):
    """dy with zeros where the pre-activation (from module's current state, in float64) is
    within 0.1 of 0: there the 16-bit results may fall on either side of the ReLU."""
    if x.dtype != torch.bfloat16:
        return dy
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    training = module.training
    pre = nn.functional.batch_norm(d(x), d(module.running_mean), d(module.running_var),
                                   d(module.weight), d(module.bias), training=training)
    if r is not None:
        pre = pre + d(r)
    return torch.where(pre.abs() < 0.1, 0, dy.double()).to(dy.dtype)


def _theirs(module, x, r):
    y = module(x)
    return torch.relu(y if r is None else y + r)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_modules_match_torch_composition(dim, dtype, channels_last, no_torch_batch_norm):
    torch.manual_seed(dim)
    ours, theirs, shape = _pair(dim, dtype)
    x, r, dy = (torch.randn(shape, dtype=F64).to(dtype) for _ in range(3))
    if channels_last and dim > 1:
        fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
        x, r = x.to(memory_format=fmt), r.to(memory_format=fmt)
    assert isinstance(ours, nn.BatchNorm1d if dim == 1 else
                      nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d)
    tol = TOL[dtype]
    for step in range(2):
        for residual in (r, None):
            g = _away_from_kink(theirs, x, residual, dy)
            want = _grads(theirs, x, residual, g, _theirs)
            got = _grads(ours, x, residual, g, lambda m, a, b: m(a, b))
            for g, w in zip(got, want):
                if w is None:
                    assert g is None
                else:
                    assert g.dtype == w.dtype
                    torch.testing.assert_close(g, w, **tol)
            ours.zero_grad()
            theirs.zero_grad()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, **tol)
    ours.eval()
    theirs.eval()
    dy = _away_from_kink(theirs, x, r, dy)
    want = _grads(theirs, x, r, dy, _theirs)
    got = _grads(ours, x, r, dy, lambda m, a, b: m(a, b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def test_activation_none_is_residual_add_and_convert_leaves_them_alone():
    ours, theirs, shape = _pair(2, F64, activation=None)
    x, r = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
    torch.testing.assert_close(ours(x, r), theirs(x) + r)
    assert "activation=None" in repr(ours)
    model = nn.Sequential(nt.BatchNormAct2d(5), nn.BatchNorm2d(5))
    nt.convert(model)
    assert type(model[0]) is nt.BatchNormAct2d and type(model[1]) is nt.BatchNorm2d
    plain = nn.BatchNorm2d(5)
    fused = nt.BatchNormAct2d(5)
    fused.load_state_dict(plain.state_dict())  # the same state dict


def test_gradcheck_with_residual():
    torch.manual_seed(0)
    x, r = (torch.randn(6, 3, 4, dtype=F64, requires_grad=True) for _ in range(2))
    w = torch.rand(3, dtype=F64, requires_grad=True)
    b = torch.randn(3, dtype=F64, requires_grad=True)

    def f(x, w, b, r):
        return nt.batch_norm(x, None, None, w, b, training=True, residual=r, activation="relu")

    assert torch.autograd.gradcheck(f, (x, w, b, r))
    assert torch.autograd.gradgradcheck(f, (x, w, b, r))


@pytest.mark.parametrize("call,error,name", [
    (lambda m, x: m(x, x[:, :2]), ValueError, "residual"),
    (lambda m, x: m(x, x.float()), ValueError, "residual"),
    (lambda m, x: m(x, x.numpy()), TypeError, "residual"),
    (lambda m, x: nt.BatchNormAct2d(5, activation="tanh"), ValueError, "activation"),
    (lambda m, x: nt.batch_norm(x, None, None, training=True, activation="gelu"), ValueError,
     "activation"),
])
def test_errors_name_the_argument_and_change_nothing(call, error, name):
    m = nt.BatchNormAct2d(5).double()
    x = torch.randn(4, 5, 3, 3, dtype=F64)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error, match=name):
        call(m, x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bfloat16_is_computed_by_nbbn(no_torch_batch_norm):
    """bfloat16 tensors through BatchNorm2d and batch_norm: nbbn's kernels, bfloat16 out."""
    torch.manual_seed(1)
    x = torch.randn(8, 3, 5, 5).to(torch.bfloat16).requires_grad_()
    m = nt.BatchNorm2d(3).to(torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == m.weight.grad.dtype == torch.bfloat16
    xf = x.detach().double()
    want = (xf - xf.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        xf.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.double(), want, rtol=2 ** -8, atol=1e-2)
