"""Batch normalization with PyTorch's semantics, on any channel axis.

Forward: one statistics pass (``_cpu.moments``), then one elementwise pass
``y = x * scale + shift`` with per-channel scale/shift computed in float64.
Backward: one fused pass for ``sum(dy)`` and ``sum(dy * (x - mean))``, then
one elementwise pass for ``dx``. Every argument is validated before anything
is computed or written, so a call that raises changes nothing.
"""
from typing import Callable, NamedTuple

import numpy as np

from . import _dispatch, _layout
from ._cpu.backward import backward_sums, grad_input
from ._cpu.ema import ema
from ._cpu.moments import channel_moments
from ._cpu.normalize import affine
from .stats import Moments


class _Call:
    """A batch-norm call's input: x, its channel axis and its (outer, C, inner) layout."""

    def __init__(self, x, axis, name="x"):
        self.x = _layout.float_array(x, name)
        self.axis = _layout.channel_axis(self.x, axis, name)
        reduced = tuple(i for i in range(self.x.ndim) if i != self.axis)
        self.layout = _layout.Layout(self.x, reduced)
        self.nchan = self.x.shape[self.axis]
        self.count = self.x.size // self.nchan if self.nchan else 0
        # Results are native-endian in x's float dtype; statistics at least float32.
        self.dtype = self.x.dtype.newbyteorder("=")
        self.stats_dtype = np.promote_types(self.dtype, np.float32)

    def view(self, a):
        """Read-only 3-D view of an array shaped like x (x itself, dy), in x's layout."""
        return self.layout.view(_layout.kernel_input(a))

    def vector(self, p, name):
        return _layout.channel_vector(p, name, self.nchan)

    def running_buffer(self, p, name):
        return _layout.running_buffer(p, name, self.nchan)

    def check_out(self, out):
        if out is not None:
            _layout.check_out_exact(out, self.x.shape, self.dtype)

    def output(self, out):
        """(view to write, finish): finish() returns the result array (``out`` if given)."""
        dtype = self.dtype
        work = np.dtype(np.float32) if dtype == np.float16 else dtype
        if out is not None and out.dtype == work:
            direct = self.layout.view(out, writeable=True)
            if direct is not None:
                return direct, lambda: out
        array, view = self.layout.empty(work)

        def finish():
            if out is None:
                return array.astype(dtype, copy=False)
            np.copyto(out, array, casting="unsafe")
            return out

        return view, finish


def _as64(p, default, n):
    return np.full(n, default) if p is None else np.asarray(p, np.float64)


def _invstd(var, eps):
    return 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)


def _scale_shift(mean, var, weight, bias, eps):
    """Batch norm as ``x * scale + shift``, per channel in float64."""
    scale = _invstd(var, eps) * _as64(weight, 1.0, len(var))
    shift = _as64(bias, 0.0, len(var)) - np.asarray(mean, np.float64) * scale
    return scale, shift


def _normalize(call, mean, var, weight, bias, eps, out=None):
    """y = (x - mean) / sqrt(var + eps) * weight + bias as one affine pass."""
    scale, shift = _scale_shift(mean, var, weight, bias, eps)
    view, finish = call.output(out)
    if call.x.size:
        affine(call.view(call.x), scale, shift, view)
    return finish()


def _local_moments(call):
    """``Moments(count, mean, m2)`` per channel of this call's x, float64 (nan when empty).

    The statistics stage on its own, so that a caller holding one shard of a
    batch (``nbbn.distributed``) can merge the shards' moments before normalizing.
    """
    if call.count == 0 or call.nchan == 0:
        return Moments(call.count, np.full(call.nchan, np.nan), np.full(call.nchan, np.nan))
    mean, m2 = channel_moments(call.view(call.x))
    return Moments(call.count, mean, m2)


def _mean_var(m):
    """(mean, biased var) in float64 from per-channel Moments."""
    if m.count == 0:
        return np.asarray(m.mean, np.float64), np.full(np.shape(m.m2), np.nan)
    return np.asarray(m.mean, np.float64), np.asarray(m.m2, np.float64) / m.count


def _batch_moments(call):
    """``(count, mean, biased var)`` per channel of this call's x, float64."""
    m = _local_moments(call)
    return (m.count, *_mean_var(m))


