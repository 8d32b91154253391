"""nbbn.distributed: allreduce_moments and SyncBatchNorm against one BatchNorm on the whole batch.

Most cases run the ranks as threads of this process over an in-process
communicator (fast, exact same code path as MPI/torch past the transport);
``test_mpi_ranks`` and ``test_torch_gloo`` run real processes over
``mpiexec`` (MPICH, shared memory) and ``torch.distributed`` (gloo over
the loopback interface, file rendezvous), each bounded by a timeout.
"""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbbn
from nbbn.distributed import SyncBatchNorm, TorchComm, allreduce_moments
from tests import distributed_worker as worker
from tests import exact

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(worker.__file__).resolve()
TIMEOUT = 120  # seconds for one multi-process run (they take a few seconds)


class ThreadGroup:
    """``size`` ranks as threads; ``comm(rank)`` is rank's nbbn communicator."""

    def __init__(self, size):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=30)  # a missing rank fails, not hangs
        self.calls = 0

    def comm(self, rank):
        group = self

        class Comm:
            def __init__(self):
                self.rank, self.size = rank, group.size

            def allgather(self, a):
                group.slots[rank] = np.array(a, np.float64, copy=True)
                group.barrier.wait()
                rows = np.stack(group.slots)
                group.barrier.wait()  # nobody overwrites a slot before all have read
                if rank == 0:
                    group.calls += 1
                return rows

        return Comm()

    def run(self, fn):
        """``fn(comm, rank)`` on every rank; the results in rank order (re-raising errors)."""
        results, errors = [None] * self.size, [None] * self.size

        def target(rank):
            try:
                results[rank] = fn(self.comm(rank), rank)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                errors[rank] = exc
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,), daemon=True)
                   for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive(), "a rank did not finish"
        for exc in errors:
            if exc is not None and not isinstance(exc, threading.BrokenBarrierError):
                raise exc
        for exc in errors:
            if exc is not None:
                raise exc
        return results


# ---- in-process ranks ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3])
def test_sync_batchnorm_threads(size):
    group = ThreadGroup(size)
    results = group.run(lambda comm, rank: worker.run_rank(comm, rank, size))
    worker.compare(results, size)


@settings(max_examples=25, deadline=None)
@given(splits=st.lists(st.integers(0, 4), min_size=1, max_size=4).filter(lambda s: sum(s) >= 2),
       channels_last=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**32 - 1))
def test_sync_batchnorm_any_split(splits, channels_last, dtype, seed):
    """Any split of a batch over ranks (empty shards included) gives the whole batch's result."""
    rng = np.random.default_rng(seed)
    n, c = sum(splits), 3
    shape = (n, 2, 3, c) if channels_last else (n, c, 2, 3)
    axis = -1 if channels_last else 1
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    starts = np.cumsum([0, *splits])
    ref = nbbn.BatchNorm(c, axis=axis, dtype=dtype)
    ref.weight[:] = rng.random(c) + 0.5
    y_ref, dx_ref = ref(x), ref.backward(dy)

    def rank_fn(comm, rank):
        layer = SyncBatchNorm(c, comm=comm, axis=axis, dtype=dtype)
        layer.weight[:] = ref.weight
        sl = slice(starts[rank], starts[rank + 1])
        return layer(x[sl]), layer.backward(dy[sl]), layer

    results = ThreadGroup(len(splits)).run(rank_fn)
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), y_ref, **tol)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), dx_ref, **tol)
    for _, _, layer in results:
        for k in ("grad_weight", "grad_bias", "running_mean", "running_var"):
            np.testing.assert_allclose(getattr(layer, k), getattr(ref, k), **tol, err_msg=k)
            np.testing.assert_array_equal(getattr(layer, k), getattr(results[0][2], k))


