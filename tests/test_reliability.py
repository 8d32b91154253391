"""Reliability: threads, fork, on-disk caches and resource use (issue 6).

Process-level hazards (an aborting threading layer, a fork, a damaged cache)
run in subprocesses, so a failure is a failed test rather than a dead pytest.
"""
import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc

import numba
import numpy as np
import pytest

import nbbn
from nbbn._cpu import _jit, moments, pool
from tests import concurrency

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(args, cwd=ROOT, **env):
    """Run python with args (in the repo root by default); the CompletedProcess, never raises."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


def run_code(code, **env):
    return run_python(["-c", textwrap.dedent(code)], **env)


def layer_available(layer):
    module = {"omp": "omppool", "tbb": "tbbpool", "workqueue": "workqueue"}[layer]
    try:
        importlib.import_module(f"numba.np.ufunc.{module}")
    except (ImportError, OSError):  # e.g. tbbpool without libtbb
        return False
    return True


LAYERS = [pytest.param(layer, marks=pytest.mark.skipif(not layer_available(layer),
                                                       reason=f"no {layer} threading layer"))
          for layer in ("omp", "tbb", "workqueue")]


# --- threads ---------------------------------------------------------------------

def test_threads_in_process():
    """8 threads x 64 mixed calls under the default layer, each result checked."""
    assert concurrency.run_threads(8, 64) == 8 * 64


@pytest.mark.parametrize("layer", LAYERS)
def test_threads_under_each_layer(layer):
    """workqueue aborts the process on overlapping parallel launches unless nbbn serializes them."""
    out = run_python(["-m", "tests.concurrency", "threads"], NUMBA_THREADING_LAYER=layer)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", str(8 * 64)]


@pytest.mark.parametrize("layer, mode", [("workqueue", "exclusive"), ("omp", "concurrent")])
def test_launch_mode_follows_the_layer(layer, mode):
    if not layer_available(layer):
        pytest.skip(f"no {layer} threading layer")
    out = run_code("from nbbn._cpu import _jit; print(_jit.launch_mode())",
                   NUMBA_THREADING_LAYER=layer)
    assert out.stdout.strip() == mode, out.stderr


# --- fork ------------------------------------------------------------------------

def test_fork_after_parallel_use():
    """Workers forked from a process that ran parallel kernels compute the same bits.

    Under GNU OpenMP a child that enters the thread pool is terminated by Numba;
    nbbn's children run the serial builds instead.
    """
    concurrency.call("nchw", "var", (0, 2, 3))  # parallel build, thread pool started
    assert True in moments.moments_rows._builds
    layer = numba.threading_layer()
    expected = "serial" if layer in _jit.FORK_UNSAFE_LAYERS else _jit.launch_mode()
    assert concurrency.run_fork_pool(parent_first=True) == [expected]


def test_fork_before_parallel_use_keeps_children_parallel():
    """A parent that never started the thread pool leaves its children free to use it."""
    out = run_python(["-m", "tests.concurrency", "fork-first"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", "concurrent"]


def test_fork_under_workqueue():
    if not layer_available("workqueue"):
        pytest.skip("no workqueue threading layer")
    out = run_python(["-m", "tests.concurrency", "fork"], NUMBA_THREADING_LAYER="workqueue")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", "exclusive"]


# --- caches ----------------------------------------------------------------------

def test_damaged_cache_is_a_miss_not_a_crash(tmp_path):
    """Truncated, garbage, bit-flipped, stale or missing cache files: the right result,
    no cache hit on the damaged entry, at most one warning, and the entry rewritten."""
    out = run_python(["-m", "tests.cache_check", "damage", str(tmp_path)])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 8, out.stdout + out.stderr[-3000:]
    for line in lines:
        damage, correct, hits, warned, hits_next = line.split()
        assert (correct, hits, hits_next) == ("True", "0", "1") and int(warned) <= 1, line


def test_serial_build_never_loads_the_parallel_one(tmp_path):
    """Numba's cache key ignores parallel=; a shared entry would put the serial build in
    the thread pool (fatal in a forked child, unserialized under workqueue)."""
    first = run_python(["-m", "tests.cache_check", "layer", str(tmp_path), "parallel"])
    assert first.returncode == 0 and first.stdout.strip() != "none", first.stderr
    second = run_python(["-m", "tests.cache_check", "layer", str(tmp_path), "serial"])
    assert second.returncode == 0 and second.stdout.strip() == "none", second.stderr


def test_edit_to_a_sibling_kernel_file_invalidates_the_cache(tmp_path):
    """A constant imported from another kernel file is frozen into the machine code.

    Numba keys entries on the kernel's own file only, so without nbbn's digest of
    every kernel module the old value would be served from the cache.
    """
    pkg = tmp_path / "nbbn"
    shutil.copytree(os.path.join(ROOT, "nbbn"), pkg,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "_cpu" / "probe_const.py").write_text("SCALE = 1.0\n")
    (pkg / "_cpu" / "probe.py").write_text(textwrap.dedent("""
        from ._jit import kernel
        from .probe_const import SCALE

        @kernel
        def scaled(x):
            return x * SCALE
    """))
    code = "from nbbn._cpu.probe import scaled; print(scaled(2.0, parallel=False))"
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}
    first = run_python(["-c", code], cwd=tmp_path, **env)
    assert first.stdout.strip() == "2.0", first.stderr
    (pkg / "_cpu" / "probe_const.py").write_text("SCALE = 3.0\n")
    out = run_python(["-c", code], cwd=tmp_path, **env)
    assert out.stdout.strip() == "6.0", out.stderr


def test_read_only_and_writable_inputs_share_one_build():
    """Kernels type every array as writable: a read-only x runs the writable x's build (one
    cold compile of each kernel, not two), with the same result, and stays unchanged."""
    x = np.random.default_rng(0).standard_normal((3, 2, 5)).astype(np.float32)
    frozen = x.copy()
    frozen.flags.writeable = False
    states, finite = moments.moments_rows(x, 3, 1, parallel=False)
    frozen_states, frozen_finite = moments.moments_rows(frozen, 3, 1, parallel=False)
    assert finite and frozen_finite and np.array_equal(states, frozen_states)
    assert np.array_equal(frozen, x)
    signatures = moments.moments_rows.build(False).overloads
    assert signatures and all(t.mutable for sig in signatures for t in sig
                              if isinstance(t, numba.types.Array))


def test_serial_and_parallel_builds_share_each_threads_pass(tmp_path):
    """A kernel's serial and parallel builds call one compiled build of its thread's share
    (``_jit.share``), with one type for the thread's index in both (a fresh cache: the
    builds compile in the process)."""
    out = run_code("""
        import numba
        import numpy as np
        from nbbn._cpu import moments
        x = np.random.default_rng(1).standard_normal((2, 3, 7))
        serial = moments.moments_rows(x, 2, 2, parallel=False)
        parallel = moments.moments_rows(x, 2, 2, parallel=True)
        assert all(np.array_equal(a, b) for a, b in zip(serial, parallel))
        print(sum(sig[0] == numba.typeof(x) for sig in moments.rows_share.overloads))
    """, NUMBA_CACHE_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1"]


# --- resources -------------------------------------------------------------------

def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_memory_does_not_grow_over_10000_calls(capsys):
    """Python and Numba (NRT allocates through PyMem_RawMalloc) allocations both show here."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 512, 6)).astype(np.float32)   # rows kernel, 512 channels
    b = rng.standard_normal((50, 512))                         # columns kernel
    out = np.empty(512, np.float32)

    def calls(n):
        for i in range(n):
            nbbn.var(a, axis=(0, 2), out=out)
            nbbn.mean_var(b, axis=0)
            nbbn.moments(a, axis=(0, 2)).var(ddof=1)
            nbbn.std(b, axis=0, keepdims=True)
            nbbn.mean(a)

    calls(1000)  # compile, fill Numba's and NumPy's caches and free lists
    tracemalloc.start()
    try:
        rss0, traced0 = _rss_bytes(), tracemalloc.get_traced_memory()[0]
        calls(2000)  # 5 functions x 2000 = 10,000 calls
        rss1, traced1 = _rss_bytes(), tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    with capsys.disabled():
        print(f"\n10,000 calls: RSS growth {(rss1 - rss0) / 2**10:.0f} KiB, "
              f"traced growth {(traced1 - traced0) / 2**10:.1f} KiB")
    # Each call allocates >= 4 KiB of results and state: a leak would be >= 40 MB.
    assert traced1 - traced0 < 64 * 2**10
    assert rss1 - rss0 < 8 * 2**20