def _forward(call, weight, bias, eps, out):
    _, mean, var = _batch_moments(call)
    y = _normalize(call, mean, var, weight, bias, eps, out)
    return y, mean, var


def _require_values(call, count=None):
    """Training needs more than one value per channel (``count``: over the whole batch)."""
    if (call.count if count is None else count) <= 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {call.x.shape}"
                         + ("" if count is None else f" ({count} values per channel in all)"))


def batch_norm_args(call, running_mean, running_var, weight, bias, training, momentum, eps,
                    out):
    """``batch_norm``'s arguments validated, for any backend's call object (vector,
    running_buffer, check_out): all checks before any work, so a failed call changes nothing."""
    weight = call.vector(weight, "weight")
    bias = call.vector(bias, "bias")
    eps = _layout.check_eps(eps)
    momentum = _layout.check_momentum(momentum)
    call.check_out(out)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if not training:
        if running_mean is None:
            raise ValueError("running_mean and running_var are required when training=False")
        return (call.vector(running_mean, "running_mean"), call.vector(running_var, "running_var"),
                weight, bias, momentum, eps)
    running_mean = call.running_buffer(running_mean, "running_mean")
    running_var = call.running_buffer(running_var, "running_var")
    _require_values(call)
    return running_mean, running_var, weight, bias, momentum, eps


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None):
    """Drop-in for ``torch.nn.functional.batch_norm`` (any channel ``axis``).

    Training normalizes with the batch statistics and, where running buffers are
    given, updates them in place with the unbiased batch variance. Evaluation
    normalizes with the running buffers.
    """
    if _dispatch.on_device(x=x, running_mean=running_mean, running_var=running_var,
                           weight=weight, bias=bias, out=out):
        return _dispatch.cuda().batch_norm(x, running_mean, running_var, weight, bias, training,
                                           momentum, eps, axis, out)
    call = _Call(x, axis)
    running_mean, running_var, weight, bias, momentum, eps = batch_norm_args(
        call, running_mean, running_var, weight, bias, training, momentum, eps, out)
    if not training:
        return _normalize(call, running_mean, running_var, weight, bias, eps, out)
    y, mean, var = _forward(call, weight, bias, eps, out)
    if running_mean is not None:
        _ema(running_mean, running_var, mean, var, momentum, call.count / (call.count - 1))
    return y


def batch_norm_forward(x, weight=None, bias=None, eps=1e-5, *, axis=1, out=None):
    """Training-mode forward: ``(y, mean, var)`` with the batch statistics (var biased)."""
    if _dispatch.on_device(x=x, weight=weight, bias=bias, out=out):
        return _dispatch.cuda().batch_norm_forward(x, weight, bias, eps, axis, out)
    call = _Call(x, axis)
    weight = call.vector(weight, "weight")
    bias = call.vector(bias, "bias")
    eps = _layout.check_eps(eps)
    call.check_out(out)
    y, mean, var = _forward(call, weight, bias, eps, out)
    return y, mean.astype(call.stats_dtype), var.astype(call.stats_dtype)


def _dy_view(call, dy):
    """Validated dy as a 3-D view in x's layout."""
    dy = _layout.float_array(dy, "dy")
    if dy.shape != call.x.shape:
        raise ValueError(f"dy must have the shape of x, {call.x.shape}; got shape {dy.shape}")
    return call.view(dy)


def _backward_sums(call, dy3, mean):
    """Per-channel ``(sum(dy), sum(dy * (x - mean)))`` over this call, float64.

    The reduction stage of the backward pass on its own: shards of one batch
    add theirs up (``nbbn.distributed``) before ``_grad_input``.
    """
    if call.x.size == 0:
        return np.zeros(call.nchan), np.zeros(call.nchan)
    return backward_sums(dy3, call.view(call.x), np.asarray(mean, np.float64))


