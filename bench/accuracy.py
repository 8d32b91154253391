"""The README's Accuracy table: nbbn and NumPy against exact references, side by side.

Run from the repository root: ``python -m bench.accuracy`` (about 10 s). Errors
are against the exact mean and variance of the stored values (``tests/exact.py``:
integer arithmetic); means in units in the last place of the exact mean, variances
relative. Data ``offset + N(0, 1) + drift`` has unit spread and a linear drift of 4
over the run. Where the exact variance is 0 (constant data), the variance itself
is shown. Then: merged states (``Moments.combine``, ``nbbn.dask``), the batch-norm
backward sums, and with ``--device`` the same statistics on CUDA arrays
(``NUMBA_ENABLE_CUDASIM=1`` without a GPU: Numba's simulator, same arithmetic).
"""
import sys

import numpy as np

import nbbn
from tests import exact

ROWS = []


def row(label, channels, a=None, axis=None, dtype=np.float64, device=False):
    """Worst errors over the channels (rows of ``channels``) of ``a`` reduced along
    ``axis`` (default: channel 0 alone, flat), nbbn (on a CUDA copy of ``a`` with
    ``device``) and NumPy, for mean and var."""
    channels = np.atleast_2d(channels)
    a = channels[0] if a is None else a
    results = {}
    on_device = nbbn.mean_var
    if device:
        from numba import cuda

        def on_device(x, axis):
            return (r.copy_to_host() for r in nbbn.mean_var(cuda.to_device(x), axis=axis))
    for who, mean_var in (("nbbn", on_device),
                          ("NumPy", lambda x, axis: (np.mean(x, axis=axis), np.var(x, axis=axis)))):
        with np.errstate(all="ignore"):
            mean, var = (np.atleast_1d(r) for r in mean_var(a, axis=axis))
        worst = [0.0, 0.0]
        for c in range(mean.size):
            m, m2 = exact.moments(channels[c])
            worst[0] = max(worst[0], exact.ulps(mean[c], m, dtype))
            want = m2 / channels.shape[1]
            worst[1] = max(worst[1], exact.relative_error(var[c], want) if want else abs(var[c]))
        results[who] = worst
    ROWS.append((label, results["nbbn"][0], results["NumPy"][0], results["nbbn"][1],
                 results["NumPy"][1]))


def device_rows(rng):
    """The per-channel rows on CUDA arrays (smaller: the simulator runs kernels as Python)."""
    from numba import cuda
    where = "simulator" if cuda.config.ENABLE_CUDASIM else cuda.get_current_device().name
    for offset, name in ((1.7e9, "1.7e9"), (1e12, "1e12")):
        x = offset + rng.standard_normal((4, 3, 20, 20)) + np.linspace(0, 4, 400).reshape(20, 20)
        channels = np.moveaxis(x, 1, 0).reshape(3, -1)
        row(f"CUDA ({where}): `{name} + N(0,1) + drift`, `[4,3,20,20]` per channel (NCHW)",
            channels, x, (0, 2, 3), device=True)
        row(f"CUDA ({where}): the same, channels-last `[4,20,20,3]`", channels,
            np.ascontiguousarray(np.moveaxis(x, 1, -1)), (0, 1, 2), device=True)


