"""The host backend: the stages of ``nbbn._backend`` over NumPy arrays and the CPU kernels."""
import numpy as np

from .backward import backward_sums as _sums, grad_input as _grad_input
from .ema import ema as _ema_kernel
from .moments import channel_moments
from .normalize import affine as _affine_kernel
from . import pool


# ---- arrays ----------------------------------------------------------------------------------


def array(a, name):
    if isinstance(a, np.ndarray):
        return a
    try:
        arr = np.asarray(a)
    except Exception as exc:
        raise TypeError(f"{name} must be array-like, got {type(a).__name__}") from exc
    return arr


def check_writable(a, name):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (it is written in place), "
                        f"got {type(a).__name__}")
    if not a.flags.writeable:
        raise ValueError(f"{name} is read-only")


def overlap(a, b):
    if not a.size or not b.size or not np.may_share_memory(a, b):
        return None
    if (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides
            and a.dtype.itemsize == b.dtype.itemsize):
        return "same"
    try:
        return "partial" if np.shares_memory(a, b, max_work=10_000) else None
    except np.exceptions.TooHardError:
        return "partial"


def _kernel_input(a):
    """A native-byte-order array of a dtype the kernels read (widening float16)."""
    if a.dtype.kind == "f" and a.dtype.itemsize == 2:  # float16, either byte order
        return a.astype(np.float32)
    if not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


def _view3(a, layout, shape3=None):
    """``a`` transposed into the layout's order and viewed as 3-D; one copy where the
    strides forbid a view. Read-only: one Numba specialization whatever the caller's flags."""
    t = a.transpose(layout.order)
    try:
        v = t.reshape(layout.shape3, copy=False)
    except ValueError:  # the axes of a group cannot merge without a copy
        v = np.ascontiguousarray(t).reshape(layout.shape3)
    v.flags.writeable = False
    return v


def view(call, a):
    return _view3(_kernel_input(a), call.plan.layout)


def fallback(op, a, **kwargs):
    return op(a, **kwargs)


# ---- statistics ------------------------------------------------------------------------------


def _flip_reduced(a, axes):
    """A view of ``a`` with reduced axes' negative strides flipped (reduction order is free)."""
    if all(s >= 0 for s in a.strides):
        return a
    return a[tuple(slice(None, None, -1) if i in axes and s < 0 else slice(None)
                   for i, s in enumerate(a.strides))]


def _finish(values, shape, dtype, out):
    """Reshape to the result's shape, cast to its dtype, honour ``out=``."""
    values = values.reshape(shape)
    if out is not None:
        np.copyto(out, values, casting="unsafe")
        return out
    values = values.astype(dtype, copy=False)
    return values[()] if values.ndim == 0 else values


# A NumPy operation that raises each floating-point flag, as the step of NumPy's reduction
# that would raise it: replayed, it goes through np.errstate (ignore, warn, raise, call).
_ONE, _ZERO, _INF = np.ones(1), np.zeros(1), np.full(1, np.inf)
_FLAG_STEPS = {
    "mean of inf and -inf": lambda: np.add.reduce(np.array([np.inf, -np.inf])),
    "inf - mean": lambda: np.subtract(_INF, _INF),
    "0 / 0": lambda: np.divide(_ZERO, _ZERO),
    "m2 / 0": lambda: np.divide(_ONE, _ZERO),
}


def _numpy_flags(a, red, kinds, ddof, mean, m2):
    """The floating-point flags NumPy's mean/var would raise for these results, in its order:
    an empty slice (0 / 0), a nan made from infinities in a slice that holds no nan (their
    sum, or inf - mean), and var's division by count - ddof <= 0."""
    if not red.nchan or not {"mean", "var", "std"} & set(kinds):
        return []
    steps = []
    if red.count == 0:
        return ["0 / 0"]
    second = "var" in kinds or "std" in kinds
    made_nan = np.isnan(mean) | (np.isnan(m2) if second else False)
    if a.dtype.kind == "f" and made_nan.any():
        # min propagates nan (and no inf makes one): one pass, no input-sized temporary
        had_nan = np.isnan(np.minimum.reduce(a, axis=red.axes)).reshape(-1)
        if (made_nan & ~had_nan).any():
            steps.append("inf - mean" if second else "mean of inf and -inf")
    if second and red.count - ddof <= 0:
        if (m2 == 0).any():
            steps.append("0 / 0")
        if (m2 > 0).any():
            steps.append("m2 / 0")
    return steps


def statistics(like, a, red, kinds, ddof, dtype, out):
    if red.count == 0 or red.nchan == 0:
        mean = np.full(red.nchan, np.nan)  # NumPy's mean of nothing
        m2 = np.zeros(red.nchan)  # a sum over nothing
        mean_low = np.zeros(red.nchan)
    else:
        mean, m2, mean_low = channel_moments(_view3(_flip_reduced(_kernel_input(a), red.axes),
                                             red.layout))
    for step in _numpy_flags(a, red, kinds, ddof, mean, m2):
        _FLAG_STEPS[step]()
    results = []
    for kind in kinds:
        if kind == "mean":
            v = mean
        elif kind == "m2":
            v = m2
        elif kind == "mean_low":
            v = mean_low
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                v = m2 / max(red.count - ddof, 0)
            if kind == "std":
                v = np.sqrt(v)
        results.append(_finish(v, red.shape, dtype, out if not results else None))
    return tuple(results)


