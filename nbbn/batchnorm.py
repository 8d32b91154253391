"""Batch normalization with PyTorch's semantics, on any channel axis.

Written once for host and device arrays: each function validates its
arguments (``_layout``'s rules, from the arrays' descriptions), all before
anything is computed or written, so a call that raises changes nothing; then
it calls the stages of the backend where the arrays live (``_backend``).
Forward: one statistics pass, then one elementwise pass ``y = x * scale +
shift`` with per-channel coefficients. Backward: one fused pass for
``sum(dy)`` and ``sum(dy * (x - mean))``, then one elementwise pass for ``dx``.
"""
import copy

import numpy as np

from . import _dispatch, _layout


class Call:
    """A batch-norm input as the backends see it: ``like`` (as given), ``x`` (the backend's
    array), ``plan`` (``_layout.ChannelPlan``) and, made on first use, ``x3`` (its 3-D view)."""

    def __init__(self, be, x, axis, name="x", min_ndim=2):
        self.be = be
        self.like = x
        self.x = be.array(x, name)
        _layout.check_float_dtype(self.x.dtype, name)
        self.plan = _layout.channel_plan(self.x, axis, name, min_ndim)
        self._x3 = None

    @property
    def x3(self):
        if self._x3 is None:
            self._x3 = self.be.view(self, self.x)
        return self._x3

    def private(self, earlier=None):
        """This call, reading its own copy of x's values where x3 is a view of the caller's x
        (a layer keeps it for backward: later in-place changes to x must not reach it).
        ``earlier``: a private call no longer needed, whose copy is reused if it fits (a
        fresh array costs more than the copy: its pages are new)."""
        if not (self.plan.size and self.be.overlap(self.x3, self.x)):
            return self
        kept = copy.copy(self)
        kept.copy_of_x = getattr(earlier, "copy_of_x", None)
        if kept.copy_of_x is not None and earlier.plan is self.plan:
            self.be.assign(kept.copy_of_x, self.x)
        else:
            kept.copy_of_x = self.be.copy(self.x)
        kept._x3 = self.be.view(self, kept.copy_of_x)
        return kept

    def vector(self, p, name):
        return vector(self.be, p, name, self.plan.nchan)

    def running_buffer(self, p, name):
        return running_buffer(self.be, p, name, self.plan.nchan)

    def like_x(self, a, name):
        """A validated float array shaped like x (dy), as the backend's 3-D view."""
        a = self.be.array(a, name)
        _layout.check_float_dtype(a.dtype, name)
        if tuple(a.shape) != self.plan.shape:
            raise ValueError(f"{name} must have the shape of x, {self.plan.shape}; "
                             f"got shape {tuple(a.shape)}")
        return self.be.view(self, a)

    def output(self, out, like_x=(), vectors=()):
        """``out`` validated, as the stages may write it, and ``deliver(result)`` -> what the
        call returns. Where ``out`` overlaps an array the call reads (``like_x``: arrays
        shaped like x, which may be exactly ``out``, elementwise in place; ``vectors``:
        per-channel inputs, None allowed), the stages write a new array, then copied."""
        if out is None:
            return None, lambda result: result
        be = self.be
        be.check_writable(out, "out")
        o = be.array(out, "out")
        _layout.check_exact_shape_dtype(o.shape, o.dtype, self.plan.shape, self.plan.dtype)
        reads = [(a, "same") for a in (self.x, *like_x)] + [(v, None) for v in vectors]
        if not any(be.overlap(o, a) not in (None, safe) for a, safe in reads if a is not None):
            return out, lambda result: result

        def deliver(result):
            be.assign(o, result)
            return out

        return None, deliver


def required(p, name):
    """``p``, or a TypeError naming the argument where it is None."""
    if p is None:
        raise TypeError(f"{name} is required (an array), got None")
    return p


def private(be, a, written):
    """Vector ``a``, copied where it overlaps an array the call writes (``written``)."""
    if a is not None and any(w is not None and be.overlap(w, a) for w in written):
        return be.copy(a)
    return a


def vector(be, p, name, nchan):
    """A per-channel float vector of shape (nchan,) (any 1-D length if nchan is None), or None."""
    if p is None:
        return None
    p = be.array(p, name)
    _layout.check_float_dtype(p.dtype, name)
    _layout.check_channel_shape(p.shape, name, nchan)
    return p


