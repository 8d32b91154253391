"""``BatchNorm`` and ``BatchRenorm``: layers for custom trainers, state-dict compatible with
PyTorch."""
import contextlib
from typing import Any, NamedTuple

import numpy as np

from . import _dispatch, _layout
from .batchnorm import (Call, PooledStatistics, check_convention, normalize, renorm_forward,
                        renorm_gradients, require_values)

_COUNTER = "num_batches_tracked"


class _Saved(NamedTuple):
    """What ``backward`` needs from the last ``forward`` (statistics as normalized with)."""

    call: object
    mean: object
    var: object
    count: int
    batch_stats: bool
    renorm: Any = None  # batch renorm's (r, d), constants for the gradient


class BatchNorm:
    """Batch normalization over the channel ``axis`` with learnable affine parameters.

    Mirrors ``torch.nn.BatchNorm{1,2,3}d``: ``forward`` uses the batch
    statistics in training mode (updating the running buffers) and the running
    statistics in evaluation mode; ``momentum=None`` is the cumulative moving
    average (factor ``1 / num_batches_tracked``). ``backward(dy)`` returns dx
    and sets ``grad_weight``/``grad_bias`` (overwritten by each call, not
    accumulated).

    ``virtual_batch_size`` (ghost batch norm): in training, axis 0 is split into
    groups of that many consecutive samples, each normalized with its own
    statistics; the running buffers move by the groups' count-weighted mean
    statistics (variance unbiased within each group). ``precise_statistics()``
    replaces the running buffers by the exact statistics of the batches seen
    inside it.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32, device="cpu",
                 virtual_batch_size=None):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.num_features = int(num_features)
        self.eps = _layout.check_eps(eps)
        self.momentum = None if momentum is None else _layout.check_momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = axis
        self.dtype = dtype
        self.virtual_batch_size = (None if virtual_batch_size is None else
                                   _layout.check_virtual_batch_size(virtual_batch_size))
        self._pooled = None  # inside precise_statistics: the batches' PooledStatistics
        n = self.num_features
        self.weight = np.ones(n, dtype) if affine else None
        self.bias = np.zeros(n, dtype) if affine else None
        if track_running_stats:
            self.running_mean = np.zeros(n, dtype)
            self.running_var = np.ones(n, dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.training = True
        self.grad_weight = self.grad_bias = None
        self._saved = None
        self.device = device
        if device == "cuda":  # parameters and running buffers live on the GPU
            be = _dispatch.device()
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(self, name) is not None:
                    setattr(self, name, be.from_host(getattr(self, name)))

    def __repr__(self):
        vbs = "" if self.virtual_batch_size is None else \
            f", virtual_batch_size={self.virtual_batch_size}"
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}{vbs})")

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def _uses_batch_stats(self):
        return self.training or not self.track_running_stats

    def _backend(self, **arrays):
        """The host's or the device's backend, by where the call's and the layer's arrays are."""
        return _dispatch.backend(**arrays, weight=self.weight, running_mean=self.running_mean)

    def forward(self, x):
        be = self._backend(x=x)
        batch_stats = self._uses_batch_stats()
        call = Call(be, x, self.axis,
                    virtual_batch_size=self.virtual_batch_size if batch_stats else None)
        if call.plan.nchan != self.num_features:
            raise ValueError(f"x has {call.plan.nchan} channels on axis {self.axis}, expected "
                             f"{self.num_features}")
        if batch_stats:
            count, mean, var = self._batch_stats(be, call)
            require_values(call, count)
        else:  # copies: backward must see the statistics this forward used
            count = call.plan.count
            mean = be.to_float64(self.running_mean)
            var = be.to_float64(self.running_var)
        y, renorm = self._normalize(call, mean, var)
        if batch_stats and self.training and self.track_running_stats:
            self._update_running(be, call, count, mean, var)
        self._saved = _Saved(call, mean, var, count, batch_stats, renorm)
        return y

    __call__ = forward

    def _update_running(self, be, call, count, mean, var):
        """After a training forward: fold the batch statistics into the running buffers (or,
        inside ``precise_statistics``, into the exact statistics, the buffers untouched)."""
        plan = call.plan
        if self._pooled is not None:
            self._pooled.add(mean, var, count, plan.last_count if plan.groups > 1 else count)
            return
        self.num_batches_tracked += 1
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        if plan.groups == 1:
            be.ema(self.running_mean, self.running_var, mean, var, factor, count / (count - 1))
            return
        groups = PooledStatistics(self.running_mean, plan.nchan)
        groups.add(mean, var, count, plan.last_count)
        be.ema(self.running_mean, self.running_var, *groups.batch_mean(), factor, 1.0)

    @contextlib.contextmanager
    def precise_statistics(self, convention="population"):
        """Exact inference statistics ("precise BN"): inside, training-mode forwards leave the
        running buffers (and ``num_batches_tracked``) alone and pool their batches' statistics;
        on a normal exit the running buffers receive them, where any batch was seen.

        ``"population"``: the mean and the unbiased variance of all values seen, merged
        exactly (Chan et al., float64), not an average of batch statistics.
        ``"batch_mean"``: the count-weighted mean of the batch means and of the batches'
        unbiased variances (what training-time normalization saw; with virtual batches,
        of the groups'). Nothing else about the layer changes.
        """
        check_convention(convention)
        if not self.track_running_stats:
            raise ValueError("precise_statistics needs running statistics "
                             "(track_running_stats=True)")
        if self._pooled is not None:
            raise RuntimeError("precise_statistics is already active on this layer")
        self._pooled = PooledStatistics(self.running_mean, self.num_features)
        try:
            yield self
            self._pooled.store(self.running_mean, self.running_var, convention)
        finally:
            self._pooled = None

    def backward(self, dy):
        """dx for the last ``forward``; sets ``grad_weight`` and ``grad_bias``."""
        saved = self._saved
        if saved is None:
            raise RuntimeError("backward called before forward")
        be = self._backend(dy=dy, x=saved.call.like)
        call, mean, var = saved.call, saved.mean, saved.var
        dy3 = call.like_x(dy, "dy")
        sums = self._reduce_sums(be, *be.backward_sums(call, dy3, mean), saved.batch_stats)
        if saved.renorm is not None:
            dx, self.grad_weight, self.grad_bias = renorm_gradients(
                call, dy3, mean, var, *saved.renorm, self.weight, self.eps, sums, saved.count,
                like=self.weight)
            return dx
        dx = be.grad_input(call, dy3, mean, var, self.weight, self.eps, *sums, saved.count,
                           saved.batch_stats, None)
        self.grad_weight = self.grad_bias = None
        if self.weight is not None:
            self.grad_weight, self.grad_bias = be.param_grads(self.weight, self.weight, var,
                                                              self.eps, *sums)
        return dx

    def _normalize(self, call, mean, var):
        """y from the statistics this forward normalizes with, and batch renorm's (r, d) (None:
        plain batch norm)."""
        return normalize(call, mean, var, self.weight, self.bias, self.eps), None

    # ---- hooks a subclass may extend (nbbn.distributed.SyncBatchNorm) ------------------------
    # A synchronized subclass all-reduces in them: forward gets the batch statistics from
    # ``_batch_stats`` and backward reduces its per-channel sums in ``_reduce_sums``. Both see
    # the call's backend ``be`` (host or device) and return vectors on the same side.

    def _batch_stats(self, be, call):
        """``(count, mean, var)`` per channel of the batch: values per channel (per virtual
        batch but the last, with virtual batches), float64 mean and biased variance. Here
        the batch is ``call.x``; a synchronized layer merges the moments of every shard of
        the batch."""
        return (call.plan.group_count, *be.batch_moments(call, variance=True))

    def _reduce_sums(self, be, sum_dy, sum_dy_xmu, batch_stats):
        """The backward pass's per-channel ``sum(dy)``, ``sum(dy * (x - mean))`` over the
        batch, from this call's (float64); ``batch_stats`` as in ``forward``."""
        return sum_dy, sum_dy_xmu

    # ---- state -------------------------------------------------------------------------------

    def _state_names(self):
        names = ["weight", "bias"] if self.affine else []
        if self.track_running_stats:
            names += ["running_mean", "running_var", "num_batches_tracked"]
        return names

    def state_dict(self):
        """Copies of the parameters and buffers under ``torch.nn.BatchNorm2d``'s keys."""
        be = self._backend()
        return {name: self.num_batches_tracked.copy() if name == _COUNTER
                else be.copy(getattr(self, name)) for name in self._state_names()}

    def load_state_dict(self, state_dict, strict=True):
        """Load a state dict (e.g. a PyTorch one converted to NumPy); all-or-nothing."""
        names = self._state_names()
        missing = [k for k in names if k not in state_dict and k != _COUNTER]
        unexpected = [k for k in state_dict if k not in names]
        if strict and (missing or unexpected):
            raise KeyError(f"Error(s) in loading state_dict for BatchNorm: missing keys "
                           f"{missing}, unexpected keys {unexpected}")
        staged = [name for name in names if name in state_dict]
        for name in staged:
            shape, want = tuple(np.shape(state_dict[name])), tuple(getattr(self, name).shape)
            if shape != want:
                raise ValueError(f"{name} must have shape {want}, got {shape}")
        be = self._backend()
        for name in staged:
            if name == _COUNTER:  # a host counter on either side
                np.copyto(self.num_batches_tracked, state_dict[name], casting="unsafe")
            else:
                be.assign(getattr(self, name), state_dict[name])


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe 2017): ``BatchNorm``'s interface, with batch renorm in
    training.

    Training normalizes with the batch statistics corrected towards the running ones,
    ``y = weight * ((x - mean) / sigma_b * r + d) + bias``, ``r = clip(sigma_b / sigma,
    1/rmax, rmax)``, ``d = clip((mean - running_mean) / sigma, -dmax, dmax)`` (r, d
    constant for the gradient), then updates the running buffers as batch norm does;
    evaluation is batch norm with the running buffers. ``rmax``/``dmax`` are attributes,
    so a trainer can run the paper's warm-up schedule (rmax from 1 to 3, dmax from 0 to
    5); ``rmax=1, dmax=0`` is batch norm.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.01, affine=True, *, rmax=3.0,
                 dmax=5.0, axis=1, dtype=np.float32, device="cpu"):
        super().__init__(num_features, eps, momentum, affine, True, axis=axis, dtype=dtype,
                         device=device)
        self.rmax, self.dmax = rmax, dmax

    @property
    def rmax(self):
        return self._rmax

    @rmax.setter
    def rmax(self, value):
        self._rmax = _layout.check_renorm_limits(value, 0.0)[0]

    @property
    def dmax(self):
        return self._dmax

    @dmax.setter
    def dmax(self, value):
        self._dmax = _layout.check_renorm_limits(1.0, value)[1]

    def __repr__(self):
        return (f"BatchRenorm({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, rmax={self.rmax}, "
                f"dmax={self.dmax}, axis={self.axis})")

    def _normalize(self, call, mean, var):
        if not self.training:
            return super()._normalize(call, mean, var)
        y, r, d = renorm_forward(call, mean, var, self.running_mean, self.running_var,
                                 self.weight, self.bias, self.rmax, self.dmax, self.eps)
        return y, (r, d)
