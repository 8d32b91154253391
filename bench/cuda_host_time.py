"""Host time of nbbn's device calls, with every kernel launch stubbed (no GPU needed).

Runs nbbn's device path in Numba's CUDA simulator with the launches replaced by a stub that
counts them and their array arguments: what remains is nbbn's Python per call (argument
checks, plans, views, allocations, launch configurations) plus the simulator's own array
objects (``cuda.device_array`` and every view: NumPy-backed stand-ins that a GPU replaces
by torch/CuPy allocations and cached views). The "own" column subtracts those, counted
per call and timed alone. Numba's launch itself costs about 6.6 us plus 3.5-4 us per array
argument on a real GPU (issue 17); the estimate column adds that to the "own" time.

    NUMBA_ENABLE_CUDASIM=1 PYTHONPATH=<tree> python bench/cuda_host_time.py [--rounds 9]

Works on trees before and after the stream/workspace rewrite (it stubs whichever launch
entry point the tree has), so the same command measures both.
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

import nbbn  # noqa: E402
from nbbn._cuda import backend  # noqa: E402

LAUNCH_US, ARRAY_ARG_US = 6.6, 3.75
COUNTS = {"launches": 0, "arrays": 0, "on": False}


def _arrays(args):
    n = 0
    for a in args:
        if isinstance(a, tuple):
            n += _arrays(a)
        elif hasattr(a, "__cuda_ndarray__"):
            n += 1
    return n


def _stub(kernel, grid_block, args):
    if COUNTS["on"]:  # counted outside the timed loops
        COUNTS["launches"] += 1
        COUNTS["arrays"] += _arrays(args)


def stub_launches():
    """Replace every kernel launch of the tree with ``_stub``."""
    from nbbn._cuda import arrays
    if hasattr(arrays, "Queue"):  # launches go through Queue.launch
        arrays.Queue.launch = lambda queue, kernel, config, *args: _stub(kernel, config, args)
        return
    from nbbn._cuda import launch  # the earlier tree: launch.launch and direct kernel[...]()
    backend.launch = lambda kernel, config, *args: _stub(kernel, config, args)
    launch.launch = backend.launch

    class Stubbed:
        def __getitem__(self, config):
            return lambda *args: _stub(None, config, args)

    for name in ("copy_strided", "fill_kernel"):
        setattr(arrays, name, Stubbed())


def cases(shape, axis):
    rng = np.random.default_rng(0)
    c = shape[axis]
    x = cuda.to_device(rng.standard_normal(shape).astype(np.float32))
    dy = cuda.to_device(rng.standard_normal(shape).astype(np.float32))
    w = cuda.to_device(np.ones(c, np.float32))
    b = cuda.to_device(np.zeros(c, np.float32))
    mean = cuda.to_device(np.zeros(c, np.float32))
    var = cuda.to_device(np.ones(c, np.float32))
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    layer = nbbn.BatchNorm(c, axis=axis, device="cuda")
    return {
        "forward": lambda: nbbn.batch_norm_forward(x, w, b, axis=axis),
        "backward": lambda: nbbn.batch_norm_backward(dy, x, mean, var, w, axis=axis),
        "train": lambda: nbbn.batch_norm(x, mean, var, w, b, training=True, axis=axis),
        "eval": lambda: nbbn.batch_norm(x, mean, var, w, b, axis=axis),
        "mean_var": lambda: nbbn.mean_var(x, axis=red),
        "layer step": lambda: layer.backward(layer(x)),
    }


def _timed(fn, rounds, inner):
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner * 1e6)
    return min(times), statistics.median(times)


def simulator_arrays(fn, rounds):
    """us per call of ``fn`` spent in the simulator's array objects: its ``cuda.device_array``
    calls (each timed alone, by shape and dtype) and its other FakeCUDAArray objects (views,
    timed as ``arrays.strided`` of a flat view)."""
    from numba.cuda.simulator.cudadrv import devicearray

    from nbbn._cuda import arrays
    allocs, views = [], [0]
    init, alloc = devicearray.FakeCUDAArray.__init__, cuda.device_array

    def counting_init(self, *args, **kwargs):
        views[0] += 1
        init(self, *args, **kwargs)

    def counting_alloc(shape, dtype=np.float64, *args, **kwargs):
        allocs.append((shape, dtype))
        views[0] -= 1  # its FakeCUDAArray is part of the allocation
        return alloc(shape, dtype, *args, **kwargs)

    devicearray.FakeCUDAArray.__init__, cuda.device_array = counting_init, counting_alloc
    try:
        fn()
    finally:
        devicearray.FakeCUDAArray.__init__, cuda.device_array = init, alloc
    spent = sum(_timed(lambda s=s, d=d: alloc(s, d), rounds, 50)[0] for s, d in allocs)
    a = alloc((1024,), np.float32)
    view = _timed(lambda: arrays.strided(a, (1024,), (4,)), rounds, 200)[0]
    return spent + views[0] * view


def measure(fn, rounds, inner=200):
    lo, med = _timed(fn, rounds, inner)
    COUNTS.update(launches=0, arrays=0, on=True)
    fn()
    COUNTS["on"] = False
    own = lo - simulator_arrays(fn, rounds)
    return lo, med, own, COUNTS["launches"], COUNTS["arrays"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    stub_launches()
    print(f"{'shape':24s} {'op':10s} {'min us':>8s} {'median':>8s} {'own us':>8s} "
          f"{'launches':>8s} {'arrays':>6s} {'+Numba est.':>11s}")
    for shape, axis, label in (((64, 64, 56, 56), 1, "[64,64,56,56] NCHW"),
                               ((64, 56, 56, 64), -1, "[64,56,56,64] NHWC"),
                               ((4096, 1024), 1, "[4096,1024]"), ((32, 64), 1, "[32,64]")):
        for op, fn in cases(shape, axis).items():
            lo, med, own, launches, arrays = measure(fn, args.rounds)
            est = own + launches * LAUNCH_US + arrays * ARRAY_ARG_US
            print(f"{label:24s} {op:10s} {lo:8.1f} {med:8.1f} {own:8.1f} {launches:8d} "
                  f"{arrays:6d} {est:11.0f}", flush=True)


if __name__ == "__main__":
    main()
