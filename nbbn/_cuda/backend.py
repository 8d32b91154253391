"""The device backend: the stages of ``nbbn._backend`` over CUDA arrays and ``@cuda.jit`` kernels.

Arrays are read through zero-copy Numba views (``arrays.to_numba``) that carry the
caller's stream; every kernel of a stage runs on that stream (``arrays.queue_of``), its
temporaries in the queue's cached workspace; results are allocated by the input's
library (torch in, torch out; CuPy in, CuPy out; else Numba device arrays). Nothing is
copied to the host and nothing waits for the device: per-channel statistics,
coefficients, the running-buffer update and the parameter gradients are kernels too,
fused where the grid allows (a reduction's last block per channel writes the channel's
results; dx's kernel computes its coefficients). Accumulation is float32 for 16-bit
input (float16, bfloat16) and float64 otherwise, as on the host; the statistics' merges
are double-double (``_cuda/moments.py``), the backward sums' float64. The epilogue
(residual, ReLU, a layer's kept copy of x and ReLU mask) and the ReLU's gate in the
backward are optional operands of the same kernels (``_kernel_args``' ``optional``).
"""
import functools

import numpy as np
from numba import cuda

from .. import _layout
from . import (arrays, backward, ema as ema_kernels, launch, merge, moments as moment_kernels,
               normalize, renorm)
from .arrays import Family, operand, queue_of, to_numba
from .launch import channels_config, columns_config, padded_parts, rows_config

F8 = np.dtype(np.float64)


def _acc(dtype):
    """Accumulation dtype: float32 for 16-bit floats, float64 otherwise (the CPU path's)."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if _layout.is_float(dtype) and dtype.itemsize == 2 else F8


def _zero(dtype):
    return _acc(dtype).type(0)


def _or(a, dummy):
    return dummy if a is None else a


def _flags(**named):
    """An int of the flags whose value is truthy (kernels branch on them)."""
    return sum(flag for flag, on in named.values() if on)


def _kernel_args(reduction, *ops, optional=(), group_rows=None):
    """A rows or columns kernel over Operands ``ops`` (one shape): ``(columns, config,
    arguments, extra)``, the arguments being each operand's flat view and strides, then
    the shape and ``group_rows`` (virtual batches; None: all rows, one group), in the
    operands' index type; ``extra``: the flat view and strides of each ``optional``
    Operand, (None, the first operand's strides) for None."""
    given = [op for op in (*ops, *optional) if op is not None]
    columns, config, shape, strides = _launch_plan(
        reduction, ops[0].shape, tuple(op.strides for op in given),
        max(op.span for op in given), group_rows, launch.settings())
    typed = iter(strides)
    pairs = [(op.flat, next(typed)) for op in ops]
    extra = tuple(x for op in optional
                  for x in ((None, pairs[0][1]) if op is None else (op.flat, next(typed))))
    return columns, config, [x for pair in pairs for x in pair] + [shape], extra


@functools.lru_cache(maxsize=1024)
def _launch_plan(reduction, shape3, strides, span, group_rows, settings):
    """What a kernel launch over operands of ``shape3``/``strides`` needs besides the arrays:
    ``(columns, config, shape, strides)`` with sizes and strides in the index type; the
    shape ends with the rows per group (``launch``: virtual batches)."""
    outer, nchan, inner = shape3
    rows = max(outer, 1) if group_rows is None else group_rows
    groups = max(1, launch.cdiv(outer, rows))
    idx = launch.index_type(span)
    typed = int if launch.SIMULATOR else idx
    if inner == 1:  # x[rows, C]: the channels-last kernels
        config = columns_config(rows, nchan, reduction, groups)
        return (True, config, (typed(outer), int(nchan), typed(rows)),
                tuple((typed(s[0]), typed(s[1])) for s in strides))
    config = rows_config(rows, nchan, inner, reduction, groups)
    return (False, config, (typed(outer), int(nchan), typed(inner), typed(rows)),
            tuple(tuple(typed(x) for x in s) for s in strides))


def _empty_operand(queue, nchan, dtype):
    """A (0, C, 1) Operand: the kernels of an empty batch read nothing and write the
    per-channel results (nan statistics, zero sums)."""
    return operand(queue.work("empty", (1,), dtype), (0, nchan, 1), (0, 0, 0))


def _reduction(queue, kernels, depth, ops, before, after, optional=None, group_rows=None):
    """A rows or columns reduction (``kernels``) over Operands ``ops``, its blocks meeting in
    the last block of each channel (each (group, channel) pair with virtual batches of
    ``group_rows`` rows): one launch. The kernel's arguments: the operands, ``before``, the
    partial states (``depth`` values per block) and tickets from the queue's workspace,
    ``after``, then (where given) the ``optional`` operands' tuple."""
    outer, nchan, _ = ops[0].shape
    pairs = nchan * (1 if group_rows is None else launch.cdiv(outer, group_rows))
    columns, cfg, args, extra = _kernel_args(True, *ops, optional=optional or (),
                                             group_rows=group_rows)
    partial = queue.work("partial", (pairs if cfg.parts > 1 else 1, depth,
                                     padded_parts(cfg.parts)), F8)
    queue.launch(kernels[1] if columns else kernels[0], cfg, *args, *before, partial,
                 queue.tickets(pairs), *after, *(() if optional is None else (extra,)))


_MOMENTS = (moment_kernels.moments_rows, moment_kernels.moments_columns)
_SUMS = (backward.sums_rows, backward.sums_columns)


# ---- arrays ----------------------------------------------------------------------------------


def array(a, name):
    return to_numba(a)  # the face sends only CUDA arrays here (``_dispatch``)


def check_writable(a, name):
    """Device arrays are always writable."""


def _address_range(a):
    """[first byte, last byte] of a Numba device array's elements."""
    start = a._ary.ctypes.data if launch.SIMULATOR else a.__cuda_array_interface__["data"][0]
    low = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s < 0)
    high = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s > 0)
    return start + low, start + high + a.dtype.itemsize - 1


