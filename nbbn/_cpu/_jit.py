"""Lazy, cached compilation of the CPU kernels, and the policy for launching them.

Each kernel is a plain Python function written once and compiled twice on
first use: a ``parallel=True`` build for large work and a serial build
(``prange`` acts as ``range``) for small inputs, where waking the thread pool
costs more than the work. Nothing compiles at import.

Every kernel call goes through ``Kernel.__call__``, which owns the launch
policy (see ``launch_mode``): a parallel build is swapped for the serial one
where entering Numba's threading layer would abort the process. Both builds
split the work into the same ``nthreads`` parts, so the swap never changes a
result, not even in the last bit.
"""
import hashlib
import inspect
import os
import pathlib
import pickle
import threading
import types
import warnings

import numba
from llvmlite import ir
from numba.core import sigutils
from numba.core.types import Array
from numba.core.caching import FunctionCache, IndexDataCacheFile
from numba.core.compiler_lock import global_compiler_lock
from numba.core.registry import CPUDispatcher
from numba.extending import intrinsic, overload

from .. import _math

# reassoc/contract let reductions vectorize; nnan/ninf would break NaN/Inf
# propagation and arcp would make x/n inexact (a constant channel's mean must
# come out exactly).
FASTMATH = {"reassoc", "contract"}

# Layers whose parallel regions may be entered by several threads at once
# (workqueue aborts the process: "Concurrent access has been detected").
CONCURRENT_LAYERS = frozenset({"omp", "tbb"})
# Layers a forked child must not enter: GNU OpenMP's pool does not survive
# fork() and Numba terminates such a child.
FORK_UNSAFE_LAYERS = frozenset({"omp"})

_cache_ok = True
_lock = threading.Lock()          # guards compilation
_launch_lock = threading.Lock()   # held by the one parallel launch a non-concurrent layer allows
_concurrent = None                # None until the threading layer is known
_serial_only = False              # True in a forked child of a process that used a fork-unsafe layer
_warned = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=5)


# --- disk cache ----------------------------------------------------------------

_source_digest = None


def _kernel_sources_digest():
    """Hash of every kernel module's source (and the shared ``_math.py``, ``_bits.py``).

    Numba keys a cache entry on the function's own bytecode and its file's
    timestamp only; a helper or constant imported from a sibling file (e.g.
    ``moments.BLOCK``) is frozen into the machine code without invalidating it.
    """
    global _source_digest
    if _source_digest is None:
        h = hashlib.sha256()
        here = pathlib.Path(__file__).parent
        shared = [here.parent / "_math.py", here.parent / "_bits.py"]
        for path in sorted(here.glob("*.py")) + shared:
            h.update(path.name.encode())
            h.update(path.read_bytes())
        _source_digest = h.hexdigest()
    return _source_digest


class _CheckedCacheFile(IndexDataCacheFile):
    """Data files carry a SHA-256 of their content: a damaged file is a miss, never loaded."""

    _DIGEST = 32

    def _save_data(self, name, data):
        payload = self._dump(data)
        with self._open_for_write(self._data_path(name)) as f:
            f.write(hashlib.sha256(payload).digest() + payload)

    def _load_data(self, name):
        with open(self._data_path(name), "rb") as f:
            blob = f.read()
        digest, payload = blob[:self._DIGEST], blob[self._DIGEST:]
        if hashlib.sha256(payload).digest() != digest:
            raise ValueError(f"checksum mismatch in {self._data_path(name)}")
        return pickle.loads(payload)


