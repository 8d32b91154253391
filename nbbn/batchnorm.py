"""Batch normalization with PyTorch's semantics, on any channel axis.

Written once for host and device arrays: each function validates its
arguments (``_layout``'s rules, from the arrays' descriptions), all before
anything is computed or written, so a call that raises changes nothing; then
it calls the stages of the backend where the arrays live (``_backend``).
Forward: one statistics pass, then one elementwise pass ``y = x * scale +
shift`` with per-channel coefficients, and the epilogue (a residual added, a
ReLU) in the same pass. Backward: one fused pass for ``sum(dy)`` and ``sum(dy *
(x - mean))``, then one elementwise pass for ``dx``; behind a ReLU, dy is masked
(where y > 0) inside both passes.
"""
import copy

import numpy as np

from . import _dispatch, _layout
from ._backend import PLAIN, Epilogue


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

    @classmethod
    def planned(cls, be, x, plan):
        """The call of host array ``x`` whose ``plan`` ``_small`` has found (x validated)."""
        call = cls.__new__(cls)
        call.be, call.like, call.x, call.plan, call._x3 = be, x, x, plan, None
        return call

    def reading(self, copy_of_x):
        """This call reading ``copy_of_x`` (x's values, written by a fused forward) in place
        of x: what a layer keeps for its backward (as ``private``)."""
        kept = copy.copy(self)
        kept.x = kept.copy_of_x = copy_of_x
        kept._x3 = None
        return kept

    @property
    def x3(self):
        if self._x3 is None:
            self._x3 = self.be.view(self, self.x)
        return self._x3

    def private(self, earlier=None):
        """``(kept, copy)``: this call reading its own copy of x's values where x3 is a view
        of the caller's x (a layer keeps it for backward: later in-place changes to x must
        not reach it), and the array that copy is written into by the forward's elementwise
        pass, which reads x anyway (``Epilogue.copy``; None: no copy needed). ``earlier``: a
        private call no longer needed, whose array is reused if it fits (a fresh array costs
        more than the copy: its pages are new)."""
        if not (self.plan.size and self.be.overlap(self.x3, self.x)):
            return self, None
        kept = copy.copy(self)
        kept.copy_of_x = reused(earlier, "copy_of_x", self.plan)
        if kept.copy_of_x is None:
            kept.copy_of_x = self.be.kept(self, None)
        kept._x3 = self.be.view(self, kept.copy_of_x)
        return kept, kept.copy_of_x

    def vector(self, p, name):
        return vector(self.be, p, name, self.plan.nchan)

    def running_buffer(self, p, name):
        return running_buffer(self.be, p, name, self.plan.nchan)

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

    def like_x(self, a, name, same_dtype=False):
        """A validated float array shaped like x (dy; of x's dtype too where ``same_dtype``),
        as the backend's 3-D view."""
        a = self.be.array(a, name)
        _layout.check_float_dtype(a.dtype, name)
        if tuple(a.shape) != self.plan.shape:
            raise ValueError(f"{name} must have the shape of x, {self.plan.shape}; "
                             f"got shape {tuple(a.shape)}")
        if same_dtype and np.dtype(a.dtype).newbyteorder("=") != self.plan.dtype:
            raise ValueError(f"{name} must have x's dtype, {self.plan.dtype}; got {a.dtype}")
        return self.be.view(self, a)

    def epilogue(self, residual, activation):
        """The ``Epilogue`` of a forward's ``residual=`` and ``activation=`` (validated)."""
        relu = _layout.check_activation(activation) == "relu"
        if residual is None:
            return Epilogue(relu=relu)
        return Epilogue(self.like_x(residual, "residual", same_dtype=True), relu)

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


def reused(earlier, name, plan):
    """The array ``name`` an earlier call kept, where it was kept for the same ``plan``."""
    if earlier is None or earlier.plan is not plan:
        return None
    return getattr(earlier, name, None)


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