def overlap(a, b):
    """From the address ranges: "partial" where they intersect (conservative). An Operand
    (a kernel's view) is compared by its flat view, which spans its elements."""
    a, b = (x.flat if isinstance(x, arrays.Operand) else x for x in (a, b))
    if not all(a.shape) or not all(b.shape):
        return None
    (a_lo, a_hi), (b_lo, b_hi) = _address_range(a), _address_range(b)
    if a_hi < b_lo or b_hi < a_lo:
        return None
    if a_lo == b_lo and tuple(a.shape) == tuple(b.shape) and a.strides == b.strides \
            and a.dtype.itemsize == b.dtype.itemsize:
        return "same"
    return "partial"


def view(call, a):
    if not call.plan.size:
        return None
    return arrays.view3(queue_of(call.x), a, call.plan.layout)


def kept(call, dtype):
    plan = call.plan
    layout = plan.layout
    buf = queue_of(call.x).empty([plan.shape[i] for i in layout.order],
                                 plan.dtype if dtype is None else dtype)
    return arrays.permuted(buf, layout.inverse)


def fallback(op, a, **kwargs):
    if kwargs.get("dtype") is not None and not _layout.is_float(kwargs["dtype"]):
        raise TypeError(f"nbbn on CUDA arrays computes floating-point results; "
                        f"dtype={kwargs['dtype']} is not supported there")
    raise TypeError(f"nbbn reads bool, integer and float CUDA arrays, got dtype {a.dtype}")


# ---- statistics ------------------------------------------------------------------------------

_MODES = {"m2": moment_kernels.RAW_M2, "var": moment_kernels.VARIANCE,
          "std": moment_kernels.STD}


def _channel_result(queue, family, nchan, shape, dtype, out, purpose):
    """(Numba (C,) array the kernel writes, finish() -> the result of ``shape``)."""
    if out is None:
        res = family.empty((nchan,), dtype)
        return to_numba(res), lambda: res.reshape(shape)
    on = to_numba(out)
    if arrays.is_c_contiguous(on):
        return arrays.flat_view(on), lambda: out
    tmp = queue.work(purpose, (nchan,), on.dtype)

    def finish():
        arrays.copy(queue, tmp.reshape(tuple(on.shape)), on)
        return out

    return tmp, finish


