"""The device backend: the stages of ``nbbn._backend`` over CUDA arrays and ``@cuda.jit`` kernels.

Arrays are read through zero-copy Numba views (``arrays.to_numba``); kernels run
on the default stream; results are allocated by the input's library (torch in,
torch out; CuPy in, CuPy out; else Numba device arrays). Nothing is copied to
the host: per-channel statistics, coefficients, the running-buffer update and
the parameter gradients are kernels too. Accumulation is float32 for float16
input and float64 otherwise, as on the host; merges are float64.
"""
import numpy as np
from numba import cuda

from .. import _layout
from . import arrays, backward, ema as ema_kernels, merge, moments as moment_kernels, normalize
from . import renorm
from .arrays import Family, to_numba
from .launch import channels_config, columns_config, final_config, launch, rows_config

F8 = np.dtype(np.float64)


def _acc(dtype):
    """Accumulation dtype: float32 for float16 input, float64 otherwise (the CPU path's)."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else F8


def _columns(a3):
    """x[outer, C, 1] as x[rows, C]."""
    return arrays.strided(a3, a3.shape[:2], a3.strides[:2])


def _or(a, dummy):
    return dummy if a is None else a


def _flags(**named):
    """An int of the flags whose value is truthy (kernels branch on them)."""
    return sum(flag for flag, on in named.values() if on)


# ---- arrays ----------------------------------------------------------------------------------


def array(a, name):
    return to_numba(a)  # the face sends only CUDA arrays here (``_dispatch``)


def check_writable(a, name):
    """Device arrays are always writable."""


def view(call, a):
    return arrays.view3(a, call.plan.layout)


def fallback(op, a, **kwargs):
    if kwargs.get("dtype") is not None and np.dtype(kwargs["dtype"]).kind != "f":
        raise TypeError(f"nbbn on CUDA arrays computes floating-point results; "
                        f"dtype={kwargs['dtype']} is not supported there")
    raise TypeError(f"nbbn reads bool, integer and float CUDA arrays, got dtype {a.dtype}")


# ---- statistics ------------------------------------------------------------------------------


def _partials(x3, nchan, zero, groups=1, group_rows=None):
    """Per-block (n, mean, m2) partial states of x3's channels, float64 (3, P, C), or of its
    (group, channel) pairs, (3, P, groups * C), with virtual batches of ``group_rows`` outer
    rows; x3 is None for an empty batch."""
    if x3 is None:
        return arrays.scratch((3, 0, groups * nchan), F8)
    outer, nchan, inner = x3.shape
    group_rows = outer if group_rows is None else group_rows
    if inner == 1:
        cfg = columns_config(group_rows, nchan)
        partial = arrays.scratch((3, cfg.parts, groups * nchan), F8)
        launch(moment_kernels.moments_columns, cfg, _columns(x3), zero, group_rows, partial)
    else:
        cfg = rows_config(group_rows, groups * nchan, inner)
        partial = arrays.scratch((3, cfg.parts, groups * nchan), F8)
        launch(moment_kernels.moments_rows, cfg, x3, zero, cfg.bx, group_rows, partial)
    return partial


def _channel_result(family, nchan, shape, dtype, out):
    """(Numba (C,) array the kernel writes, finish() -> the result of ``shape``)."""
    if out is None:
        res = family.empty((nchan,), dtype)
        return to_numba(res), lambda: res.reshape(shape)
    on = to_numba(out)
    if arrays.is_c_contiguous(on):
        return arrays.flat_view(on), lambda: out
    tmp = arrays.scratch((nchan,), on.dtype)

    def finish():
        arrays.copy(tmp.reshape(tuple(on.shape)), on)
        return out

    return tmp, finish


_MODES = {"m2": moment_kernels.RAW_M2, "var": moment_kernels.VARIANCE,
          "std": moment_kernels.STD}


def statistics(like, a, red, kinds, ddof, dtype, out):
    """One reduction launch, then one per-channel kernel that merges the blocks' partial
    states and writes the mean and one second-order statistic."""
    x3 = arrays.view3(a, red.layout, red.strides, red.offset) if red.count * red.nchan else None
    partial = _partials(x3, red.nchan, _acc(a.dtype).type(0))
    family = Family(like)
    targets, finishes = {}, []
    for kind in kinds:
        targets[kind], finish = _channel_result(family, red.nchan, red.shape, dtype,
                                                None if finishes else out)
        finishes.append(finish)
    second = next((k for k in kinds if k != "mean"), "m2")
    for kind in ("mean", second):  # what the kernel writes and nobody asked for
        if kind not in targets:
            targets[kind] = arrays.scratch((red.nchan,), F8)
    if red.nchan:
        launch(moment_kernels.finalize_moments, final_config(red.nchan), partial, float(ddof),
               _MODES[second], targets["mean"], targets[second])
    return tuple(finish() for finish in finishes)


# ---- batch norm ------------------------------------------------------------------------------


def _zero(call):
    return _acc(call.plan.dtype).type(0)


def _x3(call):
    return call.x3 if call.plan.size else None


def _batch_partials(call):
    """``_partials`` of a batch-norm input: per (group, channel) with virtual batches."""
    plan = call.plan
    return _partials(_x3(call), plan.nchan, _zero(call), plan.groups, plan.group_rows)


def batch_moments(call, variance=False):
    n = call.plan.groups * call.plan.nchan
    partial = _batch_partials(call)
    mean = arrays.scratch((n,), F8)
    second = arrays.scratch((n,), F8)
    if n:
        mode = moment_kernels.VARIANCE if variance else moment_kernels.RAW_M2
        launch(moment_kernels.finalize_moments, final_config(n), partial, 0.0, mode, mean,
               second)
    return mean, second


def coefficients(dtype, mean, var, weight, bias, eps):
    nchan = mean.shape[0]
    acc = _acc(dtype)
    scale = arrays.scratch((nchan,), acc)
    shift = arrays.scratch((nchan,), acc)
    if nchan:
        flags = _flags(w=(normalize.HAS_WEIGHT, weight is not None),
                       b=(normalize.HAS_BIAS, bias is not None))
        launch(normalize.scale_shift, channels_config(nchan), mean, var, _or(weight, mean),
               _or(bias, mean), flags, eps, scale, shift)
    return scale, shift


def _output(plan, like, out, dtype=None):
    """(writable kernel view (outer, C, inner), finish() -> the result array: ``out``, or a new
    one in ``like``'s library, laid out like it, of ``dtype`` (default: the plan's))."""
    layout = plan.layout
    dtype = plan.dtype if dtype is None else dtype
    in_order = [plan.shape[i] for i in layout.order]
    if out is not None:
        on = to_numba(out)
        direct = arrays.write_view(on, layout) if plan.size else None
        if direct is not None or not plan.size:
            return direct, lambda: out
        buf = arrays.scratch(in_order, dtype)

        def finish():
            arrays.copy(arrays.permuted(buf, layout.inverse), on)
            return out

        return buf.reshape(layout.shape3), finish
    family = Family(like)
    buf = family.empty(in_order, dtype)
    result = family.permute(buf, layout.inverse)
    view3 = to_numba(buf).reshape(layout.shape3) if plan.size else None
    return view3, lambda: result


def _affine(x3, scale, shift, zero, y3, group_rows):
    outer, nchan, inner = x3.shape
    if inner == 1:
        launch(normalize.affine_columns, columns_config(outer, nchan, reduction=False),
               _columns(x3), scale, shift, zero, group_rows, _columns(y3))
    else:
        launch(normalize.affine_rows, rows_config(outer, nchan, inner, reduction=False),
               x3, scale, shift, zero, group_rows, y3)


def affine(call, scale, shift, out):
    view3, finish = _output(call.plan, call.like, out)
    if call.plan.size:
        _affine(call.x3, scale, shift, _zero(call), view3, call.plan.group_rows)
    return finish()


def forward(call, weight, bias, eps, out, stats_dtype, running, momentum, var_factor):
    """Statistics, then one per-channel kernel (batch mean/var, scale/shift, running-buffer
    update), then the affine pass: three launches."""
    plan = call.plan
    nchan = plan.groups * plan.nchan  # statistics per (group, channel)
    family = Family(call.like)
    if stats_dtype is None:
        mean = var = arrays.scratch((nchan,), F8)  # unused: written, never read
    else:
        mean, var = family.empty((nchan,), stats_dtype), family.empty((nchan,), stats_dtype)
    partial = _batch_partials(call)
    acc = _acc(plan.dtype)
    scale = arrays.scratch((nchan,), acc)
    shift = arrays.scratch((nchan,), acc)
    if nchan:
        flags = _flags(w=(moment_kernels.HAS_WEIGHT, weight is not None),
                       b=(moment_kernels.HAS_BIAS, bias is not None),
                       r=(moment_kernels.UPDATE_RUNNING, running is not None))
        rm, rv = running if running is not None else (scale, scale)
        launch(moment_kernels.finalize_forward, final_config(nchan), partial,
               _or(weight, scale), _or(bias, scale), eps, momentum, var_factor, flags,
               to_numba(mean), to_numba(var), scale, shift, rm, rv)
    return affine(call, scale, shift, out), mean, var


def ema(running_mean, running_var, mean, var, momentum, var_factor):
    nchan = running_mean.shape[0]
    if nchan:
        launch(ema_kernels.ema, channels_config(nchan), running_mean, running_var, mean, var,
               momentum, var_factor)


def backward_sums(call, dy3, mean):
    """Block partials of the per-channel sums, then merged per channel (float64)."""
    plan = call.plan
    rows, n = plan.group_rows, plan.groups * plan.nchan  # per (group, channel)
    inner = plan.layout.shape3[2]
    if not plan.size:
        partial = arrays.scratch((2, 0, n), F8)
    elif inner == 1:
        cfg = columns_config(rows, plan.nchan)
        partial = arrays.scratch((2, cfg.parts, n), F8)
        launch(backward.sums_columns, cfg, _columns(dy3), _columns(call.x3), mean, _zero(call),
               rows, partial)
    else:
        cfg = rows_config(rows, n, inner)
        partial = arrays.scratch((2, cfg.parts, n), F8)
        launch(backward.sums_rows, cfg, dy3, call.x3, mean, _zero(call), cfg.bx, rows, partial)
    sum_dy = arrays.scratch((n,), F8)
    sum_dy_xmu = arrays.scratch((n,), F8)
    if n:
        launch(backward.finalize_sums, final_config(n), partial, sum_dy, sum_dy_xmu)
    return sum_dy, sum_dy_xmu


def grad_input(call, dy3, mean, var, weight, eps, sum_dy, sum_dy_xmu, count, batch_stats,
               out):
    plan = call.plan
    view3, finish = _output(plan, call.like, out)
    if plan.size:
        outer, nchan, inner = plan.layout.shape3
        n = plan.groups * nchan  # coefficients per (group, channel)
        zero = _zero(call)
        coef = arrays.scratch((3, n), _acc(plan.dtype))
        flags = _flags(w=(backward.HAS_WEIGHT, weight is not None),
                       s=(backward.BATCH_STATS, batch_stats))
        last = (plan.groups - 1) * nchan  # the last group's first (group, channel)
        launch(backward.dx_coefficients, channels_config(n), sum_dy, sum_dy_xmu, float(count),
               float(plan.last_count if last else count), last, var, _or(weight, var), flags,
               eps, coef)
        rows = plan.group_rows
        if inner == 1:
            launch(backward.dx_columns, columns_config(outer, nchan, reduction=False),
                   _columns(dy3), _columns(call.x3), mean, coef, zero, rows, _columns(view3))
        else:
            launch(backward.dx_rows, rows_config(outer, nchan, inner, reduction=False),
                   dy3, call.x3, mean, coef, zero, rows, view3)
    return finish()


def param_grads(like, weight, var, eps, sum_dy, sum_dy_xmu):
    nchan = weight.shape[0]
    family = Family(like)
    dweight = family.empty((nchan,), weight.dtype)
    dbias = family.empty((nchan,), weight.dtype)
    if nchan:
        launch(backward.param_grads, channels_config(nchan), sum_dy, sum_dy_xmu, var, eps,
               to_numba(dweight), to_numba(dbias))
    return dweight, dbias


def _scaled(a, scale, shift, dtype):
    """a * scale[c] + shift[c] along a's axis 0 as a new array of ``dtype`` (the affine pass
    over a's (1, C, rest) layout)."""
    an = to_numba(a)
    plan = _layout.channel_plan(an, 0, "a", min_ndim=1)
    view3, finish = _output(plan, a, None, dtype)
    if plan.size:
        _affine(arrays.view3(an, plan.layout), scale, shift, _acc(an.dtype).type(0), view3,
                plan.group_rows)
    return finish()


