"""JAX/XLA and TensorFlow/oneDNN contenders for ``nbbn bench`` (``pip install 'nbbn[peers]'``).

Each is what a user of that framework runs, prepared outside the timed call
(inputs converted once, functions traced and compiled on the first call, which
``runner.interleaved`` makes before timing):

* ``jax``: jitted Flax-style batch norm (``flax.linen.BatchNorm``'s formulas,
  written out so that Flax need not be installed): statistics in one pass,
  ``mean(x**2) - mean(x)**2`` (Flax's default fast variance); training forward ``(x - mean) * rsqrt(var + eps) * weight +
  bias`` with the running averages; backward ``jax.vjp`` of that forward (XLA
  computes again the batch statistics it needs, as a JAX training step does);
  inference with the running statistics. Every layout (``axis`` as nbbn's).
  Timed calls wait for the result (``block_until_ready``).
* ``tf``: ``tf.nn.moments`` for statistics and the fused kernels
  ``FusedBatchNormV3`` / ``FusedBatchNormGradV3`` (oneDNN on CPU) for the
  rest, in ``tf.function``; NHWC images and 2-D ``[N, C]`` (viewed as
  ``[N, 1, 1, C]``) only, and float32 only, as TensorFlow's CPU kernels.

A framework that is not installed (or fails to import) is left out.
"""
import functools
import importlib
import importlib.util
import os

from . import EPS, MOMENTUM


@functools.cache
def jax():
    """The ``jax`` module with float64 enabled, or None."""
    if importlib.util.find_spec("jax") is None:
        return None
    try:
        module = importlib.import_module("jax")
        module.config.update("jax_enable_x64", True)
    except Exception:  # noqa: BLE001 - broken install: leave it out
        return None
    return module


@functools.cache
def tf():
    """The ``tensorflow`` module, or None."""
    if importlib.util.find_spec("tensorflow") is None:
        return None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no start-up chatter
    try:
        return importlib.import_module("tensorflow")
    except Exception:  # noqa: BLE001
        return None


def available():
    """Names of the peers importable here."""
    return tuple(name for name, get in (("jax", jax), ("tf", tf)) if get() is not None)


def set_threads(n):
    """Give the peers ``n`` threads. Call before their first operation: XLA reads its
    flags when its CPU client starts, TensorFlow its thread pools when its runtime does."""
    if n == 1 and importlib.util.find_spec("jax") is not None:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
    module = tf()
    if module is not None:
        try:
            module.config.threading.set_intra_op_parallelism_threads(n)
            module.config.threading.set_inter_op_parallelism_threads(n)
        except RuntimeError:  # the runtime has started: too late, keep its pools
            pass


def versions():
    out = {}
    for name, get in (("jax", jax), ("tensorflow", tf)):
        module = get()
        out[name] = None if module is None else module.__version__
    return out


# --- JAX: Flax-style batch norm ------------------------------------------------------------


def _jax_stats(jnp, x, axes):
    """Flax's ``_compute_stats`` (its default ``use_fast_variance``): one pass for
    mean(x) and mean(x**2)."""
    mean = jnp.mean(x, axis=axes)
    return mean, jnp.maximum(0.0, jnp.mean(jnp.square(x), axis=axes) - jnp.square(mean))


def _jax_normalize(jnp, x, mean, var, weight, bias, axes):
    shape = [1 if i in axes else n for i, n in enumerate(x.shape)]
    scale = (jax().lax.rsqrt(var + EPS) * weight).reshape(shape)
    return (x - mean.reshape(shape)) * scale + bias.reshape(shape)


def _jax_forward(jnp, x, weight, bias, running_mean, running_var, axes):
    mean, var = _jax_stats(jnp, x, axes)
    y = _jax_normalize(jnp, x, mean, var, weight, bias, axes)
    return (y, (1 - MOMENTUM) * running_mean + MOMENTUM * mean,
            (1 - MOMENTUM) * running_var + MOMENTUM * var)