def _moments(queue, x3, nchan, dtype, fin, group_rows=None):
    """The per-channel (per (group, channel)) reduction of x3 (None: an empty batch) writing
    ``fin``'s results."""
    if nchan:
        op = _empty_operand(queue, nchan, dtype) if x3 is None else x3
        _reduction(queue, _MOMENTS, moment_kernels.FIELDS, (op,),
                   (_zero(dtype), moment_kernels.rescale(dtype, _acc(dtype))), (fin,),
                   group_rows=None if x3 is None else group_rows)


def _fin(mode, ddof, mean, second, low, scale, shift=None, flags=0, eps=0.0, momentum=0.0,
         var_factor=0.0, weight=None, bias=None, running=None):
    """channel_result's arguments (``moments.channel_result``); absent arrays are dummies."""
    rm, rv = running if running is not None else (scale, scale)
    return (float(ddof), mode, flags, float(eps), float(momentum), float(var_factor), mean,
            second, low, scale, _or(shift, scale), _or(weight, scale), _or(bias, scale), rm,
            rv)


def statistics(like, a, red, kinds, ddof, dtype, out):
    """One launch: the reduction, whose last block per channel writes the mean and one
    second-order statistic (then a copy where ``out`` is strided)."""
    queue = queue_of(a)
    x3 = arrays.view3(queue, a, red.layout, red.strides, red.offset) \
        if red.count * red.nchan else None
    family = Family(like, queue)
    targets, finishes = {}, []
    for kind in kinds:
        targets[kind], finish = _channel_result(queue, family, red.nchan, red.shape, dtype,
                                                None if finishes else out, "out")
        finishes.append(finish)
    second = next((k for k in kinds if k in _MODES), "m2")
    for kind in ("mean", second, "mean_low"):  # what the kernel writes and nobody asked for
        if kind not in targets:
            targets[kind] = queue.work(kind, (red.nchan,), F8)
    scale = queue.work("scale", (max(red.nchan, 1),), _acc(a.dtype))
    _moments(queue, x3, red.nchan, a.dtype, _fin(_MODES[second], ddof, targets["mean"],
                                                 targets[second], targets["mean_low"], scale))
    return tuple(finish() for finish in finishes)


# ---- batch norm ------------------------------------------------------------------------------


def _group_rows(plan):
    """The kernels' rows per virtual batch: None for one group."""
    return plan.group_rows if plan.groups > 1 else None


def batch_moments(call, variance=False, mean_low=False):
    plan = call.plan
    pairs = plan.groups * plan.nchan
    queue = queue_of(call.x)
    mean = queue.empty((pairs,), F8)
    second = queue.empty((pairs,), F8)
    low = queue.empty((pairs,), F8) if mean_low else queue.work("mean_low", (pairs,), F8)
    mode = moment_kernels.VARIANCE if variance else moment_kernels.RAW_M2
    scale = queue.work("scale", (max(pairs, 1),), _acc(plan.dtype))
    _moments(queue, call.x3, plan.nchan, plan.dtype, _fin(mode, 0, mean, second, low, scale),
             _group_rows(plan))
    return (mean, second, low) if mean_low else (mean, second)


def _affine_work(queue, nchan, dtype, weight, bias):
    """The affine pass's (scale, shift) workspace and the kernels' weight/bias flags."""
    return (queue.work("scale", (nchan,), _acc(dtype)), queue.work("shift", (nchan,), _acc(dtype)),
            _flags(w=(normalize.HAS_WEIGHT, weight is not None),
                   b=(normalize.HAS_BIAS, bias is not None)))


def coefficients(dtype, mean, var, weight, bias, eps):
    nchan = mean.shape[0]  # per (group, channel) with virtual batches
    queue = queue_of(mean, var, weight, bias)
    scale, shift, flags = _affine_work(queue, nchan, dtype, weight, bias)
    if nchan:
        queue.launch(normalize.scale_shift, channels_config(nchan), mean, var,
                     _or(weight, mean), _or(bias, mean), flags, eps, scale, shift)
    return scale, shift