def folded(w, b, scale, shift, b_dtype):
    zeros = arrays.scratch(scale.shape, F8)
    arrays.fill(zeros, 0.0)
    w_folded = _scaled(w, scale, zeros, to_numba(w).dtype)
    if b is not None:
        return w_folded, _scaled(b, scale, shift, b_dtype)
    return w_folded, cast(w, shift, b_dtype)


# ---- small batches ---------------------------------------------------------------------------


def renorm_coefficients(dtype, mean, var, running_mean, running_var, weight, bias, rmax, dmax,
                        eps):
    """One per-channel kernel: r, d and the affine pass's coefficients."""
    nchan = mean.shape[0]
    acc = _acc(dtype)
    r, d = arrays.scratch((nchan,), F8), arrays.scratch((nchan,), F8)
    scale, shift = arrays.scratch((nchan,), acc), arrays.scratch((nchan,), acc)
    if nchan:
        flags = _flags(w=(normalize.HAS_WEIGHT, weight is not None),
                       b=(normalize.HAS_BIAS, bias is not None))
        launch(renorm.renorm_coefficients, channels_config(nchan), mean, var, running_mean,
               running_var, _or(weight, mean), _or(bias, mean), flags, rmax, dmax, eps, r, d,
               scale, shift)
    return r, d, scale, shift


