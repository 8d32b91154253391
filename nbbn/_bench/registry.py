"""The one registry of benchmarked operations, shared by ``bench/`` and ``nbbn bench``.

An :class:`Op` names an operation, the floor kernels that move the bytes it
must move (see :mod:`nbbn._bench.floor`), and one factory per contender
(``nbbn``, ``numpy``, ``torch``). A factory takes the prepared inputs of a
:class:`Case` and returns a zero-argument callable: everything that is not
the operation itself (allocation, conversion to torch tensors, building a
layer) happens in the factory, outside the timed call.

Batch-norm entries are written against API.md sections 2 and 3 and are
skipped while the nbbn functions they need do not exist (``Op.requires``).
"""
import importlib
import math
from dataclasses import dataclass, field

import ml_dtypes  # noqa: F401 (registers the "bfloat16" dtype name with NumPy)
import numpy as np

import nbbn

from . import EPS, MOMENTUM

#: Shapes as [b, c, h, w] (4-D) or [n, c] (2-D); NHWC cases store [b, h, w, c].
LARGE_SHAPES = ((64, 64, 56, 56), (256, 256, 14, 14), (32, 3, 224, 224), (4096, 1024))
SMALL_SHAPES = ((32, 64), (8, 16, 8, 8))
SHAPES = LARGE_SHAPES + SMALL_SHAPES
DTYPES = ("float32", "float64")
#: Dtypes a case may ask for (``--dtypes``); bfloat16 is NumPy's through ml_dtypes.
KNOWN_DTYPES = DTYPES + ("bfloat16",)
LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class Case:
    """One operation on one logical shape, dtype and memory layout."""

    op: str
    shape: tuple      # logical [b, c, ...] (channels second)
    dtype: str
    layout: str       # "NCHW" (channels second), "NHWC" (channels last) or "NC" (2-D)

    @property
    def channels(self):
        return self.shape[1]

    @property
    def axis(self):
        """nbbn's channel ``axis`` for the stored array."""
        return -1 if self.layout == "NHWC" else 1

    @property
    def stored_shape(self):
        if self.layout == "NHWC":
            return (self.shape[0],) + self.shape[2:] + (self.shape[1],)
        return self.shape

    @property
    def reduce_axes(self):
        nd = len(self.shape)
        ch = nd - 1 if self.layout == "NHWC" else 1
        return tuple(i for i in range(nd) if i != ch)

    @property
    def label(self):
        return f"{self.op} {'x'.join(map(str, self.shape))} {self.layout} {self.dtype}"

    @property
    def size(self):
        return math.prod(self.shape)


def layouts_for(shape):
    return ("NC",) if len(shape) == 2 else LAYOUTS


def cases(ops=None, shapes=SHAPES, dtypes=DTYPES, layouts=None):
    """Every (op, shape, dtype, layout) combination, restricted as asked."""
    out = []
    for op in ops or list(OPS):
        for shape in shapes:
            shape = tuple(shape)
            for dtype in dtypes:
                for layout in layouts_for(shape):
                    if layouts and layout not in layouts and layout != "NC":
                        continue
                    case = Case(op, shape, dtype, layout)
                    if OPS[op].applies(case):
                        out.append(case)
    return out


# --- inputs ---------------------------------------------------------------

def _channel_view(v, case):
    """A per-channel vector shaped to broadcast against the stored array."""
    nd = len(case.shape)
    shape = [1] * nd
    shape[case.axis] = v.shape[0]
    return v.reshape(shape)