def _grad_input(call, dy3, mean, var, weight, eps, sum_dy, sum_dy_xmu, count, batch_stats,
                out=None):
    """dx from the per-channel sums; ``count`` is the number of values behind the statistics.

    ``batch_stats`` says whether mean/var came from x (then their gradients
    are folded in per channel) or are constants (running statistics).
    """
    view, finish = call.output(out)
    if call.x.size == 0:
        return finish()
    invstd = _invstd(var, eps)
    g = invstd * _as64(weight, 1.0, call.nchan)
    if batch_stats:
        # The mean and variance depend on x too: their gradients, folded per channel.
        h = -g * invstd * invstd * sum_dy_xmu / count
        k = -g * sum_dy / count
    else:
        h = k = np.zeros(call.nchan)
    grad_input(dy3, call.view(call.x), np.asarray(mean, np.float64), g, h, k, view)
    return finish()


def _param_grads(weight, var, eps, sum_dy, sum_dy_xmu, call=None):
    """(dweight, dbias) in weight's dtype; (None, None) without weight. (``call``: the
    device stage allocates in its input's library; the host has only NumPy.)"""
    if weight is None:
        return None, None
    return (sum_dy_xmu * _invstd(var, eps)).astype(weight.dtype), sum_dy.astype(weight.dtype)


def batch_norm_backward(dy, x, mean, var, weight=None, eps=1e-5, *, axis=1, out=None):
    """Gradients of the training-mode forward: ``(dx, dweight, dbias)``.

    ``mean``/``var`` are the batch statistics ``batch_norm_forward`` returned
    (var biased); dweight/dbias are None when weight is None.
    """
    stages = _dispatch.layer_stages(dy=dy, x=x, mean=mean, var=var, weight=weight, out=out)
    call = stages.call(x, axis)
    mean = call.vector(mean, "mean")
    var = call.vector(var, "var")
    weight = call.vector(weight, "weight")
    eps = _layout.check_eps(eps)
    dy3 = stages.dy_view(call, dy)
    call.check_out(out)
    sums = stages.backward_sums(call, dy3, mean)
    dx = stages.grad_input(call, dy3, mean, var, weight, eps, *sums, call.count, True, out)
    return (dx, *stages.param_grads(weight, var, eps, *sums, call=call))


def _ema(running_mean, running_var, mean, var, momentum, var_factor):
    if running_mean.dtype == np.float16 or running_var.dtype == np.float16:
        # The kernels read float32/float64 only; float16 buffers are tiny anyway.
        new_mean = (1 - momentum) * running_mean.astype(np.float64) + momentum * mean
        new_var = (1 - momentum) * running_var.astype(np.float64) + momentum * var_factor * var
        np.copyto(running_mean, new_mean, casting="unsafe")
        np.copyto(running_var, new_var, casting="unsafe")
    else:
        ema(running_mean, running_var, np.asarray(mean, np.float64),
            np.asarray(var, np.float64), momentum, var_factor, parallel=False)


def ema_update(running_mean, running_var, mean, var, count, momentum=0.1, *, unbiased=True):
    """Update running statistics in place: ``running = (1 - momentum) * running + momentum * batch``.

    ``count`` is the number of values per channel behind ``mean``/``var``;
    with ``unbiased=True`` (PyTorch) the biased batch variance is scaled by
    count / (count - 1). Keras/Flax's ``momentum=0.99`` is ``momentum=0.01,
    unbiased=False`` here.
    """
    if _dispatch.on_device(running_mean=running_mean, running_var=running_var, mean=mean,
                           var=var):
        return _dispatch.cuda().ema_update(running_mean, running_var, mean, var, count,
                                           momentum, unbiased)
    running_mean = _layout.running_buffer(running_mean, "running_mean", None)
    nchan = running_mean.shape[0]
    running_var = _layout.running_buffer(running_var, "running_var", nchan)
    mean = _layout.channel_vector(mean, "mean", nchan)
    var = _layout.channel_vector(var, "var", nchan)
    momentum = _layout.check_momentum(momentum)
    count = int(count)
    if count < (2 if unbiased else 1):
        raise ValueError(f"count must be >= {2 if unbiased else 1} "
                         f"({'unbiased' if unbiased else 'biased'} update), got {count}")
    _ema(running_mean, running_var, mean, var, momentum, count / (count - 1) if unbiased else 1.0)


