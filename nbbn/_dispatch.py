"""Host or device, per call: the one place that picks a backend.

A call's arrays either all live on the host or all on a CUDA device
(``__cuda_array_interface__``, or Numba's ``__cuda_ndarray__`` marker, which
is all the CUDA simulator's device arrays carry); mixed is a TypeError naming
them. The device backend (``nbbn._cuda.backend``, hence ``numba.cuda``) is
imported only when a device array is seen, so ``import nbbn`` and host calls
never touch CUDA. Both backends implement the stages listed in
``nbbn._backend``.
"""
import numpy as np

from ._cpu import backend as _host
from ._layout import is_device


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


def backend(**arrays):
    """The backend for a call's arrays (by name; None = not given): the device's where they
    live on a CUDA device, else the host's (mixed: TypeError)."""
    return device() if on_device(**arrays) else _host


def plain_host(*arrays):
    """The host backend where every array is a plain NumPy ndarray (no subclass) or None, else
    None: the quick test of the small calls' path, which takes nothing else."""
    for a in arrays:
        if a is not None and type(a) is not np.ndarray:
            return None
    return _host


_device = None


def device():
    """The CUDA backend module; RuntimeError where CUDA is unusable."""
    global _device
    if _device is None:
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
        from ._cuda import backend as _cuda_backend
        _device = _cuda_backend
    return _device
