"""Device arrays: interop with torch/CuPy/Numba, the caller's stream, kernel operands, a
per-stream workspace, copies.

Any CUDA array is handled as a Numba device array over its memory (``to_numba``:
zero-copy, no synchronization) that carries the caller's stream: the ``stream`` entry of
its ``__cuda_array_interface__`` (torch and CuPy put their current stream there), or a
Numba array's own stream. Every kernel of a call runs on that stream (``Queue``), in the
array's device context; nothing waits for the device. Results are allocated by the
input's own library (``Family``): torch in gives torch out, CuPy in gives CuPy out, from
that library's pool on its current stream; Numba arrays come from the stream-ordered
allocator on the call's stream (``cuMemAllocAsync``: no ``cudaMalloc``/``cudaFree``, whose
frees synchronize the device). Temporaries (partial states, tickets, coefficients) live in
a workspace cached per device, stream and thread (``Queue.work``), allocated once and
grown geometrically. Kernels read arrays as ``Operand``s: a flat element view and the
element strides of the (outer, C, inner) view, made without a copy where the strides
allow (``_layout``'s rules), else copied once on the device (``copy_strided``).
bfloat16 arrays carry ml_dtypes' dtype up to the launch, where the kernels get them as
records of their bits (``kernel_arguments``); torch's bfloat16 tensors, whose interface
names no type for them, are viewed through their 16-bit integer view.
"""
import contextlib
import functools
import threading
from typing import NamedTuple

import numpy as np
from numba import cuda

from .. import _layout
from .elements import BFLOAT16
from .launch import SIMULATOR, cdiv, target_blocks, threads
from .strided import copy_strided, fill_kernel

_CACHE_LIMIT = 256  # cached views and queues (cleared when full)

# ---- interop: Numba views of any CUDA array, results of the input's own kind ----------------


def library(a):
    """'torch', 'cupy' or 'numba': who allocates results for input ``a``."""
    top = type(a).__module__.split(".", 1)[0]
    return top if top in ("torch", "cupy") else "numba"


@functools.lru_cache(maxsize=1)
def gpu_count():
    return 1 if SIMULATOR else len(cuda.gpus)


def device_index(a):
    """The CUDA device ``a`` lives on, or None on a single-GPU machine (nothing to switch)."""
    if gpu_count() < 2:
        return None
    if hasattr(a, "__cuda_ndarray__"):
        return a.gpu_data.context.device.id
    dev = getattr(a, "device", None)
    index = getattr(dev, "index", None)  # torch
    return getattr(dev, "id", 0) if index is None else index  # CuPy


def device_context(device):
    """Numba's context of ``device`` made current (nothing to do for None)."""
    return contextlib.nullcontext() if device is None else cuda.gpus[device]


_views = {}


def to_numba(a):
    """A Numba device array over ``a``'s memory (zero-copy, no synchronization), carrying
    the stream of a's ``__cuda_array_interface__`` and made in a's device context. Views
    are cached by what they describe (address, shape, strides, dtype, stream): they own
    nothing, and are only used while the caller holds ``a``."""
    if hasattr(a, "__cuda_ndarray__"):
        return a
    if SIMULATOR:
        raise RuntimeError(f"nbbn: the CUDA simulator cannot read a {type(a).__name__} "
                           "(only Numba device arrays exist there); unset NUMBA_ENABLE_CUDASIM")
    if getattr(a, "requires_grad", False):  # torch hides the interface of such tensors
        a = a.detach()
    dtype = None
    if library(a) == "torch" and str(getattr(a, "dtype", "")) == "torch.bfloat16":
        import ml_dtypes
        import torch
        a, dtype = a.view(torch.int16), np.dtype(ml_dtypes.bfloat16)
    cai = a.__cuda_array_interface__
    device = device_index(a)
    strides = cai.get("strides")
    key = (cai["data"][0], tuple(cai["shape"]), None if strides is None else tuple(strides),
           cai["typestr"], cai.get("stream"), device)
    view = _views.get(key)
    if view is None:
        with device_context(device):
            view = cuda.from_cuda_array_interface(cai, owner=None, sync=False)
        if dtype is not None:
            view = strided(view, view.shape, view.strides, dtype=dtype)
        if len(_views) >= _CACHE_LIMIT:
            _views.clear()
        _views[key] = view
    return view


class _HostInterface:
    """Exposes an ``__array_interface__`` while keeping the memory's owner alive."""

    def __init__(self, interface, owner):
        self.__array_interface__ = interface
        self.owner = owner


