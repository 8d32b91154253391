"""Interleaved timing: round-robin over the contenders of a case, repeated; medians.

The machines this runs on are shared and noisy, so absolute times mean little;
ratios of times taken in the same rounds, alternating, mean much more.
"""
import gc
import statistics
import time

#: A sample is at least this long: small calls are repeated within one sample.
MIN_SAMPLE_S = 2e-3
#: Idle time before each sample, so that no contender's worker threads (OpenMP's,
#: XLA's and TensorFlow's pools spin a while after their work) still hold the cores
#: when the next one starts.
PAUSE_S = 5e-3


def calibrate(fn, min_sample):
    """Calls per sample so that one sample takes at least ``min_sample`` seconds."""
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_sample or number >= 1 << 20:
            return number, elapsed / number
        number *= 2 if elapsed * 8 > min_sample else 8


def interleaved(thunks, rounds=7, budget_s=None, min_sample=MIN_SAMPLE_S, stat=statistics.median):
    """{name: median seconds per call} of zero-arg callables timed round-robin.

    ``stat=min`` gives the fastest sample instead, the better estimate where
    other processes keep the CPUs busy (interference only ever adds time).

    Each callable is called once first (compilation, caches), then calibrated;
    each round times every callable once, starting each round at the next one
    so that none always follows the same neighbour. With ``budget_s``, rounds
    stop early (after at least 3) once the budget is spent.
    """
    names = list(thunks)
    for fn in thunks.values():
        fn()
    numbers = {n: calibrate(thunks[n], min_sample)[0] for n in names}
    samples = {n: [] for n in names}
    enabled = gc.isenabled()
    gc.disable()
    start = time.perf_counter()
    try:
        for r in range(rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                fn, number = thunks[name], numbers[name]
                time.sleep(PAUSE_S)
                t0 = time.perf_counter()
                for _ in range(number):
                    fn()
                samples[name].append((time.perf_counter() - t0) / number)
            if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
                break
    finally:
        if enabled:
            gc.enable()
    return {n: stat(s) for n, s in samples.items()}


#: Contenders nbbn's speed-up is reported against (``vs_<name>``): for the fused epilogue,
#: nbbn's plain batch norm (below 1: what the epilogue costs) and its unfused composition.
OTHERS = ("nbbn_plain", "nbbn_unfused", "numpy", "torch", "jax", "tf")


def ratios(times):
    """Speed-ups of nbbn over the others, and multiples of the floor, from median times."""
    nb = times.get("nbbn")
    out = {}
    if nb:
        for other in OTHERS:
            if other in times:
                out[f"vs_{other}"] = times[other] / nb
        if "floor" in times:
            out["x_floor"] = nb / times["floor"]
            if "nbbn_out" in times:  # the kernels alone: no fresh output to page in
                out["x_floor_out"] = times["nbbn_out"] / times["floor"]
    return out


def set_threads(n):
    """Give nbbn (and the floor, through Numba), PyTorch and the peers the same number of
    threads."""
    import numba
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    from . import peers
    from .registry import _torch
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(n)
    peers.set_threads(n)


def busy_fraction(interval=0.25):
    """Share of the CPUs used by anything during ``interval`` seconds (Linux), else None.

    Read before timing: on a shared machine a busy core makes every parallel
    call wait for a time slice, and the figures say little.
    """
    def snapshot():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)   # idle + iowait, total

    try:
        idle0, total0 = snapshot()
        time.sleep(interval)
        idle1, total1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return 1 - (idle1 - idle0) / total if total > 0 else None


def run_cases(cases, rounds=7, budget_s=None, progress=None):
    """Measure each case interleaved; a list of result dicts (see ``result``).

    ``progress``: a progress bar (tqdm's ``set_postfix_str`` and ``update``), or None.
    """
    from . import registry
    results = []
    for case in cases:
        if progress is not None:
            progress.set_postfix_str(case.label)
        times = interleaved(registry.thunks(case), rounds=rounds, budget_s=budget_s)
        results.append(result(case, times))
        if progress is not None:
            progress.update()
    return results


def result(case, times):
    from .registry import OPS
    return {
        "op": case.op, "shape": list(case.shape), "layout": case.layout, "dtype": case.dtype,
        "bytes": OPS[case.op].bytes_moved(case),
        "ms": {k: v * 1e3 for k, v in times.items()},
        **ratios(times),
    }
