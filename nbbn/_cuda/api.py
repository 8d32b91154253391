"""The device side of the public API.

Each function validates its arguments with the host path's rules (``_layout``),
converts device arrays to Numba views (zero-copy), launches kernels on the
default stream and returns results allocated by the input's library (torch in,
torch out; CuPy in, CuPy out; else Numba device arrays). Nothing is copied to
the host: per-channel scale/shift, the running-buffer update and the
parameter gradients are computed by kernels too.
"""
import math
import warnings

import numpy as np
from numba import cuda

from .. import _dispatch, _layout
from .. import batchnorm as _bn
from .. import stats as _stats
from . import arrays, backward, ema, moments, normalize
from .launch import channels_config, columns_config, final_config, launch, rows_config

F8 = np.dtype(np.float64)


def _acc(dtype):
    """Accumulation dtype: float32 for float16 input, float64 otherwise (the CPU path's)."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else F8


def _columns(a3):
    """x[outer, C, 1] as x[rows, C]."""
    return _dispatch.strided(a3, a3.shape[:2], a3.strides[:2])


def _size(shape):
    return math.prod(int(n) for n in shape)


def _numba_vector(p, name, nchan):
    """A validated per-channel float device vector (Numba view), or None."""
    if p is None:
        return None
    pn = _dispatch.to_numba(p)
    _layout.check_float_dtype(pn.dtype, name)
    _layout.check_channel_shape(pn.shape, name, nchan)
    return pn


def _or(a, dummy):
    return dummy if a is None else a


# ---- statistics -------------------------------------------------------------------------------


def _reduction(a, axis):
    an = _dispatch.to_numba(a)
    if an.dtype.kind not in _layout.KERNEL_KINDS or an.dtype.itemsize > 8:
        raise TypeError(f"nbbn reads bool, integer and float CUDA arrays, got dtype {an.dtype}")
    axes = _layout.reduced_axes(axis, an.ndim)
    return an, axes, arrays.DeviceLayout(an, axes, flip=True)


def _result_dtype(an, dtype):
    if dtype is not None and np.dtype(dtype).kind != "f":
        raise TypeError(f"nbbn on CUDA arrays computes floating-point results; dtype={dtype} "
                        "is not supported there")
    return _stats._result_dtype(an, dtype)


def _partials(an, lay, x3=None):
    """Per-block (n, mean, m2) partial states, float64 (3, P, C)."""
    outer, nchan, inner = lay.shape3
    if outer * inner == 0 or nchan == 0:
        return arrays.scratch((3, 0, nchan), F8)
    x3 = lay.view(an) if x3 is None else x3
    zero = _acc(an.dtype).type(0)
    if inner == 1:
        cfg = columns_config(outer, nchan)
        partial = arrays.scratch((3, cfg.parts, nchan), F8)
        launch(moments.moments_columns, cfg, _columns(x3), zero, partial)
    else:
        cfg = rows_config(outer, nchan, inner)
        partial = arrays.scratch((3, cfg.parts, nchan), F8)
        launch(moments.moments_rows, cfg, x3, zero, cfg.bx, partial)
    return partial


def _channel_result(family, nchan, shape, dtype, out):
    """(Numba (C,) array the kernel writes, finish() -> the result of ``shape``)."""
    if out is None:
        res = family.empty((nchan,), dtype)
        return _dispatch.to_numba(res), lambda: res.reshape(shape)
    on = _dispatch.to_numba(out)
    _layout.check_out_shape_dtype(on.shape, on.dtype, shape, dtype)
    if arrays.is_c_contiguous(on):
        return arrays.flat_view(on), lambda: out
    tmp = arrays.scratch((nchan,), on.dtype)

    def finish():
        arrays.copy(tmp.reshape(tuple(on.shape)), on)
        return out

    return tmp, finish


def _finalize(partial, ddof, mode, mean_n, var_n):
    nchan = partial.shape[2]
    if nchan:
        launch(moments.finalize_moments, final_config(nchan), partial, float(ddof), mode,
               mean_n, var_n)


def _statistic(a, axis, dtype, out, ddof, keepdims, mode, want_mean):
    an, axes, lay = _reduction(a, axis)
    rdtype = _result_dtype(an, dtype)
    outer, nchan, inner = lay.shape3
    count = outer * inner
    if want_mean and count == 0:
        warnings.warn("Mean of empty slice", RuntimeWarning, stacklevel=4)
    if mode != moments.RAW_M2 and count - ddof <= 0:
        warnings.warn("Degrees of freedom <= 0 for slice", RuntimeWarning, stacklevel=4)
    shape = _layout.kept_shape(tuple(an.shape), axes, keepdims)
    partial = _partials(an, lay)
    return _dispatch.Family(a), partial, shape, rdtype, count, nchan


def mean(a, axis, dtype, out, keepdims):
    family, partial, shape, rdtype, _, nchan = _statistic(a, axis, dtype, out, 0, keepdims,
                                                          moments.RAW_M2, True)
    mean_n, finish = _channel_result(family, nchan, shape, rdtype, out)
    _finalize(partial, 0, moments.RAW_M2, mean_n, arrays.scratch((nchan,), F8))
    return finish()


def var_or_std(a, axis, dtype, out, ddof, keepdims, op):
    mode = moments.STD if op == "std" else moments.VARIANCE
    family, partial, shape, rdtype, _, nchan = _statistic(a, axis, dtype, out, ddof, keepdims,
                                                          mode, False)
    var_n, finish = _channel_result(family, nchan, shape, rdtype, out)
    _finalize(partial, ddof, mode, arrays.scratch((nchan,), F8), var_n)
    return finish()


def mean_var(a, axis, dtype, ddof, keepdims):
    family, partial, shape, rdtype, _, nchan = _statistic(a, axis, dtype, None, ddof,
                                                          keepdims, moments.VARIANCE, False)
    mean_n, finish_mean = _channel_result(family, nchan, shape, rdtype, None)
    var_n, finish_var = _channel_result(family, nchan, shape, rdtype, None)
    _finalize(partial, ddof, moments.VARIANCE, mean_n, var_n)
    return finish_mean(), finish_var()


def moments_(a, axis, keepdims):
    family, partial, shape, _, count, nchan = _statistic(a, axis, None, None, 0, keepdims,
                                                         moments.RAW_M2, False)
    mean_n, finish_mean = _channel_result(family, nchan, shape, F8, None)
    m2_n, finish_m2 = _channel_result(family, nchan, shape, F8, None)
    _finalize(partial, 0, moments.RAW_M2, mean_n, m2_n)
    return _stats.Moments(count, finish_mean(), finish_m2())


# ---- batch norm ---------------------------------------------------------------------------


class _Call:
    """A batch-norm call's device input: x as a Numba view, its channel axis and layout."""

    def __init__(self, x, axis, name="x"):
        self.family = _dispatch.Family(x)
        self.x = _dispatch.to_numba(x)
        _layout.check_float_dtype(self.x.dtype, name)
        self.shape = tuple(int(n) for n in self.x.shape)
        self.axis = _layout.channel_axis(self.x, axis, name)
        reduced = tuple(i for i in range(len(self.shape)) if i != self.axis)
        self.layout = arrays.DeviceLayout(self.x, reduced, flip=False)
        self.nchan = self.shape[self.axis]
        self.size = _size(self.shape)
        self.count = self.size // self.nchan if self.nchan else 0
        self.dtype = np.dtype(self.x.dtype)
        self.stats_dtype = np.promote_types(self.dtype, np.float32)
        self.acc = _acc(self.dtype)
        self.zero = self.acc.type(0)
        self._x3 = None

    def x3(self):
        if self._x3 is None:
            self._x3 = self.layout.view(self.x)
        return self._x3

    def vector(self, p, name):
        return _numba_vector(p, name, self.nchan)

    running_buffer = vector  # device buffers are written in place by the kernels

    def check_out(self, out):
        if out is not None:
            on = _dispatch.to_numba(out)
            _layout.check_exact_shape_dtype(on.shape, on.dtype, self.shape, self.dtype)

    def like_x(self, a, name):
        """A validated device array shaped like x (dy)."""
        an = _dispatch.to_numba(a)
        _layout.check_float_dtype(an.dtype, name)
        if tuple(an.shape) != self.shape:
            raise ValueError(f"{name} must have the shape of x, {self.shape}; "
                             f"got shape {tuple(an.shape)}")
        return an

    def output(self, out):
        """(writable kernel view (outer, C, inner), finish() -> the result array)."""
        order = self.layout.order
        in_order = [self.shape[i] for i in order]
        if out is not None:
            on = _dispatch.to_numba(out)
            direct = self.layout.write_view(on) if self.size else None
            if direct is not None or not self.size:
                return direct, lambda: out
            buf = arrays.scratch(in_order, self.dtype)

            def finish():
                arrays.copy(arrays.permuted(buf, self.layout.inverse), on)
                return out

            return buf.reshape(self.layout.shape3), finish
        buf = self.family.empty(in_order, self.dtype)
        result = self.family.permute(buf, self.layout.inverse)
        view = _dispatch.to_numba(buf).reshape(self.layout.shape3) if self.size else None
        return view, lambda: result


