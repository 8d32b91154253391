"""PyTorch adapter: ``torch.nn.BatchNorm{1,2,3}d`` drop-ins computing with nbbn's kernels.

``import nbbn`` does not import this module (nor PyTorch); ``import nbbn.torch``
does. Install with the ``nbbn[torch]`` extra.

- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d` subclass
  PyTorch's classes and only replace ``forward``: constructor, parameters,
  buffers, state dict, ``train``/``eval``, ``momentum=None`` (cumulative
  average), ``affine=False``, ``track_running_stats=False``, input checks and
  ``isinstance(m, torch.nn.BatchNorm2d)`` are PyTorch's own.
- :class:`BatchNormAct1d`, :class:`BatchNormAct2d`, :class:`BatchNormAct3d` are
  the same with a fused epilogue: ``forward(x, residual=None)`` computes
  ``relu(BN(x) + residual)`` in batch norm's own pass (and its backward in
  batch norm's backward passes, the residual's gradient included); same state dict
  as PyTorch's classes.
- :func:`convert` swaps a model's ``torch.nn`` batch-norm modules for these in
  place (the same module objects, so parameters, buffers, hooks and optimizer
  references are untouched).
- :class:`BatchNormFunction` is the ``torch.autograd.Function``: forward is
  ``nbbn.batch_norm`` in training (the running buffers updated in the same call, the
  batch statistics kept for backward) or in evaluation,
  backward is ``nbbn.batch_norm_backward``. CPU tensors cross to NumPy without a
  copy (``tensor.detach().numpy()`` / ``torch.from_numpy``); CUDA tensors are
  handed to nbbn as they are (``__cuda_array_interface__``), so the work runs
  on their device and the results are CUDA tensors. nbbn's CUDA work is queued
  on Numba's default stream, PyTorch's on its current stream: the two agree
  unless the caller switched PyTorch to a side stream.
- Small batches: ``virtual_batch_size=`` (ghost batch norm) on the batch-norm
  modules; :class:`BatchRenorm1d`, :class:`BatchRenorm2d`, :class:`BatchRenorm3d`
  (batch renormalization, subclasses of the ``BatchNorm*d`` classes: same state
  dict, batch norm in evaluation); :func:`recompute_batch_norm_stats` (exact
  inference statistics, "precise BN", for any model's batch norms).

bfloat16 tensors are computed by nbbn too: on the CPU they cross to NumPy as
``ml_dtypes.bfloat16`` arrays (a view of their bits, no copy). Inputs nbbn cannot
represent (complex, devices other than CPU and CUDA) fall back to PyTorch's
operations, so a converted model still runs everywhere a PyTorch one does.
"""
import math

import ml_dtypes
import numpy as np
import torch
from torch import nn

import nbbn
from nbbn import _layout
from nbbn.batchnorm import PooledStatistics, check_convention, forward_and_update

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d",
           "BatchNormAct3d", "BatchNormFunction", "BatchRenorm1d", "BatchRenorm2d",
           "BatchRenorm3d", "BatchRenormFunction", "batch_norm", "convert",
           "recompute_batch_norm_stats"]

_NUMPY_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- tensors <-> nbbn's arrays ---------------------------------------------------------------


def _supported(x):
    """Whether nbbn can compute on ``x`` (else the PyTorch fallback is used)."""
    return x.dtype in _NUMPY_DTYPES and x.device.type in ("cpu", "cuda")


def _arr(t):
    """What nbbn is given for a tensor: a NumPy view (CPU) or the tensor itself (CUDA)."""
    if t is None:
        return None
    if t.is_cpu:
        if t.dtype is torch.bfloat16:  # NumPy has no bfloat16: ml_dtypes' over the same bits
            return t.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy(force=True)  # detached; shares memory, any strides (never a copy here)
    return t.detach()  # exposes __cuda_array_interface__; the work and results stay on the device


def _tensor(a, like):
    """A tensor for an nbbn result, without a copy: NumPy -> CPU tensor, device array -> CUDA."""
    if type(a) is np.ndarray and a.dtype.kind == "f":  # the common case first
        return torch.from_numpy(a)
    if a is None or isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        if _layout.is_bfloat16(a.dtype):
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    return torch.as_tensor(a, device=like.device)  # a Numba/CuPy device array


