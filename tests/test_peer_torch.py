"""PyTorch's own sample inputs (``torch.testing._internal``), run against nbbn.

``op_db`` samples (and error inputs) of ``nn.functional.batch_norm`` (-> nbbn.torch.batch_norm,
outputs, running buffers and gradients), ``native_batch_norm`` (-> nbbn.batch_norm_forward /
nbbn.batch_norm on NumPy arrays) and ``var``, ``var_mean``, ``std``, ``mean`` (-> nbbn's
statistics, NumPy's conventions), and ``module_db`` for ``BatchNorm1d/2d/3d`` (->
nbbn.torch's modules against torch.nn's, training and evaluation, error inputs included).
A sample may differ from PyTorch only where API.md says so (``deviation``).
"""
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest")

import nbbn  # noqa: E402
import nbbn.torch as nt  # noqa: E402
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

F = torch.nn.functional
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-10)}


def ops(*names):
    return [op for op in op_db if op.name in names]


def op_id(op):
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def clone(t):
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def deviation(momentum=None, training=False):
    """The reason API.md gives for nbbn to refuse a sample PyTorch accepts, or None."""
    if training and momentum is not None and not 0 <= momentum <= 1:
        return "momentum outside [0, 1]: ValueError naming it (API.md section 6)"
    return None


# ---- nn.functional.batch_norm -> nbbn.torch.batch_norm -----------------------------------------


@pytest.mark.parametrize("op", ops("nn.functional.batch_norm"), ids=op_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_batch_norm_samples(op, dtype):
    ran = 0
    for sample in op.sample_inputs("cpu", dtype, requires_grad=True):
        x = sample.input
        rm, rv, w, b = sample.args
        kwargs = dict(sample.kwargs)
        why = deviation(kwargs.get("momentum", 0.1), kwargs.get("training", False))
        if why:
            with pytest.raises(ValueError, match="momentum"):
                nt.batch_norm(clone(x), clone(rm), clone(rv), w, b, **kwargs)
            continue
        ours_in = [clone(a).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                   else a for a in (x, w, b)]
        theirs_in = [clone(a).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                     else a for a in (x, w, b)]
        ours_rm, ours_rv, theirs_rm, theirs_rv = clone(rm), clone(rv), clone(rm), clone(rv)
        want = F.batch_norm(theirs_in[0], theirs_rm, theirs_rv, *theirs_in[1:], **kwargs)
        got = nt.batch_norm(ours_in[0], ours_rm, ours_rv, *ours_in[1:], **kwargs)
        torch.testing.assert_close(got, want, **TOL[dtype])
        torch.testing.assert_close(ours_rm, theirs_rm, **TOL[dtype])
        torch.testing.assert_close(ours_rv, theirs_rv, **TOL[dtype])
        if want.numel() and want.requires_grad:
            dy = torch.randn_like(want)
            want.backward(dy)
            got.backward(dy)
            for o, t in zip(ours_in, theirs_in):
                if isinstance(o, torch.Tensor) and o.requires_grad:
                    torch.testing.assert_close(o.grad, t.grad, **TOL[dtype])
        ran += 1
    assert ran >= 8


# ---- native_batch_norm -> nbbn.batch_norm_forward / nbbn.batch_norm ---------------------------


def _np(t):
    return None if t is None else t.detach().numpy().copy()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_batch_norm_samples(dtype):
    (op,) = ops("native_batch_norm")
    ran = 0
    for sample in op.sample_inputs("cpu", dtype, requires_grad=False):
        x = sample.input
        w, b, rm, rv, training, momentum, eps = sample.args
        want_y, want_mean, want_invstd = torch.native_batch_norm(
            x, w, b, clone(rm), clone(rv), training, momentum, eps)
        theirs_rm, theirs_rv = clone(rm), clone(rv)
        torch.native_batch_norm(x, w, b, theirs_rm, theirs_rv, training, momentum, eps)
        ours_rm, ours_rv = _np(rm), _np(rv)
        if deviation(momentum, training):
            with pytest.raises(ValueError, match="momentum"):
                nbbn.batch_norm(_np(x), ours_rm, ours_rv, _np(w), _np(b), training, momentum,
                                eps)
            continue
        if training:
            y, mean, var = nbbn.batch_norm_forward(_np(x), _np(w), _np(b), eps)
            if ours_rm is not None:
                nbbn.ema_update(ours_rm, ours_rv, mean, var, x.numel() // x.shape[1],
                                momentum)
            torch.testing.assert_close(torch.from_numpy(mean), want_mean, **TOL[dtype])
            torch.testing.assert_close(torch.from_numpy(1 / np.sqrt(var + eps)), want_invstd,
                                       **TOL[dtype])
        else:
            y = nbbn.batch_norm(_np(x), ours_rm, ours_rv, _np(w), _np(b), False, momentum, eps)
        torch.testing.assert_close(torch.from_numpy(y), want_y, **TOL[dtype])
        if ours_rm is not None:
            torch.testing.assert_close(torch.from_numpy(ours_rm), theirs_rm, **TOL[dtype])
            torch.testing.assert_close(torch.from_numpy(ours_rv), theirs_rv, **TOL[dtype])
        ran += 1
    assert ran >= 6


# ---- var / var_mean / std / mean -> nbbn's statistics -------------------------------------------


def _numpy_args(op_name, sample):
    """PyTorch's reduction arguments in NumPy's terms: (axis, ddof, keepdims)."""
    kwargs = dict(sample.kwargs)
    dim = kwargs.pop("dim", None)
    if sample.args:  # the "unbiased" variants: (unbiased,)
        kwargs["unbiased"] = sample.args[0]
    if dim is not None and not isinstance(dim, int):
        dim = tuple(dim) or None  # dim=() is every dim in PyTorch
    ddof = 0
    if op_name != "mean":
        correction = kwargs.pop("correction", None)
        unbiased = kwargs.pop("unbiased", None)
        ddof = (1 if unbiased is None or unbiased else 0) if correction is None else correction
    return dim, ddof, kwargs.pop("keepdim", False), kwargs


@pytest.mark.parametrize("op", ops("var", "var_mean", "std", "mean"), ids=op_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_samples(op, dtype):
    ran = 0
    for sample in op.sample_inputs("cpu", dtype, requires_grad=False):
        axis, ddof, keepdims, rest = _numpy_args(op.name, sample)
        a = sample.input.numpy()
        if a.ndim == 0 and axis is not None:
            # PyTorch lets dim 0/-1 name a scalar's "one dim"; NumPy's (and nbbn's) rule is
            # AxisError (API.md section 6): a documented difference.
            with pytest.raises(np.exceptions.AxisError):
                getattr(nbbn, "mean_var" if op.name == "var_mean" else op.name)(a, axis=axis)
            continue
        with np.errstate(all="ignore"), _quiet():
            want = op(sample.input, *sample.args, **sample.kwargs)
            if op.name == "mean":
                got = nbbn.mean(a, axis=axis, keepdims=keepdims,
                                dtype=_numpy_dtype(rest.get("dtype")))
            elif op.name == "var_mean":
                v, m = nbbn.mean_var(a, axis=axis, ddof=ddof, keepdims=keepdims)[::-1]
                got = (v, m)
            else:
                got = getattr(nbbn, op.name)(a, axis=axis, ddof=ddof, keepdims=keepdims)
        for g, w in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(torch.as_tensor(np.asarray(g)), w, equal_nan=True,
                                       **TOL[dtype])
        ran += 1
    assert ran >= 4


class _quiet:
    """NumPy's RuntimeWarnings for empty or degenerate slices are expected here."""

    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def _numpy_dtype(torch_dtype):
    return None if torch_dtype is None else torch.empty((), dtype=torch_dtype).numpy().dtype


def test_mean_error_inputs_follow_numpy():
    """PyTorch refuses integer input or dtype= to mean; nbbn gives NumPy's answer (API.md
    section 1: integer input gives float64, as in NumPy): a documented difference."""
    (op,) = ops("mean")
    for error in op.error_inputs("cpu"):
        sample = error.sample_input
        with pytest.raises(error.error_type, match=error.error_regex):
            op(sample.input, *sample.args, **sample.kwargs)
        a, dtype = sample.input.numpy(), _numpy_dtype(sample.kwargs.get("dtype"))
        got, want = nbbn.mean(a, dtype=dtype), np.mean(a, dtype=dtype)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-12)


# ---- module_db: BatchNorm1d/2d/3d ----------------------------------------------------------------


def modules():
    return [m for m in module_db if m.module_cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d,
                                                     torch.nn.BatchNorm3d)]