# ---- batch norm ------------------------------------------------------------------------------


def batch_moments(call, variance=False, mean_low=False):
    plan = call.plan
    if plan.count == 0 or plan.nchan == 0:
        mean, second = np.full(plan.nchan, np.nan), np.full(plan.nchan, np.nan)
        low = np.zeros(plan.nchan)
    else:
        mean, m2, low = channel_moments(call.x3)
        second = m2 / plan.count if variance else m2
    return (mean, second, low) if mean_low else (mean, second)


def _as64(p, default, n):
    return np.full(n, default) if p is None else np.asarray(p, np.float64)


def _invstd(var, eps):
    return 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)


def coefficients(dtype, mean, var, weight, bias, eps):
    """Per channel in float64, whatever the data's dtype."""
    scale = _invstd(var, eps) * _as64(weight, 1.0, len(var))
    shift = _as64(bias, 0.0, len(var)) - np.asarray(mean, np.float64) * scale
    return scale, shift


def _output(call, out):
    """(3-D view to write, finish): finish() returns the result array (``out`` if given).
    float16 results are computed in float32 and cast once at the end."""
    plan = call.plan
    work = np.dtype(np.float32) if plan.dtype == np.float16 else plan.dtype
    layout = plan.layout
    if out is not None and out.dtype == work:
        s3 = layout.strides3(out.strides)
        if s3 is not None:
            return np.lib.stride_tricks.as_strided(out, layout.shape3, s3), lambda: out
    buf = pool.empty([plan.shape[i] for i in layout.order], work)
    array = buf.transpose(layout.inverse)

    def finish():
        if out is None:
            return array.astype(plan.dtype, copy=False)
        np.copyto(out, array, casting="unsafe")
        return out

    return buf.reshape(layout.shape3), finish


def affine(call, scale, shift, out):
    view3, finish = _output(call, out)
    if call.plan.size:
        _affine_kernel(call.x3, scale, shift, view3)
    return finish()


def forward(call, weight, bias, eps, out, stats_dtype, running, momentum, var_factor):
    mean, var = batch_moments(call, variance=True)
    y = affine(call, *coefficients(call.plan.dtype, mean, var, weight, bias, eps), out)
    if running is not None:
        ema(*running, mean, var, momentum, var_factor)
    if stats_dtype is None:
        return y, mean, var
    return y, mean.astype(stats_dtype, copy=False), var.astype(stats_dtype, copy=False)


def ema(running_mean, running_var, mean, var, momentum, var_factor):
    if any(b.dtype == np.float16 or not b.dtype.isnative for b in (running_mean, running_var)):
        # The kernels read native float32/float64 only; the buffers are tiny anyway.
        new_mean = (1 - momentum) * running_mean.astype(np.float64) + momentum * mean
        new_var = (1 - momentum) * running_var.astype(np.float64) + momentum * var_factor * var
        np.copyto(running_mean, new_mean, casting="unsafe")
        np.copyto(running_var, new_var, casting="unsafe")
    else:
        _ema_kernel(running_mean, running_var, np.asarray(mean, np.float64),
                    np.asarray(var, np.float64), momentum, var_factor, parallel=False)


def backward_sums(call, dy3, mean):
    if call.plan.size == 0:
        return np.zeros(call.plan.nchan), np.zeros(call.plan.nchan)
    return _sums(dy3, call.x3, np.asarray(mean, np.float64))


def grad_input(call, dy3, mean, var, weight, eps, sum_dy, sum_dy_xmu, count, batch_stats,
               out):
    view3, finish = _output(call, out)
    if call.plan.size == 0:
        return finish()
    nchan = call.plan.nchan
    invstd = _invstd(var, eps)
    g = invstd * _as64(weight, 1.0, nchan)
    if batch_stats:
        # The mean and variance depend on x too: their gradients, folded per channel.
        h = -g * invstd * invstd * sum_dy_xmu / count
        k = -g * sum_dy / count
    else:
        h = k = np.zeros(nchan)
    _grad_input(dy3, call.x3, np.asarray(mean, np.float64), g, h, k, view3)
    return finish()


def param_grads(like, weight, var, eps, sum_dy, sum_dy_xmu):
    return (sum_dy_xmu * _invstd(var, eps)).astype(weight.dtype), sum_dy.astype(weight.dtype)


def folded(w, b, scale, shift, b_dtype):
    w = np.asarray(w)
    w_folded = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    b_folded = shift if b is None else b * scale + shift
    return w_folded.astype(w.dtype), b_folded.astype(b_dtype)


# ---- per-channel vectors ---------------------------------------------------------------------


def cast(like, v, dtype):
    return np.array(v, dtype)


def to_float64(v):
    return np.array(v, np.float64)


def to_host(a):
    return np.asarray(a)


def copy(a):
    return np.copy(a)


from_host = copy


def assign(a, value):
    np.copyto(a, np.asarray(value), casting="unsafe")