def _check_batch_size(x, virtual_batch_size=None):
    """PyTorch's check: batch statistics need more than one value per channel (in each
    virtual batch)."""
    if virtual_batch_size is None:  # one group
        single = x.shape[0] * math.prod(x.shape[2:]) == 1
    else:
        counts = _group_counts(x, virtual_batch_size)
        single = bool(counts) and min(counts) == 1
    if single:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {x.size()}"
                         + ("" if virtual_batch_size is None else
                            f" in virtual batches of {virtual_batch_size}"))


def _group_counts(x, virtual_batch_size):
    """Values per channel in each virtual batch (one group: the whole batch)."""
    batch = x.shape[0]
    per_sample = 1
    for s in x.shape[2:]:
        per_sample *= s
    size = max(batch, 1) if virtual_batch_size is None else virtual_batch_size
    return [min(size, batch - start) * per_sample for start in range(0, batch, size)]


# ---- the autograd Function -----------------------------------------------------------------


def _differentiable_grads(x, weight, mean, var, eps, use_batch_stats, dy,
                          virtual_batch_size=None):
    """(dx, dweight, dbias) written with PyTorch operations, so that autograd can
    differentiate them again (double backward: gradient penalties, MAML). With batch
    statistics, mean and var are recomputed from ``x``: they depend on it (per virtual
    batch: each group of ``virtual_batch_size`` samples on its own). ``dy``: the gradient
    w.r.t. BN's output (behind a ReLU, already masked)."""
    if virtual_batch_size is not None and x.shape[0] > virtual_batch_size:
        parts = [_differentiable_grads(xg, weight, None, None, eps, True, dyg)
                 for xg, dyg in zip(x.split(virtual_batch_size), dy.split(virtual_batch_size))]
        dx = torch.cat([p[0] for p in parts])
        if weight is None:
            return dx, None, None
        return dx, sum(p[1] for p in parts), sum(p[2] for p in parts)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if use_batch_stats:
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
    else:
        mean, var = mean.view(shape), var.view(shape)
    invstd = torch.rsqrt(var + eps)
    x_hat = (x - mean) * invstd
    g = dy if weight is None else dy * weight.view(shape)
    if use_batch_stats:
        dx = invstd * (g - g.mean(dims, keepdim=True)
                       - x_hat * (g * x_hat).mean(dims, keepdim=True))
    else:
        dx = g * invstd
    if weight is None:
        return dx, None, None
    return dx, (dy * x_hat).sum(dims), dy.sum(dims)