def running_buffer(be, p, name, nchan):
    """A running-statistics buffer (updated in place), or None."""
    if p is None:
        return None
    be.check_writable(p, name)
    return vector(be, p, name, nchan)


def normalize(call, mean, var, weight, bias, eps, out=None):
    """y = (x - mean) / sqrt(var + eps) * weight + bias as one affine pass."""
    be = call.be
    return be.affine(call, *be.coefficients(call.plan.dtype, mean, var, weight, bias, eps), out)


def require_values(call, count=None):
    """Training needs more than one value per channel (``count``: over the whole batch); an
    empty batch is allowed, as in PyTorch (an empty result; the running buffers unchanged)."""
    if (call.plan.count if count is None else count) == 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {call.plan.shape}"
                         + ("" if count is None else f" ({count} values per channel in all)"))


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None):
    """Drop-in for ``torch.nn.functional.batch_norm`` (any channel ``axis``).

    Training normalizes with the batch statistics and, where running buffers are
    given, updates them in place with the unbiased batch variance. Evaluation
    normalizes with the running buffers.
    """
    be = _dispatch.backend(x=x, running_mean=running_mean, running_var=running_var,
                           weight=weight, bias=bias, out=out)
    call = Call(be, required(x, "x"), axis)
    weight = call.vector(weight, "weight")
    bias = call.vector(bias, "bias")
    eps = _layout.check_eps(eps, training)
    if training:  # evaluation ignores momentum, as PyTorch does
        momentum = _layout.check_momentum(momentum)
    if (running_mean is None) != (running_var is None):
        missing = "running_var" if running_var is None else "running_mean"
        raise ValueError(f"running_mean and running_var must be given together (or both "
                         f"None, as in PyTorch): {missing} is None")
    if not training:
        if running_mean is None:
            raise ValueError("running_mean and running_var are required when training=False")
        running_mean = call.vector(running_mean, "running_mean")
        running_var = call.vector(running_var, "running_var")
        target, deliver = call.output(out, vectors=(running_mean, running_var, weight, bias))
        return deliver(normalize(call, running_mean, running_var, weight, bias, eps, target))
    running_mean = call.running_buffer(running_mean, "running_mean")
    running_var = call.running_buffer(running_var, "running_var")
    target, deliver = call.output(out, vectors=(weight, bias))
    running = None
    if running_mean is not None:
        data = [call.x] + ([] if out is None else [be.array(out, "out")])
        for buffer, name in ((running_mean, "running_mean"), (running_var, "running_var")):
            if any(be.overlap(buffer, a) for a in data):
                raise ValueError(f"{name} shares memory with x or out: it is written in place")
        weight, bias = (private(be, p, (running_mean, running_var)) for p in (weight, bias))
        running = (running_mean, running_var)
    require_values(call)
    count = call.plan.count
    if count == 0:  # PyTorch: an empty batch updates nothing
        running = None
    return deliver(be.forward(call, weight, bias, eps, target, None, running, momentum,
                              count / (count - 1) if count > 1 else 1.0)[0])


def batch_norm_forward(x, weight=None, bias=None, eps=1e-5, *, axis=1, out=None):
    """Training-mode forward: ``(y, mean, var)`` with the batch statistics (var biased)."""
    be = _dispatch.backend(x=x, weight=weight, bias=bias, out=out)
    call = Call(be, required(x, "x"), axis)
    weight = call.vector(weight, "weight")
    bias = call.vector(bias, "bias")
    eps = _layout.check_eps(eps, training=True)
    target, deliver = call.output(out, vectors=(weight, bias))
    y, mean, var = be.forward(call, weight, bias, eps, target, call.plan.stats_dtype, None, 0.0,
                              1.0)
    return deliver(y), mean, var


