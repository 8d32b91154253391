"""nbbn.torch: the autograd Function (gradcheck), module parity with torch.nn, convert, training."""
import copy
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
nt = pytest.importorskip("nbbn.torch")

F64 = torch.float64
SHAPES = {1: [(8, 3), (6, 3, 5)], 2: [(4, 3, 5, 6)], 3: [(2, 3, 3, 4, 5)]}
CLASSES = {1: (nt.BatchNorm1d, nn.BatchNorm1d), 2: (nt.BatchNorm2d, nn.BatchNorm2d),
           3: (nt.BatchNorm3d, nn.BatchNorm3d)}
CONFIGS = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
           dict(momentum=0.3, eps=1e-3)]


def _inputs(shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g, dtype=F64) + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(shape[1], generator=g, dtype=F64)).to(dtype).requires_grad_()
    b = (0.2 * torch.randn(shape[1], generator=g, dtype=F64)).to(dtype).requires_grad_()
    return x, w, b


# ---- the autograd Function ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 4, 5), (2, 2, 3, 2, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_training(shape, affine):
    x, w, b = _inputs(shape)
    if not affine:
        w = b = None
    rm, rv = torch.zeros(shape[1], dtype=F64), torch.ones(shape[1], dtype=F64)

    def f(*args):
        return nt.BatchNormFunction.apply(*args, rm.clone(), rv.clone(), True, 0.1, 1e-5)

    args = (x, w, b) if affine else (x, None, None)
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 4, 5)])
def test_gradcheck_eval(shape):
    x, w, b = _inputs(shape)
    g = torch.Generator().manual_seed(1)
    rm = torch.randn(shape[1], generator=g, dtype=F64)
    rv = torch.rand(shape[1], generator=g, dtype=F64) + 0.5
    assert torch.autograd.gradcheck(
        lambda *a: nt.BatchNormFunction.apply(*a, rm, rv, False, 0.1, 1e-5), (x, w, b))


def test_gradcheck_channels_last_and_strided_dy():
    x, w, b = _inputs((3, 4, 5, 6))
    xl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: nt.BatchNormFunction.apply(*a, None, None, True, 0.1, 1e-5), (xl, w, b))
    # An expanded (zero-stride) upstream gradient, as from y.sum().
    y = nt.BatchNormFunction.apply(xl, w, b, None, None, True, 0.1, 1e-5)
    y.sum().backward()
    yt = nn.functional.batch_norm(x, None, None, w.detach(), b.detach(), True)
    (gx,) = torch.autograd.grad(yt.sum(), x)
    torch.testing.assert_close(xl.grad, gx, atol=1e-12, rtol=0)


def test_functional_matches_torch():
    x, w, b = _inputs((5, 3, 4, 4))
    for training in (True, False):
        rm1, rv1 = torch.rand(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5
        rm2, rv2 = rm1.clone(), rv1.clone()
        y1 = nt.batch_norm(x, rm1, rv1, w, b, training, 0.2, 1e-4)
        y2 = nn.functional.batch_norm(x, rm2, rv2, w, b, training, 0.2, 1e-4)
        torch.testing.assert_close(y1, y2)
        torch.testing.assert_close((rm1, rv1), (rm2, rv2))


# ---- modules: parity with torch.nn ---------------------------------------------------------


def _pair(dims, dtype=F64, **kw):
    ours, theirs = CLASSES[dims]
    a, b = ours(3, **kw).to(dtype), theirs(3, **kw).to(dtype)
    with torch.no_grad():
        if a.affine:
            g = torch.Generator().manual_seed(7)
            a.weight.copy_(1 + 0.3 * torch.randn(3, generator=g))
            a.bias.copy_(0.3 * torch.randn(3, generator=g))
    b.load_state_dict(a.state_dict())
    return a, b


def _assert_state_equal(a, b, tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        torch.testing.assert_close(sa[k], sb[k], atol=tol, rtol=tol, msg=k)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_module_parity(dims, config, dtype):
    tol = 1e-10 if dtype == F64 else 2e-5
    a, b = _pair(dims, dtype, **config)
    assert isinstance(a, CLASSES[dims][1])
    for step, shape in enumerate(SHAPES[dims] * 2):
        x, _, _ = _inputs(shape, dtype, seed=step)
        x2 = x.detach().clone().requires_grad_()
        ya, yb = a(x), b(x2)
        torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(x.grad, x2.grad, atol=tol, rtol=tol)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, atol=tol * 10, rtol=tol)
        with torch.no_grad():  # a plain SGD step on both, so later steps see new parameters
            for pa, pb in zip(a.parameters(), b.parameters()):
                pa -= 0.1 * pa.grad
                pb -= 0.1 * pb.grad
                pa.grad = pb.grad = None
        _assert_state_equal(a, b, tol)
    a.eval(), b.eval()
    for shape in SHAPES[dims]:
        x, _, _ = _inputs(shape, dtype, seed=99)
        x2 = x.detach().clone().requires_grad_()
        ya, yb = a(x), b(x2)
        torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(x.grad, x2.grad, atol=tol, rtol=tol)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, atol=tol * 10, rtol=tol)
    _assert_state_equal(a, b, tol)


