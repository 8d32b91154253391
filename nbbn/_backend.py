"""The stages a backend implements: the contract between the face and ``_cpu``/``_cuda``.

The public functions (``stats``, ``batchnorm``, ``layer``) are written once:
they validate their arguments from backend-neutral descriptions (``_layout``),
then call these stages of the backend ``_dispatch.backend`` picks. Each
backend is a module (``nbbn._cpu.backend``, ``nbbn._cuda.backend``) defining
every function below with the same parameters (a test checks it).

Conventions: ``call`` is the face's description of a batch-norm input
(``call.like``: the array as given; ``call.x``: the backend's array of it;
``call.plan``: its ``_layout.ChannelPlan``; ``call.x3``: its 3-D view).
Per-channel vectors are 1-D arrays of the backend (NumPy or Numba device
arrays); statistics and sums are float64. With virtual batches
(``call.plan.groups`` > 1, see ``_layout.ChannelPlan``) the batch statistics,
the backward sums and the coefficients are per (group, channel): vectors of
``groups * nchan`` values, group-major; weight and bias stay per channel. Arrays
returned to the caller are allocated in the library of the array they are "like" (NumPy on the host;
torch, CuPy or Numba on the device).
"""
from typing import NamedTuple, Protocol


class Epilogue(NamedTuple):
    """What the forward's elementwise pass does besides ``x * scale + shift``: add
    ``residual`` (a ``view``, shaped like x; None: nothing), then apply the ReLU where
    ``relu``; and, for a layer's backward, write x's values into ``copy`` and ``y > 0``
    (uint8) into ``mask`` (arrays from ``kept``; None: not kept)."""

    residual: object = None
    relu: bool = False
    copy: object = None
    mask: object = None


PLAIN = Epilogue()


