"""Batch normalization with PyTorch's semantics, on any channel axis.

Written once for host and device arrays: each function validates its
arguments (``_layout``'s rules, from the arrays' descriptions), all before
anything is computed or written, so a call that raises changes nothing; then
it calls the stages of the backend where the arrays live (``_backend``).
Forward: one statistics pass, then one elementwise pass ``y = x * scale +
shift`` with per-channel coefficients. Backward: one fused pass for
``sum(dy)`` and ``sum(dy * (x - mean))``, then one elementwise pass for ``dx``.
"""
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

    def check_out(self, out):
        if out is not None:
            self.be.check_writable(out, "out")
            o = self.be.array(out, "out")
            _layout.check_exact_shape_dtype(o.shape, o.dtype, self.plan.shape, self.plan.dtype)


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
    """Training needs more than one value per channel (``count``: over the whole batch)."""
    if (call.plan.count if count is None else count) <= 1:
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
    call = Call(be, x, axis)
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
        return normalize(call, call.vector(running_mean, "running_mean"),
                         call.vector(running_var, "running_var"), weight, bias, eps, out)
    running_mean = call.running_buffer(running_mean, "running_mean")
    running_var = call.running_buffer(running_var, "running_var")
    require_values(call)
    count = call.plan.count
    running = None if running_mean is None else (running_mean, running_var)
    return be.forward(call, weight, bias, eps, out, None, running, momentum,
                      count / (count - 1))[0]


def batch_norm_forward(x, weight=None, bias=None, eps=1e-5, *, axis=1, out=None):
    """Training-mode forward: ``(y, mean, var)`` with the batch statistics (var biased)."""
    be = _dispatch.backend(x=x, weight=weight, bias=bias, out=out)
    call = Call(be, x, axis)
    weight = call.vector(weight, "weight")
    bias = call.vector(bias, "bias")
    eps = _layout.check_eps(eps)
    call.check_out(out)
    return be.forward(call, weight, bias, eps, out, call.plan.stats_dtype, None, 0.0, 1.0)


def batch_norm_backward(dy, x, mean, var, weight=None, eps=1e-5, *, axis=1, out=None):
    """Gradients of the training-mode forward: ``(dx, dweight, dbias)``.

    ``mean``/``var`` are the batch statistics ``batch_norm_forward`` returned
    (var biased); dweight/dbias are None when weight is None.
    """
    be = _dispatch.backend(dy=dy, x=x, mean=mean, var=var, weight=weight, out=out)
    call = Call(be, x, axis)
    mean = call.vector(mean, "mean")
    var = call.vector(var, "var")
    weight = call.vector(weight, "weight")
    eps = _layout.check_eps(eps)
    dy3 = call.like_x(dy, "dy")
    call.check_out(out)
    sums = be.backward_sums(call, dy3, mean)
    dx = be.grad_input(call, dy3, mean, var, weight, eps, *sums, call.plan.count, True, out)
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
    running_mean = running_buffer(be, running_mean, "running_mean", None)
    nchan = running_mean.shape[0]
    running_var = running_buffer(be, running_var, "running_var", nchan)
    mean = vector(be, mean, "mean", nchan)
    var = vector(be, var, "var", nchan)
    momentum = _layout.check_momentum(momentum)
    count = int(count)
    if count < (2 if unbiased else 1):
        raise ValueError(f"count must be >= {2 if unbiased else 1} "
                         f"({'unbiased' if unbiased else 'biased'} update), got {count}")
    be.ema(running_mean, running_var, mean, var, momentum,
           count / (count - 1) if unbiased else 1.0)


def _fold_args(be, running_mean, running_var, weight, bias, eps):
    """Validated inference statistics and parameters, and the number of channels."""
    running_var = vector(be, running_var, "running_var", None)
    nchan = running_var.shape[0]
    running_mean = vector(be, running_mean, "running_mean", nchan)
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
    wa = be.array(w, "w")
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
