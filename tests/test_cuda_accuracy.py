"""The device statistics against exact references (``tests/exact.py``), as ``test_accuracy.py``
does for the host: float64 means correctly rounded, variances within 1e-14 relative on data
far from zero, float32/float16 results correctly rounded, constant data exact, on the rows
and columns kernels (contiguous and strided), their multi-block merges and ``Moments``
merged from device results.

In the simulator the launches are small (8 threads, 4 blocks per reduction) but each thread
still sums hundreds of values, so the chunked double-double sums, the block trees and the
merge of the blocks' partial states all run.
"""
import numpy as np
import pytest

import nbbn

from . import exact

cuda = pytest.importorskip("numba.cuda")
SIM = bool(cuda.config.ENABLE_CUDASIM)
if not SIM and not cuda.is_available():
    pytest.skip("no CUDA GPU and NUMBA_ENABLE_CUDASIM=0", allow_module_level=True)

OFFSETS = [1e3, 1.7e9, 1e12]
VAR_TARGET = 1e-14


@pytest.fixture(autouse=True)
def simulated_launches(monkeypatch):
    """Few threads per block in the simulator, at least 16 values per thread."""
    from nbbn._cuda import launch
    if SIM:
        monkeypatch.setattr(launch, "THREADS", 8)
        monkeypatch.setattr(launch, "BLOCKS_PER_SM", 2)


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


# (name, per-channel values (C, n) -> (device array, axis)): each channel's values, in
# every kernel's layout.
LAYOUTS = {
    "flat": lambda v: (dev(v[0]), None),
    "rows": lambda v: (dev(v.reshape(len(v), 4, -1).transpose(1, 0, 2)), (0, 2)),
    "columns": lambda v: (dev(v.T), 0),
    "columns_strided": lambda v: (dev(np.repeat(v.T, 2, axis=1))[::-1, ::2], 0),
    "rows_strided": lambda v: (dev(np.repeat(v.reshape(len(v), 4, -1), 2, -1)
                                   .transpose(1, 0, 2))[::-1, :, ::2], (0, 2)),
}


def _host(a):
    return np.atleast_1d(a.copy_to_host())


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_offset_data_every_kernel(layout, offset, rng):
    values = exact.channels(offset, 4_000, 2, rng)
    a, axis = LAYOUTS[layout](values)
    got_mean, got_var = (_host(r) for r in nbbn.mean_var(a, axis=axis))
    for c in range(got_mean.size):  # the flat layout holds channel 0 only
        mean, m2 = exact.moments(values[c])
        assert exact.ulps(got_mean[c], mean) <= 0.5
        assert exact.relative_error(got_var[c], m2 / values.shape[1]) <= VAR_TARGET


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_narrow_floats_correctly_rounded(dtype, layout, rng):
    values = exact.channels(1e3 if dtype == np.float32 else 50, 2_000, 2, rng).astype(dtype)
    a, axis = LAYOUTS[layout](values)
    got_mean, got_var = (_host(r) for r in nbbn.mean_var(a, axis=axis))
    assert got_mean.dtype == dtype
    for c in range(2):
        mean, m2 = exact.moments(values[c])
        assert exact.ulps(got_mean[c], mean, dtype) <= 0.5
        assert exact.ulps(got_var[c], m2 / values.shape[1], dtype) <= 0.5


@pytest.mark.parametrize("value", [0.1, 1e12 + 0.5, 4.1261241019148086e167])
@pytest.mark.parametrize("layout", ["rows", "columns", "columns_strided"])
def test_constant_data_exact(value, layout):
    values = np.full((2, 1_000), value)
    for dtype in (np.float64, np.float32, np.float16):
        with np.errstate(over="ignore"):
            v = values.astype(dtype)
        if not np.isfinite(v).all():
            continue
        mean, var = (_host(r) for r in nbbn.mean_var(*LAYOUTS[layout](v)))
        assert (mean == v[0, 0]).all()
        assert (var == 0).all()


def test_integer_data_mean_correctly_rounded():
    for values in ([3, 84, -86], np.arange(3_000) % 97 - 40.0):
        values = np.asarray(values, np.float64)
        assert exact.ulps(_host(nbbn.mean(dev(values)))[0], exact.moments(values)[0]) <= 0.5


def test_moments_carry_the_mean_low_part_through_merges(rng):
    """``nbbn.moments`` of device chunks, merged on the host: as one pass over the whole."""
    a = 1e12 + rng.standard_normal(6_000)
    mean, m2 = exact.moments(a)
    parts = []
    for chunk in np.split(a, [1, 900, 901, 4_500]):
        m = nbbn.moments(dev(chunk))
        parts.append(nbbn.Moments.with_mean_low(m.count, *(_host(v)[0] for v in
                                                           (m.mean, m.m2, m.mean_low))))
    total = nbbn.Moments.combine(parts)
    assert exact.ulps(total.mean, mean) <= 1
    assert exact.relative_error(total.m2, m2) <= VAR_TARGET


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("layout", ["rows", "columns", "columns_strided", "rows_strided"])
def test_batch_norm_statistics_and_backward_sums(layout, offset, rng):
    """As ``test_accuracy.test_batch_norm_statistics_and_backward_sums``, on the device."""
    values = exact.channels(offset, 4_000, 2, rng)
    grads = rng.standard_normal(values.shape) + 0.3
    x, _ = LAYOUTS[layout](values)
    dy, _ = LAYOUTS[layout](grads)
    ones, zeros = dev(np.ones(2)), dev(np.zeros(2))
    _, mean, var = nbbn.batch_norm_forward(x, ones, zeros)
    _, dweight, dbias = nbbn.batch_norm_backward(dy, x, mean, ones, ones, eps=0.0)
    mean, var, dweight, dbias = map(_host, (mean, var, dweight, dbias))
    for c in range(2):
        exact_mean, m2 = exact.moments(values[c])
        assert exact.ulps(mean[c], exact_mean) <= 0.5
        assert exact.relative_error(var[c], m2 / values.shape[1]) <= VAR_TARGET
        sum_dy, sum_dy_xmu = exact.backward_sums(grads[c], values[c], mean[c])
        assert exact.relative_error(dbias[c], sum_dy) <= VAR_TARGET
        assert exact.relative_error(dweight[c], sum_dy_xmu) <= VAR_TARGET


def test_nonfinite_data_as_numpy():
    """inf and nan pass through the chunked sums and double-double merges as NumPy's sums
    would; so does a square that overflows (the variance is then inf)."""
    v = np.arange(8_000.0).reshape(2, -1)
    v[0, 700] = np.inf  # read early by its thread: its sums go on for many chunks
    v[1, 3] = np.nan
    v[1, 5:9] = -np.inf
    big = (4 + np.random.default_rng(3).standard_normal((2, 4_000))) * 1e300
    for v, layout in ((v, "rows"), (v, "columns"), (big, "rows"), (big, "columns")):
        with np.errstate(invalid="ignore"):  # the simulator computes with NumPy scalars
            mean, var = (_host(r) for r in nbbn.mean_var(*LAYOUTS[layout](v)))
            np.testing.assert_allclose(mean, v.mean(axis=1), rtol=1e-15)
            np.testing.assert_array_equal(var, v.var(axis=1))