@settings(max_examples=25, deadline=None)
@given(splits=st.lists(st.integers(0, 5), min_size=1, max_size=4),
       keepdims=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_allreduce_moments_exact(splits, keepdims, seed):
    rng = np.random.default_rng(seed)
    x = 1e3 + rng.standard_normal((sum(splits), 3, 4))
    starts = np.cumsum([0, *splits])
    for axis in [(0, 2), 0, None]:
        want = nbbn.moments(x, axis=axis, keepdims=keepdims)

        def rank_fn(comm, rank, axis=axis):
            part = x[starts[rank]:starts[rank + 1]]
            return allreduce_moments(nbbn.moments(part, axis=axis, keepdims=keepdims), comm)

        results = ThreadGroup(len(splits)).run(rank_fn)
        for got in results:
            assert got.count == want.count and type(got.count) is type(want.count)
            assert np.shape(got.mean) == np.shape(want.mean)
            np.testing.assert_allclose(got.mean, want.mean, rtol=1e-14)
            np.testing.assert_allclose(got.m2, want.m2, rtol=1e-10)
            np.testing.assert_array_equal(got.mean, results[0].mean)  # same bits everywhere
            np.testing.assert_array_equal(got.m2, results[0].m2)


@pytest.mark.parametrize("splits", [[2999, 1], [1000, 0, 999, 1001], [7, 2993]], ids=str)
def test_offset_data_merged_over_ranks_against_exact(splits):
    """1e12 + N(0, 1) over ranks: each rank's mean travels with its low part and the states
    merge pairwise in double-double, so the union is as accurate as one reduction (issue 12:
    mean within 1 ulp, var 1e-14), for allreduce_moments and SyncBatchNorm's statistics."""
    values = exact.channels(1e12, sum(splits), 2, np.random.default_rng(3))
    x = values.T.copy()  # [N, C]
    starts = np.cumsum([0, *splits])

    def rank_fn(comm, rank):
        shard = x[starts[rank]:starts[rank + 1]]
        total = allreduce_moments(nbbn.moments(shard, axis=0), comm)
        layer = SyncBatchNorm(2, momentum=1.0, comm=comm, dtype=np.float64)
        layer(shard)  # running buffers: the batch mean and the unbiased variance
        return total, layer.running_mean.copy(), layer.running_var.copy()

    n = sum(splits)
    for total, running_mean, running_var in ThreadGroup(len(splits)).run(rank_fn):
        for c in range(2):
            mean, m2 = exact.moments(values[c])
            assert exact.ulps(total.mean[c], mean) <= 1
            assert exact.relative_error(total.m2[c], m2) <= 1e-14
            assert exact.ulps(running_mean[c], mean) <= 1
            assert exact.relative_error(running_var[c], m2 / (n - 1)) <= 1e-14


def test_allreduce_moments_all_empty_and_array_counts():
    def rank_fn(comm, rank):
        empty = allreduce_moments(nbbn.moments(np.empty((0, 2)), axis=0), comm)
        counts = allreduce_moments(nbbn.Moments(np.array([rank, 1]), np.array([1.0, rank]),
                                                np.array([0.0, 0.0])), comm)
        return empty, counts

    for empty, counts in ThreadGroup(3).run(rank_fn):
        assert empty.count == 0 and np.isnan(empty.mean).all() and (empty.m2 == 0).all()
        np.testing.assert_array_equal(counts.count, [3, 3])
        np.testing.assert_allclose(counts.mean, [1.0, 1.0])
        np.testing.assert_allclose(counts.m2, [0.0, 2.0])


def test_eval_backward_and_collective_counts():
    """Eval with running statistics: the forward is local, the backward sums are global."""
    x = np.random.default_rng(0).standard_normal((6, 2, 3))
    ref = nbbn.BatchNorm(2, dtype=np.float64).eval()
    ref(x), ref.backward(x)

    def rank_fn(comm, rank, affine=True):
        layer = SyncBatchNorm(2, comm=comm, dtype=np.float64, affine=affine).eval()
        sl = slice(3 * rank, 3 * rank + 3)
        return layer(x[sl]), layer.backward(x[sl]), layer.grad_weight

    group = ThreadGroup(2)
    results = group.run(rank_fn)
    assert group.calls == 1  # the backward's sums only
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), ref.backward(x))
    for r in results:
        np.testing.assert_allclose(r[2], ref.grad_weight)
    group = ThreadGroup(2)
    group.run(lambda comm, rank: rank_fn(comm, rank, affine=False))
    assert group.calls == 0  # nothing depends on the other ranks