@pytest.mark.parametrize("name, shape, axis", [
    ("NCHW", (64, 64, 80, 80), (0, 2, 3)),
    ("NHWC", (64, 80, 80, 64), (0, 1, 2)),
    ("all", (64, 64, 80, 80), None),
    ("rows", (64, 64, 80, 80), 3),
])
def test_peak_temporary_memory_is_small(name, shape, axis, capsys):
    """No temporary proportional to the input (a float64 copy would be 2x the float32 input).

    What remains is per output element: float64 mean/m2 and one (count, mean, m2)
    state per thread, which dominates when there are many channels ("rows").
    """
    x = np.ones(shape, np.float32)
    nbbn.mean_var(x[:2], axis=axis)  # compile outside the measurement
    tracemalloc.start()
    try:
        result = nbbn.mean_var(x, axis=axis)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    n_out = np.asarray(result[0]).size
    with capsys.disabled():
        print(f"\n{name} mean_var of {x.nbytes / 2**20:.0f} MiB: peak temporary "
              f"{peak / 2**10:.0f} KiB = {peak / x.nbytes:.2e} of the input")
    per_output = 8 * (3 * numba.get_num_threads() + 4)  # state, float64 mean/m2, results
    assert peak < 0.01 * x.nbytes + per_output * n_out + 2**20