def _affine(call, scale, shift, out):
    """y = x * scale + shift (per-channel device arrays in the accumulation dtype)."""
    view, finish = call.output(out)
    if call.size:
        x3 = call.x3()
        outer, nchan, inner = call.layout.shape3
        if inner == 1:
            launch(normalize.affine_columns, columns_config(outer, nchan, reduction=False),
                   _columns(x3), scale, shift, call.zero, _columns(view))
        else:
            launch(normalize.affine_rows, rows_config(outer, nchan, inner, reduction=False),
                   x3, scale, shift, call.zero, view)
    return finish()


def _normalize(call, mean, var, weight, bias, eps, out=None):
    """y with given per-channel statistics: scale/shift by a kernel, then the affine pass."""
    scale = arrays.scratch((call.nchan,), call.acc)
    shift = arrays.scratch((call.nchan,), call.acc)
    if call.nchan:
        flags = (normalize.HAS_WEIGHT if weight is not None else 0) | \
                (normalize.HAS_BIAS if bias is not None else 0)
        launch(normalize.scale_shift, channels_config(call.nchan), mean, var,
               _or(weight, mean), _or(bias, mean), flags, eps, scale, shift)
    return _affine(call, scale, shift, out)


def _forward(call, weight, bias, eps, out, mean_n, var_n, running=None, momentum=0.0,
             var_factor=1.0):
    """Training forward: statistics, then y; writes the batch mean/var (biased) into
    mean_n/var_n and, given ``running`` buffers, updates them, all on the device."""
    nchan = call.nchan
    partial = _partials(call.x, call.layout, call.x3() if call.size else None)
    scale = arrays.scratch((nchan,), call.acc)
    shift = arrays.scratch((nchan,), call.acc)
    if nchan:
        flags = ((moments.HAS_WEIGHT if weight is not None else 0)
                 | (moments.HAS_BIAS if bias is not None else 0)
                 | (moments.UPDATE_RUNNING if running is not None else 0))
        rm, rv = running if running is not None else (scale, scale)
        launch(moments.finalize_forward, final_config(nchan), partial, _or(weight, scale),
               _or(bias, scale), eps, momentum, var_factor, flags, mean_n, var_n, scale,
               shift, rm, rv)
    return _affine(call, scale, shift, out)


def batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, axis, out):
    call = _Call(x, axis)
    running_mean, running_var, weight, bias, momentum, eps = _bn.batch_norm_args(
        call, running_mean, running_var, weight, bias, training, momentum, eps, out)
    if not training:
        return _normalize(call, running_mean, running_var, weight, bias, eps, out)
    stats = arrays.scratch((call.nchan,), F8)
    running = None if running_mean is None else (running_mean, running_var)
    return _forward(call, weight, bias, eps, out, stats, stats, running, momentum,
                    call.count / (call.count - 1))


def batch_norm_forward(x, weight, bias, eps, axis, out):
    call = _Call(x, axis)
    weight = call.vector(weight, "weight")
    bias = call.vector(bias, "bias")
    eps = _layout.check_eps(eps)
    call.check_out(out)
    mean = call.family.empty((call.nchan,), call.stats_dtype)
    var = call.family.empty((call.nchan,), call.stats_dtype)
    y = _forward(call, weight, bias, eps, out, _dispatch.to_numba(mean),
                 _dispatch.to_numba(var))
    return y, mean, var


def _dy_view(call, dy):
    """Validated dy as a kernel view in x's layout (None for an empty x)."""
    dyn = call.like_x(dy, "dy")
    return call.layout.view(dyn) if call.size else None


def _backward_sums(call, dy3, mean):
    """Per-channel float64 (sum(dy), sum(dy * (x - mean))): block partials, then merged."""
    nchan = call.nchan
    outer, _, inner = call.layout.shape3
    if not call.size:
        partial = arrays.scratch((2, 0, nchan), F8)
    elif inner == 1:
        cfg = columns_config(outer, nchan)
        partial = arrays.scratch((2, cfg.parts, nchan), F8)
        launch(backward.sums_columns, cfg, _columns(dy3), _columns(call.x3()), mean, call.zero,
               partial)
    else:
        cfg = rows_config(outer, nchan, inner)
        partial = arrays.scratch((2, cfg.parts, nchan), F8)
        launch(backward.sums_rows, cfg, dy3, call.x3(), mean, call.zero, cfg.bx, partial)
    sum_dy = arrays.scratch((nchan,), F8)
    sum_dy_xmu = arrays.scratch((nchan,), F8)
    if nchan:
        launch(backward.finalize_sums, final_config(nchan), partial, sum_dy, sum_dy_xmu)
    return sum_dy, sum_dy_xmu


