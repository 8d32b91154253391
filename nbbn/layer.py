"""``BatchNorm``: a batch-norm layer for custom trainers, state-dict compatible with PyTorch."""
import threading
from typing import NamedTuple

import numpy as np

from . import _dispatch, _layout
from .batchnorm import Call, normalize, require_values, required

_COUNTER = "num_batches_tracked"


class _Saved(NamedTuple):
    """What ``backward`` needs from the last ``forward`` (statistics as normalized with)."""

    call: object
    mean: object
    var: object
    count: int
    batch_stats: bool


class BatchNorm:
    """Batch normalization over the channel ``axis`` with learnable affine parameters.

    Mirrors ``torch.nn.BatchNorm{1,2,3}d``: ``forward`` uses the batch
    statistics in training mode (updating the running buffers) and the running
    statistics in evaluation mode; ``momentum=None`` is the cumulative moving
    average (factor ``1 / num_batches_tracked``). ``backward(dy)`` returns dx
    and sets ``grad_weight``/``grad_bias`` (overwritten by each call, not
    accumulated).

    ``forward`` keeps its own copy of what ``backward`` needs (x's values, the
    statistics), so changing x in place in between changes nothing. Threads:
    what ``forward`` keeps is per thread (each thread's ``backward`` pairs with
    that thread's last ``forward``), and the running-buffer and gradient updates
    are serialized, none lost; ``grad_weight``/``grad_bias`` are those of the
    last ``backward`` of any thread.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32, device="cpu"):
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
        self.dtype = dtype
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
                f"axis={self.axis})")

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

    def forward(self, x):
        be = self._backend(x=x)
        call = Call(be, required(x, "x"), self.axis)
        if call.plan.nchan != self.num_features:
            raise ValueError(f"x has {call.plan.nchan} channels on axis {self.axis}, expected "
                             f"{self.num_features}")
        batch_stats = self._uses_batch_stats()
        if batch_stats:
            _layout.check_eps(self.eps, training=True)
            count, mean, var = self._batch_stats(be, call)
            require_values(call, count)
        else:  # copies: backward must see the statistics this forward used
            count = call.plan.count
            mean = be.to_float64(self.running_mean)
            var = be.to_float64(self.running_var)
        y = normalize(call, mean, var, self.weight, self.bias, self.eps)
        if batch_stats and self.training and self.track_running_stats:
            with self._lock:
                self.num_batches_tracked += 1
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                if count > 1:  # PyTorch: an empty batch moves the counter, not the buffers
                    be.ema(self.running_mean, self.running_var, mean, var, factor,
                           count / (count - 1))
        earlier = getattr(self._local, "saved", None)
        self._local.saved = _Saved(call.private(earlier and earlier.call), mean, var, count,
                                   batch_stats)
        return y

    __call__ = forward

    def backward(self, dy):
        """dx for this thread's last ``forward``; sets ``grad_weight`` and ``grad_bias``."""
        saved = getattr(self._local, "saved", None)
        if saved is None:
            raise RuntimeError("backward called before forward")
        be = self._backend(dy=dy, x=saved.call.like)
        call, mean, var = saved.call, saved.mean, saved.var
        dy3 = call.like_x(dy, "dy")
        sum_dy, sum_dy_xmu = self._reduce_sums(be, *be.backward_sums(call, dy3, mean),
                                               saved.batch_stats)
        dx = be.grad_input(call, dy3, mean, var, self.weight, self.eps, sum_dy, sum_dy_xmu,
                           saved.count, saved.batch_stats, None)
        grads = (None, None)
        if self.weight is not None:
            grads = be.param_grads(self.weight, self.weight, var, self.eps, sum_dy, sum_dy_xmu)
        with self._lock:
            self.grad_weight, self.grad_bias = grads
        return dx

    # ---- hooks a subclass may extend (nbbn.distributed.SyncBatchNorm) ------------------------
    # A synchronized subclass all-reduces in them: forward gets the batch statistics from
    # ``_batch_stats`` and backward reduces its per-channel sums in ``_reduce_sums``. Both see
    # the call's backend ``be`` (host or device) and return vectors on the same side.

    def _batch_stats(self, be, call):
        """``(count, mean, var)`` per channel of the batch: values per channel, float64
        mean and biased variance. Here the batch is ``call.x``; a synchronized layer
        merges the moments of every shard of the batch."""
        return (call.plan.count, *be.batch_moments(call, variance=True))

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