def _output(queue, plan, like, out, dtype=None):
    """(writable Operand (outer, C, inner), finish() -> the result array: ``out``, or a new
    one in ``like``'s library, laid out like it, of ``dtype`` (default: the plan's))."""
    layout = plan.layout
    dtype = np.dtype(plan.dtype if dtype is None else dtype)
    in_order = [plan.shape[i] for i in layout.order]
    contiguous = arrays.c_strides(layout.shape3, dtype.itemsize)
    if out is not None:
        on = to_numba(out)
        direct = arrays.write_view(on, layout) if plan.size else None
        if direct is not None or not plan.size:
            return direct, lambda: out
        buf = queue.work("out", in_order, dtype)

        def finish():
            arrays.copy(queue, arrays.permuted(buf, layout.inverse), on)
            return out

        return operand(buf, layout.shape3, contiguous), finish
    family = Family(like, queue)
    buf = family.empty(in_order, dtype)
    result = family.permute(buf, layout.inverse)
    op = operand(to_numba(buf), layout.shape3, contiguous) if plan.size else None
    return op, lambda: result


def _affine(queue, x3, scale, shift, zero, y3, residual=None, relu=False, copy=None,
            mask=None, group_rows=None):
    """The affine pass (``normalize``) over Operands, with the epilogue's optional ones."""
    columns, cfg, args, extra = _kernel_args(False, x3, y3, optional=(residual, copy, mask),
                                             group_rows=group_rows)
    res, s_res, cp, s_cp, mk, s_mk = extra
    queue.launch(normalize.affine_columns if columns else normalize.affine_rows, cfg, *args,
                 scale, shift, zero, (res, s_res, True if relu else None, cp, s_cp, mk, s_mk))


def affine(call, scale, shift, out, epilogue):
    return _normalized(queue_of(call.x), call, scale, shift, out, epilogue)


def _written(call, a):
    """The writable Operand of an array from ``kept`` (None stays None)."""
    return None if a is None else arrays.write_view(to_numba(a), call.plan.layout)


def _normalized(queue, call, scale, shift, out, epilogue):
    y3, finish = _output(queue, call.plan, call.like, out)
    if call.plan.size:
        _affine(queue, call.x3, scale, shift, _zero(call.plan.dtype), y3, epilogue.residual,
                epilogue.relu, _written(call, epilogue.copy), _written(call, epilogue.mask),
                _group_rows(call.plan))
    return finish()


def forward(call, weight, bias, eps, out, stats_dtype, running, momentum, var_factor,
            epilogue):
    """Two launches: the statistics, whose last block per channel writes the batch mean/var,
    scale/shift and the running-buffer update; then the affine pass."""
    plan = call.plan
    nchan = plan.groups * plan.nchan  # statistics per (group, channel)
    queue = queue_of(call.x)
    if stats_dtype is None:
        mean = queue.work("mean", (nchan,), F8)  # unused: written, never read
        var = queue.work("var", (nchan,), F8)
    else:
        family = Family(call.like, queue)
        mean, var = family.empty((nchan,), stats_dtype), family.empty((nchan,), stats_dtype)
    acc = _acc(plan.dtype)
    scale = queue.work("scale", (nchan,), acc)
    shift = queue.work("shift", (nchan,), acc)
    flags = _flags(c=(moment_kernels.COEFFICIENTS, True),
                   w=(moment_kernels.HAS_WEIGHT, weight is not None),
                   b=(moment_kernels.HAS_BIAS, bias is not None),
                   r=(moment_kernels.UPDATE_RUNNING, running is not None))
    fin = _fin(moment_kernels.VARIANCE, 0, to_numba(mean), to_numba(var),
               queue.work("mean_low", (mean.shape[0],), F8), scale, shift, flags, eps, momentum,
               var_factor, weight, bias, running)
    _moments(queue, call.x3, plan.nchan, plan.dtype, fin, _group_rows(plan))
    return _normalized(queue, call, scale, shift, out, epilogue), mean, var