class BatchNormFunction(torch.autograd.Function):
    """Batch norm over dim 1 of ``x`` with nbbn's kernels; returns ``y``.

    ``apply(x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps,
    residual=None, activation=None, virtual_batch_size=None)``: with ``use_batch_stats``
    it normalizes with the batch statistics (per virtual batch where
    ``virtual_batch_size`` is not None) and, where running buffers are given, updates them
    in place (as ``nbbn.batch_norm``: unbiased variance, factor ``momentum``); otherwise it
    normalizes with the running buffers. ``residual`` is added and ``activation``
    ("relu") applied in the same pass. Differentiable in ``x``, ``weight``, ``bias``
    and ``residual``: the backward is
    nbbn's kernels, or, where autograd records it (``create_graph=True``), the same
    formulas in PyTorch operations, differentiable again. Forward-mode AD raises
    NotImplementedError (``batch_norm`` does for ``torch.func`` transforms, vmap included).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps,
                residual=None, activation=None, virtual_batch_size=None):
        xa, wa, ba = _arr(x), _arr(weight), _arr(bias)
        ra = None if residual is None else _arr(residual)
        ctx.eps = eps
        ctx.use_batch_stats = use_batch_stats
        ctx.activation = activation
        ctx.virtual_batch_size = virtual_batch_size
        if use_batch_stats:
            if virtual_batch_size is None:  # the running buffers updated in the same call
                ya, mean, var = forward_and_update(xa, _arr(running_mean), _arr(running_var), wa,
                                                   ba, momentum, eps, axis=1, residual=ra,
                                                   activation=activation)
            else:
                ya, mean, var = nbbn.batch_norm_forward(xa, wa, ba, eps, axis=1, residual=ra,
                                                        activation=activation,
                                                        virtual_batch_size=virtual_batch_size)
                if running_mean is not None and x.numel():  # an empty batch updates nothing
                    nbbn.ema_update(_arr(running_mean), _arr(running_var), mean, var,
                                    _group_counts(x, virtual_batch_size), momentum)
            if running_mean is not None and x.numel():
                # Written through a NumPy view: tell autograd, as an in-place op would.
                torch.autograd.graph.increment_version([running_mean, running_var])
            # The small arrays backward reads, as nbbn's (x only as a saved tensor: an
            # array here would keep it alive as long as the graph).
            ctx.arrays = wa, mean, var
            mean, var = _tensor(mean, x), _tensor(var, x)
        else:
            ya = nbbn.batch_norm(xa, _arr(running_mean), _arr(running_var), wa, ba,
                                 training=False, eps=eps, axis=1, residual=ra,
                                 activation=activation)
            # Saved as they are now: an in-place change before backward is reported by autograd.
            mean, var = running_mean, running_var
        y = _tensor(ya, x)
        # Behind the ReLU, the backward reads y (the gradient flows where y > 0).
        ctx.save_for_backward(x, weight, mean, var, y if activation else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, var, y = ctx.saved_tensors  # raises where they changed in place
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_r = len(ctx.needs_input_grad) > 8 and ctx.needs_input_grad[8]
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
            if y is not None:
                dy = dy * (y > 0)
            dx, dw, db = _differentiable_grads(x, weight, mean, var, ctx.eps,
                                               ctx.use_batch_stats, dy, ctx.virtual_batch_size)
            return (dx if need_x else None, dw if need_w else None, db if need_b else None,
                    None, None, None, None, None, dy if need_r else None, None, None)
        dya = _arr(dy)
        dx = dw = db = dr = None
        if ctx.use_batch_stats:
            xa, (wa, ma, va) = _arr(x), ctx.arrays
            if y is None and not need_r and ctx.virtual_batch_size is None:
                dx, dw, db = nbbn.batch_norm_backward(dya, xa, ma, va, wa, ctx.eps)
            else:
                dx, dw, db, *dr = nbbn.batch_norm_backward(
                    dya, xa, ma, va, wa, ctx.eps, axis=1, y=_arr(y),
                    activation=ctx.activation, residual_grad=need_r,
                    virtual_batch_size=ctx.virtual_batch_size)
                dr = dr[0] if dr else None
        else:
            xa, wa = _arr(x), _arr(weight)
            if y is not None:  # the ReLU's gradient, then the affine map's
                dy = torch.where(y > 0, dy, 0)
                dya = _arr(dy)
            dr = dy
            # Normalizing with constants is affine in x: dx = dy * weight / sqrt(var + eps),
            # which is inference batch norm of dy with a zero mean.
            if need_x:
                zeros = torch.zeros_like(var)
                dx = nbbn.batch_norm(dya, _arr(zeros), _arr(var), wa, None, training=False,
                                     eps=ctx.eps, axis=1)
            if weight is not None and (need_w or need_b):
                # dweight = sum(dy * (x - mean)) / sqrt(var + eps), dbias = sum(dy): the same
                # sums as the training backward, with the running statistics as "mean, var".
                _, dw, db = nbbn.batch_norm_backward(dya, xa, _arr(mean), _arr(var), wa, ctx.eps,
                                                     axis=1)
        return (_tensor(dx, x) if need_x else None, _tensor(dw, x) if need_w else None,
                _tensor(db, x) if need_b else None, None, None, None, None, None,
                _tensor(dr, x) if need_r else None, None, None)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            "nbbn.torch batch norm does not support forward-mode AD (torch.func.jvp, "
            "torch.autograd.forward_ad); use torch.nn.functional.batch_norm there")


class BatchRenormFunction(torch.autograd.Function):
    """Batch renormalization (training) over dim 1 of ``x`` with nbbn's kernels; returns ``y``.

    ``apply(x, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps)``:
    ``nbbn.batch_renorm_forward`` (running buffers updated in place) and
    ``nbbn.batch_renorm_backward`` (r, d constant). Differentiable in ``x``,
    ``weight`` and ``bias`` (once); forward-mode AD raises NotImplementedError.
    """

    jvp = staticmethod(BatchNormFunction.jvp)

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps):
        ya, *stats = nbbn.batch_renorm_forward(_arr(x), _arr(running_mean), _arr(running_var),
                                               _arr(weight), _arr(bias), rmax=rmax, dmax=dmax,
                                               momentum=momentum, eps=eps, axis=1)
        torch.autograd.graph.increment_version([running_mean, running_var])
        ctx.eps = eps
        ctx.save_for_backward(x, weight, *(_tensor(v, x) for v in stats))
        return _tensor(ya, x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, *stats = ctx.saved_tensors
        grads = nbbn.batch_renorm_backward(_arr(dy), _arr(x), *map(_arr, stats), _arr(weight),
                                           ctx.eps, axis=1)
        return (*(_tensor(g, x) if need else None
                  for g, need in zip(grads, ctx.needs_input_grad[:3])), *(None,) * 6)


def _check_arguments(x, running_mean, running_var, weight, bias, residual=None,
                     activation=None):
    """PyTorch's argument rules, each error naming its argument (before anything changes)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    _layout.check_activation(activation)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None, got "
                            f"{type(residual).__name__}")
        if residual.shape != x.shape or residual.dtype != x.dtype \
                or residual.device != x.device:
            raise ValueError(f"residual must have the shape, dtype and device of input "
                             f"({tuple(x.shape)}, {x.dtype}, {x.device}); got "
                             f"({tuple(residual.shape)}, {residual.dtype}, {residual.device})")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither "
                         "be None")
    channels = x.shape[1] if x.dim() > 1 else None
    for name, p in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
        if channels is not None and p.numel() != channels:
            raise ValueError(f"{name} should contain {channels} elements, not {p.numel()}")


