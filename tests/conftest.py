# The CUDA tests run in Numba's CUDA simulator unless told otherwise (a real GPU:
# NUMBA_ENABLE_CUDASIM=0). It must be set before numba is imported, hence first.
import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
if "PYTEST_XDIST_WORKER" in os.environ:  # workers share the cores: OpenMP threads wait asleep
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def threaded_cuda(monkeypatch):
    """numba.cuda for device calls from several threads: tiny launches, and in the
    simulator (which runs one kernel at a time and configures a kernel object in place:
    its own limits, not nbbn's) launches one at a time, each on its own configured copy."""
    cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    if not cuda.is_available():
        pytest.skip("no CUDA device and the simulator is off (NUMBA_ENABLE_CUDASIM=1)")
    from nbbn._cuda import launch
    monkeypatch.setattr(launch, "MIN_WORK", 1)
    if cuda.config.ENABLE_CUDASIM:
        from numba.cuda.simulator.kernel import FakeCUDAKernel
        monkeypatch.setattr(launch, "THREADS", 4)
        monkeypatch.setattr(launch, "BLOCKS_PER_SM", 2)
        lock = threading.Lock()
        configure, call = FakeCUDAKernel.__getitem__, FakeCUDAKernel.__call__

        def locked_call(kernel, *args):
            if kernel._device:  # a device function, called from inside a running kernel
                return call(kernel, *args)
            with lock:
                return call(kernel, *args)

        monkeypatch.setattr(FakeCUDAKernel, "__getitem__",
                            lambda kernel, config: configure(copy.copy(kernel), config))
        monkeypatch.setattr(FakeCUDAKernel, "__call__", locked_call)
    return cuda