def prepare(case, seed=0):
    """The inputs of a case: x, dy, per-channel parameters and batch statistics (NumPy)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(case.dtype)
    c = case.channels
    x = rng.standard_normal(case.stored_shape, dtype=np.float32).astype(dt, copy=False)
    x *= 2
    x += 0.5
    inputs = dict(x=x, case=case)
    if case.op != "mean_var":
        inputs.update(
            dy=rng.standard_normal(case.stored_shape, dtype=np.float32).astype(dt, copy=False),
            residual=rng.standard_normal(case.stored_shape, dtype=np.float32).astype(dt),
            weight=(1 + 0.1 * rng.standard_normal(c)).astype(dt),
            bias=(0.1 * rng.standard_normal(c)).astype(dt),
            running_mean=np.zeros(c, dt),
            running_var=np.ones(c, dt),
            mean=x.mean(axis=case.reduce_axes, dtype=np.float64).astype(dt),
            var=x.var(axis=case.reduce_axes, dtype=np.float64).astype(dt),
            count=case.size // c,
        )
    return inputs


def _torch():
    try:
        return importlib.import_module("torch")
    except ImportError:
        return None


def torch_available():
    return _torch() is not None


def _t(a, case=None):
    """torch view of a NumPy array (bfloat16: of its bits); with a case, the stored array as
    logical NCHW."""
    torch = _torch()
    if a.dtype == np.dtype("bfloat16"):
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    if case is not None and case.layout == "NHWC":
        t = t.permute(0, t.ndim - 1, *range(1, t.ndim - 1))  # channels-last memory format
    return t


def _get(p, *keys):
    return tuple(p[k] for k in keys)


# --- mean_var -------------------------------------------------------------

def _mean_var_nbbn(p):
    x, axes = p["x"], p["case"].reduce_axes
    return lambda: nbbn.mean_var(x, axis=axes)


def _mean_var_numpy(p):
    x, axes = p["x"], p["case"].reduce_axes
    return lambda: (np.mean(x, axis=axes), np.var(x, axis=axes))


def _mean_var_torch(p):
    torch = _torch()
    x, axes = _t(p["x"]), p["case"].reduce_axes

    def run():
        var, mean = torch.var_mean(x, dim=axes, correction=0)
        return mean, var

    return run


# --- batch norm: NumPy references -------------------------------------------

def _np_forward(x, w, b, axes, case):
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    scale = w / np.sqrt(var + EPS)
    shift = b - mean * scale
    return x * _channel_view(scale, case) + _channel_view(shift, case), mean, var


def _np_ema(rm, rv, mean, var, count):
    rm *= 1 - MOMENTUM
    rm += MOMENTUM * mean
    rv *= 1 - MOMENTUM
    rv += (MOMENTUM * count / (count - 1)) * var


def _np_backward(dy, x, mean, var, w, axes, case):
    n = x.size // mean.size
    invstd = 1 / np.sqrt(var + EPS)
    xmu = x - _channel_view(mean, case)
    sum_dy = dy.sum(axis=axes)
    sum_dy_xmu = (dy * xmu).sum(axis=axes)
    k = _channel_view(sum_dy_xmu * invstd * invstd / n, case)
    dx = (dy - _channel_view(sum_dy / n, case) - xmu * k) * _channel_view(w * invstd, case)
    return dx, sum_dy_xmu * invstd, sum_dy


# --- training forward (batch_norm, training=True) ----------------------------

def _forward_nbbn(p):
    x, rm, rv, w, b, ax = _get(p, "x", "running_mean", "running_var", "weight", "bias") + (p["case"].axis,)
    return lambda: nbbn.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS, axis=ax)


def _forward_nbbn_out(p):
    x, rm, rv, w, b, ax = _get(p, "x", "running_mean", "running_var", "weight", "bias") + (p["case"].axis,)
    y = np.empty_like(x)
    return lambda: nbbn.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS,
                                   axis=ax, out=y)


def _forward_numpy(p):
    case = p["case"]
    x, rm, rv, w, b = (p[k] for k in ("x", "running_mean", "running_var", "weight", "bias"))

    def run():
        y, mean, var = _np_forward(x, w, b, case.reduce_axes, case)
        _np_ema(rm, rv, mean, var, p["count"])
        return y

    return run


def _forward_torch(p):
    F = importlib.import_module("torch.nn.functional")
    case = p["case"]
    x = _t(p["x"], case)
    rm, rv, w, b = (_t(p[k]) for k in ("running_mean", "running_var", "weight", "bias"))
    return lambda: F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)


# --- inference (batch_norm, training=False) ---------------------------------

def _inference_nbbn(p):
    x, rm, rv, w, b, ax = _get(p, "x", "running_mean", "running_var", "weight", "bias") + (p["case"].axis,)
    return lambda: nbbn.batch_norm(x, rm, rv, w, b, training=False, eps=EPS, axis=ax)


def _inference_nbbn_out(p):
    x, rm, rv, w, b, ax = _get(p, "x", "running_mean", "running_var", "weight", "bias") + (p["case"].axis,)
    y = np.empty_like(x)
    return lambda: nbbn.batch_norm(x, rm, rv, w, b, training=False, eps=EPS, axis=ax, out=y)


def _inference_numpy(p):
    case = p["case"]
    x, rm, rv, w, b = (p[k] for k in ("x", "running_mean", "running_var", "weight", "bias"))

    def run():
        scale = w / np.sqrt(rv + EPS)
        shift = b - rm * scale
        return x * _channel_view(scale, case) + _channel_view(shift, case)

    return run


def _inference_torch(p):
    F = importlib.import_module("torch.nn.functional")
    case = p["case"]
    x = _t(p["x"], case)
    rm, rv, w, b = (_t(p[k]) for k in ("running_mean", "running_var", "weight", "bias"))
    return lambda: F.batch_norm(x, rm, rv, w, b, training=False, eps=EPS)


# --- backward ----------------------------------------------------------------

def _backward_nbbn(p):
    dy, x, m, v, w, ax = _get(p, "dy", "x", "mean", "var", "weight") + (p["case"].axis,)
    return lambda: nbbn.batch_norm_backward(dy, x, m, v, w, EPS, axis=ax)


def _backward_nbbn_out(p):
    dy, x, m, v, w, ax = _get(p, "dy", "x", "mean", "var", "weight") + (p["case"].axis,)
    dx = np.empty_like(x)
    return lambda: nbbn.batch_norm_backward(dy, x, m, v, w, EPS, axis=ax, out=dx)


def _backward_numpy(p):
    case = p["case"]
    dy, x, m, v, w = (p[k] for k in ("dy", "x", "mean", "var", "weight"))
    return lambda: _np_backward(dy, x, m, v, w, case.reduce_axes, case)


def _backward_torch(p):
    torch = _torch()
    case = p["case"]
    dy, x = _t(p["dy"], case), _t(p["x"], case)
    w, m = _t(p["weight"]), _t(p["mean"])
    invstd = _t((1 / np.sqrt(p["var"].astype(np.float64) + EPS)).astype(p["var"].dtype))
    bwd = torch.ops.aten.native_batch_norm_backward
    return lambda: bwd(dy, x, w, None, None, m, invstd, True, EPS, [True, True, True])


# --- fused epilogue: relu(BN(x) + residual), forward and backward ---------------------
# Beside the fused call: nbbn's plain batch norm (what the epilogue adds to it), nbbn then
# NumPy's add and ReLU (the unfused composition), NumPy alone, and PyTorch's BN + add + ReLU.

def _fused_forward_nbbn(p):
    x, w, b, r, ax = _get(p, "x", "weight", "bias", "residual") + (p["case"].axis,)
    return lambda: nbbn.batch_norm_forward(x, w, b, EPS, axis=ax, residual=r,
                                           activation="relu")


def _fused_forward_plain(p):
    x, w, b, ax = _get(p, "x", "weight", "bias") + (p["case"].axis,)
    return lambda: nbbn.batch_norm_forward(x, w, b, EPS, axis=ax)


def _fused_forward_unfused(p):
    x, w, b, r, ax = _get(p, "x", "weight", "bias", "residual") + (p["case"].axis,)

    def run():
        y, mean, var = nbbn.batch_norm_forward(x, w, b, EPS, axis=ax)
        y += r
        np.maximum(y, 0, out=y)
        return y, mean, var

    return run


def _fused_forward_numpy(p):
    case = p["case"]
    x, w, b, r = _get(p, "x", "weight", "bias", "residual")

    def run():
        y, mean, var = _np_forward(x, w, b, case.reduce_axes, case)
        y += r
        return np.maximum(y, 0, out=y), mean, var

    return run


def _fused_forward_torch(p):
    torch = _torch()
    F = importlib.import_module("torch.nn.functional")
    case = p["case"]
    x, r = _t(p["x"], case), _t(p["residual"], case)
    w, b = _t(p["weight"]), _t(p["bias"])
    return lambda: torch.relu(F.batch_norm(x, None, None, w, b, training=True, eps=EPS) + r)


def _relu_output(p):
    """The forward's y = relu(BN(x) + r) with the case's batch statistics (the backward's
    input)."""
    case = p["case"]
    return nbbn.batch_norm_forward(p["x"], p["weight"], p["bias"], EPS, axis=case.axis,
                                   residual=p["residual"], activation="relu")[0]


def _fused_backward_nbbn(p):
    dy, x, m, v, w, ax = _get(p, "dy", "x", "mean", "var", "weight") + (p["case"].axis,)
    y = _relu_output(p)
    return lambda: nbbn.batch_norm_backward(dy, x, m, v, w, EPS, axis=ax, y=y,
                                            activation="relu", residual_grad=True)


def _fused_backward_unfused(p):
    dy, x, m, v, w, ax = _get(p, "dy", "x", "mean", "var", "weight") + (p["case"].axis,)
    y = _relu_output(p)

    def run():
        g = np.where(y > 0, dy, 0)  # the ReLU's gradient: the residual's too
        return (*nbbn.batch_norm_backward(g, x, m, v, w, EPS, axis=ax), g)

    return run


def _fused_backward_numpy(p):
    case = p["case"]
    dy, x, m, v, w = _get(p, "dy", "x", "mean", "var", "weight")
    y = _relu_output(p)

    def run():
        g = np.where(y > 0, dy, 0)
        return (*_np_backward(g, x, m, v, w, case.reduce_axes, case), g)

    return run


def _fused_backward_torch(p):
    torch = _torch()
    case = p["case"]
    dy, x, y = _t(p["dy"], case), _t(p["x"], case), _t(_relu_output(p), case)
    w, m = _t(p["weight"]), _t(p["mean"])
    invstd = _t((1 / np.sqrt(p["var"].astype(np.float64) + EPS)).astype(p["var"].dtype))
    bwd = torch.ops.aten.native_batch_norm_backward

    def run():
        g = torch.ops.aten.threshold_backward(dy, y, 0)  # ReLU's backward; add's passes g on
        return (*bwd(g, x, w, None, None, m, invstd, True, EPS, [True, True, True]), g)

    return run


# --- ema_update ----------------------------------------------------------------

def _ema_nbbn(p):
    rm, rv, m, v, n = (p[k] for k in ("running_mean", "running_var", "mean", "var", "count"))
    return lambda: nbbn.ema_update(rm, rv, m, v, n, MOMENTUM)


def _ema_numpy(p):
    rm, rv, m, v, n = (p[k] for k in ("running_mean", "running_var", "mean", "var", "count"))
    return lambda: _np_ema(rm, rv, m, v, n)


def _ema_torch(p):
    rm, rv, m, v = (_t(p[k]) for k in ("running_mean", "running_var", "mean", "var"))
    n = p["count"]

    def run():
        rm.mul_(1 - MOMENTUM).add_(m, alpha=MOMENTUM)
        rv.mul_(1 - MOMENTUM).add_(v, alpha=MOMENTUM * n / (n - 1))

    return run


# --- a whole layer step: forward (training) then backward --------------------------

def _layer_nbbn(p):
    case = p["case"]
    layer = nbbn.BatchNorm(case.channels, axis=case.axis, dtype=np.dtype(case.dtype))
    layer.weight[...] = p["weight"]
    layer.bias[...] = p["bias"]
    x, dy = p["x"], p["dy"]

    def run():
        layer(x)
        return layer.backward(dy)

    return run


def _layer_numpy(p):
    case = p["case"]
    x, dy, rm, rv, w, b = (p[k] for k in ("x", "dy", "running_mean", "running_var", "weight", "bias"))

    def run():
        y, mean, var = _np_forward(x, w, b, case.reduce_axes, case)
        _np_ema(rm, rv, mean, var, p["count"])
        return _np_backward(dy, x, mean, var, w, case.reduce_axes, case)

    return run


def _layer_torch(p):
    torch = _torch()
    case = p["case"]
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}.get(
        len(case.shape), torch.nn.BatchNorm3d)
    layer = cls(case.channels, eps=EPS, momentum=MOMENTUM).to(getattr(torch, case.dtype))
    with torch.no_grad():
        layer.weight.copy_(_t(p["weight"]))
        layer.bias.copy_(_t(p["bias"]))
    x, dy = _t(p["x"], case), _t(p["dy"], case)

    def run():
        layer.zero_grad(set_to_none=True)
        xg = x.detach().requires_grad_()
        layer(xg).backward(dy)
        return xg.grad

    return run


# --- small batches: batch renorm, virtual batches (ghost batch norm) ----------------------

RMAX, DMAX = 3.0, 5.0
VIRTUAL = 8  # samples per virtual batch


def _renorm_nbbn(p):
    x, rm, rv, w, b, ax = _get(p, "x", "running_mean", "running_var", "weight", "bias") + (p["case"].axis,)
    return lambda: nbbn.batch_renorm_forward(x, rm, rv, w, b, rmax=RMAX, dmax=DMAX, axis=ax)


def _np_renorm(x, rm, rv, w, b, case):
    """Ioffe's batch renorm in NumPy: y, the batch statistics, r and d."""
    mean, var = x.mean(axis=case.reduce_axes), x.var(axis=case.reduce_axes)
    sigma = np.sqrt(rv + EPS)
    r = np.clip(np.sqrt(var + EPS) / sigma, 1 / RMAX, RMAX)
    d = np.clip((mean - rm) / sigma, -DMAX, DMAX)
    scale = w * r / np.sqrt(var + EPS)
    return (x * _channel_view(scale, case) + _channel_view(b + w * d - mean * scale, case),
            mean, var, r, d)