def _composed(x, running_mean, running_var, weight, bias, training, momentum, eps, residual,
              activation):
    """PyTorch's operations for what nbbn cannot represent: batch norm, + residual, ReLU."""
    y = nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training,
                                 momentum, eps)
    if residual is not None:
        y = y + residual
    return nn.functional.relu(y) if activation else y


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, residual=None, activation=None,
               virtual_batch_size=None):
    """Drop-in for ``torch.nn.functional.batch_norm`` computing with nbbn's kernels;
    ``residual`` (shaped like x) and ``activation`` ("relu") give ``relu(BN(x) + residual)``
    in the same pass; ``virtual_batch_size`` (training): ghost batch norm."""
    _check_arguments(x, running_mean, running_var, weight, bias, residual, activation)
    if training:
        _check_batch_size(x, virtual_batch_size)
    return _checked_batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
                               eps, residual, activation, virtual_batch_size)


def _checked_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                        residual, activation, virtual_batch_size):
    """``batch_norm`` once its arguments and (in training) the batch size are checked."""
    if getattr(torch._C, "_are_functorch_transforms_active", lambda: False)():
        raise NotImplementedError(
            "nbbn.torch batch norm does not support torch.func transforms (vmap, grad, jacrev, "
            "...); use torch.nn.functional.batch_norm there")
    if not _supported(x) or x.dim() < 2:
        if virtual_batch_size is not None and training:
            raise TypeError(f"nbbn.torch: virtual batches need a float16/bfloat16/32/64 CPU "
                            f"or CUDA tensor of 2 or more dimensions, got {x.dtype} on "
                            f"{x.device}")
        return _composed(x, running_mean, running_var, weight, bias, training, momentum, eps,
                         residual, activation)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when training=False")
    return BatchNormFunction.apply(x, weight, bias, running_mean, running_var, bool(training),
                                   float(momentum), float(eps), residual, activation,
                                   virtual_batch_size if training else None)


# ---- modules -------------------------------------------------------------------------------


