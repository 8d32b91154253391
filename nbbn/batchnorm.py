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
    array), ``plan`` (``_layout.ChannelPlan``) and, made on first use, ``x3`` (its 3-D view).
    With ``virtual_batch_size`` the batch statistics are per virtual batch (group)."""

    def __init__(self, be, x, axis, name="x", min_ndim=2, virtual_batch_size=None):
        self.be = be
        self.like = x
        self.x = be.array(x, name)
        _layout.check_float_dtype(self.x.dtype, name)
        self.plan = _layout.channel_plan(self.x, axis, name, min_ndim, virtual_batch_size)
        self.virtual = virtual_batch_size is not None
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

    def statistics(self, p, name):
        """Batch statistics as the caller holds them (per channel; (groups, C) with virtual
        batches) as the stages' vector (group-major)."""
        if not self.virtual:
            return self.vector(required(p, name), name)
        return group_vector(self.be, p, name, self.plan.groups, self.plan.nchan)

    def as_given(self, *stats):
        """The stages' statistics vectors as returned to the caller ((groups, C) with
        virtual batches)."""
        if not self.virtual:
            return stats
        return tuple(v.reshape(self.plan.groups, self.plan.nchan) for v in stats)

    def check_out(self, out):
        if out is not None:
            self.be.check_writable(out, "out")
            o = self.be.array(out, "out")
            _layout.check_exact_shape_dtype(o.shape, o.dtype, self.plan.shape, self.plan.dtype)


def required(p, name):
    """``p``, or a TypeError naming the argument where it is None."""
    if p is None:
        raise TypeError(f"{name} is required (an array), got None")
    return p


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
    """Training needs more than one value per channel (``count``: over the whole batch), in
    each virtual batch (group) where there are several."""
    plan = call.plan
    if plan.groups > 1:
        if plan.last_count <= 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {plan.shape} whose last virtual batch has "
                             f"{plan.last_count} value(s) per channel")
    elif (plan.count if count is None else count) <= 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {plan.shape}"
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


def batch_norm_forward(x, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
                       virtual_batch_size=None):
    """Training-mode forward: ``(y, mean, var)`` with the batch statistics (var biased).

    ``virtual_batch_size`` (ghost batch norm): axis 0 is split into groups of that
    many consecutive samples (the last may be smaller), each normalized with its own
    statistics; mean/var are then (groups, C).
    """
    be = _dispatch.backend(x=x, weight=weight, bias=bias, out=out)
    call = Call(be, x, axis, virtual_batch_size=virtual_batch_size)
    weight = call.vector(weight, "weight")
    bias = call.vector(bias, "bias")
    eps = _layout.check_eps(eps)
    call.check_out(out)
    y, mean, var = be.forward(call, weight, bias, eps, out, call.plan.stats_dtype, None, 0.0,
                              1.0)
    return (y, *call.as_given(mean, var))


def batch_norm_backward(dy, x, mean, var, weight=None, eps=1e-5, *, axis=1, out=None,
                        virtual_batch_size=None):
    """Gradients of the training-mode forward: ``(dx, dweight, dbias)``.

    ``mean``/``var`` are the batch statistics ``batch_norm_forward`` returned
    (var biased; (groups, C) with the same ``virtual_batch_size``); dweight/dbias
    are None when weight is None.
    """
    be = _dispatch.backend(dy=dy, x=x, mean=mean, var=var, weight=weight, out=out)
    call = Call(be, x, axis, virtual_batch_size=virtual_batch_size)
    mean = call.statistics(mean, "mean")
    var = call.statistics(var, "var")
    weight = call.vector(weight, "weight")
    eps = _layout.check_eps(eps)
    dy3 = call.like_x(dy, "dy")
    call.check_out(out)
    sums = be.backward_sums(call, dy3, mean)
    dx = be.grad_input(call, dy3, mean, var, weight, eps, *sums, call.plan.group_count, True,
                       out)
    if weight is None:
        return dx, None, None
    return (dx, *be.param_grads(call.like, weight, var, eps, *sums))


# ---- batch renormalization (Ioffe 2017) -------------------------------------------------------


def renorm_forward(call, mean, var, running_mean, running_var, weight, bias, rmax, dmax, eps,
                   out=None):
    """Batch renorm's ``(y, r, d)`` from the batch statistics (float64 mean, biased var) and the
    running buffers before their update: one per-channel stage, one affine pass."""
    be = call.be
    r, d, scale, shift = be.renorm_coefficients(call.plan.dtype, mean, var, running_mean,
                                                running_var, weight, bias, rmax, dmax, eps)
    return be.affine(call, scale, shift, out), r, d