def test_errors():
    with pytest.raises(TypeError, match="comm must be"):
        SyncBatchNorm(3, comm=object())
    with pytest.raises(TypeError, match="comm must be"):
        allreduce_moments(nbbn.moments(np.ones(3)), comm=None)
    if importlib.util.find_spec("torch") is not None:
        with pytest.raises(RuntimeError, match="init_process_group"):
            TorchComm()
    group = ThreadGroup(1)
    layer = SyncBatchNorm(3, comm=group.comm(0))
    assert repr(layer).startswith("SyncBatchNorm(3") and "1 ranks" in repr(layer)
    with pytest.raises(ValueError, match="channels"):
        layer(np.ones((4, 2)))


def test_import_nbbn_imports_no_scale_out_dependency():
    code = ("import sys, nbbn; bad = [m for m in ('nbbn.distributed', 'nbbn.dask', 'mpi4py', "
            "'torch', 'dask') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=TIMEOUT, check=True)
    assert out.stdout.strip() == "[]"


# ---- real processes ------------------------------------------------------------------------


def _run_bounded(cmd, env, timeout=TIMEOUT):
    """Run ``cmd`` in its own process group; kill the whole group when it overruns."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd} took more than {timeout} s:\n{out}")
    return proc.returncode, out


def _local_env(**extra):
    path = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "NUMBA_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


def _load(outdir, size):
    results = []
    for rank in range(size):
        with np.load(outdir / f"rank{rank}.npz") as f:
            results.append({k: f[k] for k in f.files})
    return results


def _mpiexec():
    """MPICH's launcher: ``mpiexec.gforker`` where there (it forks the ranks and talks to them
    over pipes: no socket at all), else Hydra's ``mpiexec`` forking locally."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'nbbn[mpi]')")
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    gforker = shutil.which("mpiexec.gforker", path=path)
    if gforker is not None:
        return [gforker]
    hydra = shutil.which("mpiexec", path=path)
    if hydra is None:
        pytest.skip("no mpiexec found (pip install 'nbbn[mpi]' brings MPICH's)")
    return [hydra, "-launcher", "fork", "-host", "localhost", "-iface", "lo"]


# MPICH on this machine only: data over shared memory (UCX's sm/self transports), and
# where Hydra is the launcher, its control traffic on the loopback interface.
MPI_ENV = {"UCX_TLS": "sm,self", "UCX_NET_DEVICES": "lo", "MPIR_CVAR_CH4_NETMOD": "ucx",
           "HYDRA_IFACE": "lo", "HYDRA_LAUNCHER": "fork"}


@pytest.mark.parametrize("size", [1, 2, 3])
def test_mpi_ranks(size, tmp_path):
    cmd = [*_mpiexec(), "-n", str(size), sys.executable, "-m", "mpi4py", str(WORKER), "mpi",
           str(tmp_path)]
    rc, out = _run_bounded(cmd, _local_env(**MPI_ENV))
    assert rc == 0, out
    worker.compare(_load(tmp_path, size), size)


def test_torch_gloo(tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this PyTorch build has no gloo backend")
    size = 2
    env = _local_env(WORLD_SIZE=str(size), GLOO_SOCKET_IFNAME="lo")
    procs = []
    for rank in range(size):
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "torch", str(tmp_path)],
                                      env={**env, "RANK": str(rank)}, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    assert len(outs) == size and all(p.returncode == 0 for p in procs), "\n".join(outs)
    worker.compare(_load(tmp_path, size), size)


def test_mpi_example():
    """README's example, on 2 ranks: it checks itself against one BatchNorm."""
    cmd = [*_mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py",
           str(ROOT / "examples" / "sync_bn_mpi.py")]
    rc, out = _run_bounded(cmd, _local_env(**MPI_ENV))
    assert rc == 0 and "largest difference" in out, out


