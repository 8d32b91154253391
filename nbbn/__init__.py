"""nbbn: Numba-accelerated batch normalization and one-pass statistics."""
from .batchnorm import (batch_norm, batch_norm_backward, batch_norm_forward,
                        batch_renorm_backward, batch_renorm_forward, ema_update, fold, fold_into)
from .layer import BatchNorm, BatchRenorm
from .stats import Moments, mean, mean_var, moments, std, var

__version__ = "0.1.0"

__all__ = [
    "BatchNorm", "BatchRenorm", "Moments", "batch_norm", "batch_norm_backward",
    "batch_norm_forward", "batch_renorm_backward", "batch_renorm_forward", "ema_update", "fold",
    "fold_into", "mean", "mean_var", "moments", "std", "var",
]

# Extras' modules load on first use (``nbbn.distributed.SyncBatchNorm`` after ``import nbbn``),
# so ``import nbbn`` imports neither mpi4py, torch nor dask.
_LAZY_SUBMODULES = ("distributed", "dask")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
