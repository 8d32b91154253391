"""``BatchNorm`` and ``BatchRenorm``: layers for custom trainers, state-dict compatible with
PyTorch."""
import contextlib
import threading
from typing import Any, NamedTuple

import numpy as np

from . import _dispatch, _layout
from .batchnorm import (Call, PooledStatistics, _eps, _small, check_convention, gradients,
                        normalize, renorm_forward, require_values, required, reused)

_COUNTER = "num_batches_tracked"


class _Saved(NamedTuple):
    """What ``backward`` needs from the last ``forward`` (statistics as normalized with; the
    ReLU's gate y > 0 as a uint8 array, or None; whether a residual was added)."""

    call: object
    mean: object
    var: object
    count: int
    batch_stats: bool
    mask: object
    residual: bool
    renorm: Any = None  # batch renorm's (r, d), constants for the gradient


class BatchNorm:
    """Batch normalization over the channel ``axis`` with learnable affine parameters.

    Mirrors ``torch.nn.BatchNorm{1,2,3}d``: ``forward`` uses the batch
    statistics in training mode (updating the running buffers) and the running
    statistics in evaluation mode; ``momentum=None`` is the cumulative moving
    average (factor ``1 / num_batches_tracked``). ``backward(dy)`` returns dx
    and sets ``grad_weight``/``grad_bias`` (overwritten by each call, not
    accumulated). ``activation="relu"`` and ``forward(x, residual)`` compute
    ``relu(BN(x) + residual)`` in the same pass; ``backward`` then also sets
    ``grad_residual`` (None where no residual was given).

    ``forward`` keeps its own copy of what ``backward`` needs (x's values, written
    by the normalizing pass as it reads x; the statistics; the ReLU's mask), so
    changing x or y in place in between changes nothing. Threads:
    what ``forward`` keeps is per thread (each thread's ``backward`` pairs with
    that thread's last ``forward``), and the running-buffer and gradient updates
    are serialized, none lost; ``grad_weight``/``grad_bias`` are those of the
    last ``backward`` of any thread.

    ``virtual_batch_size`` (ghost batch norm): in training, axis 0 is split into
    groups of that many consecutive samples, each normalized with its own
    statistics; the running buffers move by the groups' count-weighted mean
    statistics (variance unbiased within each group). ``precise_statistics()``
    replaces the running buffers by the exact statistics of the batches seen
    inside it.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32, device="cpu",
                 activation=None, virtual_batch_size=None):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        dtype = np.dtype(dtype)
        _layout.check_float_dtype(dtype, "dtype")
        self.num_features = int(num_features)
        self.eps = _layout.check_eps(eps)
        self.momentum = None if momentum is None else _layout.check_momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = axis
        self.activation = _layout.check_activation(activation)
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
        self.grad_weight = self.grad_bias = self.grad_residual = None
        self._local = threading.local()  # per thread: what backward needs (``_Saved``)
        self._lock = threading.Lock()    # serializes updates of buffers and gradients
        self.device = device
        if device == "cuda":  # parameters and running buffers live on the GPU
            be = _dispatch.device()
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(self, name) is not None:
                    setattr(self, name, be.from_host(getattr(self, name)))

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}" + self._options() + ")")

    def _options(self):
        """The keyword arguments ``__repr__`` shows where they are not the defaults."""
        return (("" if self.activation is None else f", activation={self.activation!r}")
                + ("" if self.virtual_batch_size is None
                   else f", virtual_batch_size={self.virtual_batch_size}"))

    def __getstate__(self):  # what one thread's backward needs, and the lock, stay here
        return {k: v for k, v in vars(self).items() if k not in ("_local", "_lock")}

    def __setstate__(self, state):
        vars(self).update(state)
        self._local, self._lock = threading.local(), threading.Lock()

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

    def forward(self, x, residual=None):
        if residual is None and self.activation is None and self._uses_batch_stats() \
                and self._plain():
            y = self._small_forward(x)
            if y is not None:
                return y
        be = self._backend(x=x, residual=residual)
        batch_stats = self._uses_batch_stats()
        call = Call(be, required(x, "x"), self.axis,
                    virtual_batch_size=self.virtual_batch_size if batch_stats else None)
        if call.plan.nchan != self.num_features:
            raise ValueError(f"x has {call.plan.nchan} channels on axis {self.axis}, expected "
                             f"{self.num_features}")
        # Virtual batches of a layer whose hooks are not extended: the statistics and y in one
        # stage (``Backend.forward``; the host does small groups a group at a time).
        grouped = batch_stats and call.plan.groups > 1 and self._plain_hooks()
        if batch_stats:
            _layout.check_eps(self.eps, training=True)
            if grouped:
                count = call.plan.group_count
            else:
                count, mean, var = self._batch_stats(be, call)
            require_values(call, count)
        else:  # copies: backward must see the statistics this forward used
            count = call.plan.count
            mean = be.to_float64(self.running_mean)
            var = be.to_float64(self.running_var)
        epilogue = call.epilogue(residual, self.activation)
        earlier = getattr(self._local, "saved", None)
        kept, copy = call.private(earlier and earlier.call)
        mask = None
        if epilogue.relu and call.plan.size:
            mask = earlier.mask if earlier is not None and earlier.mask is not None \
                and earlier.call.plan is call.plan else be.kept(call, np.uint8)
        epilogue = epilogue._replace(copy=copy, mask=mask)
        if grouped:
            y, mean, var = be.forward(call, self.weight, self.bias, self.eps, None, None, None,
                                      0.0, 1.0, epilogue)
            renorm = None
        else:
            y, renorm = self._normalize(call, mean, var, epilogue)
        if batch_stats and self.training and self.track_running_stats:
            with self._lock:
                self._update_running(be, call, count, mean, var)
        self._local.saved = _Saved(kept, mean, var, count, batch_stats, mask,
                                   residual is not None, renorm)
        return y

    __call__ = forward

    def _update_running(self, be, call, count, mean, var):
        """After a training forward: fold the batch statistics into the running buffers (or,
        inside ``precise_statistics``, into the exact statistics, the buffers untouched)."""
        plan = call.plan
        if count <= 1:  # PyTorch: an empty batch moves the counter, not the buffers
            if self._pooled is None:
                self.num_batches_tracked += 1
            return
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

    def _normalize(self, call, mean, var, epilogue):
        """y from the statistics this forward normalizes with, and batch renorm's (r, d) (None:
        plain batch norm)."""
        return normalize(call, mean, var, self.weight, self.bias, self.eps,
                         epilogue=epilogue), None

    def _plain_hooks(self):
        """Whether the hooks here are not extended (a synchronized or renorm layer's are)."""
        return (type(self)._batch_stats is BatchNorm._batch_stats
                and type(self)._reduce_sums is BatchNorm._reduce_sums
                and type(self)._normalize is BatchNorm._normalize)

    def _plain(self):
        """Whether this layer's batch is its input, whole (the hooks here not extended, no
        virtual batches, no precise statistics): what the fused small-call path computes."""
        return self._plain_hooks() and self.virtual_batch_size is None and self._pooled is None

    def _small_forward(self, x):
        """``forward`` with batch statistics, no epilogue, in one compiled call where the
        backend has one (``batchnorm._small``); None: the general way."""
        small = _small(self.axis, x, self.weight, self.bias, self.running_mean, self.running_var)
        if small is None or not _eps(self.eps, True):
            return None
        be, plan, fused = small
        count = plan.count
        if plan.nchan != self.num_features or count < 2:
            return None
        call = Call.planned(be, x, plan)
        earlier = getattr(self._local, "saved", None)
        copy = reused(earlier and earlier.call, "copy_of_x", plan)
        if copy is None:
            copy = be.kept(call, None)
        if not (self.training and self.track_running_stats):
            done = be.fused_forward(fused, x, self.weight, self.bias, self.eps, None, 0.0, 1.0,
                                    np.float64, copy)
        else:
            with self._lock:
                tracked = float(self.num_batches_tracked) + 1
                done = be.fused_forward(
                    fused, x, self.weight, self.bias, self.eps,
                    (self.running_mean, self.running_var),
                    1.0 / tracked if self.momentum is None else self.momentum,
                    count / (count - 1), np.float64, copy)
                if done is not None:
                    self.num_batches_tracked += 1
        if done is None:
            return None
        y, mean, var = done
        self._local.saved = _Saved(call.reading(copy), mean, var, count, True, None, False)
        return y

    def backward(self, dy):
        """dx for this thread's last ``forward``; sets ``grad_weight``, ``grad_bias`` and
        ``grad_residual``."""
        saved = getattr(self._local, "saved", None)
        if saved is None:
            raise RuntimeError("backward called before forward")
        x = getattr(saved.call, "copy_of_x", None)  # x's values as forward saw them
        if (x is not None and dy is not None and saved.batch_stats and saved.mask is None and not saved.residual
                and self._plain()):
            small = _small(self.axis, x, saved.mean, saved.var, self.weight, like_x=dy)
            done = small and small[0].fused_backward(small[2], dy, x, saved.mean, saved.var,
                                                     self.weight, self.eps)
            if done:
                dx, *grads = done
                with self._lock:
                    self.grad_weight, self.grad_bias = grads
                    self.grad_residual = None
                return dx
        be = self._backend(dy=dy, x=saved.call.like)
        call, mean, var = saved.call, saved.mean, saved.var
        gate3 = None if saved.mask is None else be.view(call, saved.mask)
        weight = self.weight
        if saved.renorm is not None:  # batch renorm's dx: batch norm's with weight * r
            weight = be.renorm_weight(self.weight, saved.renorm[0])
        required(dy, "dy")
        done = (saved.batch_stats and call.plan.groups > 1 and self._plain_hooks()
                and be.grouped_backward(call, call.like_x(dy, "dy"), mean, var, weight,
                                        self.eps, None, gate3, saved.residual))
        if done:
            dx, *grads, dresidual = done
        else:
            dx, sums, dresidual = gradients(
                call, dy, mean, var, weight, self.eps, saved.count, saved.batch_stats, None,
                gate3, saved.residual,
                lambda sum_dy, sum_dy_xmu: self._reduce_sums(be, sum_dy, sum_dy_xmu,
                                                             saved.batch_stats))
            grads = (None, None)
            if self.weight is not None and saved.renorm is None:
                grads = be.param_grads(self.weight, self.weight, var, self.eps, *sums)
            elif self.weight is not None:
                grads = be.renorm_grads(self.weight, self.weight, var, *saved.renorm, self.eps,
                                        *sums)
        with self._lock:
            self.grad_weight, self.grad_bias = grads
            self.grad_residual = dresidual
        return dx

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
        be = self._backend()
        values = {}
        for name in staged:  # every value checked before anything is assigned
            value = state_dict[name]
            if name == _COUNTER or not _layout.is_device(value):
                try:
                    value = np.asarray(value)
                except Exception as exc:
                    raise TypeError(f"{name} must be array-like, got {type(value).__name__}") \
                        from exc
            shape, want = tuple(value.shape), tuple(getattr(self, name).shape)
            if shape != want:
                raise ValueError(f"{name} must have shape {want}, got {shape}")
            kind = np.dtype(value.dtype).kind
            if kind not in ("iu" if name == _COUNTER else "biuf"):
                raise TypeError(f"{name} must be {'an integer' if name == _COUNTER else 'a real'}"
                                f" array, got dtype {value.dtype}")
            values[name] = value
        for name, value in values.items():
            if name == _COUNTER:  # a host counter on either side
                np.copyto(self.num_batches_tracked, value, casting="unsafe")
            else:
                be.assign(getattr(self, name), value)


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
                 dmax=5.0, axis=1, dtype=np.float32, device="cpu", activation=None):
        super().__init__(num_features, eps, momentum, affine, True, axis=axis, dtype=dtype,
                         device=device, activation=activation)
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
                f"dmax={self.dmax}, axis={self.axis}" + self._options() + ")")

    def _normalize(self, call, mean, var, epilogue):
        if not self.training:
            return super()._normalize(call, mean, var, epilogue)
        y, r, d = renorm_forward(call, mean, var, self.running_mean, self.running_var,
                                 self.weight, self.bias, self.rmax, self.dmax, self.eps,
                                 epilogue=epilogue)
        return y, (r, d)
