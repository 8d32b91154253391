"""nbbn: Numba-accelerated batch normalization and one-pass statistics."""
from .batchnorm import (batch_norm, batch_norm_backward, batch_norm_forward, ema_update, fold,
                        fold_into)
from .layer import BatchNorm
from .stats import Moments, mean, mean_var, moments, std, var

__version__ = "0.1.0"

__all__ = [
    "BatchNorm", "Moments", "batch_norm", "batch_norm_backward", "batch_norm_forward",
    "ema_update", "fold", "fold_into", "mean", "mean_var", "moments", "std", "var",
]