class _NbbnBatchNorm:
    """``forward`` of PyTorch's ``_BatchNorm``, with the arithmetic done by nbbn.

    ``virtual_batch_size`` (keyword, default None): ghost batch norm in training, as
    ``nbbn.BatchNorm``'s. Inside ``recompute_batch_norm_stats`` a training forward pools
    its batch statistics (``_nbbn_pooled``) instead of moving the running buffers.
    """

    virtual_batch_size = None  # also for modules that ``convert`` swapped in
    _nbbn_pooled = None

    def __init__(self, *args, virtual_batch_size=None, **kwargs):
        super().__init__(*args, **kwargs)
        if virtual_batch_size is not None:
            self.virtual_batch_size = _layout.check_virtual_batch_size(virtual_batch_size)

    def extra_repr(self):
        vbs = self.virtual_batch_size
        return super().extra_repr() + ("" if vbs is None else f", virtual_batch_size={vbs}")

    def forward(self, input):
        return self._normalized(input)

    def _normalized(self, input, residual=None, activation=None):
        self._check_input_dim(input)
        training = self.training
        running_mean, running_var = self.running_mean, self.running_var
        weight, bias = self.weight, self.bias
        _check_arguments(input, running_mean, running_var, weight, bias, residual, activation)
        # Batch statistics in training, and in evaluation when there are no running ones.
        use_batch_stats = training or (running_mean is None and running_var is None)
        vbs = self.virtual_batch_size if training else None
        if use_batch_stats:
            # before the counter moves: a failed call changes nothing
            _check_batch_size(input, vbs)
        if training and self._nbbn_pooled is not None:
            return self._pooled_forward(input, vbs, residual, activation)
        factor = self._count_batch()
        if training and not self.track_running_stats:  # updated in training only when tracked
            running_mean = running_var = None
        return _checked_batch_norm(input, running_mean, running_var, weight, bias,
                                   use_batch_stats, factor, self.eps, residual, activation, vbs)

    def _count_batch(self):
        """PyTorch's bookkeeping of a forward: count a training batch (tracked), and return the
        running buffers' factor (``momentum``, or 1/count for the cumulative average)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        return factor

    def _pooled_forward(self, input, vbs, residual=None, activation=None):
        """Training forward under ``recompute_batch_norm_stats`` (no autograd): the output, the
        batch statistics pooled, the running buffers and counter untouched."""
        y, mean, var = nbbn.batch_norm_forward(_arr(input), _arr(self.weight), _arr(self.bias),
                                               self.eps, axis=1, residual=_arr(residual),
                                               activation=activation, virtual_batch_size=vbs)
        counts = _group_counts(input, vbs)
        self._nbbn_pooled.add(mean, var, counts[0], counts[-1])
        return _tensor(y, input)


class BatchNorm1d(_NbbnBatchNorm, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` (input ``(N, C)`` or ``(N, C, L)``) computed by nbbn."""


