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

bfloat16 tensors are computed by nbbn too: on the CPU they cross to NumPy as
``ml_dtypes.bfloat16`` arrays (a view of their bits, no copy). Inputs nbbn cannot
represent (complex, devices other than CPU and CUDA) fall back to PyTorch's
operations, so a converted model still runs everywhere a PyTorch one does.
"""
import ml_dtypes
import numpy as np
import torch
from torch import nn

import nbbn
from nbbn import _layout
from nbbn.batchnorm import forward_and_update

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d",
           "BatchNormAct3d", "BatchNormFunction", "batch_norm", "convert"]

_NUMPY_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- tensors <-> nbbn's arrays ---------------------------------------------------------------


def _supported(x):
    """Whether nbbn can compute on ``x`` (else the PyTorch fallback is used)."""
    return x.dtype in _NUMPY_DTYPES and x.device.type in ("cpu", "cuda")


def _arr(t):
    """What nbbn is given for a tensor: a NumPy view (CPU) or the tensor itself (CUDA)."""
    if t is None:
        return None
    t = t.detach()
    if t.is_cpu:
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: ml_dtypes' over the same bits
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()  # shares memory, any strides
    return t  # exposes __cuda_array_interface__; nbbn keeps the work and results on the device


def _tensor(a, like):
    """A tensor for an nbbn result, without a copy: NumPy -> CPU tensor, device array -> CUDA."""
    if a is None or isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        if _layout.is_bfloat16(a.dtype):
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    return torch.as_tensor(a, device=like.device)  # a Numba/CuPy device array


def _check_batch_size(x):
    """PyTorch's check: batch statistics need more than one value per channel."""
    n = x.shape[0]
    for s in x.shape[2:]:
        n *= s
    if n == 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {x.size()}")


# ---- the autograd Function -----------------------------------------------------------------


def _differentiable_grads(x, weight, mean, var, eps, use_batch_stats, dy):
    """(dx, dweight, dbias) written with PyTorch operations, so that autograd can
    differentiate them again (double backward: gradient penalties, MAML). With batch
    statistics, mean and var are recomputed from ``x``: they depend on it. ``dy``: the
    gradient w.r.t. BN's output (behind a ReLU, already masked)."""
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
    residual=None, activation=None)``: with ``use_batch_stats`` it normalizes with the
    batch statistics and, where running buffers are given, updates them in place (as
    ``nbbn.batch_norm``: unbiased variance, factor ``momentum``); otherwise it
    normalizes with the running buffers. ``residual`` is added and ``activation``
    ("relu") applied in the same pass. Differentiable in ``x``, ``weight``, ``bias``
    and ``residual``: the backward is
    nbbn's kernels, or, where autograd records it (``create_graph=True``), the same
    formulas in PyTorch operations, differentiable again. Forward-mode AD raises
    NotImplementedError (``batch_norm`` does for ``torch.func`` transforms, vmap included).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps,
                residual=None, activation=None):
        xa, wa, ba = _arr(x), _arr(weight), _arr(bias)
        epilogue = dict(residual=_arr(residual), activation=activation)
        ctx.eps = eps
        ctx.use_batch_stats = use_batch_stats
        ctx.activation = activation
        if use_batch_stats:
            # The running buffers updated in the same call (not where the batch is empty).
            ya, mean, var = forward_and_update(xa, _arr(running_mean), _arr(running_var), wa, ba,
                                               momentum, eps, axis=1, **epilogue)
            if running_mean is not None and x.numel():
                # Written through a NumPy view: tell autograd, as an in-place op would.
                torch.autograd.graph.increment_version([running_mean, running_var])
            mean, var = _tensor(mean, x), _tensor(var, x)
        else:
            ya = nbbn.batch_norm(xa, _arr(running_mean), _arr(running_var), wa, ba,
                                 training=False, eps=eps, axis=1, **epilogue)
            # Saved as they are now: an in-place change before backward is reported by autograd.
            mean, var = running_mean, running_var
        y = _tensor(ya, x)
        # Behind the ReLU, the backward reads y (the gradient flows where y > 0).
        ctx.save_for_backward(x, weight, mean, var, y if activation else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, var, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_r = len(ctx.needs_input_grad) > 8 and ctx.needs_input_grad[8]
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
            if y is not None:
                dy = dy * (y > 0)
            dx, dw, db = _differentiable_grads(x, weight, mean, var, ctx.eps,
                                               ctx.use_batch_stats, dy)
            return (dx if need_x else None, dw if need_w else None, db if need_b else None,
                    None, None, None, None, None, dy if need_r else None, None)
        dya, xa, wa = _arr(dy), _arr(x), _arr(weight)
        dx = dw = db = dr = None
        if ctx.use_batch_stats:
            dx, dw, db, *dr = nbbn.batch_norm_backward(
                dya, xa, _arr(mean), _arr(var), wa, ctx.eps, axis=1, y=_arr(y),
                activation=ctx.activation, residual_grad=need_r)
            dr = dr[0] if dr else None
        else:
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
        dx = _tensor(dx, x) if need_x else None
        dw = _tensor(dw, x) if need_w else None
        db = _tensor(db, x) if need_b else None
        dr = _tensor(dr, x) if need_r else None
        return dx, dw, db, None, None, None, None, None, dr, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            "nbbn.torch batch norm does not support forward-mode AD (torch.func.jvp, "
            "torch.autograd.forward_ad); use torch.nn.functional.batch_norm there")



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
               momentum=0.1, eps=1e-5, *, residual=None, activation=None):
    """Drop-in for ``torch.nn.functional.batch_norm`` computing with nbbn's kernels;
    ``residual`` (shaped like x) and ``activation`` ("relu") give ``relu(BN(x) + residual)``
    in the same pass."""
    _check_arguments(x, running_mean, running_var, weight, bias, residual, activation)
    if getattr(torch._C, "_are_functorch_transforms_active", lambda: False)():
        raise NotImplementedError(
            "nbbn.torch batch norm does not support torch.func transforms (vmap, grad, jacrev, "
            "...); use torch.nn.functional.batch_norm there")
    if training:
        _check_batch_size(x)
    if not _supported(x) or x.dim() < 2:
        return _composed(x, running_mean, running_var, weight, bias, training, momentum, eps,
                         residual, activation)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when training=False")
    return BatchNormFunction.apply(x, weight, bias, running_mean, running_var, bool(training),
                                   float(momentum), float(eps), residual, activation)


# ---- modules -------------------------------------------------------------------------------


class _NbbnBatchNorm:
    """``forward`` of PyTorch's ``_BatchNorm``, with the arithmetic done by nbbn."""

    def forward(self, input):
        return self._normalized(input)

    def _normalized(self, input, residual=None, activation=None):
        self._check_input_dim(input)
        _check_arguments(input, None, None, None, None, residual, activation)
        factor = 0.0 if self.momentum is None else self.momentum
        # Batch statistics in training, and in evaluation when there are no running ones.
        use_batch_stats = self.training or (self.running_mean is None and
                                            self.running_var is None)
        if use_batch_stats:
            _check_batch_size(input)  # before the counter moves: a failed call changes nothing
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        # Running buffers are updated in training only when tracked; read in evaluation.
        track = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if track else None,
                          self.running_var if track else None, self.weight, self.bias,
                          use_batch_stats, factor, self.eps, residual=residual,
                          activation=activation)


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