def test_submodules_load_on_first_use():
    code = ("import sys, nbbn; assert 'nbbn.distributed' not in sys.modules; "
            "print(nbbn.distributed.SyncBatchNorm.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=TIMEOUT, check=True)
    assert out.stdout.strip() == "SyncBatchNorm"
    with pytest.raises(AttributeError):
        nbbn.no_such_thing  # noqa: B018


@pytest.fixture
def cuda_ranks(threaded_cuda):
    """numba.cuda for ranks as threads (see conftest.threaded_cuda)."""
    return threaded_cuda


@pytest.mark.parametrize("axis,dtype,splits,momentum", [
    (1, np.float32, [3, 0, 2], 0.1),    # an empty shard
    (-1, np.float64, [1, 4], None),     # channels-last, cumulative average
], ids=str)
def test_sync_batchnorm_cuda(axis, dtype, splits, momentum, cuda_ranks):
    """CUDA shards: every rank equals one BatchNorm(device="cuda") and one on the host."""
    cuda = cuda_ranks
    rng = np.random.default_rng(3)
    c = 2
    shape = (sum(splits), c, 3) if axis == 1 else (sum(splits), 3, c)
    steps = [((rng.standard_normal(shape) * (k + 1) + k).astype(dtype),
              rng.standard_normal(shape).astype(dtype), training)
             for k, training in enumerate((True, True, False))]
    params = {"weight": (rng.random(c) + 0.5).astype(dtype),
              "bias": rng.standard_normal(c).astype(dtype)}
    keys = ("grad_weight", "grad_bias", "running_mean", "running_var", "num_batches_tracked")

    def run(layer, rows=slice(None)):
        on_device = layer.device == "cuda"
        put = cuda.to_device if on_device else np.asarray
        get = (lambda a: a.copy_to_host()) if on_device else np.array  # copies
        layer.load_state_dict(params, strict=False)
        results = []
        for x, dy, training in steps:
            y = get(layer.train(training)(put(x[rows])))
            dx = get(layer.backward(put(dy[rows])))
            results.append([y, dx, *(get(getattr(layer, k)) for k in keys[:4]),
                            layer.num_batches_tracked.copy()])
        return results

    kw = dict(momentum=momentum, axis=axis, dtype=dtype)
    starts = np.cumsum([0, *splits])
    ranks = ThreadGroup(len(splits)).run(lambda comm, rank: run(
        SyncBatchNorm(c, comm=comm, device="cuda", **kw), slice(starts[rank], starts[rank + 1])))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for want in (run(nbbn.BatchNorm(c, device="cuda", **kw)), run(nbbn.BatchNorm(c, **kw))):
        for step, expected in enumerate(want):
            for i, name in enumerate(("y", "dx")):
                got = np.concatenate([r[step][i] for r in ranks])
                np.testing.assert_allclose(got, expected[i], **tol, err_msg=f"{step} {name}")
            for r in ranks:
                for name, got, value in zip(keys, r[step][2:], expected[2:]):
                    np.testing.assert_allclose(got, value, **tol, err_msg=f"{step} {name}")


def test_allreduce_moments_of_device_arrays():
    """GPU-side Moments (the CUDA simulator in tests) cross as small host vectors."""
    cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    if not cuda.is_available():
        pytest.skip("no CUDA device and the simulator is off (NUMBA_ENABLE_CUDASIM=1)")
    x = np.random.default_rng(1).standard_normal((7, 3))
    want = nbbn.moments(x, axis=0)

    def rank_fn(comm, rank):
        part = nbbn.moments(x[[0, 1, 2], :] if rank == 0 else x[3:], axis=0)
        on_device = nbbn.Moments(part.count, cuda.to_device(part.mean), cuda.to_device(part.m2))
        return allreduce_moments(on_device, comm)

    for got in ThreadGroup(2).run(rank_fn):
        assert got.count == 7
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-14)
        np.testing.assert_allclose(got.m2, want.m2, rtol=1e-12)