def strided(a, shape, strides, offset=0, stream=None, dtype=None):
    """A Numba device array over ``a``'s memory: origin at a's first element + ``offset``
    bytes, any ``shape``/``strides`` (bytes), of a's dtype (or ``dtype``), on a's stream (or
    ``stream``). ``a`` is a Numba device array; the view keeps it alive."""
    shape, strides = tuple(int(n) for n in shape), tuple(int(s) for s in strides)
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        host = a._ary  # the simulator's device memory is this NumPy array
        desc = {"data": (host.__array_interface__["data"][0] + offset, False), "shape": shape,
                "strides": strides, "typestr": dtype.str, "version": 3}
        memory = np.asarray(_HostInterface(desc, host))
        # A dtype the typestr cannot name (bfloat16, records: "V2") is viewed back.
        view = FakeCUDAArray(memory if memory.dtype == dtype else memory.view(dtype))
        view.stream = a.stream if stream is None else stream
        return view
    from numba.cuda.cudadrv import devicearray, driver
    ptr = (a.device_ctypes_pointer.value or 0) + offset
    size = driver.memory_size_from_info(shape, strides, dtype.itemsize) if all(shape) else 0
    context = getattr(a.gpu_data, "context", None) or cuda.current_context()
    data = driver.MemoryPointer(context, driver.binding.CUdeviceptr(ptr), size, owner=a)
    return devicearray.DeviceNDArray(shape, strides, dtype, gpu_data=data,
                                     stream=a.stream if stream is None else stream)


def stream_key(stream):
    """An int naming a Numba stream (0: Numba's default stream)."""
    if isinstance(stream, int):
        return stream
    handle = getattr(stream, "handle", None)
    return id(stream) if handle is None else int(handle)  # the simulator's have no handle


# ---- where a call runs: device, stream, workspace ---------------------------------------------


class Queue:
    """The device and stream a call's kernels go to, with that pair's workspace (one per
    thread: a call's temporaries outlive its launches, and threads sharing a stream would
    otherwise overwrite each other's). Launches never wait for the device."""

    def __init__(self, stream, device):
        self.stream = stream
        self.device = device
        self._buffers = {}  # purpose -> byte buffer
        self._views = {}    # (purpose, shape, dtype) -> view of the buffer
        self._owners = []   # torch tensors behind buffers made during a graph capture

    def launch(self, kernel, config, *args):
        args = kernel_arguments(args)
        if self.device is None:
            kernel[config.grid, config.block, self.stream](*args)
        else:
            with cuda.gpus[self.device]:
                kernel[config.grid, config.block, self.stream](*args)

    def work(self, purpose, shape, dtype):
        """A C-contiguous device array of ``shape``/``dtype`` for temporaries of ``purpose``,
        reused by every later call on this queue (never returned to a caller)."""
        dtype = np.dtype(dtype)
        shape = tuple(int(n) for n in shape)
        key = (purpose, shape, dtype)
        view = self._views.get(key)
        if view is None:
            buf = self._buffer(purpose, max(1, int(np.prod(shape, dtype=np.int64))) * dtype.itemsize)
            view = strided(buf, shape, c_strides(shape, dtype.itemsize), stream=self.stream,
                           dtype=dtype)
            if len(self._views) >= _CACHE_LIMIT:
                self._views.clear()
            self._views[key] = view
        return view

    def tickets(self, n):
        """``n`` int32 zeros for the last-block tickets (the kernels leave them zero)."""
        return self.work("tickets", (max(n, 1),), np.int32)

    def _buffer(self, purpose, nbytes):
        buf = self._buffers.get(purpose)
        if buf is None or buf.shape[0] < nbytes:
            size = max(nbytes, 2 * buf.shape[0] if buf is not None else 256)
            buf = self._capture_buffer(size) if self._capturing() else \
                allocate(self, (size,), np.uint8, lasting=True)
            self._buffers[purpose] = buf
            self._views = {k: v for k, v in self._views.items() if k[0] != purpose}
            if purpose == "tickets":
                fill(self, buf, 0)
        return buf

    def _capturing(self):
        """Whether this stream is being captured into a CUDA graph (no cudaMalloc allowed)."""
        if SIMULATOR or not hasattr(self.stream, "handle"):
            return False
        from numba.cuda.cudadrv import driver
        status = driver.driver.cuStreamIsCapturing(self.stream.handle)
        return status != driver.binding.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE

    def _capture_buffer(self, size):
        """A workspace buffer made while the stream is captured: from torch's allocator (the
        graph's private pool), the library that captures; kept with the queue, so replays
        find it."""
        import torch
        tensor = torch.empty(size, dtype=torch.uint8,
                             device=torch.device("cuda", self.device or torch.cuda.current_device()))
        self._owners.append(tensor)
        return to_numba(tensor)

    def empty(self, shape, dtype):
        """A new Numba device array for a caller (stream-ordered where the driver has it)."""
        return allocate(self, shape, dtype, lasting=False)