class Backend(Protocol):
    # ---- arrays ------------------------------------------------------------------------------

    def array(self, a, name):
        """``a`` as this backend's array (shape, strides, dtype); TypeError naming ``name``
        where it is not array-like."""

    def check_writable(self, a, name):
        """Raise where ``a`` (as given) cannot be written in place (running buffers, out=)."""

    def overlap(self, a, b):
        """How arrays ``a`` and ``b`` (this backend's) share memory: None (not at all),
        "same" (the same elements in the same layout: elementwise work in place is safe)
        or "partial". Host: ``np.shares_memory``; device: the arrays' address ranges."""

    def view(self, call, a):
        """The read-only (outer, C, inner) view of ``a`` (this backend's array, shaped like
        ``call.x``) in ``call``'s layout; one copy where strides forbid a view."""

    def kept(self, call, dtype):
        """A new array shaped like ``call.x``, of ``dtype`` (None: x's), laid out in the
        call's layout order (its view is direct): what a layer keeps for its backward."""

    def fallback(self, op, a, **kwargs):
        """NumPy's function ``op`` (``numpy.mean``, ...) of an array whose dtype the kernels
        don't read (complex, object, longdouble, a non-float ``dtype=``): NumPy's answer on the
        host, a TypeError on the device."""

    # ---- statistics ----------------------------------------------------------------------

    def statistics(self, like, a, red, kinds, ddof, dtype, out):
        """The statistics ``kinds`` ("mean", "m2", "var", "std", "mean_low") of array ``a``
        (``like``: as given) over the ``_layout.Reduction`` ``red``, each of shape
        ``red.shape`` in ``dtype``, in like's library; ``out`` (validated, or None) receives
        the first. var/std divide m2 by count - ddof (inf or nan where that is <= 0, as
        NumPy). "mean_low" (with dtype float64) is the rest of the mean: ``mean + mean_low``
        to double-double accuracy, for merges (``Moments``)."""

    # ---- batch norm ----------------------------------------------------------------------

    def batch_moments(self, call, variance=False, mean_low=False):
        """Per-channel (per group and channel) float64 (mean, m2) of ``call.x``, or (mean,
        biased variance) with ``variance``; nan where the batch is empty. With ``mean_low``, a
        third vector: the rest of the mean (double-double, as in ``statistics``; 0 where
        empty)."""

    def coefficients(self, dtype, mean, var, weight, bias, eps):
        """Batch norm of data of ``dtype`` as ``x * scale + shift``: (scale, shift) vectors
        (mean's length) for ``affine``; weight/bias (per channel) may be None."""

    def affine(self, call, scale, shift, out, epilogue):
        """``y = x * scale[g, c] + shift[g, c]`` (g: the row's group) over ``call.x`` and the
        ``Epilogue``, into ``out`` (validated) or a new array laid out like x."""

    def forward(self, call, weight, bias, eps, out, stats_dtype, running, momentum,
                var_factor, epilogue):
        """Training forward: ``(y, mean, var)``, the batch mean and biased variance in
        ``stats_dtype``, allocated in x's library (None: float64 work vectors); where
        ``running`` = (running_mean, running_var) is given (one group only), those are
        updated in place (``ema`` with momentum, var_factor); the elementwise pass with the
        ``Epilogue``."""

    def ema(self, running_mean, running_var, mean, var, momentum, var_factor):
        """``running = (1 - momentum) * running + momentum * batch`` in place (the variance's
        batch term scaled by var_factor)."""

    def backward_sums(self, call, dy3, mean, gate3, dresidual):
        """Per-channel (per group and channel) float64 ``(sum(g), sum(g * (x - mean)))``, g
        being dy where ``gate3`` (y or a kept mask) is positive (the ReLU's gradient; None:
        g = dy); dy3 and gate3 from ``view``. With ``dresidual``, g too, as a new array like
        x in x's dtype written in the same pass: ``(sum_g, sum_g_xmu, g)``."""

    def grad_input(self, call, dy3, mean, var, weight, eps, sum_dy, sum_dy_xmu, count,
                   batch_stats, out, gate3):
        """dx from the per-channel sums, ``count`` values behind the statistics (with
        virtual batches: in each group, the last group's ``call.plan.last_count``);
        ``batch_stats``: mean/var came from x (their gradients are folded in); dy3 through
        ``gate3`` as in ``backward_sums``."""

    def param_grads(self, like, weight, var, eps, sum_dy, sum_dy_xmu):
        """(dweight, dbias) in weight's dtype, in ``like``'s library (summed over groups)."""

    def grouped_backward(self, call, dy3, mean, var, weight, eps, out, gate3, dresidual):
        """The training backward over virtual batches (``call.plan.groups`` > 1, their batch
        statistics) in one stage, where the backend has a faster way than ``backward_sums``,
        ``grad_input`` and ``param_grads``: ``(dx, dweight, dbias, g)``, dweight and dbias
        None where weight is None, ``g`` as ``backward_sums`` writes it with ``dresidual``
        (else None); or None (declined: the general stages then run, and rewrite whatever
        was written)."""

    def folded(self, w, b, scale, shift, b_dtype):
        """(w * scale per output channel (w's axis 0), b * scale + shift) as new arrays in
        w's dtype and ``b_dtype``, in w's library; ``w`` as given, ``b`` validated or None
        (then b_folded = shift)."""

    # ---- small batches: batch renorm, virtual batches, precise statistics -------------------

    def renorm_coefficients(self, dtype, mean, var, running_mean, running_var, weight, bias,
                            rmax, dmax, eps):
        """Batch renorm (Ioffe 2017), per channel: float64 ``(r, d, scale, shift)``. r, d
        from the batch's mean and biased variance and the running buffers (as they are:
        before this batch's update); scale/shift for ``affine``: batch norm's coefficients
        with the effective weight ``weight * r`` and bias ``bias + weight * d``."""

    def renorm_weight(self, weight, r):
        """Batch renorm's effective weight ``weight * r`` (float64; r where weight is None):
        with it ``grad_input`` gives renorm's dx (r and d are constants for the gradient)."""

    def renorm_grads(self, like, weight, var, r, d, eps, sum_dy, sum_dy_xmu):
        """Batch renorm's parameter gradients ``(dweight, dbias)``: ``dweight = r * sum_dy_xmu
        / sqrt(var + eps) + d * sum_dy``, ``dbias = sum_dy``, in weight's dtype, in ``like``'s
        library."""

    def merge_batches(self, state, mean, var, count, last_count):
        """Fold per-(group, channel) statistics (mean and biased var, ``groups * C`` long;
        ``count`` values per channel in each group, ``last_count`` in the last) into the
        float64 state (5, C), in place. Its rows per channel: count, mean and m2 of all
        values (Chan et al.: exact), their unbiased variance, and the count-weighted mean
        of the groups' unbiased variances. A fresh state is zeros."""

    # ---- small calls, one compiled call each -------------------------------------------------
    # Where a call's time is its steps, not its arithmetic, a backend may do the whole call in
    # one compiled call. The face validates the arguments first (the general rules, on the
    # plain cases only); a ``fused_*`` stage may still decline (None) where it does not
    # read an argument as it is, having written nothing: the general stages then run.

    def fused_reduction(self, red, a):
        """The backend's description (opaque to the face) of the reduction ``red`` (a
        ``Reduction``, its count above 0) of arrays like ``a`` for ``fused_statistics``, or
        None where it has no fused call for them. Called once per cached reduction."""

    def fused_statistics(self, small, a, kinds, ddof):
        """``statistics`` of ``kinds`` ("mean", "var", "std"; count - ddof above 0, results
        in a's dtype, no out=) in one call, or None (declined: not finite)."""

    def fused_ema(self, running_mean, running_var, mean, var, momentum, var_factor):
        """``ema`` of vectors as given (None allowed: declined), the arguments' values checked
        by the face, in one call: True, or None (declined)."""

    def fused(self, plan, x):
        """The backend's description (opaque to the face) of arrays like ``x`` (``plan``: its
        ``ChannelPlan``) for the ``fused_*`` stages, or None where it has no fused call for
        them. Called once per cached plan (x's shape, strides, dtype and axis)."""

    def fused_forward(self, small, x, weight, bias, eps, running, momentum, var_factor,
                      stats_dtype, copy):
        """``forward`` (no out=, no epilogue but ``copy``: an array from ``kept`` that x's
        values are written into, or None) in one call: ``(y, mean, var)``, mean and var None
        where ``stats_dtype`` is None; or None (declined)."""

    def fused_inference(self, small, x, running_mean, running_var, weight, bias, eps):
        """y normalized with the running statistics in one call, or None (declined)."""

    def fused_backward(self, small, dy, x, mean, var, weight, eps):
        """The training backward in one call: ``(dx, dweight, dbias)`` (None, None where
        weight is None), or None (declined)."""

    # ---- per-channel vectors -------------------------------------------------------------

    def cast(self, like, v, dtype):
        """A new copy of vector ``v`` in ``dtype``, in ``like``'s library."""

    def to_float64(self, v):
        """A float64 copy of ``v`` on this side (``v`` on the host or on this side)."""

    def to_host(self, a):
        """A NumPy array of ``a``."""

    def copy(self, a):
        """A copy of ``a`` on this side, same dtype."""

    def from_host(self, a):
        """A copy of host array ``a`` on this side, same dtype."""

    def assign(self, a, value):
        """``a[...] = value`` for ``value`` on the host or this side, of a's shape."""
