"""nbbn: Numba-accelerated batch normalization and one-pass statistics."""
from .stats import Moments, mean, mean_var, moments, std, var

__version__ = "0.1.0"

__all__ = ["Moments", "mean", "mean_var", "moments", "std", "var"]