def kernel_arguments(args):
    """A launch's arguments as the kernels read them: bfloat16 arrays (in tuples too) viewed
    as records of their bits (Numba has no bfloat16)."""
    if isinstance(args, tuple):
        return tuple(kernel_arguments(a) for a in args)
    dtype = getattr(args, "dtype", None)
    if dtype is not None and hasattr(args, "shape") and _layout.is_bfloat16(dtype):
        return strided(args, args.shape, args.strides, dtype=BFLOAT16)
    return args


@functools.lru_cache(maxsize=1024)
def c_strides(shape, itemsize):
    """Byte strides of a C-contiguous array."""
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


_queues = {}


def queue_of(*arrays):
    """The queue of a call over Numba arrays ``arrays``: the stream of the first that has one
    (an explicit stream: torch's and CuPy's arrays always do; ours carry their queue's),
    else Numba's default stream; the device of the first array."""
    first = None
    stream = 0
    for a in arrays:
        if a is not None:
            if first is None:
                first = a
            if a.stream:
                stream = a.stream
                break
    key = (stream_key(stream), threading.get_ident(),
           device_index(first) if gpu_count() > 1 else None)
    queue = _queues.get(key)
    if queue is None:
        if len(_queues) >= _CACHE_LIMIT:
            _queues.clear()
        queue = _queues[key] = Queue(stream, key[2])
    return queue


def allocate(queue, shape, dtype, lasting):
    """A new C-contiguous Numba device array on ``queue``: from the stream-ordered allocator
    (freed, when dropped, on the same stream: no device-wide synchronization), or, for
    ``lasting`` buffers and where the driver has no such allocator, Numba's."""
    shape = tuple(int(n) for n in shape)
    dtype = np.dtype(dtype)
    if queue.device is not None:
        with device_context(queue.device):
            return _allocate(queue, shape, dtype, lasting)
    return _allocate(queue, shape, dtype, lasting)


def _allocate(queue, shape, dtype, lasting):
    if SIMULATOR or lasting:
        return cuda.device_array(shape, dtype, stream=queue.stream)
    return _allocate_async(queue, shape, dtype)


def _allocate_async(queue, shape, dtype):
    from numba.cuda.cudadrv import devicearray, driver
    nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    handle = queue.stream.handle if hasattr(queue.stream, "handle") \
        else driver.binding.CUstream(0)
    try:
        ptr = driver.driver.cuMemAllocAsync(nbytes, handle)
    except Exception:  # no memory pools (old driver, some virtualized GPUs)
        return cuda.device_array(shape, dtype, stream=queue.stream)
    data = driver.MemoryPointer(cuda.current_context(), ptr, nbytes,
                                finalizer=functools.partial(_free_async, ptr, handle))
    return devicearray.DeviceNDArray(shape, c_strides(shape, dtype.itemsize), dtype,
                                     gpu_data=data, stream=queue.stream)


def _free_async(ptr, handle):
    from numba.cuda.cudadrv import driver
    try:
        driver.driver.cuMemFreeAsync(ptr, handle)
    except Exception:  # the context is gone (interpreter exit): its memory went with it
        pass


class Family:
    """Allocation and reshaping in the library of an input array (torch, CuPy or Numba)."""

    def __init__(self, like, queue):
        self.like = like
        self.kind = library(like)
        self.queue = queue

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        shape = tuple(int(n) for n in shape)
        if self.kind == "torch":
            import torch
            return torch.empty(shape, dtype=getattr(torch, dtype.name), device=self.like.device)
        if self.kind == "cupy":
            import cupy
            with self.like.device:
                return cupy.empty(shape, dtype)
        return self.queue.empty(shape, dtype)

    def permute(self, a, axes):
        """``a`` with its axes reordered (a view, as numpy.transpose)."""
        axes = tuple(int(i) for i in axes)
        if axes == tuple(range(len(axes))):
            return a
        if self.kind == "torch":
            return a.permute(*axes)
        if self.kind == "cupy":
            return a.transpose(axes)
        return permuted(a, axes)


# ---- kernel operands ---------------------------------------------------------------------------