def _jax_call(fn, *arrays):
    """A zero-argument callable running jitted ``fn`` on device copies of ``arrays``."""
    j = jax()
    args = [j.device_put(a) for a in arrays]
    compiled = j.jit(fn)
    return lambda: j.block_until_ready(compiled(*args))


def jax_contender(op, p):
    """Factory of the ``jax`` contender of op ``op`` for prepared inputs ``p``."""
    jnp = jax().numpy
    axes = p["case"].reduce_axes
    if op == "mean_var":
        return _jax_call(lambda x: _jax_stats(jnp, x, axes), p["x"])
    if op == "forward":
        return _jax_call(lambda *a: _jax_forward(jnp, *a, axes), p["x"], p["weight"], p["bias"],
                         p["running_mean"], p["running_var"])
    if op == "backward":
        def backward(dy, x, weight, bias):
            def y_of(x_, w_, b_):
                mean, var = _jax_stats(jnp, x_, axes)
                return _jax_normalize(jnp, x_, mean, var, w_, b_, axes)
            return jax().vjp(y_of, x, weight, bias)[1](dy)
        return _jax_call(backward, p["dy"], p["x"], p["weight"], p["bias"])
    if op == "inference":
        return _jax_call(lambda x, m, v, w, b: _jax_normalize(jnp, x, m, v, w, b, axes),
                         p["x"], p["running_mean"], p["running_var"], p["weight"], p["bias"])
    raise KeyError(op)


# --- TensorFlow: the fused (oneDNN) kernels ----------------------------------------------------


def tf_applies(case):
    """TensorFlow's fused CPU kernels: NHWC (or 2-D as NHWC) float32; moments: any."""
    if case.op == "mean_var":
        return True
    return case.layout in ("NHWC", "NC") and case.dtype == "float32"


def _nhwc(a):
    return a.reshape(a.shape[0], 1, 1, a.shape[1]) if a.ndim == 2 else a


def tf_contender(op, p):
    """Factory of the ``tf`` contender of op ``op`` for prepared inputs ``p``."""
    t = tf()
    raw = t.raw_ops
    if op == "mean_var":
        x = t.constant(p["x"])
        axes = list(p["case"].reduce_axes)
        fn = t.function(lambda x: t.nn.moments(x, axes))
        return lambda: fn(x)
    x = t.constant(_nhwc(p["x"]))
    w, b, rm, rv = (t.constant(p[k]) for k in ("weight", "bias", "running_mean", "running_var"))
    if op == "forward":
        fn = t.function(lambda x, w, b, rm, rv: raw.FusedBatchNormV3(
            x=x, scale=w, offset=b, mean=rm, variance=rv, epsilon=EPS,
            exponential_avg_factor=MOMENTUM, is_training=True)[:3])
        return lambda: fn(x, w, b, rm, rv)
    if op == "inference":
        fn = t.function(lambda x, w, b, rm, rv: raw.FusedBatchNormV3(
            x=x, scale=w, offset=b, mean=rm, variance=rv, epsilon=EPS, is_training=False)[0])
        return lambda: fn(x, w, b, rm, rv)
    if op == "backward":
        empty = t.constant([], t.float32)
        saved = raw.FusedBatchNormV3(x=x, scale=w, offset=b, mean=empty, variance=empty,
                                     epsilon=EPS, is_training=True)[3:]
        dy = t.constant(_nhwc(p["dy"]))
        fn = t.function(lambda dy, x, w, s1, s2, s3: raw.FusedBatchNormGradV3(
            y_backprop=dy, x=x, scale=w, reserve_space_1=s1, reserve_space_2=s2,
            reserve_space_3=s3, epsilon=EPS, is_training=True)[:3])
        return lambda: fn(dy, x, w, *saved)
    raise KeyError(op)


def contenders(op, case):
    """{peer: factory(inputs)} for the peers installed here that run ``case``."""
    out = {}
    if op not in ("mean_var", "forward", "backward", "inference"):
        return out
    if jax() is not None:
        out["jax"] = functools.partial(jax_contender, op)
    if tf() is not None and tf_applies(case):
        out["tf"] = functools.partial(tf_contender, op)
    return out