def normalize(call, mean, var, weight, bias, eps, out=None, epilogue=PLAIN):
    """y = (x - mean) / sqrt(var + eps) * weight + bias as one affine pass (and the
    ``epilogue``)."""
    be = call.be
    return be.affine(call, *be.coefficients(call.plan.dtype, mean, var, weight, bias, eps), out,
                     epilogue)


def require_values(call, count=None):
    """Training needs more than one value per channel (``count``: over the whole batch), in
    each virtual batch (group) where there are several; an empty batch is allowed, as in
    PyTorch (an empty result; the running buffers unchanged)."""
    plan = call.plan
    if plan.groups > 1:
        if plan.last_count <= 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {plan.shape} whose last virtual batch has "
                             f"{plan.last_count} value(s) per channel")
    elif (plan.count if count is None else count) == 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {plan.shape}"
                         + ("" if count is None else f" ({count} values per channel in all)"))


# ---- small calls: one compiled call each, where the backend has one ---------------------------
# A small call's time is its Python steps, so the plain cases (host arrays, no out=, no
# epilogue, arguments of the usual types) skip them: x's plan and the backend's fused plan
# are cached by x's description, the few checks left are the general rules for these cases,
# and the backend does the rest in one call. Anything else, or a backend that declines,
# takes the general path, which validates everything (and raises).

_SMALL = _layout.PlanCache()


def _small(axis, x, *vectors, like_x=None):
    """(backend, plan, the backend's fused plan) for a call on host array ``x`` (not None)
    whose ``vectors`` (None or host arrays) have one value per channel and whose ``like_x``
    (None or a host array) has x's shape; else None."""
    be = _dispatch.plain_host(x, like_x, *vectors)
    if be is None or x is None or type(axis) is not int:
        return None
    key = (x.shape, x.strides, x.dtype, axis)
    entry = _SMALL.get(key)
    if entry is None:
        entry = _SMALL.keep(key, _small_entry(be, x, axis))
    if entry is False or like_x is not None and like_x.shape != x.shape:
        return None
    channels = entry[1]
    for v in vectors:
        if v is not None and v.shape != channels:
            return None
    return be, entry[0], entry[2]


def _small_entry(be, x, axis):
    """(plan, (nchan,), fused plan) for x and axis, or False (invalid, or not fused)."""
    try:
        plan = Call(be, x, axis).plan
    except (TypeError, ValueError):
        return False
    small = be.fused(plan, x)
    return False if small is None else (plan, (plan.nchan,), small)


def _eps(eps, training):
    """Whether ``eps`` is a float the general rule accepts (``_layout.check_eps``)."""
    return type(eps) is float and (eps > 0 if training else eps >= 0)


def _small_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                      stats):
    """``_batch_norm`` in one compiled call, or None (then the general path)."""
    small = _small(axis, x, running_mean, running_var, weight, bias)
    if small is None or not _eps(eps, training) or (running_mean is None) != (running_var is None):
        return None
    be, plan, fused = small
    if not training:
        if running_mean is None:
            return None
        return be.fused_inference(fused, x, running_mean, running_var, weight, bias, eps)
    count = plan.count
    if type(momentum) is not float or not 0 <= momentum <= 1 or count < 2:
        return None
    running = None if running_mean is None else (running_mean, running_var)
    done = be.fused_forward(fused, x, weight, bias, eps, running, momentum,
                            count / (count - 1), plan.stats_dtype if stats else None, None)
    return done if done is None or stats else done[0]


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None, residual=None, activation=None):
    """Drop-in for ``torch.nn.functional.batch_norm`` (any channel ``axis``).

    Training normalizes with the batch statistics and, where running buffers are
    given, updates them in place with the unbiased batch variance. Evaluation
    normalizes with the running buffers. ``residual`` (shaped like x) is added and
    ``activation`` ("relu") applied in the same pass: ``act(BN(x) + residual)``.
    """
    return _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                       out, residual, activation, False)