@pytest.mark.parametrize("axis", [1, -1], ids=["NCHW", "NHWC"])
def test_batch_norm_peak_memory_is_the_output(axis, capsys):
    """Forward and backward allocate their output and per-channel vectors, nothing input-sized."""
    x = np.random.default_rng(0).standard_normal((32, 64, 64, 64), dtype=np.float32)
    c = x.shape[axis]
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    _, mean, var = nbbn.batch_norm_forward(x[:2], w, b, axis=axis)  # compile outside
    nbbn.batch_norm_backward(x[:2], x[:2], mean, var, w, axis=axis)
    for name, call in [("forward", lambda: nbbn.batch_norm_forward(x, w, b, axis=axis)),
                       ("backward", lambda: nbbn.batch_norm_backward(x, x, mean, var, w,
                                                                     axis=axis))]:
        pool.POOL.clear()  # a fresh output, not the previous call's block
        tracemalloc.start()
        try:
            result = call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        extra = peak - result[0].nbytes
        with capsys.disabled():
            print(f"\n{name} of {x.nbytes / 2**20:.0f} MiB: peak beyond the output "
                  f"{extra / 2**10:.0f} KiB = {extra / x.nbytes:.1e} of the input")
        assert extra < 2**20
        del result


def _available_memory():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":") for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):
        return 0


@pytest.mark.skipif(_available_memory() < 6 * 2**30, reason="needs 6 GiB of free memory")
def test_more_than_2_31_elements():
    """Indices past 2**31 reach the right elements: the ones are only at the end."""
    n, tail = 2**31 + 2**20, 2**20
    a = np.zeros(n, np.int8)
    a[-tail:] = 1
    p = tail / n
    np.testing.assert_allclose(nbbn.mean_var(a), (p, p * (1 - p)), rtol=1e-9)
    # Channels-last (rows, 4): byte offsets past 2**31, one tail pattern per channel.
    b = a.view(np.bool_).reshape(-1, 4)
    b[-tail // 4:] = [True, False, True, True]
    rows, q = b.shape[0], tail / 4 / b.shape[0]
    want_mean = np.array([q, 0, q, q])
    np.testing.assert_allclose(nbbn.mean(b, axis=0), want_mean, rtol=1e-9)
    np.testing.assert_allclose(nbbn.var(b, axis=0, ddof=1),
                               want_mean * (1 - want_mean) * rows / (rows - 1), rtol=1e-9)


def test_fork_while_another_thread_compiles():
    """The child of a fork() made while a thread holds Numba's compiler lock (compiling)
    compiles and runs nbbn's kernels instead of waiting for that lock forever."""
    out = run_code("""
        import os, threading, time
        import numpy as np
        from numba.core.compiler_lock import global_compiler_lock
        import nbbn

        held = threading.Event()

        def compiling():  # as a compile holds it: a while, in another thread
            with global_compiler_lock:
                held.set()
                time.sleep(1.0)

        threading.Thread(target=compiling).start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            ok = nbbn.var(np.arange(12, dtype=np.int16).reshape(3, 4), axis=0).shape == (4,)
            os._exit(0 if ok else 1)
        deadline = time.time() + 60
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("child exit", os.waitstatus_to_exitcode(status))
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
            print("child hung")
    """)
    assert out.stdout.split() == ["child", "exit", "0"], (out.stdout, out.stderr[-2000:])