def renorm_gradients(call, dy3, mean, var, r, d, weight, eps, sums, count, out=None, like=None):
    """Batch renorm's ``(dx, dweight, dbias)`` from the backward sums: batch norm's dx with the
    effective weight ``weight * r`` (r, d are constants for the gradient; no extra pass).
    Parameter gradients are allocated like ``like`` (default: x as given)."""
    be = call.be
    weight_eff, dweight, dbias = be.renorm_grads(call.like if like is None else like, weight,
                                                 var, r, d, eps, *sums)
    dx = be.grad_input(call, dy3, mean, var, weight_eff, eps, *sums, count, True, out)
    return dx, dweight, dbias


def batch_renorm_forward(x, running_mean, running_var, weight=None, bias=None, *, rmax=3.0,
                         dmax=5.0, momentum=0.01, eps=1e-5, axis=1, out=None):
    """Batch renormalization (Ioffe 2017), training mode: ``(y, mean, var, r, d)``.

    ``y = weight * ((x - mean) / sigma_b * r + d) + bias`` with the batch's mean and
    ``sigma_b = sqrt(var + eps)``, ``r = clip(sigma_b / sigma, 1/rmax, rmax)``,
    ``d = clip((mean - running_mean) / sigma, -dmax, dmax)``, ``sigma =
    sqrt(running_var + eps)`` from the running buffers as given; then the buffers
    are updated in place as ``batch_norm`` does (EMA, unbiased variance). mean/var
    (biased) and r, d are per channel; ``rmax=1, dmax=0`` is batch norm.
    """
    be = _dispatch.backend(x=x, running_mean=running_mean, running_var=running_var,
                           weight=weight, bias=bias, out=out)
    call = Call(be, x, axis)
    running_mean = call.running_buffer(required(running_mean, "running_mean"), "running_mean")
    running_var = call.running_buffer(required(running_var, "running_var"), "running_var")
    weight = call.vector(weight, "weight")
    bias = call.vector(bias, "bias")
    rmax, dmax = _layout.check_renorm_limits(rmax, dmax)
    momentum = _layout.check_momentum(momentum)
    eps = _layout.check_eps(eps)
    call.check_out(out)
    require_values(call)
    count = call.plan.count
    mean, var = be.batch_moments(call, variance=True)
    y, r, d = renorm_forward(call, mean, var, running_mean, running_var, weight, bias, rmax,
                             dmax, eps, out)
    be.ema(running_mean, running_var, mean, var, momentum, count / (count - 1))
    return (y, *(be.cast(call.like, v, call.plan.stats_dtype) for v in (mean, var, r, d)))


def batch_renorm_backward(dy, x, mean, var, r, d, weight=None, eps=1e-5, *, axis=1, out=None):
    """Gradients of ``batch_renorm_forward``: ``(dx, dweight, dbias)``, r and d held constant
    (mean/var/r/d as the forward returned them); dweight/dbias are None when weight is None."""
    be = _dispatch.backend(dy=dy, x=x, mean=mean, var=var, r=r, d=d, weight=weight, out=out)
    call = Call(be, x, axis)
    mean, var, r, d = (call.vector(required(v, name), name)
                       for v, name in ((mean, "mean"), (var, "var"), (r, "r"), (d, "d")))
    weight = call.vector(weight, "weight")
    eps = _layout.check_eps(eps)
    dy3 = call.like_x(dy, "dy")
    call.check_out(out)
    sums = be.backward_sums(call, dy3, mean)
    return renorm_gradients(call, dy3, mean, var, r, d, weight, eps, sums, call.plan.count, out)


def _check_count(count, unbiased):
    count = int(count)
    if count < (2 if unbiased else 1):
        raise ValueError(f"count must be >= {2 if unbiased else 1} "
                         f"({'unbiased' if unbiased else 'biased'} update), got {count}")
    return count


