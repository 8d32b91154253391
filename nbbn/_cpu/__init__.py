"""CPU backend: parallel Numba kernels over the (outer, C, inner) view."""