class _TolerantCache(FunctionCache):
    """Numba's per-function disk cache, made safe to read whatever is on disk.

    An unreadable entry (truncated, corrupt, half-written) is a miss: the index
    is reset, the kernel recompiled and the entry rewritten. Failing to write
    only costs the next process a compile.
    """

    def __init__(self, py_func):
        super().__init__(py_func)
        self._cache_file = _CheckedCacheFile(
            cache_path=self._cache_path,
            filename_base=self._impl.filename_base,
            source_stamp=self._impl.locator.get_source_stamp(),
        )

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + (_kernel_sources_digest(),)

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except Exception as exc:  # any failure to read means "not cached"
            _warn_once("load", f"nbbn: ignoring an unreadable compiled-kernel cache entry "
                               f"in {self._cache_path} ({exc!r}); recompiling it.")
            try:
                self.flush()
            except OSError:
                pass
            return None

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except Exception as exc:
            _warn_once("save", f"nbbn: cannot write the compiled-kernel cache in "
                               f"{self._cache_path} ({exc!r}); kernels will be recompiled "
                               "in the next process.")


def _flavoured(py_func, parallel):
    """A copy of py_func named per build, so each build gets its own cache files.

    Numba's cache key ignores compile flags: with one name, the serial build
    would load the parallel machine code from disk (and enter the thread pool,
    defeating the fork and workqueue policy) or the reverse.
    """
    func = types.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__,
                              py_func.__defaults__, py_func.__closure__)
    func.__kwdefaults__ = py_func.__kwdefaults__
    func.__qualname__ = f"{py_func.__qualname__}__{'parallel' if parallel else 'serial'}"
    func.__module__ = py_func.__module__
    func.__doc__ = py_func.__doc__
    return func


def _writable(t):
    return t.copy(readonly=False) if isinstance(t, Array) and not t.mutable else t


class _Dispatcher(CPUDispatcher):
    """Numba's dispatcher, typing every array argument as writable: one build per dtype,
    dimension and layout whatever the caller's flags (read-only and writable x were two
    builds of every kernel, ~10 s each cold). The kernels never write what they read
    (the tests check every input unchanged); the arrays' data model is the same."""

    def compile(self, sig):
        args, return_type = sigutils.normalize_signature(sig)
        canonical = tuple(map(_writable, args))
        entry = super().compile(canonical if return_type is None else return_type(*canonical))
        if canonical != tuple(args):  # the caller's exact types now find this build directly
            self._insert([a._code for a in args], entry)
        return entry


def _compile(py_func, parallel):
    global _cache_ok
    func = _flavoured(py_func, parallel)
    dispatcher = _Dispatcher(func, targetoptions={"parallel": parallel, "fastmath": FASTMATH,
                                                  "nogil": True, "nopython": True})
    if _cache_ok:
        try:
            dispatcher._cache = _TolerantCache(func)  # what njit(cache=True) does, tolerant
        except RuntimeError as exc:  # no writable cache locator
            _cache_ok = False
            warnings.warn(
                f"nbbn: cannot cache compiled kernels on disk ({exc}); "
                "compiling in memory on each run. Set NUMBA_CACHE_DIR to a "
                "writable directory to cache them.",
                RuntimeWarning,
                stacklevel=4,
            )
    return dispatcher


# --- launch policy ---------------------------------------------------------------

def _active_layer():
    """The threading layer's name, selecting and starting it if needed (public Numba API)."""
    numba.get_num_threads()  # starts the layer; threading_layer() raises before that
    return numba.threading_layer()