def ema_update(running_mean, running_var, mean, var, count, momentum=0.1, *, unbiased=True):
    """Update running statistics in place: ``running = (1 - momentum) * running + momentum * batch``.

    ``count`` is the number of values per channel behind ``mean``/``var``;
    with ``unbiased=True`` (PyTorch) the biased batch variance is scaled by
    count / (count - 1). Keras/Flax's ``momentum=0.99`` is ``momentum=0.01,
    unbiased=False`` here.

    Statistics of virtual batches ((groups, C) mean/var of ``batch_norm_forward(...,
    virtual_batch_size=)``): ``count`` is the sequence of the groups' counts (equal
    but the last), and the batch term is the count-weighted mean of the group means
    and of the groups' unbiased variances (``unbiased=True`` only).
    """
    be = _dispatch.backend(running_mean=running_mean, running_var=running_var, mean=mean,
                           var=var)
    running_mean = running_buffer(be, running_mean, "running_mean", None)
    nchan = running_mean.shape[0]
    running_var = running_buffer(be, running_var, "running_var", nchan)
    momentum = _layout.check_momentum(momentum)
    if np.ndim(count) == 0:
        mean = vector(be, required(mean, "mean"), "mean", nchan)
        var = vector(be, required(var, "var"), "var", nchan)
        count = _check_count(count, unbiased)
        be.ema(running_mean, running_var, mean, var, momentum,
               count / (count - 1) if unbiased else 1.0)
        return
    counts = [_check_count(n, unbiased) for n in count]
    if not unbiased or not counts or len(set(counts[:-1])) > 1 or counts[-1] > counts[0]:
        raise ValueError("count of virtual batches' statistics: one count per group, equal but "
                         f"the last (no larger), with unbiased=True; got {count!r}, "
                         f"unbiased={unbiased}")
    pooled = PooledStatistics(running_mean, nchan)
    pooled.add(group_vector(be, mean, "mean", len(counts), nchan),
               group_vector(be, var, "var", len(counts), nchan), counts[0], counts[-1])
    be.ema(running_mean, running_var, *pooled.batch_mean(), momentum, 1.0)


def _flat(be, a):
    """Backend array ``a`` as a C-order vector (a view where it is C-contiguous)."""
    return (a if a.flags["C_CONTIGUOUS"] else be.copy(a)).reshape(a.size)


def group_vector(be, p, name, groups, nchan):
    """Statistics of virtual batches, (groups, nchan), as a flat group-major vector."""
    a = be.array(required(p, name), name)
    _layout.check_float_dtype(a.dtype, name)
    if tuple(a.shape) != (groups, nchan):
        raise ValueError(f"{name} must have shape {(groups, nchan)}, one value per virtual "
                         f"batch and channel; got shape {tuple(a.shape)}")
    return _flat(be, a)


class PooledStatistics:
    """Statistics of many batches per channel, exact: the count, mean and m2 of every value
    seen, merged with Chan et al.'s formula in float64, and the count-weighted mean of the
    batches' unbiased variances. The state lives where ``like`` (an array: the running
    buffers) lives, so nothing crosses to the host. Precise batch norm, and the running
    update of virtual batches."""

    CONVENTIONS = ("population", "batch_mean")

    def __init__(self, like, nchan):
        self.be = _dispatch.backend(like=like)
        self.state = self.be.from_host(np.zeros((5, nchan)))
        self.batches = 0

    def add(self, mean, var, count, last_count=None):
        """Fold in batch statistics (mean and biased var: per channel, or per virtual batch and
        channel, (groups, C) or group-major), ``count`` values per channel (per group; the
        last ``last_count``)."""
        be = self.be
        be.merge_batches(self.state, _flat(be, be.array(mean, "mean")),
                         _flat(be, be.array(var, "var")), count,
                         count if last_count is None else last_count)
        self.batches += 1

    def population(self):
        """(mean, unbiased variance) of all values seen, float64 vectors on the backend."""
        return self.state[1], self.state[3]

    def batch_mean(self):
        """(mean, count-weighted mean of the batches' unbiased variances)."""
        return self.state[1], self.state[4]

    def store(self, running_mean, running_var, convention):
        """Write the statistics of ``convention`` into the running buffers (backend arrays),
        where any batch was seen."""
        if self.batches:
            mean, var = self.population() if convention == "population" else self.batch_mean()
            self.be.assign(self.be.array(running_mean, "running_mean"), mean)
            self.be.assign(self.be.array(running_var, "running_var"), var)


def check_convention(convention):
    if convention not in PooledStatistics.CONVENTIONS:
        raise ValueError(f"convention must be one of {PooledStatistics.CONVENTIONS}, "
                         f"got {convention!r}")
    return convention


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