def _grad_input(call, dy3, mean, var, weight, eps, sum_dy, sum_dy_xmu, count, batch_stats,
                out=None):
    """dx from the per-channel sums (``count`` values behind the statistics)."""
    view, finish = call.output(out)
    if call.size:
        outer, nchan, inner = call.layout.shape3
        coef = arrays.scratch((3, nchan), call.acc)
        flags = ((backward.HAS_WEIGHT if weight is not None else 0)
                 | (backward.BATCH_STATS if batch_stats else 0))
        launch(backward.dx_coefficients, channels_config(nchan), sum_dy, sum_dy_xmu,
               float(count), var, _or(weight, var), flags, eps, coef)
        x3 = call.x3()
        if inner == 1:
            launch(backward.dx_columns, columns_config(outer, nchan, reduction=False),
                   _columns(dy3), _columns(x3), mean, coef, call.zero, _columns(view))
        else:
            launch(backward.dx_rows, rows_config(outer, nchan, inner, reduction=False),
                   dy3, x3, mean, coef, call.zero, view)
    return finish()


def _param_grads(weight, var, eps, sum_dy, sum_dy_xmu, call=None):
    """(dweight, dbias) in weight's dtype, allocated by the library of ``call``'s input
    (default: weight's)."""
    if weight is None:
        return None, None
    nchan = weight.shape[0]
    family = _dispatch.Family(weight) if call is None else call.family
    dweight = family.empty((nchan,), weight.dtype)
    dbias = family.empty((nchan,), weight.dtype)
    if nchan:
        launch(backward.param_grads, channels_config(nchan), sum_dy, sum_dy_xmu, var, eps,
               _dispatch.to_numba(dweight), _dispatch.to_numba(dbias))
    return dweight, dbias




def _ema(running_mean, running_var, mean, var, momentum, var_factor):
    """running = (1 - momentum) * running + momentum * batch, in place on the device."""
    nchan = running_mean.shape[0]
    if nchan:
        launch(ema.ema, channels_config(nchan), running_mean, running_var, mean, var, momentum,
               var_factor)


def ema_update(running_mean, running_var, mean, var, count, momentum, unbiased):
    running_mean = _numba_vector(running_mean, "running_mean", None)
    nchan = running_mean.shape[0]
    running_var = _numba_vector(running_var, "running_var", nchan)
    mean = _numba_vector(mean, "mean", nchan)
    var = _numba_vector(var, "var", nchan)
    momentum = _layout.check_momentum(momentum)
    count = int(count)
    if count < (2 if unbiased else 1):
        raise ValueError(f"count must be >= {2 if unbiased else 1} "
                         f"({'unbiased' if unbiased else 'biased'} update), got {count}")
    _ema(running_mean, running_var, mean, var, momentum,
         count / (count - 1) if unbiased else 1.0)


def _fold(running_mean, running_var, weight, bias, eps, scale, shift):
    """Validated inputs; scale/shift written by a kernel. Returns nchan."""
    nchan = scale.shape[0]
    flags = (normalize.HAS_WEIGHT if weight is not None else 0) | \
            (normalize.HAS_BIAS if bias is not None else 0)
    if nchan:
        launch(normalize.scale_shift, channels_config(nchan), running_mean, running_var,
               _or(weight, running_var), _or(bias, running_var), flags, eps, scale, shift)


def _fold_args(running_mean, running_var, weight, bias, eps):
    running_var = _numba_vector(running_var, "running_var", None)
    nchan = running_var.shape[0]
    running_mean = _numba_vector(running_mean, "running_mean", nchan)
    weight = _numba_vector(weight, "weight", nchan)
    bias = _numba_vector(bias, "bias", nchan)
    eps = _layout.check_eps(eps)
    return running_mean, running_var, weight, bias, eps, nchan