def test_state_dict_round_trip_and_repr():
    a, b = _pair(2)
    assert set(a.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                   "num_batches_tracked"}
    a(_inputs((4, 3, 2, 2))[0])
    b.load_state_dict(a.state_dict())
    _assert_state_equal(a, b, 0)
    assert repr(a) == repr(b)


@pytest.mark.parametrize("dims,bad", [(1, (2, 3, 4, 5)), (1, (3,)), (2, (4, 3, 5)),
                                      (3, (4, 3, 5, 5))])
def test_input_dim_checks_match_torch(dims, bad):
    a, b = _pair(dims)
    x = torch.randn(bad, dtype=F64)
    with pytest.raises(ValueError) as ea:
        a(x)
    with pytest.raises(ValueError) as eb:
        b(x)
    assert str(ea.value) == str(eb.value)


def test_one_value_per_channel_when_training():
    a, b = _pair(1)
    x = torch.randn(1, 3, dtype=F64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        a(x)
    assert int(a.num_batches_tracked) == 0  # a failed call changes nothing
    a.eval()
    b.eval()
    torch.testing.assert_close(a(x), b(x))  # evaluation uses the running statistics


def test_empty_batch_like_torch():
    a, b = _pair(2)
    x = torch.zeros(0, 3, 4, 4, dtype=F64)
    assert a(x).shape == b(x).shape == x.shape
    _assert_state_equal(a, b, 0)


def test_float16_and_bfloat16():
    for dtype in (torch.float16, torch.bfloat16):
        a, b = _pair(2, torch.float32)
        x = torch.randn(4, 3, 5, 5).to(dtype)
        ya, yb = a(x), b(x)
        assert ya.dtype == yb.dtype == dtype
        torch.testing.assert_close(ya.float(), yb.float(), atol=2e-2, rtol=1e-2)
        _assert_state_equal(a, b, 1e-3)


def test_channels_last_memory_format_is_kept():
    a, b = _pair(2, torch.float32)
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    ya, yb = a(x), b(x)
    assert ya.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ya, yb)


def test_running_buffer_writes_bump_the_version():
    a = nt.BatchNorm2d(3)
    v = a.running_mean._version
    a(torch.randn(4, 3, 2, 2))
    assert a.running_mean._version > v


def test_import_nbbn_does_not_import_torch():
    code = ("import sys, nbbn; assert 'torch' not in sys.modules and 'nbbn.torch' not in "
            "sys.modules; import nbbn.torch; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ---- convert -------------------------------------------------------------------------------


class _MyBN(nn.BatchNorm2d):
    pass


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None),
                      _MyBN(4), nn.ReLU()),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.BatchNorm1d(16, affine=False), nn.ReLU(),
        nn.Linear(16, 10))


def test_convert_swaps_in_place():
    model = _small_model()
    model[3].eval()
    ref = copy.deepcopy(model)
    params = {name: id(p) for name, p in model.named_parameters()}
    buffers = {name: id(b) for name, b in model.named_buffers()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert nt.convert(model) is model
    assert type(model[1]) is nt.BatchNorm2d and type(model[6]) is nt.BatchNorm1d
    assert type(model[3][1]) is nt.BatchNorm2d
    assert type(model[3][2]) is _MyBN  # subclasses are not ours to swap
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert {n: id(b) for n, b in model.named_buffers()} == buffers
    assert opt.param_groups[0]["params"][0] is model[0].weight
    assert model.training and not model[3].training and not model[3][1].training
    assert model[3][1].momentum is None and not model[6].affine
    assert isinstance(model[1], nn.BatchNorm2d)
    x = torch.randn(6, 1, 8, 8)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    _assert_state_equal(model, ref, 1e-5)
    bn = nn.BatchNorm3d(2)
    assert nt.convert(bn) is bn and type(bn) is nt.BatchNorm3d
    assert nt.convert(bn) is bn  # idempotent
    with pytest.raises(TypeError):
        nt.convert("not a module")


# ---- training a small CNN: nbbn's batch norm vs PyTorch's -----------------------------------


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def _cnn():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         _Block(8), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-9), (torch.float32, 2e-4)])
def test_training_small_cnn_matches_torch(dtype, tol):
    ref = _cnn().to(dtype)
    ours = nt.convert(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 1, 8, 8, generator=g, dtype=dtype),
             torch.randint(0, 10, (16,), generator=g)) for _ in range(5)]
    losses = {}
    for name, model in (("torch", ref), ("nbbn", ours)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses[name] = []
        for x, t in data:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), t)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
        model.eval()
        losses[name].append(nn.functional.cross_entropy(model(data[0][0]), data[0][1]).item())
    assert losses["nbbn"] == pytest.approx(losses["torch"], rel=tol, abs=tol)
    assert losses["torch"][-1] < losses["torch"][0]  # it did learn something
    _assert_state_equal(ours, ref, tol * 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_stay_on_the_device():
    a, b = _pair(2, torch.float32)
    a, b = a.cuda(), b.cuda()
    x = torch.randn(8, 3, 6, 6, device="cuda", requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ya, yb = a(x), b(x2)
    assert ya.is_cuda
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    _assert_state_equal(a, b, 1e-5)
