"""PyTorch adapter: ``torch.nn.BatchNorm{1,2,3}d`` drop-ins computing with nbbn's kernels.

``import nbbn`` does not import this module (nor PyTorch); ``import nbbn.torch``
does. Install with the ``nbbn[torch]`` extra.

- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d` subclass
  PyTorch's classes and only replace ``forward``: constructor, parameters,
  buffers, state dict, ``train``/``eval``, ``momentum=None`` (cumulative
  average), ``affine=False``, ``track_running_stats=False``, input checks and
  ``isinstance(m, torch.nn.BatchNorm2d)`` are PyTorch's own.
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

Inputs nbbn cannot represent (bfloat16, complex, devices other than CPU and
CUDA) fall back to ``torch.nn.functional.batch_norm``, so a converted model
still runs everywhere a PyTorch one does.
"""
import numpy as np
import torch
from torch import nn

import nbbn
from nbbn.batchnorm import forward_and_update

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormFunction", "batch_norm",
           "convert"]

_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


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
        return t.numpy()  # shares memory, any strides
    return t  # exposes __cuda_array_interface__; nbbn keeps the work and results on the device


def _tensor(a, like):
    """A tensor for an nbbn result, without a copy: NumPy -> CPU tensor, device array -> CUDA."""
    if a is None or isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
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
    statistics, mean and var are recomputed from ``x``: they depend on it."""
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

    ``apply(x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps)``:
    with ``use_batch_stats`` it normalizes with the batch statistics and, where
    running buffers are given, updates them in place (as ``nbbn.batch_norm``: unbiased
    variance, factor ``momentum``); otherwise it normalizes with the running
    buffers. Differentiable in ``x``, ``weight`` and ``bias``: the backward is
    nbbn's kernels, or, where autograd records it (``create_graph=True``), the same
    formulas in PyTorch operations, differentiable again. Forward-mode AD raises
    NotImplementedError (``batch_norm`` does for ``torch.func`` transforms, vmap included).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps):
        xa, wa, ba = _arr(x), _arr(weight), _arr(bias)
        ctx.eps = eps
        ctx.use_batch_stats = use_batch_stats
        if use_batch_stats:
            # The running buffers updated in the same call (not where the batch is empty).
            ya, mean, var = forward_and_update(xa, _arr(running_mean), _arr(running_var), wa, ba,
                                               momentum, eps, axis=1)
            if running_mean is not None and x.numel():
                # Written through a NumPy view: tell autograd, as an in-place op would.
                torch.autograd.graph.increment_version([running_mean, running_var])
            mean, var = _tensor(mean, x), _tensor(var, x)
        else:
            ya = nbbn.batch_norm(xa, _arr(running_mean), _arr(running_var), wa, ba,
                                 training=False, eps=eps, axis=1)
            # Saved as they are now: an in-place change before backward is reported by autograd.
            mean, var = running_mean, running_var
        ctx.save_for_backward(x, weight, mean, var)
        return _tensor(ya, x)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, var = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
            dx, dw, db = _differentiable_grads(x, weight, mean, var, ctx.eps,
                                               ctx.use_batch_stats, dy)
            return (dx if need_x else None, dw if need_w else None, db if need_b else None,
                    None, None, None, None, None)
        dya, xa, wa = _arr(dy), _arr(x), _arr(weight)
        dx = dw = db = None
        if ctx.use_batch_stats:
            dx, dw, db = nbbn.batch_norm_backward(dya, xa, _arr(mean), _arr(var), wa, ctx.eps,
                                                  axis=1)
        else:
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
        return dx, dw, db, None, None, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            "nbbn.torch batch norm does not support forward-mode AD (torch.func.jvp, "
            "torch.autograd.forward_ad); use torch.nn.functional.batch_norm there")



def _check_arguments(x, running_mean, running_var, weight, bias):
    """PyTorch's argument rules, each error naming its argument (before anything changes)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
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


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Drop-in for ``torch.nn.functional.batch_norm`` computing with nbbn's kernels."""
    _check_arguments(x, running_mean, running_var, weight, bias)
    if getattr(torch._C, "_are_functorch_transforms_active", lambda: False)():
        raise NotImplementedError(
            "nbbn.torch batch norm does not support torch.func transforms (vmap, grad, jacrev, "
            "...); use torch.nn.functional.batch_norm there")
    if training:
        _check_batch_size(x)
    if not _supported(x) or x.dim() < 2:
        return nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training,
                                        momentum, eps)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when training=False")
    return BatchNormFunction.apply(x, weight, bias, running_mean, running_var, bool(training),
                                   float(momentum), float(eps))


# ---- modules -------------------------------------------------------------------------------


class _NbbnBatchNorm:
    """``forward`` of PyTorch's ``_BatchNorm``, with the arithmetic done by nbbn."""

    def forward(self, input):
        self._check_input_dim(input)
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
                          use_batch_stats, factor, self.eps)


class BatchNorm1d(_NbbnBatchNorm, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` (input ``(N, C)`` or ``(N, C, L)``) computed by nbbn."""


class BatchNorm2d(_NbbnBatchNorm, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (input ``(N, C, H, W)``, any memory format) computed by nbbn."""


class BatchNorm3d(_NbbnBatchNorm, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` (input ``(N, C, D, H, W)``) computed by nbbn."""


_SWAPS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def convert(module):
    """Swap every ``torch.nn.BatchNorm{1,2,3}d`` in ``module`` (itself included) for nbbn's.

    The swap is in place: each batch-norm module keeps its identity, parameters,
    buffers, hooks and training mode and only changes class, so optimizers and
    state dicts made before the call keep working. Subclasses of PyTorch's
    classes (``SyncBatchNorm``, lazy modules, user subclasses) are left alone.
    Returns ``module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    for m in module.modules():
        swap = _SWAPS.get(type(m))
        if swap is not None:
            m.__class__ = swap
    return module