def backward_sums(rng):
    """sum(dy * (x - mean)) of batch_norm_backward (dweight with var 1, eps 0) and NumPy's
    float64 sum of the same terms, against the exact sum."""
    print("\n| backward `sum(dy * (x - mean))`, float64 | nbbn (rel. error) | NumPy (rel. error) |")
    print("| --- | --- | --- |")
    for offset, name in ((1e3, "1e3"), (1.7e9, "1.7e9"), (1e12, "1e12")):
        for layout in ("NCHW", "channels-last"):
            x = offset + rng.standard_normal((16, 3, 40, 40))
            dy = rng.standard_normal(x.shape) + 0.3
            mean = nbbn.mean(x, axis=(0, 2, 3))
            values, grads = (np.moveaxis(a, 1, 0).reshape(3, -1) for a in (x, dy))
            if layout != "NCHW":
                x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
            _, dweight, _ = nbbn.batch_norm_backward(dy, x, mean, np.ones(3), np.ones(3), eps=0.0,
                                                     axis=1 if layout == "NCHW" else -1)
            worst = [0.0, 0.0]
            for c in range(3):
                want = exact.backward_sums(grads[c], values[c], mean[c])[1]
                numpy_sum = np.sum(grads[c] * (values[c] - mean[c]))
                worst = np.maximum(worst, [exact.relative_error(dweight[c], want),
                                           exact.relative_error(numpy_sum, want)])
            print(f"| `{name} + N(0,1)`, `[16,3,40,40]`, {layout} | {worst[0]:.1e} | "
                  f"{worst[1]:.1e} |")


def main():
    rng = np.random.default_rng(2024)
    for offset, name in ((1e3, "1e3"), (1.7e9, "1.7e9 (timestamps)"), (1e12, "1e12")):
        for n in (20_000, 10**6):
            row(f"`{name} + N(0,1) + drift`, n = {n:,}, `axis=None`", exact.offset_data(offset, n, rng))
    x = 1e12 + rng.standard_normal((16, 3, 40, 40))
    channels = np.moveaxis(x, 1, 0).reshape(3, -1)
    row("`1e12 + N(0,1)`, `[16,3,40,40]` per channel (NCHW)", channels, x, (0, 2, 3))
    row("the same, channels-last `[16,40,40,3]`", channels,
        np.ascontiguousarray(np.moveaxis(x, 1, -1)), (0, 1, 2))
    row("`[3, 84, -86]`", [3.0, 84, -86])
    row("`0.1`, 10,000 times (constant; var shown, not its error)", np.full(10_000, 0.1))
    row("float32 `1e3 + 0.01 N(0,1)`, n = 10^6 (`examples/quickstart.py`'s)",
        (1e3 + 0.01 * np.random.default_rng(0).standard_normal(10**6)).astype(np.float32),
        dtype=np.float32)

    if "--device" in sys.argv:
        device_rows(rng)

    print("| data (float64 unless said) | nbbn mean (ulps) | NumPy mean (ulps) | nbbn var (rel. error) "
          "| NumPy var (rel. error) |")
    print("| --- | --- | --- | --- | --- |")
    for label, nb_m, np_m, nb_v, np_v in ROWS:
        print(f"| {label} | {nb_m:.2f} | {np_m:.2f} | {nb_v:.1e} | {np_v:.1e} |")

    a = 1e12 + rng.standard_normal(200_000)
    mean, m2 = exact.moments(a)
    total = nbbn.Moments.combine(nbbn.moments(chunk) for chunk in np.array_split(a, 7))
    print(f"\n`Moments.combine` of 7 chunks of `1e12 + N(0,1)` (n = 200,000): mean "
          f"{exact.ulps(total.mean, mean):.2f} ulps, m2 relative error "
          f"{exact.relative_error(total.m2, m2):.1e}")
    try:
        import dask.array as da
        from nbbn import dask as nbbn_dask
    except ImportError:
        pass
    else:
        got_mean, got_var = (float(r) for r in
                             da.compute(*nbbn_dask.mean_var(da.from_array(a, chunks=9_999))))
        print(f"`nbbn.dask.mean_var` of the same in 21 chunks: mean "
              f"{exact.ulps(got_mean, mean):.2f} ulps, var relative error "
              f"{exact.relative_error(got_var, m2 / a.size):.1e}")
    for values in ([1, -1, 1, -1, 1, -1, 1.0], [1, 1.0]):
        big = 0.9 * np.finfo(np.float64).max * np.array(values)
        with np.errstate(all="ignore"):
            print(f"`mean(0.9 * finfo.max * {values})`: nbbn {nbbn.mean(big):.6e}, "
                  f"NumPy {np.mean(big):.6e}")
    backward_sums(rng)


if __name__ == "__main__":
    main()