def _fold64(running_mean, running_var, weight, bias, eps):
    """Validated float64 (scale, shift) of inference batch norm, and the result dtype."""
    running_var = _layout.channel_vector(running_var, "running_var", None)
    nchan = running_var.shape[0]
    running_mean = _layout.channel_vector(running_mean, "running_mean", nchan)
    weight = _layout.channel_vector(weight, "weight", nchan)
    bias = _layout.channel_vector(bias, "bias", nchan)
    eps = _layout.check_eps(eps)
    dtype = np.promote_types(running_var.dtype, np.float32)
    return (*_scale_shift(running_mean, running_var, weight, bias, eps), dtype)


def fold(running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """Inference batch norm as ``y = x * scale + shift``: returns ``(scale, shift)``."""
    if _dispatch.on_device(running_mean=running_mean, running_var=running_var, weight=weight,
                           bias=bias):
        return _dispatch.cuda().fold(running_mean, running_var, weight, bias, eps)
    scale, shift, dtype = _fold64(running_mean, running_var, weight, bias, eps)
    return scale.astype(dtype), shift.astype(dtype)


def fold_into(w, b, running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """Fold inference batch norm into the preceding conv/linear layer.

    ``w`` has the output channels on axis 0 (conv ``[out, in, kh, kw]``, linear
    ``[out, in]``); ``b`` may be None. Returns new ``(w_folded, b_folded)`` with
    ``conv(x, w_folded) + b_folded == batch_norm(conv(x, w) + b)``.
    """
    if _dispatch.on_device(w=w, b=b, running_mean=running_mean, running_var=running_var,
                           weight=weight, bias=bias):
        return _dispatch.cuda().fold_into(w, b, running_mean, running_var, weight, bias, eps)
    w = _layout.float_array(w, "w")
    scale, shift, _ = _fold64(running_mean, running_var, weight, bias, eps)
    nchan = scale.shape[0]
    if w.ndim < 1 or w.shape[0] != nchan:
        raise ValueError(f"w must have {nchan} output channels on axis 0 (one per batch-norm "
                         f"channel), got shape {w.shape}")
    b = _layout.channel_vector(b, "b", nchan)
    w_folded = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    b_folded = shift if b is None else b * scale + shift
    b_dtype = w.dtype if b is None else np.promote_types(w.dtype, b.dtype)
    return w_folded.astype(w.dtype), b_folded.astype(b_dtype)


# ---- the stages nbbn.BatchNorm is written over ------------------------------------------


class LayerStages(NamedTuple):
    """``nbbn.BatchNorm``'s building blocks on one side: ``HOST_STAGES`` here, the device's
    in ``nbbn._cuda.api``; ``_dispatch.layer_stages`` picks them per call.

    Per-channel vectors (statistics, sums) are float64 and stay on their side;
    counts are host integers. ``dy3`` is ``dy_view``'s result.
    """

    call: Callable            # (x, axis) -> call: x, its layout, .nchan, .count
    local_moments: Callable   # (call) -> Moments(count, mean, m2) of this call's x
    batch_moments: Callable   # (call) -> (count, mean, biased var) of this call's x
    normalize: Callable       # (call, mean, var, weight, bias, eps) -> y
    ema: Callable             # (running_mean, running_var, mean, var, momentum, var_factor)
    dy_view: Callable         # (call, dy) -> dy3: dy validated, in x's layout
    backward_sums: Callable   # (call, dy3, mean) -> (sum(dy), sum(dy * (x - mean)))
    grad_input: Callable      # (call, dy3, mean, var, weight, eps, sum_dy, sum_dy_xmu, count,
                              #  batch_stats, out=None) -> dx
    param_grads: Callable     # (weight, var, eps, sum_dy, sum_dy_xmu, call=None)
                              #  -> (dweight, dbias)
    float64_copy: Callable    # (vector on the host or this side) -> float64 copy on this side
    copy: Callable            # (array) -> its copy (state_dict)
    assign: Callable          # (array, value: host or this side's, same shape) -> None


HOST_STAGES = LayerStages(
    call=_Call, local_moments=_local_moments, batch_moments=_batch_moments,
    normalize=_normalize, ema=_ema, dy_view=_dy_view, backward_sums=_backward_sums,
    grad_input=_grad_input, param_grads=_param_grads,
    float64_copy=lambda v: np.array(v, np.float64),
    copy=np.copy, assign=lambda a, value: np.copyto(a, np.asarray(value), casting="unsafe"))