def _started_layer():
    """The threading layer's name if this process has started one, else None."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def _concurrent_launches():
    global _concurrent
    if _concurrent is None:
        _concurrent = _active_layer() in CONCURRENT_LAYERS
    return _concurrent


def launch_mode():
    """How parallel builds run now.

    ``"serial"``: never (forked child of a process that started GNU OpenMP);
    ``"exclusive"``: one launch at a time, concurrent callers run the serial
    build (workqueue layer); ``"concurrent"``: freely (omp, tbb).
    """
    if _serial_only:
        return "serial"
    return "concurrent" if _concurrent_launches() else "exclusive"


# fork() while another thread compiles: the child would inherit Numba's compiler lock held
# by a thread it does not have, and wait for it forever at its first compile. So fork()
# waits for the compilation in progress, holding the lock across it, and both sides
# release it after.


def _before_fork():
    global_compiler_lock.acquire()


def _after_fork_in_parent():
    global_compiler_lock.release()


def _after_fork_in_child():
    global _serial_only, _lock, _launch_lock
    global_compiler_lock.release()  # held by this thread, the forking one
    # A lock held by another parent thread at fork() is never released here.
    _lock = threading.Lock()
    _launch_lock = threading.Lock()
    if _started_layer() in FORK_UNSAFE_LAYERS:
        _serial_only = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


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
        """Run the kernel; ``parallel`` is a request the launch policy may decline."""
        if parallel and not _serial_only:
            if _concurrent_launches():
                return self.build(True)(*args)
            if _launch_lock.acquire(blocking=False):
                try:
                    return self.build(True)(*args)
                finally:
                    _launch_lock.release()
        return self.build(False)(*args)


def kernel(py_func):
    """Decorator: ``@kernel`` marks a function as a lazily compiled CPU kernel."""
    return Kernel(py_func)


def helper(py_func):
    """Decorator for small functions called from kernels (inlined by Numba)."""
    return numba.njit(inline="always", fastmath=FASTMATH, cache=False)(py_func)


def share(py_func):
    """Decorator for a thread's share of a kernel's work (its ``prange`` body over the
    threads): a function of its own, called, not inlined, so that the kernel's serial and
    parallel builds compile it once per type of its arguments, not once each (inlined, a
    parallel build of a reduction took 10-15 s cold, its serial build 5). Its scratch
    arrays are its own allocations, so the compiler still knows that nothing else writes
    them (their loops vectorize without alias checks). Kernels pass the thread's index as
    ``np.int64(t)``: a parallel build's loop index is unsigned, and each type is a build."""
    return numba.njit(fastmath=FASTMATH, cache=False)(py_func)


@intrinsic
def _fma_instruction(typingctx, a, b, c):
    sig = numba.float64(numba.float64, numba.float64, numba.float64)

    def codegen(context, builder, signature, args):
        f64 = ir.DoubleType()
        fma = builder.module.declare_intrinsic("llvm.fma", [f64], ir.FunctionType(f64, [f64] * 3))
        return builder.call(fma, args)

    return sig, codegen


def _compile_shared_math():
    """Make ``_math``'s functions callable from CPU kernels, as they are written.

    Each compiles as its own strict function (no fastmath: see the module
    docstring of ``_math``) wherever a kernel calls it, dividing by zero as NumPy
    does (inf/nan: the kernels' finiteness checks then hand the call to the
    general path, which applies NumPy's rules; Numba's default raises
    ZeroDivisionError); ``_math.fma`` compiles as the fused multiply-add
    instruction.
    """
    overload(_math.fma, target="cpu")(lambda a, b, c: lambda a, b, c: _fma_instruction(a, b, c))
    for func in vars(_math).values():
        if inspect.isfunction(func) and func.__module__ == _math.__name__ and func is not _math.fma:
            def implementation(*args, _func=func):
                return _func
            implementation.__signature__ = inspect.signature(func)  # Numba checks it
            overload(func, target="cpu",
                     jit_options={"fastmath": False, "error_model": "numpy"})(implementation)


_compile_shared_math()


# Below this many elements a kernel runs serially: waking the thread pool
# costs more than the work.
PARALLEL_MIN_ELEMENTS = 1 << 17


def serial(n_elements):
    """Whether every kernel over at most n_elements runs serially (see ``thread_plan``)."""
    return n_elements < PARALLEL_MIN_ELEMENTS or numba.get_num_threads() < 2


def thread_plan(n_elements, n_items):
    """(nthreads, parallel) for a kernel over n_elements split into n_items.

    ``parallel`` is a request: ``Kernel.__call__`` may run the serial build
    (see ``launch_mode``) with the same ``nthreads`` split, hence the same result.
    """
    if n_elements < PARALLEL_MIN_ELEMENTS or n_items < 2:
        return 1, False
    nthreads = min(numba.get_num_threads(), n_items)
    return nthreads, nthreads > 1