def fold(running_mean, running_var, weight, bias, eps):
    family = _dispatch.Family(running_var)
    args = _fold_args(running_mean, running_var, weight, bias, eps)
    nchan = args[-1]
    dtype = np.promote_types(args[1].dtype, np.float32)
    scale = family.empty((nchan,), dtype)
    shift = family.empty((nchan,), dtype)
    _fold(*args[:-1], _dispatch.to_numba(scale), _dispatch.to_numba(shift))
    return scale, shift


def fold_into(w, b, running_mean, running_var, weight, bias, eps):
    family = _dispatch.Family(w)
    wn = _dispatch.to_numba(w)
    _layout.check_float_dtype(wn.dtype, "w")
    running_mean, running_var, weight, bias, eps, nchan = _fold_args(
        running_mean, running_var, weight, bias, eps)
    if wn.ndim < 1 or wn.shape[0] != nchan:
        raise ValueError(f"w must have {nchan} output channels on axis 0 (one per batch-norm "
                         f"channel), got shape {tuple(wn.shape)}")
    bn_ = _numba_vector(b, "b", nchan)
    scale = arrays.scratch((nchan,), F8)
    shift = arrays.scratch((nchan,), F8)
    zeros = arrays.scratch((nchan,), F8)
    _fold(running_mean, running_var, weight, bias, eps, scale, shift)
    arrays.fill(zeros, 0.0)
    # w * scale[out-channel]: the affine pass over w's (1, out-channels, rest) layout.
    if wn.ndim >= 2:
        w_folded = _affine(_Call(w, 0, "w"), scale, zeros, None)
    else:
        w_folded = family.empty((nchan,), wn.dtype)
        _vector_affine(wn, scale, zeros, _dispatch.to_numba(w_folded))
    b_dtype = wn.dtype if bn_ is None else np.promote_types(wn.dtype, bn_.dtype)
    b_folded = family.empty((nchan,), b_dtype)
    if bn_ is None:
        arrays.copy(shift, _dispatch.to_numba(b_folded))
    else:
        _vector_affine(bn_, scale, shift, _dispatch.to_numba(b_folded))
    return w_folded, b_folded


def _vector_affine(v, scale, shift, out):
    """out[c] = v[c] * scale[c] + shift[c] for per-channel vectors (a one-row affine pass)."""
    nchan = v.shape[0]
    if nchan:
        as_row = lambda a: _dispatch.strided(a, (1, nchan), (0, a.strides[0]))  # noqa: E731
        launch(normalize.affine_columns, columns_config(1, nchan, reduction=False),
               as_row(v), scale, shift, _acc(v.dtype).type(0), as_row(out))


# ---- the layer ----------------------------------------------------------------------------


def layer_to_device(layer):
    """Move a new layer's parameters and running buffers to the device (once, at creation)."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(layer, name)
        if value is not None:
            setattr(layer, name, cuda.to_device(value))


def _channel_moments(call, mode):
    """call.x's per-channel float64 (mean, m2 or biased var: ``mode``), nan where empty."""
    partial = _partials(call.x, call.layout, call.x3() if call.size else None)
    mean = arrays.scratch((call.nchan,), F8)
    second = arrays.scratch((call.nchan,), F8)
    _finalize(partial, 0, mode, mean, second)
    return mean, second


def _local_moments(call):
    return _stats.Moments(call.count, *_channel_moments(call, moments.RAW_M2))


def _batch_moments(call):
    return (call.count, *_channel_moments(call, moments.VARIANCE))


def _float64_copy(v):
    """A float64 device copy of a per-channel vector; a host one (SyncBatchNorm's all-reduced
    statistics and sums: C values) is uploaded."""
    if not _dispatch.is_device(v):
        return cuda.to_device(np.array(v, np.float64))
    v = _dispatch.to_numba(v)
    out = arrays.scratch(v.shape, F8)
    arrays.copy(v, out)
    return out


def _copy(a):
    out = arrays.scratch(a.shape, a.dtype)
    arrays.copy(a, out)
    return out


def _assign(a, value):
    """a[...] = value, a host or device array of a's shape."""
    if _dispatch.is_device(value):
        arrays.copy(_dispatch.to_numba(value), a)
    else:
        a.copy_to_device(np.ascontiguousarray(value, a.dtype))


# BatchNorm's stages on the device: per-channel vectors stay there (no host round trip).
STAGES = _bn.LayerStages(
    call=_Call, local_moments=_local_moments, batch_moments=_batch_moments,
    normalize=_normalize, ema=_ema, dy_view=_dy_view, backward_sums=_backward_sums,
    grad_input=_grad_input, param_grads=_param_grads, float64_copy=_float64_copy, copy=_copy,
    assign=_assign)