def ema(running_mean, running_var, mean, var, momentum, var_factor):
    nchan = running_mean.shape[0]
    if nchan:
        queue = queue_of(mean, var, running_mean)
        queue.launch(ema_kernels.ema, channels_config(nchan), running_mean, running_var, mean,
                     var, momentum, var_factor)


def backward_sums(call, dy3, mean, gate3, dresidual):
    """One launch: block partials of the per-channel sums, merged per channel in the last
    block (float64); the gated dy written too where ``dresidual``."""
    plan = call.plan
    nchan = plan.nchan
    queue = queue_of(call.x)
    sum_dy = queue.work("sum_dy", (plan.groups * nchan,), F8)
    sum_dy_xmu = queue.work("sum_dy_xmu", (plan.groups * nchan,), F8)
    dres3, finish = _output(queue, plan, call.like, None) if dresidual else (None, None)
    if nchan:
        x3 = call.x3 if plan.size else _empty_operand(queue, nchan, plan.dtype)
        _reduction(queue, _SUMS, 2, (dy3 if plan.size else x3, x3), (mean, _zero(plan.dtype)),
                   (sum_dy, sum_dy_xmu), (gate3, dres3),
                   _group_rows(plan) if plan.size else None)
    return (sum_dy, sum_dy_xmu) if finish is None else (sum_dy, sum_dy_xmu, finish())


def grad_input(call, dy3, mean, var, weight, eps, sum_dy, sum_dy_xmu, count, batch_stats,
               out, gate3):
    """One launch: dx, each block computing its channels' coefficients from the sums."""
    plan = call.plan
    queue = queue_of(call.x)
    dx3, finish = _output(queue, plan, call.like, out)
    if plan.size:
        flags = _flags(w=(backward.HAS_WEIGHT, weight is not None),
                       s=(backward.BATCH_STATS, batch_stats))
        weight = None if weight is None else to_numba(weight)
        last_pair = (plan.groups - 1) * plan.nchan  # the last group's counts differ
        counts = (float(count), float(plan.last_count if last_pair else count), last_pair)
        grad = (mean, var, _or(weight, var), sum_dy, sum_dy_xmu, counts, flags, float(eps))
        columns, cfg, args, gating = _kernel_args(False, dy3, call.x3, dx3, optional=(gate3,),
                                                  group_rows=_group_rows(plan))
        queue.launch(backward.dx_columns if columns else backward.dx_rows, cfg, *args, grad,
                     _zero(plan.dtype), gating)
    return finish()


def param_grads(like, weight, var, eps, sum_dy, sum_dy_xmu):
    nchan = weight.shape[0]
    queue = queue_of(sum_dy, to_numba(weight))
    family = Family(like, queue)
    dweight = family.empty((nchan,), weight.dtype)
    dbias = family.empty((nchan,), weight.dtype)
    if nchan:
        queue.launch(backward.param_grads, channels_config(nchan), sum_dy, sum_dy_xmu,
                     to_numba(var), eps, to_numba(dweight), to_numba(dbias))
    return dweight, dbias


def grouped_backward(call, dy3, mean, var, weight, eps, out, gate3, dresidual):
    return None  # declined: the general stages


def renorm_coefficients(dtype, mean, var, running_mean, running_var, weight, bias, rmax, dmax,
                        eps):
    """One per-channel kernel: r, d and the affine pass's coefficients."""
    nchan = mean.shape[0]
    queue = queue_of(mean, var, running_mean)
    r, d = queue.empty((nchan,), F8), queue.empty((nchan,), F8)
    scale, shift, flags = _affine_work(queue, nchan, dtype, weight, bias)
    if nchan:
        queue.launch(renorm.renorm_coefficients, channels_config(nchan), mean, var,
                     running_mean, running_var, _or(weight, mean), _or(bias, mean), flags, rmax,
                     dmax, eps, r, d, scale, shift)
    return r, d, scale, shift


