"""The host backend: the stages of ``nbbn._backend`` over NumPy arrays and the CPU kernels."""
import numpy as np

from typing import NamedTuple

from .._layout import is_bfloat16
from ._blocks import AS_LAID_OUT, regroups, row_items, short_columns
from ._jit import thread_plan
from .backward import backward_sums as _sums, grad_input as _grad_input
from .elements import as_dtype, kernel_array, work_dtype
from .ema import ema as _ema_kernel
from .merge import merge_batches as _merge_kernel
from .moments import CHANNEL_TILE, channel_moments
from .normalize import affine as _affine_kernel
from .renorm import renorm_factors as _renorm_factors
from . import fused as _fused, groups as _groups, pool


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


def _view3(a, layout, shape3=None):
    """``a`` transposed into the layout's order and viewed as 3-D; one copy where the
    strides forbid a view."""
    t = a.transpose(layout.order)
    try:
        v = t.reshape(layout.shape3, copy=False)
    except ValueError:  # the axes of a group cannot merge without a copy
        v = np.ascontiguousarray(t).reshape(layout.shape3)
    return v


def view(call, a):
    return _view3(kernel_array(a), call.plan.layout)


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
        np.copyto(out, as_dtype(values, out.dtype), casting="unsafe")
        return out
    values = as_dtype(values, dtype)
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
        mean, m2, mean_low = channel_moments(_view3(_flip_reduced(kernel_array(a), red.axes),
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


def _counts(plan, count):
    """Values behind each statistic: ``count`` (a scalar) for one group; per (group,
    channel) with virtual batches, ``count`` in each group but the last."""
    if plan.groups == 1:
        return count
    counts = np.full((plan.groups, plan.nchan), float(count))
    counts[-1] = plan.last_count
    return counts.ravel()


def _group_rows(plan):
    """The kernels' ``group_rows``: outer rows per virtual batch, None for one group."""
    return plan.group_rows if plan.groups > 1 else None


def batch_moments(call, variance=False, mean_low=False):
    plan = call.plan
    if plan.count == 0 or plan.nchan == 0:
        size = plan.groups * plan.nchan
        mean, second, low = np.full(size, np.nan), np.full(size, np.nan), np.zeros(size)
    else:
        mean, m2, low = channel_moments(call.x3, _group_rows(plan))
        second = m2 / _counts(plan, plan.group_count) if variance else m2
    return (mean, second, low) if mean_low else (mean, second)


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


def _output(call, out, dtype=None):
    """(the kernels' writable 3-D view, finish): finish() returns the result, ``out`` if
    given, else a new array of ``dtype`` (x's by default) laid out in the layout's order."""
    plan = call.plan
    layout = plan.layout
    if out is not None:
        s3 = layout.strides3(out.strides)
        if s3 is not None:
            direct = np.lib.stride_tricks.as_strided(out, layout.shape3, s3)
            return kernel_array(direct), lambda: out
    buf = pool.empty([plan.shape[i] for i in layout.order], plan.dtype if dtype is None else dtype)
    array = buf.transpose(layout.inverse)

    def finish():
        if out is None:
            return array
        np.copyto(out, array)
        return out

    return kernel_array(buf.reshape(layout.shape3)), finish


def _written(call, a):
    """The kernels' writable 3-D view of an array from ``kept`` (None stays None)."""
    return None if a is None else _output(call, a)[0]


def _working(call, *vectors):
    """Per-channel (per group and channel) vectors in the working dtype of x's elementwise
    kernels."""
    work = work_dtype(call.plan.dtype)
    return tuple(np.asarray(v, work) for v in vectors)


def kept(call, dtype):
    plan = call.plan
    dtype = plan.dtype if dtype is None else np.dtype(dtype)
    return np.empty([plan.shape[i] for i in plan.layout.order], dtype).transpose(
        plan.layout.inverse)


def affine(call, scale, shift, out, epilogue):
    view3, finish = _output(call, out)
    if call.plan.size:
        _affine_kernel(call.x3, *_working(call, scale, shift), view3, epilogue.residual,
                       True if epilogue.relu else None, _written(call, epilogue.copy),
                       _written(call, epilogue.mask), _group_rows(call.plan))
    return finish()


def forward(call, weight, bias, eps, out, stats_dtype, running, momentum, var_factor,
            epilogue):
    done = _forward_by_groups(call, weight, bias, eps, out, stats_dtype, epilogue)
    if done is not None:
        return done
    mean, var = batch_moments(call, variance=True)
    y = affine(call, *coefficients(call.plan.dtype, mean, var, weight, bias, eps), out,
               epilogue)
    if running is not None:
        ema(*running, mean, var, momentum, var_factor)
    if stats_dtype is None:
        return y, mean, var
    return y, mean.astype(stats_dtype, copy=False), var.astype(stats_dtype, copy=False)


def _read64(v):
    """Vector ``v`` (None allowed) as the kernels read it: float32/float64 as it is, other
    dtypes as float64."""
    return v if v is None or v.dtype in _NATIVE_FLOATS else np.asarray(v, np.float64)


def _by_groups(call, out, *read):
    """2-D x where small virtual batches of channels-last rows go a group at a time
    (``groups``), else None: also where ``out`` shares memory with an array read (``read``,
    None allowed), which the general path would read after a group declined."""
    if not _groups.applies(call.plan) or out is not None and any(
            a is not None and overlap(out, a) for a in (call.x, *read)):
        return None
    return call.x3[:, :, 0]


def _plane(a):
    return None if a is None else a[:, :, 0]


def _forward_by_groups(call, weight, bias, eps, out, stats_dtype, epilogue):
    """``forward`` a group at a time (``_by_groups``), or None."""
    x = _by_groups(call, out, epilogue.residual)
    if x is None:
        return None
    plan = call.plan
    view3, finish = _output(call, out)
    shape = (plan.groups, plan.nchan)  # an eighth of x for groups of 8 rows: fresh pages cost
    mean, var = (pool.empty(shape, np.float64 if stats_dtype is None else stats_dtype)
                 for _ in range(2))
    nthreads, parallel = _groups.plan_groups(x, plan.group_rows)
    if not _groups.forward_groups(
            x, _read64(weight), _read64(bias), eps, view3[:, :, 0], mean, var,
            _plane(epilogue.residual), True if epilogue.relu else None,
            _plane(_written(call, epilogue.copy)), _plane(_written(call, epilogue.mask)),
            plan.group_rows, np.empty((nthreads, 2, plan.nchan), work_dtype(plan.dtype)),
            nthreads, parallel=parallel):
        return None
    return finish(), mean.ravel(), var.ravel()


def ema(running_mean, running_var, mean, var, momentum, var_factor):
    if any(b.dtype.itemsize == 2 or not b.dtype.isnative for b in (running_mean, running_var)):
        # The kernel reads native float32/float64 only; the buffers are tiny anyway.
        new_mean = (1 - momentum) * running_mean.astype(np.float64) + momentum * mean
        new_var = (1 - momentum) * running_var.astype(np.float64) + momentum * var_factor * var
        np.copyto(running_mean, as_dtype(new_mean, running_mean.dtype))
        np.copyto(running_var, as_dtype(new_var, running_var.dtype))
    else:
        _ema_kernel(running_mean, running_var, np.asarray(mean, np.float64),
                    np.asarray(var, np.float64), momentum, var_factor, parallel=False)


def backward_sums(call, dy3, mean, gate3, dresidual):
    plan = call.plan
    target, finish = _output(call, None) if dresidual else (None, None)
    if plan.size == 0:
        sums = np.zeros(plan.groups * plan.nchan), np.zeros(plan.groups * plan.nchan)
    else:
        sums = _sums(dy3, call.x3, np.asarray(mean, np.float64), gate3, target,
                     _group_rows(plan))
    return sums if finish is None else (*sums, finish())


def grad_input(call, dy3, mean, var, weight, eps, sum_dy, sum_dy_xmu, count, batch_stats,
               out, gate3):
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
    _grad_input(dy3, call.x3, *_working(call, mean, g, h, k), view3, gate3,
                _group_rows(call.plan))
    return finish()


def grouped_backward(call, dy3, mean, var, weight, eps, out, gate3, dresidual):
    x = _by_groups(call, out, dy3, gate3)
    if x is None:
        return None
    plan = call.plan
    view3, finish = _output(call, out)
    g, finish_g = _output(call, None) if dresidual else (None, None)
    shape = (plan.groups, plan.nchan)
    nthreads, parallel = _groups.plan_groups(x, plan.group_rows)
    grads = np.empty((nthreads, 2, plan.nchan))
    if not _groups.backward_groups(
            _plane(dy3), x, _plane(gate3), _plane(g), _read64(mean).reshape(shape),
            _read64(var).reshape(shape), _read64(weight), eps, view3[:, :, 0], grads,
            plan.group_rows, np.empty((nthreads, 4, plan.nchan), work_dtype(plan.dtype)),
            nthreads, parallel=parallel):
        return None
    dweight = dbias = None
    if weight is not None:
        dweight, dbias = (as_dtype(v, weight.dtype) for v in grads.sum(axis=0))
    return finish(), dweight, dbias, None if finish_g is None else finish_g()


def _channel_sum(v, nchan):
    """Per-(group, channel) ``v`` summed over the groups."""
    return v if len(v) == nchan else v.reshape(-1, nchan).sum(axis=0)


def param_grads(like, weight, var, eps, sum_dy, sum_dy_xmu):
    nchan = weight.shape[0]
    return (as_dtype(_channel_sum(sum_dy_xmu * _invstd(var, eps), nchan), weight.dtype),
            as_dtype(_channel_sum(sum_dy, nchan), weight.dtype))


def folded(w, b, scale, shift, b_dtype):
    w = np.asarray(w)
    w_folded = w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    b_folded = shift if b is None else b.astype(np.float64) * scale + shift
    return as_dtype(w_folded, w.dtype), as_dtype(b_folded, b_dtype)


# ---- small batches ---------------------------------------------------------------------------


def renorm_coefficients(dtype, mean, var, running_mean, running_var, weight, bias, rmax, dmax,
                        eps):
    n = len(var)
    r, d = np.empty(n), np.empty(n)
    _renorm_factors(*(np.asarray(v, np.float64) for v in (mean, var, running_mean, running_var)),
                    rmax, dmax, eps, r, d, parallel=False)
    w = _as64(weight, 1.0, n)
    return (r, d, *coefficients(dtype, mean, var, w * r, _as64(bias, 0.0, n) + w * d, eps))


def renorm_weight(weight, r):
    return _as64(weight, 1.0, len(r)) * np.asarray(r, np.float64)


def renorm_grads(like, weight, var, r, d, eps, sum_dy, sum_dy_xmu):
    dweight = (np.asarray(r, np.float64) * sum_dy_xmu * _invstd(var, eps)
               + np.asarray(d, np.float64) * sum_dy)
    return as_dtype(dweight, weight.dtype), as_dtype(sum_dy, weight.dtype)


def merge_batches(state, mean, var, count, last_count):
    _merge_kernel(state, np.asarray(mean, np.float64), np.asarray(var, np.float64),
                  float(count), float(last_count), parallel=False)


# ---- small calls, one compiled call each -----------------------------------------------------

# The dtypes the fused kernels read (x, dy and the vectors): 16-bit floats and other byte
# orders go the general way, which converts them.
_NATIVE_FLOATS = frozenset(map(np.dtype, (np.float32, np.float64)))


class _Small(NamedTuple):
    """What ``fused`` found for a plan: x's dtype, the layout's axis order and its
    inverse (None: plain), x's shape in that order, the shape of the view the fused kernels
    read of an array so laid out (3-D rows, or the 2-D plane of channels-last data; None:
    the array as it is), x's size and number of channels, the units the kernels split among
    threads (``_work_items``), whether an output like x comes from the pool
    (``pool.MIN_BYTES``), and the kernels' serial builds."""

    dtype: object
    order: tuple
    inverse: tuple
    ordered_shape: tuple
    view: tuple
    size: int
    nchan: int
    items: int
    pooled: bool
    forward: object
    inference: object
    backward: object


def fused(plan, x):
    """Arrays of one batch (no virtual batches) of a dtype read as it is, viewed in the
    layout's order without a copy, without channel tiles, regrouped rows (``_blocks.widen``)
    or short rows read as columns (``_blocks.short_rows``; small arrays have neither:
    ``_blocks.AS_LAID_OUT``). Each call then runs in one compiled call, by as many threads
    as the general path's passes would take (``_threads``)."""
    layout = plan.layout
    n_outer, nchan, n_inner = layout.shape3
    if (plan.groups > 1 or x.dtype not in _NATIVE_FLOATS or plan.size == 0
            or nchan > CHANNEL_TILE or layout.strides3(x.strides) is None
            or n_inner == 1 and regroups(n_outer, nchan) or short_columns(n_inner, plan.size)):
        return None
    view = _kernel_shape(layout.shape3)
    if not _viewable(x, layout.order, view):
        return None
    order = None if layout.order == tuple(range(len(plan.shape))) else layout.order
    ordered = tuple(plan.shape[i] for i in layout.order)
    return _Small(plan.dtype, order, order and layout.inverse, ordered,
                  None if view == ordered else view, plan.size, nchan, _work_items(view),
                  plan.size * plan.dtype.itemsize >= pool.MIN_BYTES,
                  *(k.build(False) for k in (_fused.forward, _fused.inference, _fused.backward)))


def _viewable(a, order, shape):
    """Whether ``a`` transposed to ``order`` has a view of ``shape`` (a view's existence
    depends on the shape and strides only: checked once per cached plan, each call then
    reshapes without NumPy's ``copy`` keyword, which alone costs 0.2 us)."""
    try:
        a.transpose(order).reshape(shape, copy=False)
    except ValueError:
        return False
    return True


def _kernel_shape(shape3):
    """The shape of the fused kernels' view of a layout's 3-D (outer, C, inner) view: itself
    (rows), or for channels-last data (inner == 1) its 2-D (rows, C) plane."""
    return shape3 if shape3[2] > 1 else shape3[:2]


def _threads(small, elements):
    """None where the general path's passes over ``elements`` (a backward: 2 * size) would
    all run serially: the fused serial builds then take the small calls' arguments as they
    come. Else (nthreads, parallel) as the general path's kernels take them: the fused
    kernels split the work as those do (``_fused.split_moments``), so every path agrees."""
    nthreads, parallel = thread_plan(elements, small.items)
    return None if nthreads == 1 else (nthreads, parallel)


def _contiguous(small, a):
    """The kernels' view of x or dy for a threaded call, None where it is not C-contiguous
    (one parallel build per dtype and layout of x: the general path reads the others)."""
    v = _view(small, a)
    return v if v.flags.c_contiguous else None


def _wide(v, nchan, default):
    """A per-channel vector as float64 (its values exactly), ``default`` where it is None
    (weight 1 and bias 0 give the same coefficients as none, bit for bit). Threaded calls
    pass their vectors so and take their per-channel results as float64, then rounded once
    as the kernels' stores round: one parallel build of each kernel per dtype and layout of
    x, not one per combination of the vectors' dtypes, layouts and absences (each a 10-20 s
    compile: with one per combination the test suite ran 3x as long)."""
    return np.full(nchan, default) if v is None else v.astype(np.float64)


def _work_items(shape):
    """The units the kernels split among threads in a view of ``shape``: row items of 3-D
    views (``_blocks``), rows of 2-D planes."""
    return row_items(shape) if len(shape) == 3 else shape[0]


def _view(small, a):
    """The kernels' view of x, dy or an array from ``_empty`` (``fused``: x's is a view)."""
    if small.order is not None:
        a = a.transpose(small.order)
    return a if small.view is None else a.reshape(small.view)


class _SmallReduction(NamedTuple):
    """What ``fused_reduction`` found: the reduction, the dtype of its results, the shape of
    the kernel's view of an array transposed to its order (3-D rows, or the 2-D plane of
    channels-last data), and the kernel's serial build."""

    red: object
    dtype: object
    view: tuple
    statistics: object


def fused_reduction(red, a):
    """Small reductions (``_blocks.AS_LAID_OUT``) of float32/float64 data the kernels read
    as it is: a view of ``a`` in the reduction's order, no negative stride to flip."""
    layout = red.layout
    if (a.dtype not in _NATIVE_FLOATS or not 0 < a.size < AS_LAID_OUT or red.count == 0
            or layout.shape3[1] > CHANNEL_TILE or any(s < 0 for s in a.strides)):
        return None
    view = _kernel_shape(layout.shape3)
    if not _viewable(a, layout.order, view):
        return None
    return _SmallReduction(red, a.dtype, view, _fused.statistics.build(False))


def fused_statistics(small, a, kinds, ddof):
    red = small.red
    values, finite = small.statistics(a.transpose(red.layout.order).reshape(small.view),
                                      float(red.count - ddof), "std" in kinds)
    if not finite:
        return None
    return tuple(_finish(values[0 if kind == "mean" else 1], red.shape, small.dtype, None)
                 for kind in kinds)


def fused_ema(running_mean, running_var, mean, var, momentum, var_factor):
    vectors = (running_mean, running_var, mean, var)
    if not (all(v is not None and v.ndim == 1 and v.dtype in _NATIVE_FLOATS for v in vectors)
            and running_mean.shape == running_var.shape == mean.shape == var.shape
            and running_mean.flags.writeable and running_var.flags.writeable):
        return None
    return _fused.running_update.build(False)(*vectors, momentum, var_factor) or None


def _empty(small):
    """A new output like x, laid out in the layout's order (large ones from the pool)."""
    a = (pool.empty if small.pooled else np.empty)(small.ordered_shape, small.dtype)
    return a if small.order is None else a.transpose(small.inverse)


def _read(v):
    """Whether the fused kernels read vector ``v`` (None allowed) as it is."""
    return v is None or v.dtype in _NATIVE_FLOATS


def fused_forward(small, x, weight, bias, eps, running, momentum, var_factor, stats_dtype,
                  copy):
    running_mean = running_var = None
    if running is not None:
        running_mean, running_var = running
        if not (running_mean.flags.writeable and running_var.flags.writeable
                and running_mean.dtype in _NATIVE_FLOATS and running_var.dtype in _NATIVE_FLOATS):
            return None
    if not (_read(weight) and _read(bias)):
        return None
    threads = _threads(small, small.size)
    if threads is not None:
        return _threaded_forward(small, threads, x, weight, bias, eps, running, momentum,
                                 var_factor, stats_dtype, copy)
    y = _empty(small)
    mean = var = None
    if stats_dtype is not None:
        mean, var = np.empty(small.nchan, stats_dtype), np.empty(small.nchan, stats_dtype)
    if small.forward(_view(small, x), weight, bias, eps, _view(small, y), mean, var,
                     running_mean, running_var, momentum, var_factor,
                     None if copy is None else _view(small, copy), None):
        return y, mean, var
    return None


def _threaded_forward(small, threads, x, weight, bias, eps, running, momentum, var_factor,
                      stats_dtype, copy):
    nchan = small.nchan
    x_view = _contiguous(small, x)
    if x_view is None or running is not None and (np.may_share_memory(running[0], x)
                                                  or np.may_share_memory(running[1], x)):
        return None  # the general path reads copies
    y = _empty(small)
    stats = np.empty((2, nchan))
    if not _fused.forward(x_view, _wide(weight, nchan, 1.0), _wide(bias, nchan, 0.0), eps,
                          _view(small, y), stats[0], stats[1], None, None, momentum, var_factor,
                          None if copy is None else _view(small, copy), threads[0],
                          parallel=threads[1]):
        return None
    # The running buffers in their own dtype, as the serial builds update them (declined,
    # nothing written, where they share memory).
    if running is not None and not _fused.running_update.build(False)(
            *running, stats[0], stats[1], momentum, var_factor):
        return None
    if stats_dtype is None:
        return y, None, None
    mean, var = stats.astype(stats_dtype)  # one conversion for both
    return y, mean, var


def fused_inference(small, x, running_mean, running_var, weight, bias, eps):
    if not (_read(running_mean) and _read(running_var) and _read(weight) and _read(bias)):
        return None
    threads = _threads(small, small.size)
    if threads is not None:
        return _threaded_inference(small, threads, x, running_mean, running_var, weight, bias,
                                   eps)
    y = _empty(small)
    if small.inference(_view(small, x), running_mean, running_var, weight, bias, eps,
                       _view(small, y), None):
        return y
    return None


def _threaded_inference(small, threads, x, running_mean, running_var, weight, bias, eps):
    nchan = small.nchan
    x_view = _contiguous(small, x)
    if x_view is None:
        return None
    y = _empty(small)
    if _fused.inference(x_view, _wide(running_mean, nchan, 0.0), _wide(running_var, nchan, 1.0),
                        _wide(weight, nchan, 1.0), _wide(bias, nchan, 0.0), eps, _view(small, y),
                        threads[0], parallel=threads[1]):
        return y
    return None


def fused_backward(small, dy, x, mean, var, weight, eps):
    if not (dy.strides == x.strides and _read(dy) and _read(mean) and _read(var)
            and _read(weight)):
        return None
    threads = _threads(small, 2 * small.size)
    if threads is not None:
        return _threaded_backward(small, threads, dy, x, mean, var, weight, eps)
    dx = _empty(small)
    dweight = dbias = None
    if weight is not None:
        dweight, dbias = np.empty(small.nchan, weight.dtype), np.empty(small.nchan, weight.dtype)
    if small.backward(_view(small, dy), _view(small, x), mean, var, weight, eps,
                      _view(small, dx), dweight, dbias, None):
        return dx, dweight, dbias
    return None


def _threaded_backward(small, threads, dy, x, mean, var, weight, eps):
    nchan = small.nchan
    dy_view, x_view = _contiguous(small, dy), _contiguous(small, x)
    if dy.dtype != x.dtype or dy_view is None or x_view is None:
        return None
    dx = _empty(small)
    grads = np.empty((2, nchan))
    if not _fused.backward(dy_view, x_view, _wide(mean, nchan, 0.0), _wide(var, nchan, 1.0),
                           _wide(weight, nchan, 1.0), eps, _view(small, dx), grads[0], grads[1],
                           threads[0], parallel=threads[1]):
        return None
    if weight is None:
        return dx, None, None
    dweight, dbias = grads.astype(weight.dtype)  # one conversion for both
    return dx, dweight, dbias


# ---- per-channel vectors ---------------------------------------------------------------------


def cast(like, v, dtype):
    return as_dtype(v, dtype)


def to_float64(v):
    return np.array(v, np.float64)


def to_host(a):
    return np.asarray(a)


def copy(a):
    return np.copy(a)


from_host = copy


def assign(a, value):
    value = np.asarray(value)
    if is_bfloat16(a.dtype) and value.dtype != a.dtype:
        value = as_dtype(value, a.dtype)
    np.copyto(a, value, casting="unsafe")
