"""What ``nbbn info`` reports: versions, threads, compilation cache, CUDA.

Every probe is guarded: a missing optional package, no GPU or an unwritable
directory is reported, never raised.
"""
import importlib
import os
import platform
import sys


def _version(module_name):
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - absent or broken: report, don't raise
        return None
    return getattr(module, "__version__", "unknown")


def versions():
    from . import __version__
    out = {"nbbn": __version__, "python": platform.python_version()}
    for name, module in [("numpy", "numpy"), ("numba", "numba"), ("llvmlite", "llvmlite"),
                         ("numba-cuda", "numba_cuda"), ("torch", "torch")]:
        out[name] = _version(module)
    return out


def threads(probe=True):
    """Numba's threading layer and thread count; with ``probe``, start the pool to see the layer."""
    import numba
    out = {
        "threading_layer_configured": numba.config.THREADING_LAYER,
        "num_threads": numba.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
    }
    try:
        from ._cpu import _jit
        out["parallel_min_elements"] = getattr(_jit, "PARALLEL_MIN_ELEMENTS", None)
    except Exception:  # noqa: BLE001
        pass
    layer = None
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        if probe:
            layer = _probe_layer()
    out["threading_layer"] = layer or "not started"
    if "torch" in sys.modules or _version("torch"):
        try:
            import torch
            out["torch_num_threads"] = torch.get_num_threads()
        except Exception:  # noqa: BLE001
            pass
    return out


def _cpu_name():
    try:
        import llvmlite.binding as ll
        return ll.get_host_cpu_name()
    except Exception:  # noqa: BLE001
        return platform.processor() or None


def _probe_layer():
    """Run one tiny parallel region (from the floor kernels) and ask which layer ran it."""
    try:
        import numba
        import numpy as np

        from ._bench.floor import floor_kernel
        floor_kernel("read", 1 << 30)(np.ones(4))
        return numba.threading_layer()
    except Exception as exc:  # noqa: BLE001
        return f"unavailable ({type(exc).__name__}: {exc})"


def cache():
    """Where compiled kernels are cached and whether that directory is writable."""
    import numba
    configured = numba.config.CACHE_DIR or None
    if configured:
        where = configured
    else:
        where = os.path.join(os.path.dirname(__file__), "_cpu", "__pycache__")
    probe = where
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    writable = bool(probe) and os.access(probe, os.W_OK)
    out = {"cache_dir": where, "cache_dir_from": "NUMBA_CACHE_DIR" if configured else "package __pycache__",
           "cache_writable": writable}
    try:
        from ._cpu import _jit
        out["cache_enabled"] = bool(getattr(_jit, "_cache_ok", True))
    except Exception:  # noqa: BLE001
        pass
    return out


def cuda():
    """CUDA availability and devices; never raises (numba-cuda may be absent, or no GPU)."""
    out = {"available": False}
    try:
        from numba import cuda as nb_cuda
    except Exception as exc:  # noqa: BLE001
        out["reason"] = f"numba.cuda unavailable ({type(exc).__name__}: {exc}); pip install 'nbbn[cuda]'"
        return out
    try:
        import numba
        out["simulator"] = bool(numba.config.ENABLE_CUDASIM)
        available = bool(nb_cuda.is_available())
        out["available"] = available
        if not available:
            out["reason"] = "no CUDA driver or GPU found"
            return out
        devices = []
        for dev in nb_cuda.list_devices():
            name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
            devices.append({"id": dev.id, "name": name,
                            "compute_capability": list(getattr(dev, "compute_capability", ()))})
        out["devices"] = devices
    except Exception as exc:  # noqa: BLE001
        out["available"] = False
        out["reason"] = f"{type(exc).__name__}: {exc}"
    return out


def collect(probe=True):
    return {"versions": versions(), "platform": platform.platform(), "threads": threads(probe),
            "cache": cache(), "cuda": cuda()}
