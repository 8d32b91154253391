"""The CUDA backend against the CPU path: statistics, batch norm, running buffers, layer.

Runs in Numba's CUDA simulator (tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1
unless told otherwise) on tiny shapes, with few threads per block and little
work per thread so that the multi-block and grid-level merge paths run. On a
real GPU (NUMBA_ENABLE_CUDASIM=0) the same tests run with the real launch
configuration.
"""
import warnings

import numpy as np
import pytest

import nbbn
from nbbn import _dispatch

cuda = pytest.importorskip("numba.cuda")
SIM = bool(cuda.config.ENABLE_CUDASIM)
if not SIM and not cuda.is_available():
    pytest.skip("no CUDA GPU and NUMBA_ENABLE_CUDASIM=0", allow_module_level=True)

TOL = {np.float16: dict(rtol=2e-3, atol=2e-3), np.float32: dict(rtol=1e-6, atol=1e-6),
       np.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.fixture(autouse=True)
def small_launches(monkeypatch):
    """Few threads and blocks, one element per thread: every merge path runs on tiny data."""
    from nbbn._cuda import launch
    if SIM:
        monkeypatch.setattr(launch, "THREADS", 4)
        monkeypatch.setattr(launch, "BLOCKS_PER_SM", 2)
    monkeypatch.setattr(launch, "MIN_WORK", 1)


def dev(a):
    return cuda.to_device(np.asarray(a))


def host(a):
    assert a is None or hasattr(a, "__cuda_ndarray__"), f"not a device array: {type(a)}"
    return None if a is None else a.copy_to_host()


def close(device_result, cpu_result, dtype=np.float64):
    np.testing.assert_allclose(host(device_result), cpu_result, **TOL[np.dtype(dtype).type])


# ---- statistics -------------------------------------------------------------------------------


@pytest.mark.skipif(not SIM, reason="launch sizes patched in the simulator only")
def test_small_launches_split_channels_over_blocks():
    """The shapes below take the multi-block, block-tree and grid-merge paths."""
    from nbbn._cuda.launch import columns_config, rows_config
    cfg = rows_config(3, 2, 5)
    assert cfg.parts > 1 and cfg.block[0] > 1
    cfg = columns_config(9, 2)
    assert cfg.parts > 1 and cfg.block[0] < cfg.block[0] * cfg.block[1]
    assert rows_config(1, 1, 11).parts > 1

STAT_CASES = [
    ((3, 2, 5), (0, 2)),   # rows kernel, several blocks per channel
    ((9, 2), 0),           # channels-last (columns) kernel, several blocks, merged per column
    ((2, 3, 4), 1),        # kept axes not adjacent: one device copy into layout order
    ((11,), None),         # axis=None, one channel, grid-level merge
]


@pytest.mark.parametrize("shape,axis", STAT_CASES, ids=str)
def test_statistics_match_cpu(shape, axis, rng):
    a = rng.standard_normal(shape) * 3 + 100
    d = dev(a)
    close(nbbn.mean(d, axis=axis), nbbn.mean(a, axis=axis))
    close(nbbn.var(d, axis=axis, ddof=1), nbbn.var(a, axis=axis, ddof=1))
    close(nbbn.std(d, axis=axis, keepdims=True), nbbn.std(a, axis=axis, keepdims=True))
    m, v = nbbn.mean_var(d, axis=axis, correction=1)
    m0, v0 = nbbn.mean_var(a, axis=axis, correction=1)
    close(m, m0)
    close(v, v0)
    mom = nbbn.moments(d, axis=axis)
    mom0 = nbbn.moments(a, axis=axis)
    assert mom.count == mom0.count
    close(mom.mean, mom0.mean)
    close(mom.m2, mom0.m2)


def test_statistics_dtypes_and_layouts(rng):
    a = rng.standard_normal((4, 6)).astype(np.float32) + 10
    for arr in (a, a.astype(np.float16), (a * 10).astype(np.int32), a > 10):
        r = nbbn.var(dev(arr), axis=0)
        r0 = nbbn.var(arr, axis=0)
        assert host(r).dtype == r0.dtype
        close(r, r0, np.float32 if arr.dtype == np.float16 else np.float64)
    # strided, transposed and reversed device views read in place or copied once
    big = dev(a)
    for view, ref in ((big[:, ::2], a[:, ::2]), (big.T, a.T), (big[::-1], a[::-1]),
                      (big[:, ::-1], a[:, ::-1])):
        close(nbbn.mean_var(view, axis=1)[1], nbbn.mean_var(ref, axis=1)[1], np.float32)
        close(nbbn.mean(view, axis=0), nbbn.mean(ref, axis=0), np.float32)


def test_statistics_out_scalar_empty_and_nonfinite(rng):
    a = rng.standard_normal((3, 4))
    out = cuda.device_array(4, np.float32)
    assert nbbn.var(dev(a), axis=0, out=out) is out
    close(out, np.var(a, axis=0).astype(np.float32), np.float32)
    strided_out = cuda.device_array((4, 2))[:, 1]
    nbbn.mean(dev(a), axis=0, out=strided_out)
    close(strided_out, a.mean(0))
    s = nbbn.std(dev(a))
    assert s.shape == ()
    close(s, np.std(a))
    with pytest.warns(RuntimeWarning):
        e = nbbn.mean(dev(np.zeros((0, 3))), axis=0)
    assert np.isnan(host(e)).all()
    with pytest.warns(RuntimeWarning):
        close(nbbn.var(dev(a), axis=0, ddof=3), nbbn.var(a, axis=0, ddof=3))
    b = a.copy()
    b[0, 0], b[1, 1], b[2, 1] = np.nan, np.inf, -np.inf
    b[:, 2] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_allclose(host(nbbn.mean(dev(b), axis=0)), np.mean(b, axis=0),
                                   rtol=1e-12)
        np.testing.assert_array_equal(np.isnan(host(nbbn.var(dev(b), axis=0))),
                                      np.isnan(np.var(b, axis=0)))
    with pytest.raises(TypeError):
        nbbn.var(dev(a), dtype=np.int64)


# ---- batch norm -------------------------------------------------------------------------------

BN_CASES = [((3, 2, 5), 1), ((6, 3), 1), ((2, 3, 2), -1), ((2, 2, 2, 3), 1)]


def make(shape, axis, dtype, rng):
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    w = (rng.random(c) + 0.5).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("shape,axis", BN_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_backward_match_cpu(shape, axis, dtype, rng):
    x, w, b, dy = make(shape, axis, dtype, rng)
    y, mean, var = nbbn.batch_norm_forward(dev(x), dev(w), dev(b), axis=axis)
    y0, mean0, var0 = nbbn.batch_norm_forward(x, w, b, axis=axis)
    assert host(y).dtype == y0.dtype and host(mean).dtype == mean0.dtype
    close(y, y0, dtype)
    close(mean, mean0, dtype)
    close(var, var0, dtype)
    dx, dw, db = nbbn.batch_norm_backward(dev(dy), dev(x), mean, var, dev(w), axis=axis)
    dx0, dw0, db0 = nbbn.batch_norm_backward(dy, x, mean0, var0, w, axis=axis)
    close(dx, dx0, dtype)
    close(dw, dw0, dtype)
    close(db, db0, dtype)
    dx, dw, db = nbbn.batch_norm_backward(dev(dy), dev(x), mean, var, axis=axis)
    assert dw is None and db is None
    close(dx, nbbn.batch_norm_backward(dy, x, mean0, var0, axis=axis)[0], dtype)


def test_float16_and_out(rng):
    x, w, b, dy = make((4, 3, 3), 1, np.float16, rng)
    y, mean, var = nbbn.batch_norm_forward(dev(x), dev(w), dev(b))
    y0, mean0, var0 = nbbn.batch_norm_forward(x, w, b)
    assert host(y).dtype == np.float16 and host(mean).dtype == np.float32
    close(y, y0, np.float16)
    close(mean, mean0, np.float16)
    dx = nbbn.batch_norm_backward(dev(dy), dev(x), mean, var, dev(w))[0]
    close(dx, nbbn.batch_norm_backward(dy, x, mean0, var0, w)[0], np.float16)
    x = x.astype(np.float32)
    out = cuda.device_array(x.shape, np.float32)
    assert nbbn.batch_norm(dev(x), None, None, training=True, out=out) is out
    close(out, nbbn.batch_norm(x, None, None, training=True), np.float32)
    out_t = cuda.device_array(x.shape[::-1], np.float32).T  # no 3-D view: written via a copy
    nbbn.batch_norm(dev(x), None, None, training=True, out=out_t)
    close(out_t, nbbn.batch_norm(x, None, None, training=True), np.float32)


@pytest.mark.parametrize("axis", [1, -1])
def test_batch_norm_running_buffers(axis, rng):
    shape = (4, 3, 2) if axis == 1 else (4, 2, 3)
    x, w, b, _ = make(shape, axis, np.float32, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    drm, drv = dev(rm), dev(rv)
    for step in range(2):
        xs = x * (step + 1) + step
        y = nbbn.batch_norm(dev(xs), drm, drv, dev(w), dev(b), training=True, momentum=0.3,
                            axis=axis)
        y0 = nbbn.batch_norm(xs, rm, rv, w, b, training=True, momentum=0.3, axis=axis)
        close(y, y0, np.float32)
        close(drm, rm, np.float32)
        close(drv, rv, np.float32)
    y = nbbn.batch_norm(dev(x), drm, drv, dev(w), dev(b), training=False, axis=axis)
    close(y, nbbn.batch_norm(x, rm, rv, w, b, training=False, axis=axis), np.float32)


def test_ema_fold_and_fold_into(rng):
    rm, rv = rng.standard_normal(3), rng.random(3) + 0.5
    mean, var = rng.standard_normal(3), rng.random(3)
    drm, drv = dev(rm), dev(rv)
    assert nbbn.ema_update(drm, drv, dev(mean), dev(var), 10, momentum=0.2) is None
    nbbn.ema_update(rm, rv, mean, var, 10, momentum=0.2)
    close(drm, rm)
    close(drv, rv)
    w, b = rng.random(3) + 0.5, rng.standard_normal(3)
    for args in ((drm, drv), (drm, drv, dev(w), dev(b))):
        scale, shift = nbbn.fold(*args, eps=1e-3)
        scale0, shift0 = nbbn.fold(*(host(a) for a in args), eps=1e-3)
        close(scale, scale0)
        close(shift, shift0)
    cw = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    cb = rng.standard_normal(3).astype(np.float32)
    for bias in (None, cb):
        wf, bf = nbbn.fold_into(dev(cw), None if bias is None else dev(bias), drm, drv,
                                dev(w), dev(b))
        wf0, bf0 = nbbn.fold_into(cw, bias, rm, rv, w, b)
        close(wf, wf0, np.float32)
        close(bf, bf0, np.float32)


def test_argument_errors_match_cpu(rng):
    x = dev(rng.standard_normal((4, 3, 2)).astype(np.float32))
    with pytest.raises(ValueError, match="weight"):
        nbbn.batch_norm_forward(x, dev(np.ones(4, np.float32)))
    with pytest.raises(ValueError, match="more than 1 value"):
        nbbn.batch_norm(dev(np.ones((1, 3))), None, None, training=True)
    with pytest.raises(TypeError):
        nbbn.batch_norm_forward(dev(np.ones((2, 3), np.int64)))
    with pytest.raises(ValueError, match="out"):
        nbbn.batch_norm_forward(x, out=cuda.device_array((4, 3, 2), np.float64))
    with pytest.raises(ValueError, match="count"):
        nbbn.ema_update(dev(np.zeros(3)), dev(np.ones(3)), dev(np.zeros(3)), dev(np.ones(3)), 1)


def test_host_and_device_mixed_is_a_type_error(rng):
    xh = rng.standard_normal((4, 3)).astype(np.float32)
    xd, wd, wh = dev(xh), dev(np.ones(3, np.float32)), np.ones(3, np.float32)
    calls = [
        lambda: nbbn.batch_norm(xd, wh, wh, training=False),
        lambda: nbbn.batch_norm(xh, None, None, wd, training=True),
        lambda: nbbn.batch_norm_forward(xd, wh),
        lambda: nbbn.batch_norm_forward(xh, out=cuda.device_array((4, 3), np.float32)),
        lambda: nbbn.batch_norm_backward(xh, xd, wd, wd),
        lambda: nbbn.ema_update(wd, wh, wd, wd, 4),
        lambda: nbbn.fold(wd, wh),
        lambda: nbbn.fold_into(xh.T.copy(), None, wd, wd),
        lambda: nbbn.var(xd, axis=0, out=np.empty(3)),
        lambda: nbbn.BatchNorm(3, device="cuda")(xh),
        lambda: nbbn.BatchNorm(3)(xd),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="mixed"):
            call()


# ---- the layer --------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_matches_cpu(momentum, rng):
    layer = nbbn.BatchNorm(3, momentum=momentum, device="cuda")
    ref = nbbn.BatchNorm(3, momentum=momentum)
    assert hasattr(layer.weight, "__cuda_ndarray__")
    w = (rng.random(3) + 0.5).astype(np.float32)
    state = {**ref.state_dict(), "weight": w}
    layer.load_state_dict({**state, "weight": dev(w)})
    ref.load_state_dict(state)
    for step in range(2):
        x = (rng.standard_normal((4, 3, 2)) + step).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        close(layer(dev(x)), ref(x), np.float32)
        close(layer.backward(dev(dy)), ref.backward(dy), np.float32)
        close(layer.grad_weight, ref.grad_weight, np.float32)
        close(layer.grad_bias, ref.grad_bias, np.float32)
    layer.eval()
    ref.eval()
    x = rng.standard_normal((4, 3, 2)).astype(np.float32)
    close(layer(dev(x)), ref(x), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    close(layer.backward(dev(dy)), ref.backward(dy), np.float32)
    sd, sd0 = layer.state_dict(), ref.state_dict()
    assert sd.keys() == sd0.keys()
    for k in sd:
        if k == "num_batches_tracked":
            assert sd[k] == sd0[k]
        else:
            close(sd[k], sd0[k], np.float32)


def test_layer_stays_on_the_device(rng, monkeypatch):
    """Training and evaluation, forward and backward: no copy to or from the host."""
    layer = nbbn.BatchNorm(3, momentum=None, device="cuda")
    x = dev(rng.standard_normal((4, 3, 2)).astype(np.float32))

    def refuse(*args, **kwargs):
        raise AssertionError("a host transfer")

    monkeypatch.setattr(cuda, "to_device", refuse)
    monkeypatch.setattr(type(x), "copy_to_host", refuse)
    for mode in (True, False):
        layer.train(mode)
        layer.backward(layer(x))
    assert int(layer.num_batches_tracked) == 1


# ---- dispatch and interop ---------------------------------------------------------------------


class FakeCAI:
    """Exposes a CUDA array interface without any memory behind it."""

    def __init__(self, shape=(2, 3), module="cupy._core.core"):
        self.shape = shape
        self.device = "cpu"
        type(self).__module__ = module

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": "<f4", "data": (0, False), "version": 3}


def test_dispatch_recognizes_device_arrays():
    assert _dispatch.is_device(dev(np.ones(2)))
    assert _dispatch.is_device(FakeCAI())
    for host_value in (np.ones(2), [1.0, 2.0], 3.0, None):
        assert not _dispatch.is_device(host_value)
    torch = pytest.importorskip("torch")
    assert not _dispatch.is_device(torch.ones(2))  # a CPU tensor's interface raises
    assert not _dispatch.on_device(a=np.ones(2), b=None)
    assert _dispatch.on_device(a=dev(np.ones(2)), b=None)
    with pytest.raises(TypeError, match="a on the device, b on the host"):
        _dispatch.on_device(a=FakeCAI(), b=np.ones(2))


def test_results_in_the_inputs_library():
    """CuPy in -> CuPy out, torch in -> torch out (allocation and views by the library)."""
    from nbbn._cuda.arrays import Family, library, queue_of
    assert library(FakeCAI(module="cupy._core.core")) == "cupy"
    assert library(FakeCAI(module="torch")) == "torch"
    assert library(dev(np.ones(2))) == "numba"
    torch = pytest.importorskip("torch")
    family = Family(torch.ones(2), None)  # a CPU tensor stands in for a CUDA one here
    buf = family.empty((2, 3, 4), np.float16)
    assert isinstance(buf, torch.Tensor) and buf.dtype == torch.float16
    assert tuple(family.permute(buf, (2, 0, 1)).shape) == (4, 2, 3)
    numba_family = Family(dev(np.ones(2)), queue_of(dev(np.ones(2))))
    buf = numba_family.empty((2, 3), np.float32)
    assert hasattr(buf, "__cuda_ndarray__")
    assert tuple(numba_family.permute(buf, (1, 0)).shape) == (3, 2)


@pytest.mark.skipif(not SIM, reason="the simulator's refusal of foreign device memory")
def test_foreign_arrays_in_the_simulator_are_refused():
    with pytest.raises(RuntimeError, match="simulator"):
        nbbn.var(FakeCAI())


def test_no_cuda_is_a_runtime_error(monkeypatch):
    monkeypatch.setattr(_dispatch, "_device", None)
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="nbbn\\[cuda\\]"):
        nbbn.var(dev(np.ones(3)))
    with pytest.raises(RuntimeError, match="nbbn\\[cuda\\]"):
        nbbn.BatchNorm(3, device="cuda")


def test_inputs_not_modified(rng):
    x = rng.standard_normal((3, 2, 4)).astype(np.float32)
    dx, dy = dev(x), dev(x[::-1].copy())
    nbbn.batch_norm_forward(dx)
    nbbn.batch_norm_backward(dy, dx, dev(np.zeros(2, np.float32)), dev(np.ones(2, np.float32)))
    nbbn.var(dx, axis=1)
    np.testing.assert_array_equal(host(dx), x)
    np.testing.assert_array_equal(host(dy), x[::-1])


def test_import_and_host_calls_do_not_load_cuda():
    import subprocess
    import sys
    code = ("import sys, numpy as np, nbbn; nbbn.var(np.ones((2, 3)), axis=0); "
            "nbbn.batch_norm_forward(np.ones((2, 3))); "
            "print(any(m.startswith('numba.cuda') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert out.strip() == "False"


def test_device_calls_from_several_threads(threaded_cuda, rng):
    """Threads calling the device path at once each get their own, correct results."""
    from concurrent.futures import ThreadPoolExecutor
    cases = []
    for i in range(12):
        x = rng.standard_normal((3, 2, 5)) * (i + 1) + i
        cases.append((i % 3, x))

    def work(case):
        kind, x = case
        xd = threaded_cuda.to_device(x)
        if kind == 0:
            return host(nbbn.var(xd, axis=(0, 2))), x.var(axis=(0, 2))
        if kind == 1:
            y, _, _ = nbbn.batch_norm_forward(xd)
            return host(y), nbbn.batch_norm_forward(x)[0]
        layer = nbbn.BatchNorm(2, dtype=np.float64, device="cuda")
        return host(layer(xd)), nbbn.BatchNorm(2, dtype=np.float64)(x)

    with ThreadPoolExecutor(4) as pool:
        for got, want in pool.map(work, cases):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


# ---- streams, workspace, launches ---------------------------------------------------------------


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch as (kernel name, stream, queue)."""
    from nbbn._cuda import arrays
    seen = []
    launch = arrays.Queue.launch

    def spy(queue, kernel, config, *args):
        seen.append((kernel.__name__, queue.stream, queue))
        return launch(queue, kernel, config, *args)

    monkeypatch.setattr(arrays.Queue, "launch", spy)
    return seen


def public_calls(x, dy, w, b):
    """Every public device function on x (dy, w, b alike), and layer steps (the layer's own
    buffers on x's stream)."""
    nbbn.mean_var(x, axis=tuple(i for i in range(x.ndim) if i != 1))
    nbbn.var(x, axis=1)
    y, mean, var = nbbn.batch_norm_forward(x, w, b)
    nbbn.batch_norm_backward(dy, x, mean, var, w)
    nbbn.batch_norm(x, None, None, w, b, training=True)
    nbbn.fold(mean, var, w, b)
    layer = nbbn.BatchNorm(x.shape[1], dtype=x.dtype, device="cuda")
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(layer, name).stream = x.stream
    layer.backward(layer(x))
    layer.eval()
    layer.backward(layer(x))


@pytest.mark.parametrize("shape", [(3, 2, 5), (6, 2)], ids=str)
def test_every_launch_runs_on_the_inputs_stream(shape, launches, rng):
    """Arrays associated with a stream: every kernel of every call goes to that stream."""
    stream = cuda.stream()
    x, w, b, dy = make(shape, 1, np.float32, rng)
    on = [dev(a) for a in (x, dy, w, b)]
    for a in on:
        a.stream = stream  # what cuda.to_device(a, stream=stream) gives on a GPU
    public_calls(*on)
    assert launches and {id(s) for _, s, _ in launches} == {id(stream)}


def test_launched_kernels_have_static_signatures(launches, rng):
    """The static table (tests/cuda_static.py, checked in test_cuda_ptx.py) lists every kernel
    the public functions launch."""
    from numba import types

    from tests import cuda_static
    listed = {name for _, name, _ in cuda_static.specializations(types)}
    for shape, axis in (((3, 2, 5), 1), ((6, 2), 1)):
        x, w, b, dy = make(shape, axis, np.float32, rng)
        public_calls(*(dev(a) for a in (x, dy, w, b)))
    nbbn.var(dev(rng.standard_normal((3, 4)))[:, ::-1], axis=0)  # a device copy
    launched = {name for name, _, _ in launches}
    assert launched - listed == set()
    assert {"moments_rows", "moments_columns", "sums_rows", "dx_columns"} <= launched


def test_no_device_allocation_per_call_but_the_results(monkeypatch, rng):
    """After a first call, a call allocates its results and nothing else (temporaries come
    from the cached workspace), and the last-block tickets are left at zero."""
    from nbbn._cuda import arrays
    x, w, b, dy = (dev(a) for a in make((3, 2, 5), 1, np.float32, rng))
    calls = {"forward": (lambda: nbbn.batch_norm_forward(x, w, b), 3),
             "backward": (lambda: nbbn.batch_norm_backward(dy, x, w, w, w), 3),
             "mean_var": (lambda: nbbn.mean_var(x, axis=(0, 2)), 2),
             "eval": (lambda: nbbn.batch_norm(x, w, w, w, b), 1)}
    allocate = cuda.device_array
    count = []
    monkeypatch.setattr(cuda, "device_array", lambda *a, **k: count.append(a) or allocate(*a, **k))
    for name, (call, results) in calls.items():
        call()
        count.clear()
        call()
        assert len(count) == results, name
    queue = arrays.queue_of(x)
    assert not host(queue.tickets(2)).any()


def test_views_of_foreign_arrays_do_not_synchronize(monkeypatch):
    """torch/CuPy arrays are viewed with their interface's stream and no synchronization;
    torch tensors that require grad are viewed detached; views are cached."""
    from nbbn._cuda import arrays
    made = []

    def view(desc, owner=None, sync=True):
        made.append((desc["stream"], sync, owner))
        return object()

    monkeypatch.setattr(arrays, "SIMULATOR", False)
    monkeypatch.setattr(cuda, "from_cuda_array_interface", view, raising=False)
    monkeypatch.setattr(arrays, "_views", {})

    class Tensor(FakeCAI):
        requires_grad = True

        @property
        def __cuda_array_interface__(self):
            if self.requires_grad:
                raise RuntimeError("Can't get __cuda_array_interface__ on Variable that "
                                   "requires grad")
            return {**super().__cuda_array_interface__, "stream": 7}

        def detach(self):
            t = Tensor(module="torch")
            t.requires_grad = False
            return t

    first = arrays.to_numba(Tensor(module="torch"))
    assert arrays.to_numba(Tensor(module="torch")) is first
    assert made == [(7, False, None)]


def test_layers_keep_their_copied_inputs(rng):
    """Inputs the kernels cannot view (copied once) stay valid from a layer's forward to its
    backward while other calls run in between."""
    layers = [nbbn.BatchNorm(2, device="cuda") for _ in range(2)]
    refs = [nbbn.BatchNorm(2) for _ in range(2)]
    xs = [rng.standard_normal((3, 2, 2, 4)).astype(np.float32)[:, :, :, :3] for _ in range(2)]
    ys = [layer(dev(np.ascontiguousarray(x.base))[:, :, :, :3]) for layer, x in zip(layers, xs)]
    ys0 = [ref(x) for ref, x in zip(refs, xs)]
    for y, y0 in zip(ys, ys0):
        close(y, y0, np.float32)
    for layer, ref, y0 in zip(layers, refs, ys0):
        close(layer.backward(dev(y0)), ref.backward(y0), np.float32)
