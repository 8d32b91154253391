"""CUDA backend: lazily compiled ``@cuda.jit`` kernels over the (outer, C, inner) view.

Same families and file names as ``_cpu/`` (moments, normalize, backward, ema);
``launch`` holds the launch configuration and the block-level merges,
``arrays`` the device views and copies, ``api`` the device side of the public
functions. Imported only when a device array is seen (``nbbn._dispatch``).
"""