def _renorm_numpy(p):
    case = p["case"]
    x, rm, rv, w, b = (p[k] for k in ("x", "running_mean", "running_var", "weight", "bias"))

    def run():
        y, mean, var, _, _ = _np_renorm(x, rm, rv, w, b, case)
        _np_ema(rm, rv, mean, var, p["count"])
        return y

    return run


def _renorm_stats(p):
    """The statistics, r and d of batch renorm on the case's input (for the backward)."""
    return nbbn.batch_renorm_forward(p["x"], p["running_mean"].copy(), p["running_var"].copy(),
                                     p["weight"], p["bias"], rmax=RMAX, dmax=DMAX,
                                     axis=p["case"].axis)[1:]


def _renorm_backward_nbbn(p):
    dy, x, w, ax = p["dy"], p["x"], p["weight"], p["case"].axis
    stats = _renorm_stats(p)
    return lambda: nbbn.batch_renorm_backward(dy, x, *stats, w, EPS, axis=ax)


def _renorm_backward_numpy(p):
    case = p["case"]
    dy, x, w = p["dy"], p["x"], p["weight"]
    mean, var, r, d = _renorm_stats(p)

    def run():  # batch norm's backward with the effective weight w * r
        dx, dw, db = _np_backward(dy, x, mean, var, w * r, case.reduce_axes, case)
        return dx, r * dw + d * db, db

    return run