class Operand(NamedTuple):
    """An array as the kernels read it: ``flat``, a 1-D element view starting at its first
    element and spanning it (``span`` elements), and the element ``strides`` and ``shape`` of
    its (outer, C, inner) view (non-negative strides)."""

    flat: object
    strides: tuple
    shape: tuple
    span: int


_flats = {}


def operand(a, shape, strides, offset=0):
    """The Operand of Numba array ``a`` read with ``shape`` and byte ``strides`` (>= 0) from
    byte ``offset``. On a GPU the flat views are cached like ``to_numba``'s (owning nothing)."""
    item = a.dtype.itemsize
    span, element_strides = _extent(tuple(shape), tuple(strides), item)
    if SIMULATOR:
        return Operand(strided(a, (span,), (item,), offset), element_strides, shape, span)
    key = (a.device_ctypes_pointer.value, offset, span, a.dtype.str, stream_key(a.stream))
    flat = _flats.get(key)
    if flat is None:
        flat = strided(a, (span,), (item,), offset)
        flat.gpu_data._owner = None  # a description of memory the caller holds
        if len(_flats) >= _CACHE_LIMIT:
            _flats.clear()
        _flats[key] = flat
    return Operand(flat, element_strides, tuple(shape), span)


@functools.lru_cache(maxsize=1024)
def _extent(shape, strides, itemsize):
    """(elements spanned, element strides) of a view of ``shape``/byte ``strides`` (>= 0)."""
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) // itemsize if all(shape) else 0
    return span, tuple(s // itemsize for s in strides)


# ---- copies ----------------------------------------------------------------------------------


class _Grid:
    def __init__(self, grid, block):
        self.grid, self.block = grid, block


def _grid_for(size):
    t = threads()
    return _Grid(max(1, min(cdiv(size, t), target_blocks() * 8)), t)


def fill(queue, a, value):
    """a[:] = value for a 1-D device array."""
    if a.shape[0]:
        queue.launch(fill_kernel, _grid_for(a.shape[0]), a, value)


def _flat(a):
    """(1-D element view spanning a's memory, index of a's first element, element strides)."""
    item = a.dtype.itemsize
    lo = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s < 0)
    hi = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s > 0)
    view = strided(a, ((hi - lo) // item + 1,), (item,), lo)
    return view, -lo // item, tuple(int(s) // item for s in a.strides)


def copy(queue, src, dst):
    """dst[...] = src (same shape, any strides and dtypes), on the device."""
    size = int(np.prod(src.shape, dtype=np.int64))
    if size == 0:
        return
    sv, sb, ss = _flat(src)
    dv, db, ds = _flat(dst)
    queue.launch(copy_strided, _grid_for(size), sv, sb, ss, dv, db, ds,
                 tuple(int(n) for n in src.shape))


def is_c_contiguous(a):
    expected = a.dtype.itemsize
    for n, s in zip(reversed(a.shape), reversed(a.strides)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def flat_view(a):
    """A C-contiguous device array as 1-D."""
    return strided(a, (int(np.prod(a.shape, dtype=np.int64)),), (a.dtype.itemsize,))


def view3(queue, a, layout, strides=None, offset=0):
    """The (outer, C, inner) Operand of device array ``a`` in ``layout`` (``strides``/
    ``offset``: a's, possibly with reduced axes flipped); one device copy into the layout's
    order where the strides forbid a view (negative strides too). The copy is a new array,
    not workspace: a layer keeps its input's view from forward to backward."""
    s3 = _view_strides(layout, tuple(a.strides) if strides is None else strides,
                       a.dtype.itemsize)
    if s3 is not None:
        return operand(a, layout.shape3, s3, offset)
    buf = queue.empty([layout.shape[i] for i in layout.order], a.dtype)
    copy(queue, permuted(a, layout.order), buf)
    return operand(buf, layout.shape3, c_strides(layout.shape3, a.dtype.itemsize))


def write_view(a, layout):
    """A writable Operand of ``a`` in ``layout``, or None where a copy is needed."""
    s3 = _view_strides(layout, tuple(a.strides), a.dtype.itemsize)
    return None if s3 is None else operand(a, layout.shape3, s3)


@functools.lru_cache(maxsize=1024)
def _view_strides(layout, strides, itemsize):
    """The byte strides of the kernels' view of an array with ``strides`` in ``layout``, or
    None where it needs a copy (no view, or negative or unaligned strides)."""
    s3 = layout.strides3(strides)
    if s3 is None or any(s < 0 or s % itemsize for s in s3):
        return None
    return s3


def permuted(a, axes):
    """Numba device array ``a`` with its axes reordered (a view)."""
    return strided(a, [a.shape[i] for i in axes], [a.strides[i] for i in axes])
