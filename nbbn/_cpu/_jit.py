"""Lazy, cached compilation of the CPU kernels.

Each kernel is a plain Python function written once and compiled twice on
first use: a ``parallel=True`` build for large work and a serial build
(``prange`` acts as ``range``) for small inputs, where waking the thread pool
costs more than the work. Nothing compiles at import.
"""
import threading
import warnings

import numba

# reassoc/contract let reductions vectorize; nnan/ninf would break NaN/Inf
# propagation and arcp would make x/n inexact (a constant channel's mean must
# come out exactly).
FASTMATH = {"reassoc", "contract"}

_cache_ok = True
_lock = threading.Lock()


def _compile(py_func, parallel):
    global _cache_ok
    options = dict(parallel=parallel, fastmath=FASTMATH, nogil=True)
    if _cache_ok:
        try:
            return numba.njit(cache=True, **options)(py_func)
        except RuntimeError as exc:  # no writable cache locator
            _cache_ok = False
            warnings.warn(
                f"nbbn: cannot cache compiled kernels on disk ({exc}); "
                "compiling in memory on each run. Set NUMBA_CACHE_DIR to a "
                "writable directory to cache them.",
                RuntimeWarning,
                stacklevel=4,
            )
    return numba.njit(cache=False, **options)(py_func)


class Kernel:
    """A kernel compiled lazily in a serial and a parallel flavour."""

    def __init__(self, py_func):
        self.py_func = py_func
        self._builds = {}
        self.__name__ = py_func.__name__
        self.__doc__ = py_func.__doc__

    def build(self, parallel):
        dispatcher = self._builds.get(parallel)
        if dispatcher is None:
            with _lock:
                dispatcher = self._builds.get(parallel)
                if dispatcher is None:
                    dispatcher = _compile(self.py_func, parallel)
                    self._builds[parallel] = dispatcher
        return dispatcher

    def __call__(self, *args, parallel=True):
        return self.build(parallel)(*args)


def kernel(py_func):
    """Decorator: ``@kernel`` marks a function as a lazily compiled CPU kernel."""
    return Kernel(py_func)


def helper(py_func):
    """Decorator for small functions called from kernels (inlined by Numba)."""
    return numba.njit(inline="always", fastmath=FASTMATH, cache=False)(py_func)


# Below this many elements a kernel runs serially: waking the thread pool
# costs more than the work.
PARALLEL_MIN_ELEMENTS = 1 << 17


def thread_plan(n_elements, n_items):
    """(nthreads, parallel) for a kernel over n_elements split into n_items."""
    if n_elements < PARALLEL_MIN_ELEMENTS or n_items < 2:
        return 1, False
    nthreads = min(numba.get_num_threads(), n_items)
    return nthreads, nthreads > 1