def batch_norm_backward(dy, x, mean, var, weight=None, eps=1e-5, *, axis=1, out=None):
    """Gradients of the training-mode forward: ``(dx, dweight, dbias)``.

    ``mean``/``var`` are the batch statistics ``batch_norm_forward`` returned
    (var biased); dweight/dbias are None when weight is None.
    """
    be = _dispatch.backend(dy=dy, x=x, mean=mean, var=var, weight=weight, out=out)
    call = Call(be, required(x, "x"), axis)
    mean = call.vector(required(mean, "mean"), "mean")
    var = call.vector(required(var, "var"), "var")
    weight = call.vector(weight, "weight")
    eps = _layout.check_eps(eps)
    dy3 = call.like_x(required(dy, "dy"), "dy")
    target, deliver = call.output(out, like_x=(be.array(dy, "dy"),), vectors=(mean, var, weight))
    sums = be.backward_sums(call, dy3, mean)
    dx = deliver(be.grad_input(call, dy3, mean, var, weight, eps, *sums, call.plan.count, True,
                               target))
    if weight is None:
        return dx, None, None
    return (dx, *be.param_grads(call.like, weight, var, eps, *sums))


def ema_update(running_mean, running_var, mean, var, count, momentum=0.1, *, unbiased=True):
    """Update running statistics in place: ``running = (1 - momentum) * running + momentum * batch``.

    ``count`` is the number of values per channel behind ``mean``/``var``;
    with ``unbiased=True`` (PyTorch) the biased batch variance is scaled by
    count / (count - 1). Keras/Flax's ``momentum=0.99`` is ``momentum=0.01,
    unbiased=False`` here.
    """
    be = _dispatch.backend(running_mean=running_mean, running_var=running_var, mean=mean,
                           var=var)
    running_mean = running_buffer(be, required(running_mean, "running_mean"), "running_mean",
                                  None)
    nchan = running_mean.shape[0]
    running_var = running_buffer(be, required(running_var, "running_var"), "running_var", nchan)
    mean = vector(be, required(mean, "mean"), "mean", nchan)
    var = vector(be, required(var, "var"), "var", nchan)
    momentum = _layout.check_momentum(momentum)
    count = _layout.check_count(count, 2 if unbiased else 1)
    mean, var = (private(be, v, (running_mean, running_var)) for v in (mean, var))
    be.ema(running_mean, running_var, mean, var, momentum,
           count / (count - 1) if unbiased else 1.0)


def _fold_args(be, running_mean, running_var, weight, bias, eps):
    """Validated inference statistics and parameters, and the number of channels."""
    running_mean = vector(be, required(running_mean, "running_mean"), "running_mean", None)
    nchan = running_mean.shape[0]
    running_var = vector(be, required(running_var, "running_var"), "running_var", nchan)
    weight = vector(be, weight, "weight", nchan)
    bias = vector(be, bias, "bias", nchan)
    return running_mean, running_var, weight, bias, _layout.check_eps(eps), nchan


def fold(running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """Inference batch norm as ``y = x * scale + shift``: returns ``(scale, shift)``."""
    be = _dispatch.backend(running_mean=running_mean, running_var=running_var, weight=weight,
                           bias=bias)
    like = running_var
    running_mean, running_var, weight, bias, eps, _ = _fold_args(
        be, running_mean, running_var, weight, bias, eps)
    dtype = np.promote_types(running_var.dtype, np.float32)
    scale, shift = be.coefficients(dtype, running_mean, running_var, weight, bias, eps)
    return be.cast(like, scale, dtype), be.cast(like, shift, dtype)


def fold_into(w, b, running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """Fold inference batch norm into the preceding conv/linear layer.

    ``w`` has the output channels on axis 0 (conv ``[out, in, kh, kw]``, linear
    ``[out, in]``); ``b`` may be None. Returns new ``(w_folded, b_folded)`` with
    ``conv(x, w_folded) + b_folded == batch_norm(conv(x, w) + b)``.
    """
    be = _dispatch.backend(w=w, b=b, running_mean=running_mean, running_var=running_var,
                           weight=weight, bias=bias)
    wa = be.array(required(w, "w"), "w")
    _layout.check_float_dtype(wa.dtype, "w")
    running_mean, running_var, weight, bias, eps, nchan = _fold_args(
        be, running_mean, running_var, weight, bias, eps)
    if len(wa.shape) < 1 or wa.shape[0] != nchan:
        raise ValueError(f"w must have {nchan} output channels on axis 0 (one per batch-norm "
                         f"channel), got shape {tuple(wa.shape)}")
    b = vector(be, b, "b", nchan)
    scale, shift = be.coefficients(np.dtype(np.float64), running_mean, running_var, weight,
                                   bias, eps)
    b_dtype = wa.dtype if b is None else np.promote_types(wa.dtype, b.dtype)
    return be.folded(w, b, scale, shift, b_dtype)