class BatchNorm2d(_NbbnBatchNorm, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (input ``(N, C, H, W)``, any memory format) computed by nbbn."""


class BatchNorm3d(_NbbnBatchNorm, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` (input ``(N, C, D, H, W)``) computed by nbbn."""


class _NbbnBatchNormAct(_NbbnBatchNorm):
    """Batch norm with a fused epilogue: ``forward(x, residual=None)`` is
    ``activation(BN(x) + residual)``, computed in batch norm's own passes (forward and
    backward, the residual's gradient included)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, activation="relu", device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.activation = _layout.check_activation(activation)

    def forward(self, input, residual=None):
        return self._normalized(input, residual, self.activation)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation!r}"


class BatchNormAct1d(_NbbnBatchNormAct, nn.BatchNorm1d):
    """``BatchNorm1d`` then ``+ residual`` and ReLU, fused (input ``(N, C)``/``(N, C, L)``)."""


class BatchNormAct2d(_NbbnBatchNormAct, nn.BatchNorm2d):
    """``BatchNorm2d`` then ``+ residual`` and ReLU, fused (input ``(N, C, H, W)``)."""


class BatchNormAct3d(_NbbnBatchNormAct, nn.BatchNorm3d):
    """``BatchNorm3d`` then ``+ residual`` and ReLU, fused (input ``(N, C, D, H, W)``)."""


class _NbbnBatchRenorm(_NbbnBatchNorm):
    """Batch renormalization (Ioffe 2017) in training, batch norm in evaluation: as
    ``nbbn.BatchRenorm``, with ``rmax``/``dmax`` attributes for warm-up schedules and the
    running buffers always tracked. State dict, ``isinstance`` and evaluation are those of
    the ``torch.nn.BatchNorm*d`` it subclasses."""

    def __init__(self, num_features, eps=1e-5, momentum=0.01, affine=True, *, rmax=3.0,
                 dmax=5.0, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        self.rmax, self.dmax = _layout.check_renorm_limits(rmax, dmax)

    def extra_repr(self):
        return super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}"

    def forward(self, input):
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        _check_batch_size(input)
        if not _supported(input):
            raise TypeError(f"nbbn.torch.{type(self).__name__} computes on float16, bfloat16, "
                            f"float32 and float64 CPU or CUDA tensors, got {input.dtype} on "
                            f"{input.device}")
        if self._nbbn_pooled is not None:
            return self._pooled_forward(input, None)
        rmax, dmax = _layout.check_renorm_limits(self.rmax, self.dmax)
        return BatchRenormFunction.apply(input, self.weight, self.bias, self.running_mean,
                                         self.running_var, rmax, dmax, self._count_batch(),
                                         self.eps)

    def _pooled_forward(self, input, vbs):
        # renormalized against the running buffers, which stay as they are (copies move)
        rmax, dmax = _layout.check_renorm_limits(self.rmax, self.dmax)
        running = (_arr(self.running_mean.clone()), _arr(self.running_var.clone()))
        y, mean, var, _, _ = nbbn.batch_renorm_forward(
            _arr(input), *running, _arr(self.weight), _arr(self.bias), rmax=rmax, dmax=dmax,
            momentum=0.0, eps=self.eps, axis=1)
        self._nbbn_pooled.add(mean, var, input.numel() // input.shape[1])
        return _tensor(y, input)


class BatchRenorm1d(_NbbnBatchRenorm, nn.BatchNorm1d):
    """Batch renorm over ``(N, C)`` or ``(N, C, L)``: a ``torch.nn.BatchNorm1d``."""


class BatchRenorm2d(_NbbnBatchRenorm, nn.BatchNorm2d):
    """Batch renorm over ``(N, C, H, W)`` (any memory format): a ``torch.nn.BatchNorm2d``."""


class BatchRenorm3d(_NbbnBatchRenorm, nn.BatchNorm3d):
    """Batch renorm over ``(N, C, D, H, W)``: a ``torch.nn.BatchNorm3d``."""


_SWAPS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def convert(module):
    """Swap every ``torch.nn.BatchNorm{1,2,3}d`` in ``module`` (itself included) for nbbn's.

    The swap is in place: each batch-norm module keeps its identity, parameters,
    buffers, hooks and training mode and only changes class, so optimizers and
    state dicts made before the call keep working. Subclasses of PyTorch's
    classes (``SyncBatchNorm``, lazy modules, user subclasses, nbbn's
    ``BatchNormAct*d``) are left alone.
    Returns ``module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    for m in module.modules():
        swap = _SWAPS.get(type(m))
        if swap is not None:
            m.__class__ = swap
    return module


# ---- exact inference statistics ("precise BN") --------------------------------------------


def recompute_batch_norm_stats(model, batches, *, convention="population", forward=None):
    """Set every batch norm's running statistics in ``model`` to the exact statistics of
    ``batches`` ("precise BN"); returns ``model``.

    Runs ``forward(model, batch)`` (default ``model(batch)``) for each batch under
    ``torch.no_grad()`` in training mode: each batch-norm layer normalizes with its
    batch statistics, as in training, and pools them. Then its running buffers are set:
    ``convention="population"``: the mean and unbiased variance of all values it saw,
    merged exactly (Chan et al., float64), not an average of batch statistics;
    ``"batch_mean"``: the count-weighted mean of the batch means and of the batches'
    unbiased variances (per virtual batch with ``virtual_batch_size``). Works on
    ``torch.nn.BatchNorm1d/2d/3d`` (computed by nbbn while it runs) and nbbn's modules
    alike; other batch-norm subclasses are read by a forward pre-hook. Parameters,
    ``num_batches_tracked`` and the modules' training modes are left as they were.
    """
    check_convention(convention)
    forward = (lambda m, batch: m(batch)) if forward is None else forward
    norms = [(m, type(m), PooledStatistics(_arr(m.running_mean), m.num_features))
             for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    modes = [(m, m.training) for m in model.modules()]
    counters = [(m, m.num_batches_tracked.clone()) for m, _, _ in norms
                if m.num_batches_tracked is not None]
    hooks = []
    try:
        for m, cls, pooled in norms:
            m.__class__ = _SWAPS.get(cls, cls)  # torch.nn's modules run on nbbn meanwhile
            if isinstance(m, _NbbnBatchNorm):
                m._nbbn_pooled = pooled
            else:
                hooks.append(m.register_forward_pre_hook(_pool_input(pooled)))
        model.train()
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
        for m, _, pooled in norms:
            pooled.store(_arr(m.running_mean), _arr(m.running_var), convention)
    finally:
        for h in hooks:
            h.remove()
        for m, cls, _ in norms:
            m.__class__ = cls
            m.__dict__.pop("_nbbn_pooled", None)
        for m, counter in counters:
            m.num_batches_tracked.copy_(counter)
        for m, training in modes:
            m.training = training
    return model


def _pool_input(pooled):
    """A forward pre-hook pooling the batch statistics of a batch-norm module's input (for
    batch-norm classes nbbn does not compute)."""
    def hook(module, args):
        x = args[0]
        m = nbbn.moments(_arr(x), axis=(0, *range(2, x.dim())))
        if m.count:
            pooled.add(m.mean, m.m2 / m.count, m.count)
    return hook
