"""``BatchNorm``: a batch-norm layer for custom trainers, state-dict compatible with PyTorch."""
import numpy as np

from . import _dispatch, _layout
from . import batchnorm as bn


class BatchNorm:
    """Batch normalization over the channel ``axis`` with learnable affine parameters.

    Mirrors ``torch.nn.BatchNorm{1,2,3}d``: ``forward`` uses the batch
    statistics in training mode (updating the running buffers) and the running
    statistics in evaluation mode; ``momentum=None`` is the cumulative moving
    average (factor ``1 / num_batches_tracked``). ``backward(dy)`` returns dx
    and sets ``grad_weight``/``grad_bias`` (overwritten by each call, not
    accumulated).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32, device="cpu"):
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
            _dispatch.cuda().layer_to_device(self)

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis})")

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def _uses_batch_stats(self):
        return self.training or not self.track_running_stats

    def forward(self, x):
        if _dispatch.on_device(x=x, weight=self.weight, running_mean=self.running_mean):
            return _dispatch.cuda().layer_forward(self, x)
        call = bn._Call(x, self.axis)
        if call.nchan != self.num_features:
            raise ValueError(f"x has {call.nchan} channels on axis {self.axis}, expected "
                             f"{self.num_features}")
        batch_stats = self._uses_batch_stats()
        if not batch_stats:
            mean, var, count = self.running_mean, self.running_var, call.count
        else:
            count, mean, var = self._batch_stats(call)
            bn._require_values(call, count)
        y = bn._normalize(call, mean, var, self.weight, self.bias, self.eps, None)
        if batch_stats and self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
            bn._ema(self.running_mean, self.running_var, mean, var, factor, count / (count - 1))
        self._saved = (call, np.asarray(mean, np.float64), bn._invstd(var, self.eps),
                       batch_stats, count)
        return y

    __call__ = forward

    def backward(self, dy):
        """dx for the last ``forward``; sets ``grad_weight`` and ``grad_bias``."""
        if _dispatch.on_device(dy=dy, weight=self.weight, x=getattr(self._saved, "x", None)):
            return _dispatch.cuda().layer_backward(self, dy)
        if self._saved is None:
            raise RuntimeError("backward called before forward")
        call, mean, invstd, batch_stats, count = self._saved
        dy3 = bn._dy_view(call, dy)
        sum_dy, sum_dy_xmu = self._reduce_sums(*bn._backward_sums(call, dy3, mean), batch_stats)
        dx = bn._grad_input(call, dy3, mean, invstd, self.weight, sum_dy, sum_dy_xmu, count,
                            batch_stats, None)
        self.grad_weight, self.grad_bias = bn._param_grads(self.weight, invstd, sum_dy,
                                                           sum_dy_xmu)
        return dx

    # ---- stages a subclass may extend (nbbn.distributed.SyncBatchNorm) ----------------------
    # A synchronized subclass all-reduces between the stages: forward computes the batch
    # statistics through ``_batch_stats`` and backward reduces its per-channel sums through
    # ``_reduce_sums`` (both exchange host float64 vectors, C values). A device (CUDA) code
    # path must go through both hooks too; set this True once it does, and SyncBatchNorm
    # accepts CUDA arrays (until then it refuses them rather than normalize per shard).
    _DEVICE_PATH_USES_HOOKS = False

    def _batch_stats(self, call):
        """``(count, mean, var)`` per channel of the batch: values per channel, float64
        mean and biased variance. Here the batch is ``call.x``; a synchronized layer
        merges the moments of every shard of the batch."""
        m = bn._local_moments(call)
        return (m.count, *bn._mean_var(m))

    def _reduce_sums(self, sum_dy, sum_dy_xmu, batch_stats):
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
        if self.device == "cuda":
            return _dispatch.cuda().layer_state_dict(self)
        return {name: getattr(self, name).copy() for name in self._state_names()}

    def load_state_dict(self, state_dict, strict=True):
        """Load a state dict (e.g. a PyTorch one converted to NumPy); all-or-nothing."""
        if self.device == "cuda":
            return _dispatch.cuda().layer_load_state_dict(self, state_dict, strict)
        names = self._state_names()
        missing = [k for k in names if k not in state_dict and k != "num_batches_tracked"]
        unexpected = [k for k in state_dict if k not in names]
        if strict and (missing or unexpected):
            raise KeyError(f"Error(s) in loading state_dict for BatchNorm: missing keys "
                           f"{missing}, unexpected keys {unexpected}")
        staged = {}
        for name in names:
            if name not in state_dict:
                continue
            value = np.asarray(state_dict[name])
            current = getattr(self, name)
            if value.shape != current.shape:
                raise ValueError(f"{name} must have shape {current.shape}, got {value.shape}")
            staged[name] = value
        for name, value in staged.items():
            np.copyto(getattr(self, name), value, casting="unsafe")