def _ours(cls):
    return {torch.nn.BatchNorm1d: nt.BatchNorm1d, torch.nn.BatchNorm2d: nt.BatchNorm2d,
            torch.nn.BatchNorm3d: nt.BatchNorm3d}[cls]


@pytest.mark.parametrize("info", modules(), ids=lambda m: m.module_cls.__name__)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_module_samples(info, training, dtype):
    inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                     training=training)
    for mi in inputs:
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        theirs = info.module_cls(*args, **kwargs).to(dtype)
        ours = _ours(info.module_cls)(*args, **kwargs).to(dtype)
        with torch.no_grad():
            for p in theirs.parameters():
                p.uniform_(0.5, 1.5)
            if theirs.running_var is not None:
                theirs.running_mean.uniform_(-1, 1)
                theirs.running_var.uniform_(0.5, 2)
        ours.load_state_dict(theirs.state_dict())
        theirs.train(training)
        ours.train(training)
        for step in range(2):
            (x,) = mi.forward_input.args
            xt, xo = clone(x).requires_grad_(), clone(x).requires_grad_()
            want, got = theirs(xt), ours(xo)
            torch.testing.assert_close(got, want, **TOL[dtype])
            if want.numel():
                dy = torch.randn_like(want)
                want.backward(dy)
                got.backward(dy)
                torch.testing.assert_close(xo.grad, xt.grad, **TOL[dtype])
            for name, t in theirs.state_dict().items():
                torch.testing.assert_close(ours.state_dict()[name], t, **TOL[dtype])
            for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
                torch.testing.assert_close(q.grad, p.grad, **TOL[dtype], msg=name)


@pytest.mark.parametrize("info", modules(), ids=lambda m: m.module_cls.__name__)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_error_inputs(info, training):
    """nbbn's modules fail where torch.nn's do, with the same exception type and, where
    torch.nn's message matches the sample's pattern (training), a matching message."""
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                           requires_grad=False, training=training)
    assert errors
    for error in errors:
        mi = error.module_error_input
        outcomes = []
        for cls in (info.module_cls, _ours(info.module_cls)):
            module = cls(*mi.constructor_input.args, **mi.constructor_input.kwargs)
            module.train(training)
            try:
                module(*mi.forward_input.args, **mi.forward_input.kwargs)
            except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
                outcomes.append((type(exc), bool(re.search(error.error_regex, str(exc)))))
            else:
                outcomes.append(None)
        assert outcomes[0] == outcomes[1], outcomes
        if training:
            assert outcomes[0] == (error.error_type, True)
