"""Host vs device routing, and the CUDA array interop.

The only module that looks at ``__cuda_array_interface__`` (and at Numba's
``__cuda_ndarray__`` marker, which is all the CUDA simulator's device arrays
carry). Public functions ask ``on_device(...)`` once, before anything else;
the CUDA backend (``nbbn._cuda``, hence ``numba.cuda``) is imported only when
the answer is yes, so ``import nbbn`` and host calls never touch CUDA.

Device inputs are handled as Numba device arrays (``to_numba``: zero-copy);
results are allocated by the input's own library (``Family``), so CuPy in gives
CuPy out and torch in gives torch out, in that library's memory pool.
"""
import numpy as np

_HOST_TYPES = (np.ndarray, np.generic, int, float, bool, list, tuple)


def is_device(a):
    """True for a CUDA array: ``__cuda_array_interface__`` or Numba's ``__cuda_ndarray__``."""
    if a is None or isinstance(a, _HOST_TYPES):
        return False
    # hasattr: torch CPU tensors raise AttributeError for the interface property.
    return hasattr(a, "__cuda_ndarray__") or hasattr(a, "__cuda_array_interface__")


def on_device(**arrays):
    """True if the call's arrays live on a CUDA device, False if on the host.

    ``arrays`` are the call's array arguments by name (None = not given).
    Host and device arrays mixed in one call: TypeError naming them.
    """
    device, host = [], []
    for name, a in arrays.items():
        if a is not None:
            (device if is_device(a) else host).append(name)
    if device and host:
        raise TypeError(f"nbbn: host and CUDA device arrays mixed in one call: "
                        f"{', '.join(device)} on the device, {', '.join(host)} on the host; "
                        "move them to one side first")
    return bool(device)


def layer_stages(**arrays):
    """``nbbn.BatchNorm``'s stages (``batchnorm.LayerStages``) for a call's arrays: the
    device's where they live on a CUDA device, else the host's (mixed: TypeError)."""
    if on_device(**arrays):
        return cuda().STAGES
    from .batchnorm import HOST_STAGES  # here, not at the top: batchnorm imports this module
    return HOST_STAGES


def to_host(a):
    """``a`` as a NumPy array: host arrays as they are, CUDA arrays copied to the host."""
    return to_numba(a).copy_to_host() if is_device(a) else np.asarray(a)


_backend = None


def cuda():
    """The CUDA backend module (``nbbn._cuda.api``); RuntimeError where CUDA is unusable."""
    global _backend
    if _backend is None:
        try:
            from numba import cuda as nbcuda
        except ImportError as exc:  # pragma: no cover - numba-cuda is a dependency of [cuda]
            raise RuntimeError(
                "nbbn got a CUDA array but numba.cuda cannot be imported: install the CUDA "
                "extra, pip install 'nbbn[cuda]' (numba-cuda and the CUDA runtime "
                f"libraries) ({exc})") from exc
        if not nbcuda.is_available():
            raise RuntimeError(
                "nbbn got a CUDA array but no usable CUDA device was found: install an NVIDIA "
                "driver and pip install 'nbbn[cuda]' (numba-cuda, NVRTC), check nvidia-smi "
                "and CUDA_VISIBLE_DEVICES; for testing without a GPU set "
                "NUMBA_ENABLE_CUDASIM=1 before importing numba")
        from ._cuda import api
        _backend = api
    return _backend


# ---- interop: Numba views of any CUDA array, results of the input's own kind ----------------


def _simulator():
    from numba import cuda as nbcuda
    return bool(nbcuda.config.ENABLE_CUDASIM)


def library(a):
    """'torch', 'cupy' or 'numba': who allocates results for input ``a``."""
    top = type(a).__module__.split(".", 1)[0]
    return top if top in ("torch", "cupy") else "numba"


def to_numba(a):
    """A Numba device array over ``a``'s memory (zero-copy)."""
    from numba import cuda as nbcuda
    if hasattr(a, "__cuda_ndarray__"):
        return a
    if _simulator():
        raise RuntimeError(f"nbbn: the CUDA simulator cannot read a {type(a).__name__} "
                           "(only Numba device arrays exist there); unset NUMBA_ENABLE_CUDASIM")
    return nbcuda.as_cuda_array(a)


class _HostInterface:
    """Exposes an ``__array_interface__`` while keeping the memory's owner alive."""

    def __init__(self, interface, owner):
        self.__array_interface__ = interface
        self.owner = owner


def strided(a, shape, strides, offset=0):
    """A Numba device array over ``a``'s memory: origin at a's first element + ``offset``
    bytes, any ``shape``/``strides`` (bytes). ``a`` is a Numba device array."""
    shape, strides = tuple(int(n) for n in shape), tuple(int(s) for s in strides)
    if _simulator():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        host = a._ary  # the simulator's device memory is this NumPy array
        desc = {"data": (host.__array_interface__["data"][0] + offset, False), "shape": shape,
                "strides": strides, "typestr": host.dtype.str, "version": 3}
        return FakeCUDAArray(np.asarray(_HostInterface(desc, host)))
    from numba import cuda as nbcuda
    cai = a.__cuda_array_interface__
    desc = {"data": (cai["data"][0] + offset, False), "shape": shape, "strides": strides,
            "typestr": cai["typestr"], "version": 3}
    return nbcuda.from_cuda_array_interface(desc, owner=a, sync=False)


class Family:
    """Allocation and reshaping in the library of an input array (torch, CuPy or Numba)."""

    def __init__(self, like):
        self.like = like
        self.kind = library(like)

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
        from numba import cuda as nbcuda
        return nbcuda.device_array(shape, dtype)

    def permute(self, a, axes):
        """``a`` with its axes reordered (a view, as numpy.transpose)."""
        axes = tuple(int(i) for i in axes)
        if axes == tuple(range(len(axes))):
            return a
        if self.kind == "torch":
            return a.permute(*axes)
        if self.kind == "cupy":
            return a.transpose(axes)
        shape = [a.shape[i] for i in axes]
        strides = [a.strides[i] for i in axes]
        return strided(a, shape, strides)