def forward_and_update(x, running_mean, running_var, weight, bias, momentum, eps, *, axis=1,
                       residual=None, activation=None):
    """``batch_norm``'s training forward (running buffers, which may be None, updated in
    place) returning ``(y, mean, var)`` as ``batch_norm_forward`` does: what an autograd
    function keeps for its backward, in one call (``nbbn.torch``)."""
    return _batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps, axis,
                       None, residual, activation, True)


def _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, axis, out,
                residual, activation, stats):
    """``batch_norm``; in training with ``stats``, ``(y, mean, var)``."""
    if out is None and residual is None and activation is None:
        done = _small_batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
                                 eps, axis, stats)
        if done is not None:
            return done
    be = _dispatch.backend(x=x, running_mean=running_mean, running_var=running_var,
                           weight=weight, bias=bias, out=out, residual=residual)
    call = Call(be, required(x, "x"), axis)
    weight = call.vector(weight, "weight")
    bias = call.vector(bias, "bias")
    epilogue = call.epilogue(residual, activation)
    read = () if residual is None else (be.array(residual, "residual"),)
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
        target, deliver = call.output(out, like_x=read,
                                      vectors=(running_mean, running_var, weight, bias))
        return deliver(normalize(call, running_mean, running_var, weight, bias, eps, target,
                                 epilogue))
    running_mean = call.running_buffer(running_mean, "running_mean")
    running_var = call.running_buffer(running_var, "running_var")
    target, deliver = call.output(out, like_x=read, vectors=(weight, bias))
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
    y, mean, var = be.forward(call, weight, bias, eps, target,
                              call.plan.stats_dtype if stats else None, running, momentum,
                              count / (count - 1) if count > 1 else 1.0, epilogue)
    return (deliver(y), mean, var) if stats else deliver(y)


def batch_norm_forward(x, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
                       residual=None, activation=None, virtual_batch_size=None):
    """Training-mode forward: ``(y, mean, var)`` with the batch statistics (var biased);
    ``y = act(BN(x) + residual)`` where ``residual``/``activation`` ("relu") are given.

    ``virtual_batch_size`` (ghost batch norm): axis 0 is split into groups of that
    many consecutive samples (the last may be smaller), each normalized with its own
    statistics; mean/var are then (groups, C).
    """
    if (out is None and residual is None and activation is None and virtual_batch_size is None
            and _eps(eps, True)):
        small = _small(axis, x, weight, bias)
        done = small and small[0].fused_forward(small[2], x, weight, bias, eps, None, 0.0, 1.0,
                                                small[1].stats_dtype, None)
        if done:
            return done
    be = _dispatch.backend(x=x, weight=weight, bias=bias, out=out, residual=residual)
    call = Call(be, required(x, "x"), axis, virtual_batch_size=virtual_batch_size)
    weight = call.vector(weight, "weight")
    bias = call.vector(bias, "bias")
    eps = _layout.check_eps(eps, training=True)
    epilogue = call.epilogue(residual, activation)
    read = () if residual is None else (be.array(residual, "residual"),)
    target, deliver = call.output(out, like_x=read, vectors=(weight, bias))
    y, mean, var = be.forward(call, weight, bias, eps, target, call.plan.stats_dtype, None, 0.0,
                              1.0, epilogue)
    return (deliver(y), *call.as_given(mean, var))


def gradients(call, dy, mean, var, weight, eps, count, batch_stats, out, gate3=None,
              residual_grad=False, reduce_sums=None):
    """The backward of a forward with batch (``batch_stats``) or given statistics:
    ``(dx, (sum_dy, sum_dy_xmu), dresidual)`` from dy (shaped like x) through the ReLU's
    ``gate3`` (a view of y or of a kept mask; None: no ReLU). ``dresidual`` (where
    ``residual_grad``, else None) is the gated dy, written by the reduction pass; the dx
    pass then reads it in place of dy and the gate. ``reduce_sums``: what a synchronized
    layer does to the per-channel sums in between (None: nothing)."""
    be = call.be
    dy3 = call.like_x(dy, "dy")
    sums = be.backward_sums(call, dy3, mean, gate3, residual_grad)
    dresidual = None
    if residual_grad:
        *sums, dresidual = sums
        if np.dtype(be.array(dy, "dy").dtype) == call.plan.dtype:
            dy3, gate3 = be.view(call, be.array(dresidual, "dresidual")), None
    if reduce_sums is not None:
        sums = reduce_sums(*sums)
    dx = be.grad_input(call, dy3, mean, var, weight, eps, *sums, count, batch_stats, out, gate3)
    return dx, tuple(sums), dresidual