def renorm_grads(like, weight, var, r, d, eps, sum_dy, sum_dy_xmu):
    nchan = var.shape[0]
    weight_eff = arrays.scratch((nchan,), F8)
    dweight = dbias = None
    if weight is not None:
        family = Family(like)
        dweight = family.empty((nchan,), weight.dtype)
        dbias = family.empty((nchan,), weight.dtype)
    if nchan:
        flags = _flags(w=(normalize.HAS_WEIGHT, weight is not None))
        launch(renorm.renorm_grads, channels_config(nchan), sum_dy, sum_dy_xmu, var, r, d,
               _or(weight, var), flags, eps, weight_eff, to_numba(_or(dweight, weight_eff)),
               to_numba(_or(dbias, weight_eff)))
    return weight_eff, dweight, dbias


def merge_batches(state, mean, var, count, last_count):
    nchan = state.shape[1]
    if nchan:
        launch(merge.merge_batches, channels_config(nchan), state, mean, var, float(count),
               float(last_count))


# ---- per-channel vectors ---------------------------------------------------------------------


def cast(like, v, dtype):
    out = Family(like).empty(tuple(v.shape), dtype)
    arrays.copy(v, to_numba(out))
    return out


def to_float64(v):
    """Host vectors (a synchronized layer's all-reduced statistics and sums: C values) are
    uploaded."""
    if not _layout.is_device(v):
        return cuda.to_device(np.array(v, np.float64))
    v = to_numba(v)
    out = arrays.scratch(v.shape, F8)
    arrays.copy(v, out)
    return out


def to_host(a):
    return to_numba(a).copy_to_host()


def copy(a):
    out = arrays.scratch(a.shape, a.dtype)
    arrays.copy(a, out)
    return out


def from_host(a):
    return cuda.to_device(np.asarray(a))


def assign(a, value):
    """a[...] = value, a host or device array of a's shape."""
    if _layout.is_device(value):
        arrays.copy(to_numba(value), a)
    else:
        a.copy_to_device(np.ascontiguousarray(value, a.dtype))
