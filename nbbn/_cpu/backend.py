"""The host backend: the stages of ``nbbn._backend`` over NumPy arrays and the CPU kernels."""
import numpy as np

from .backward import backward_sums as _sums, grad_input as _grad_input
from .ema import ema as _ema_kernel
from .merge import merge_batches as _merge_kernel
from .moments import channel_moments
from .normalize import affine as _affine_kernel
from .renorm import renorm_factors as _renorm_factors


# ---- arrays ----------------------------------------------------------------------------------


def array(a, name):
    if isinstance(a, np.ndarray):
        return a
    try:
        arr = np.asarray(a)
    except Exception as exc:
        raise TypeError(f"{name} must be array-like, got {type(a).__name__}") from exc
    if arr.dtype == object or arr.dtype.kind in "SUV":
        raise TypeError(f"{name} must be a numeric array-like, got {type(a).__name__}")
    return arr


def check_writable(a, name):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (it is written in place), "
                        f"got {type(a).__name__}")
    if not a.flags.writeable:
        raise ValueError(f"{name} is read-only")


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
    return getattr(np, op)(a, **kwargs)


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


def statistics(like, a, red, kinds, ddof, dtype, out):
    if red.count == 0 or red.nchan == 0:
        mean = np.full(red.nchan, np.nan)  # NumPy's mean of nothing
        m2 = np.zeros(red.nchan)  # a sum over nothing
    else:
        mean, m2 = channel_moments(_view3(_flip_reduced(_kernel_input(a), red.axes),
                                          red.layout))
    results = []
    for kind in kinds:
        if kind == "mean":
            v = mean
        elif kind == "m2":
            v = m2
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                v = m2 / max(red.count - ddof, 0)
            if kind == "std":
                v = np.sqrt(v)
        results.append(_finish(v, red.shape, dtype, out if not results else None))
    return tuple(results)


# ---- batch norm ------------------------------------------------------------------------------


def _counts(plan, count):
    """Values behind each statistic: ``count`` (a scalar) for one group; per (group,
    channel) with virtual batches, ``count`` in each group but the last."""
    if plan.groups == 1:
        return count
    counts = np.full((plan.groups, plan.nchan), float(count))
    counts[-1] = plan.last_count
    return counts.ravel()


def batch_moments(call, variance=False):
    plan = call.plan
    if plan.count == 0 or plan.nchan == 0:
        return np.full(plan.groups * plan.nchan, np.nan), np.full(plan.groups * plan.nchan, np.nan)
    mean, m2 = channel_moments(call.x3, _group_rows(plan))
    return mean, m2 / _counts(plan, plan.group_count) if variance else m2


def _group_rows(plan):
    """The kernels' ``group_rows``: outer rows per virtual batch, 0 for one group."""
    return plan.group_rows if plan.groups > 1 else 0


def _as64(p, default, n):
    """Per-channel ``p`` in float64 over n values (groups x channels), ``default`` if None."""
    if p is None:
        return np.full(n, default)
    p = np.asarray(p, np.float64)
    return p if p.shape[0] == n else np.tile(p, n // p.shape[0])


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
    buf = np.empty([plan.shape[i] for i in layout.order], work)
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
        _affine_kernel(call.x3, scale, shift, view3, _group_rows(call.plan))
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
    if running_mean.dtype == np.float16 or running_var.dtype == np.float16:
        # The kernels read float32/float64 only; float16 buffers are tiny anyway.
        new_mean = (1 - momentum) * running_mean.astype(np.float64) + momentum * mean
        new_var = (1 - momentum) * running_var.astype(np.float64) + momentum * var_factor * var
        np.copyto(running_mean, new_mean, casting="unsafe")
        np.copyto(running_var, new_var, casting="unsafe")
    else:
        _ema_kernel(running_mean, running_var, np.asarray(mean, np.float64),
                    np.asarray(var, np.float64), momentum, var_factor, parallel=False)


def backward_sums(call, dy3, mean):
    plan = call.plan
    if plan.size == 0:
        return np.zeros(plan.groups * plan.nchan), np.zeros(plan.groups * plan.nchan)
    return _sums(dy3, call.x3, np.asarray(mean, np.float64), _group_rows(plan))


def grad_input(call, dy3, mean, var, weight, eps, sum_dy, sum_dy_xmu, count, batch_stats,
               out):
    view3, finish = _output(call, out)
    if call.plan.size == 0:
        return finish()
    n = len(var)
    invstd = _invstd(var, eps)
    g = invstd * _as64(weight, 1.0, n)
    if batch_stats:
        # The mean and variance depend on x too: their gradients, folded per channel.
        count = _counts(call.plan, count)
        h = -g * invstd * invstd * sum_dy_xmu / count
        k = -g * sum_dy / count
    else:
        h = k = np.zeros(n)
    _grad_input(dy3, call.x3, np.asarray(mean, np.float64), g, h, k, view3,
                _group_rows(call.plan))
    return finish()


def _channel_sum(v, nchan):
    """Per-(group, channel) ``v`` summed over the groups."""
    return v if len(v) == nchan else v.reshape(-1, nchan).sum(axis=0)


def param_grads(like, weight, var, eps, sum_dy, sum_dy_xmu):
    nchan = weight.shape[0]
    return (_channel_sum(sum_dy_xmu * _invstd(var, eps), nchan).astype(weight.dtype),
            _channel_sum(sum_dy, nchan).astype(weight.dtype))


def folded(w, b, scale, shift, b_dtype):
    w = np.asarray(w)
    w_folded = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    b_folded = shift if b is None else b * scale + shift
    return w_folded.astype(w.dtype), b_folded.astype(b_dtype)


# ---- small batches ---------------------------------------------------------------------------


def renorm_coefficients(dtype, mean, var, running_mean, running_var, weight, bias, rmax, dmax,
                        eps):
    n = len(var)
    r, d = np.empty(n), np.empty(n)
    _renorm_factors(*(np.asarray(v, np.float64) for v in (mean, var, running_mean, running_var)),
                    rmax, dmax, eps, r, d, parallel=False)
    w = _as64(weight, 1.0, n)
    return (r, d, *coefficients(dtype, mean, var, w * r, _as64(bias, 0.0, n) + w * d, eps))


def renorm_grads(like, weight, var, r, d, eps, sum_dy, sum_dy_xmu):
    r, d = np.asarray(r, np.float64), np.asarray(d, np.float64)
    weight_eff = _as64(weight, 1.0, len(r)) * r
    if weight is None:
        return weight_eff, None, None
    dweight = r * sum_dy_xmu * _invstd(var, eps) + d * sum_dy
    return weight_eff, dweight.astype(weight.dtype), sum_dy.astype(weight.dtype)


def merge_batches(state, mean, var, count, last_count):
    _merge_kernel(state, np.asarray(mean, np.float64), np.asarray(var, np.float64),
                  float(count), float(last_count), parallel=False)


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