def renorm_weight(weight, r):
    nchan = r.shape[0]
    queue = queue_of(r)
    weight_eff = queue.empty((nchan,), F8)
    if nchan:
        queue.launch(renorm.renorm_weight, channels_config(nchan), _or(weight, r),
                     r, _flags(w=(normalize.HAS_WEIGHT, weight is not None)), weight_eff)
    return weight_eff


def renorm_grads(like, weight, var, r, d, eps, sum_dy, sum_dy_xmu):
    nchan = var.shape[0]
    queue = queue_of(sum_dy, to_numba(weight))
    family = Family(like, queue)
    dweight = family.empty((nchan,), weight.dtype)
    dbias = family.empty((nchan,), weight.dtype)
    if nchan:
        queue.launch(renorm.renorm_grads, channels_config(nchan), sum_dy, sum_dy_xmu, var, r,
                     d, eps, to_numba(dweight), to_numba(dbias))
    return dweight, dbias


def merge_batches(state, mean, var, count, last_count):
    nchan = state.shape[1]
    if nchan:
        queue_of(state).launch(merge.merge_batches, channels_config(nchan), state, mean, var,
                               float(count), float(last_count))


def _scaled(queue, a, scale, shift, dtype):
    """a * scale[c] + shift[c] along a's axis 0 as a new array of ``dtype`` (the affine pass
    over a's (1, C, rest) layout)."""
    an = to_numba(a)
    plan = _layout.channel_plan(an, 0, "a", min_ndim=1)
    y3, finish = _output(queue, plan, a, None, dtype)
    if plan.size:
        _affine(queue, arrays.view3(queue, an, plan.layout), scale, shift, _zero(an.dtype), y3)
    return finish()


def folded(w, b, scale, shift, b_dtype):
    queue = queue_of(scale)
    zeros = queue.work("zeros", scale.shape, scale.dtype)
    arrays.fill(queue, zeros, 0.0)
    w_folded = _scaled(queue, w, scale, zeros, to_numba(w).dtype)
    if b is not None:
        return w_folded, _scaled(queue, b, scale, shift, b_dtype)
    return w_folded, cast(w, shift, b_dtype)


# ---- small calls: none fused here (a device call is a few launches on the caller's stream) --


def fused(plan, x):
    return None


def fused_reduction(red, a):
    return None


def fused_statistics(small, a, kinds, ddof):
    return None


def fused_ema(running_mean, running_var, mean, var, momentum, var_factor):
    return None


def fused_forward(small, x, weight, bias, eps, running, momentum, var_factor, stats_dtype,
                  copy):
    return None


def fused_inference(small, x, running_mean, running_var, weight, bias, eps):
    return None


def fused_backward(small, dy, x, mean, var, weight, eps):
    return None


# ---- per-channel vectors ---------------------------------------------------------------------


def cast(like, v, dtype):
    queue = queue_of(v)
    out = Family(like, queue).empty(tuple(v.shape), dtype)
    arrays.copy(queue, v, to_numba(out))
    return out


def to_float64(v):
    """Host vectors (a synchronized layer's all-reduced statistics and sums: C values) are
    uploaded."""
    if not _layout.is_device(v):
        return cuda.to_device(np.array(v, np.float64))
    v = to_numba(v)
    queue = queue_of(v)
    out = queue.empty(v.shape, F8)
    arrays.copy(queue, v, out)
    return out


def to_host(a):
    a = to_numba(a)
    queue = queue_of(a)
    host = a.copy_to_host(stream=queue.stream)
    if queue.stream:
        queue.stream.synchronize()  # the caller reads it now
    return host


def copy(a):
    queue = queue_of(a)
    out = queue.empty(a.shape, a.dtype)
    arrays.copy(queue, a, out)
    return out


def from_host(a):
    return cuda.to_device(np.asarray(a))


def assign(a, value):
    """a[...] = value, a host or device array of a's shape."""
    queue = queue_of(a)
    if _layout.is_device(value):
        arrays.copy(queue, to_numba(value), a)
    else:
        a.copy_to_device(np.ascontiguousarray(value, a.dtype), stream=queue.stream)