def _ghost_nbbn(p):
    x, w, b, ax = p["x"], p["weight"], p["bias"], p["case"].axis
    return lambda: nbbn.batch_norm_forward(x, w, b, EPS, axis=ax, virtual_batch_size=VIRTUAL)


def _ghost_numpy(p):
    case, x, w, b = p["case"], p["x"], p["weight"], p["bias"]
    return lambda: np.concatenate([_np_forward(x[i:i + VIRTUAL], w, b, case.reduce_axes, case)[0]
                                   for i in range(0, len(x), VIRTUAL)])


def _ghost_torch(p):
    F = importlib.import_module("torch.nn.functional")
    torch = _torch()
    x, w, b = _t(p["x"], p["case"]), _t(p["weight"]), _t(p["bias"])
    return lambda: torch.cat([F.batch_norm(part, None, None, w, b, training=True, eps=EPS)
                              for part in x.split(VIRTUAL)])


def _ghost_backward_nbbn(p):
    dy, x, w, ax = p["dy"], p["x"], p["weight"], p["case"].axis
    _, mean, var = nbbn.batch_norm_forward(x, w, None, EPS, axis=ax, virtual_batch_size=VIRTUAL)
    return lambda: nbbn.batch_norm_backward(dy, x, mean, var, w, EPS, axis=ax,
                                            virtual_batch_size=VIRTUAL)


