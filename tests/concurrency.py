"""Workloads shared by the reliability tests, runnable in-process or in a subprocess.

``python -m tests.concurrency threads`` runs the threaded workload and prints
"ok <calls>"; ``fork`` / ``fork-first`` run the forked-pool workload with the
parent computing before / only after forking, and print "ok <workers' launch modes>".
A failure raises (non-zero exit); an abort in Numba's threading layer kills
the process, which the caller sees as a signal or a missing "ok".
"""
import multiprocessing
import sys
import threading

import numpy as np

import nbbn
from tests import reference

# Big enough that thread_plan asks for the parallel build (>= 2**17 elements);
# the small ones run serially, so parallel and serial launches interleave.
_rng = np.random.default_rng(7)
ARRAYS = {
    "nchw": (_rng.standard_normal((16, 8, 48, 48)) * 2 + 5).astype(np.float32),
    "nhwc": _rng.standard_normal((60000, 6)),
    "flat": _rng.random(300_000) * 100,
    "ints": _rng.integers(-50, 50, (64, 4096), dtype=np.int16),
    "small": _rng.standard_normal((3, 5, 7)),
}
CASES = [
    ("nchw", "mean_var", (0, 2, 3)),
    ("nchw", "var", (0, 2, 3)),
    ("nchw", "std", None),
    ("nhwc", "mean_var", 0),
    ("nhwc", "moments", 0),
    ("flat", "var", None),
    ("flat", "mean", None),
    ("ints", "var", 1),
    ("ints", "mean_var", 0),
    ("small", "var", (0, 2)),
    ("small", "moments", 1),
]


def expected(name, op, axis):
    a = ARRAYS[name]
    m = reference.mean(a, axis)
    v = reference.var(a, axis)
    return {"mean": (m,), "var": (v,), "std": (np.sqrt(v),), "mean_var": (m, v),
            "moments": (m, reference.m2(a, axis))}[op]


def call(name, op, axis):
    """The tuple of float64 arrays nbbn returns for one case."""
    got = getattr(nbbn, op)(ARRAYS[name], axis=axis)
    if op == "moments":
        got = (got.mean, got.m2)
    elif op != "mean_var":
        got = (got,)
    return tuple(np.asarray(g, np.float64) for g in got)


def check(name, op, axis, got, want):
    rtol = 1e-5 if ARRAYS[name].dtype == np.float32 else 1e-9
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.max(np.abs(w)),
                                   err_msg=f"{op} of {name} along {axis}")


def run_threads(n_threads=8, n_calls=64):
    """n_threads threads x n_calls mixed calls started together; returns the calls checked."""
    want = {case: expected(*case) for case in CASES}
    start = threading.Barrier(n_threads)
    errors, done = [], []

    def worker(seed):
        picks = np.random.default_rng(seed).integers(0, len(CASES), n_calls)
        start.wait()
        try:
            for i in picks:
                check(*CASES[i], call(*CASES[i]), want[CASES[i]])
                done.append(1)
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return len(done)


def _child_task(i):
    """Runs in a forked worker: every case, big ones included; returns the results."""
    from nbbn._cpu import _jit
    return _jit.launch_mode(), [call(*case) for case in CASES]


def run_fork_pool(n_workers=2, n_tasks=4, parent_first=True):
    """Forked workers compute every case; with parent_first the parent did so before forking
    (parallel builds for the big ones), otherwise after the workers are done.

    Returns the workers' launch modes; raises unless every worker's results are
    bit-identical to the parent's (same nthreads split whatever the build).
    """
    parent = [call(*case) for case in CASES] if parent_first else None
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(n_workers) as pool:
        # A worker killed by the threading layer is replaced silently; its task never returns.
        results = pool.map_async(_child_task, range(n_tasks)).get(timeout=30)
    if parent is None:
        parent = [call(*case) for case in CASES]
    for _, child in results:
        for p, c in zip(parent, child, strict=True):
            for pa, ca in zip(p, c, strict=True):
                np.testing.assert_array_equal(ca, pa)
    return sorted({mode for mode, _ in results})


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "threads":
        print("ok", run_threads())
    elif what in ("fork", "fork-first"):
        print("ok", " ".join(run_fork_pool(parent_first=what == "fork")))
    else:
        raise SystemExit(f"unknown workload {what}")