def batch_norm_backward(dy, x, mean, var, weight=None, eps=1e-5, *, axis=1, out=None,
                        y=None, activation=None, residual_grad=False, virtual_batch_size=None):
    """Gradients of the training-mode forward: ``(dx, dweight, dbias)``, and the residual's
    gradient ``dresidual`` last where ``residual_grad``.

    ``mean``/``var`` are the batch statistics ``batch_norm_forward`` returned
    (var biased; (groups, C) with the same ``virtual_batch_size``); dweight/dbias
    are None when weight is None. Behind
    ``activation="relu"`` the gradient flows where the forward's output ``y`` is
    positive, as in PyTorch; ``dresidual`` is that masked dy.
    """
    if (out is None and y is None and activation is None and not residual_grad
            and virtual_batch_size is None and dy is not None and mean is not None
            and var is not None and _eps(eps, False)):
        small = _small(axis, x, mean, var, weight, like_x=dy)
        done = small and small[0].fused_backward(small[2], dy, x, mean, var, weight, eps)
        if done:
            return done
    be = _dispatch.backend(dy=dy, x=x, mean=mean, var=var, weight=weight, out=out, y=y)
    call = Call(be, required(x, "x"), axis, virtual_batch_size=virtual_batch_size)
    mean = call.statistics(mean, "mean")
    var = call.statistics(var, "var")
    weight = call.vector(weight, "weight")
    eps = _layout.check_eps(eps)
    required(dy, "dy")
    gate3, read = gate(call, y, activation)
    target, deliver = call.output(out, like_x=(be.array(dy, "dy"), *read),
                                  vectors=(mean, var, weight))
    done = call.virtual and be.grouped_backward(call, call.like_x(dy, "dy"), mean, var, weight,
                                                eps, target, gate3, bool(residual_grad))
    if done:
        dx, *grads, dresidual = done
    else:
        dx, sums, dresidual = gradients(call, dy, mean, var, weight, eps,
                                        call.plan.group_count, True, target, gate3,
                                        bool(residual_grad))
        grads = (None, None) if weight is None else be.param_grads(call.like, weight, var,
                                                                   eps, *sums)
    dx = deliver(dx)
    return (dx, *grads, dresidual) if residual_grad else (dx, *grads)


def gate(call, y, activation):
    """(the ReLU's gate: a view of the forward's output ``y``, or None; the arrays read) for
    a backward's ``y=``/``activation=`` (validated)."""
    if _layout.check_activation(activation) is None:
        if y is not None:
            raise ValueError("y is only read behind activation='relu'; got activation=None")
        return None, ()
    if y is None:
        raise ValueError("activation='relu' needs y, the forward's output (the gradient "
                         "flows where y > 0)")
    return call.like_x(y, "y"), (call.be.array(y, "y"),)


# ---- batch renormalization (Ioffe 2017) -------------------------------------------------------