def _ghost_backward_numpy(p):
    case, dy, x, w = p["case"], p["dy"], p["x"], p["weight"]
    parts = [(x[i:i + VIRTUAL], dy[i:i + VIRTUAL]) for i in range(0, len(x), VIRTUAL)]
    stats = [(xs.mean(axis=case.reduce_axes), xs.var(axis=case.reduce_axes)) for xs, _ in parts]
    return lambda: np.concatenate([_np_backward(dys, xs, m, v, w, case.reduce_axes, case)[0]
                                   for (xs, dys), (m, v) in zip(parts, stats)])


# --- the registry --------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    name: str
    title: str
    floor: tuple                  # floor kernel steps, see nbbn._bench.floor
    contenders: dict              # contender name -> factory(inputs) -> zero-arg callable
    requires: tuple = ()          # nbbn attributes that must exist
    only: tuple = field(default=())  # layouts the op applies to (empty: all)

    def available(self):
        """None when runnable here, else why not."""
        missing = [n for n in self.requires if not hasattr(nbbn, n)]
        return f"nbbn.{', nbbn.'.join(missing)} not available yet" if missing else None

    def applies(self, case):
        return not self.only or case.layout in self.only

    def bytes_moved(self, case):
        from .floor import PASSES
        itemsize = np.dtype(case.dtype).itemsize
        return sum(sum(PASSES[s]) for s in self.floor) * case.size * itemsize