def renorm_forward(call, mean, var, running_mean, running_var, weight, bias, rmax, dmax, eps,
                   out=None, epilogue=PLAIN):
    """Batch renorm's ``(y, r, d)`` from the batch statistics (float64 mean, biased var) and the
    running buffers before their update: one per-channel stage, one affine pass (and the
    ``epilogue``)."""
    be = call.be
    r, d, scale, shift = be.renorm_coefficients(call.plan.dtype, mean, var, running_mean,
                                                running_var, weight, bias, rmax, dmax, eps)
    return be.affine(call, scale, shift, out, epilogue), r, d


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
    call = Call(be, required(x, "x"), axis)
    running_mean = call.running_buffer(required(running_mean, "running_mean"), "running_mean")
    running_var = call.running_buffer(required(running_var, "running_var"), "running_var")
    weight = call.vector(weight, "weight")
    bias = call.vector(bias, "bias")
    rmax, dmax = _layout.check_renorm_limits(rmax, dmax)
    momentum = _layout.check_momentum(momentum)
    eps = _layout.check_eps(eps, training=True)
    target, deliver = call.output(out, vectors=(weight, bias))
    data = [call.x] + ([] if out is None else [be.array(out, "out")])
    for buffer, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if any(be.overlap(buffer, a) for a in data):
            raise ValueError(f"{name} shares memory with x or out: it is written in place")
    weight, bias = (private(be, p, (running_mean, running_var)) for p in (weight, bias))
    require_values(call)
    count = call.plan.count
    mean, var = be.batch_moments(call, variance=True)
    y, r, d = renorm_forward(call, mean, var, running_mean, running_var, weight, bias, rmax,
                             dmax, eps, target)
    if count > 1:  # PyTorch's rule: an empty batch updates nothing
        be.ema(running_mean, running_var, mean, var, momentum, count / (count - 1))
    return (deliver(y), *(be.cast(call.like, v, call.plan.stats_dtype) for v in (mean, var, r, d)))


def batch_renorm_backward(dy, x, mean, var, r, d, weight=None, eps=1e-5, *, axis=1, out=None):
    """Gradients of ``batch_renorm_forward``: ``(dx, dweight, dbias)``, r and d held constant
    (mean/var/r/d as the forward returned them); dweight/dbias are None when weight is None.
    dx is batch norm's with the weight ``weight * r`` (no extra pass)."""
    be = _dispatch.backend(dy=dy, x=x, mean=mean, var=var, r=r, d=d, weight=weight, out=out)
    call = Call(be, required(x, "x"), axis)
    mean, var, r, d = (call.vector(required(v, name), name)
                       for v, name in ((mean, "mean"), (var, "var"), (r, "r"), (d, "d")))
    weight = call.vector(weight, "weight")
    eps = _layout.check_eps(eps)
    required(dy, "dy")
    target, deliver = call.output(out, like_x=(be.array(dy, "dy"),),
                                  vectors=(mean, var, r, d, weight))
    dx, sums, _ = gradients(call, dy, mean, var, be.renorm_weight(weight, r), eps,
                            call.plan.count, True, target)
    dx = deliver(dx)
    if weight is None:
        return dx, None, None
    return (dx, *be.renorm_grads(call.like, weight, var, r, d, eps, *sums))


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
    if (type(count) is int and count >= (2 if unbiased else 1) and type(momentum) is float
            and 0 <= momentum <= 1):  # a small call's time is its steps: one compiled call
        be = _dispatch.plain_host(running_mean, running_var, mean, var)
        if be is not None and be.fused_ema(running_mean, running_var, mean, var, momentum,
                                           count / (count - 1) if unbiased else 1.0):
            return
    be = _dispatch.backend(running_mean=running_mean, running_var=running_var, mean=mean,
                           var=var)
    running_mean = running_buffer(be, required(running_mean, "running_mean"), "running_mean",
                                  None)
    nchan = running_mean.shape[0]
    running_var = running_buffer(be, required(running_var, "running_var"), "running_var", nchan)
    momentum = _layout.check_momentum(momentum)
    if np.ndim(count) == 0:
        mean = vector(be, required(mean, "mean"), "mean", nchan)
        var = vector(be, required(var, "var"), "var", nchan)
        count = _layout.check_count(count, 2 if unbiased else 1)
        mean, var = (private(be, v, (running_mean, running_var)) for v in (mean, var))
        be.ema(running_mean, running_var, mean, var, momentum,
               count / (count - 1) if unbiased else 1.0)
        return
    counts = [_layout.check_count(n, 2) for n in count]
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