def _ops(*ops):
    return {op.name: op for op in ops}


OPS = _ops(
    Op("mean_var", "statistics (mean_var)", ("read",),
       dict(nbbn=_mean_var_nbbn, numpy=_mean_var_numpy, torch=_mean_var_torch)),
    Op("forward", "training forward (batch_norm, training=True)", ("read", "copy"),
       dict(nbbn=_forward_nbbn, nbbn_out=_forward_nbbn_out, numpy=_forward_numpy,
            torch=_forward_torch), requires=("batch_norm",)),
    Op("backward", "backward (batch_norm_backward)", ("read2", "axpy"),
       dict(nbbn=_backward_nbbn, nbbn_out=_backward_nbbn_out, numpy=_backward_numpy,
            torch=_backward_torch),
       requires=("batch_norm_backward",)),
    Op("inference", "inference (batch_norm, training=False)", ("copy",),
       dict(nbbn=_inference_nbbn, nbbn_out=_inference_nbbn_out, numpy=_inference_numpy,
            torch=_inference_torch),
       requires=("batch_norm",)),
    Op("ema_update", "running-statistics update (ema_update)", (),
       dict(nbbn=_ema_nbbn, numpy=_ema_numpy, torch=_ema_torch), requires=("ema_update",),
       only=("NCHW", "NC")),
    Op("layer_step", "BatchNorm layer: forward + backward", ("read", "copy", "read2", "axpy"),
       dict(nbbn=_layer_nbbn, numpy=_layer_numpy, torch=_layer_torch), requires=("BatchNorm",)),
    Op("renorm_forward", "batch renorm forward (batch_renorm_forward)", ("read", "copy"),
       dict(nbbn=_renorm_nbbn, numpy=_renorm_numpy), requires=("batch_renorm_forward",)),
    Op("renorm_backward", "batch renorm backward (batch_renorm_backward)", ("read2", "axpy"),
       dict(nbbn=_renorm_backward_nbbn, numpy=_renorm_backward_numpy),
       requires=("batch_renorm_backward",)),
    Op("ghost_forward", f"ghost batch norm forward (virtual batches of {VIRTUAL})",
       ("read", "copy"), dict(nbbn=_ghost_nbbn, numpy=_ghost_numpy, torch=_ghost_torch),
       requires=("batch_norm_forward",)),
    Op("ghost_backward", f"ghost batch norm backward (virtual batches of {VIRTUAL})",
       ("read2", "axpy"), dict(nbbn=_ghost_backward_nbbn, numpy=_ghost_backward_numpy),
       requires=("batch_norm_backward",)),
    # Floors: the statistics read x; then x and the residual are read, y written.
    Op("fused_forward", "fused forward: relu(batch_norm_forward(x) + residual)",
       ("read", "axpy"),
       dict(nbbn=_fused_forward_nbbn, nbbn_plain=_fused_forward_plain,
            nbbn_unfused=_fused_forward_unfused, numpy=_fused_forward_numpy,
            torch=_fused_forward_torch), requires=("batch_norm_forward",)),
    # The sums read dy, x and y and write the residual's gradient g; dx reads g and x.
    Op("fused_backward", "fused backward through the ReLU, with the residual's gradient",
       ("read", "axpy", "axpy"),
       dict(nbbn=_fused_backward_nbbn, nbbn_plain=_backward_nbbn,
            nbbn_unfused=_fused_backward_unfused, numpy=_fused_backward_numpy,
            torch=_fused_backward_torch), requires=("batch_norm_backward",)),
)

#: Contenders that compute with NumPy's own loops: not run on bfloat16 (NumPy has no
#: bfloat16 arithmetic of its own; ml_dtypes' loops are no peer).
NUMPY_CONTENDERS = ("numpy", "nbbn_unfused")

def factories(case):
    """{contender: factory(inputs) -> zero-arg callable} of a case: the op's own, less
    PyTorch where it is not installed, and the installed peers' (``peers``)."""
    from . import peers
    out = {name: factory for name, factory in OPS[case.op].contenders.items()
           if (name != "torch" or torch_available())
           and not (case.dtype == "bfloat16" and name in NUMPY_CONTENDERS)}
    if case.dtype != "bfloat16":
        out.update(peers.contenders(case.op, case))
    return out


def thunks(case, inputs=None):
    """{contender: zero-arg callable} for a case; "floor" included where the op has one."""
    from .floor import floor_runner
    op = OPS[case.op]
    inputs = prepare(case) if inputs is None else inputs
    out = {}
    if op.floor:
        out["floor"] = floor_runner(op.floor, inputs["x"])
    for name, factory in factories(case).items():
        out[name] = factory(inputs)
    return out
