"""Subprocess drivers for the on-disk kernel cache tests (see test_reliability.py).

A tiny probe kernel is written to a fresh directory per scenario so each has
its own cache files; it goes through nbbn's real ``_jit.Kernel`` machinery.

``python -m tests.cache_check damage ROOT`` damages the probe's cache in every
way below, each in its own directory, and prints one line per damage:
``<damage> <result ok> <cache hits after damage> <warnings> <hits on the next load>``.

``python -m tests.cache_check layer DIR serial|parallel`` runs one build of the
probe in DIR and prints the threading layer this process started ("none" if none).
"""
import importlib.util
import io
import os
import pathlib
import pickle
import sys
import warnings

import numba
import numpy as np

from nbbn._cpu import _jit

PROBE_SOURCE = """\
from numba import prange


def total(x):
    s = 0.0
    for i in prange(x.shape[0]):
        s += x[i]
    return s
"""


def _stale_version(blob):
    """An index written by another Numba version (its first pickle is the version)."""
    f = io.BytesIO(blob)
    pickle.load(f)
    return pickle.dumps("0.0.0") + f.read()


def _flip(blob):
    """One bit flipped mid-file: often still a valid pickle, with wrong machine code."""
    mid = len(blob) // 2
    return blob[:mid] + bytes([blob[mid] ^ 0x10]) + blob[mid + 1:]


# (suffix, how the file's bytes are replaced; None deletes it)
DAMAGES = {
    "index-truncated": (".nbi", lambda b: b[: len(b) // 2]),
    "index-empty": (".nbi", lambda b: b""),
    "index-garbage": (".nbi", lambda b: os.urandom(len(b))),
    "index-stale-version": (".nbi", _stale_version),
    "data-truncated": (".nbc", lambda b: b[: len(b) // 2]),
    "data-garbage": (".nbc", lambda b: os.urandom(len(b))),
    "data-bit-flip": (".nbc", _flip),
    "data-deleted": (".nbc", None),
}


def load_probe(directory, name):
    """Import the probe kernel from directory (writing it first if needed) as module name."""
    path = pathlib.Path(directory) / "probe.py"
    if not path.exists():
        path.write_text(PROBE_SOURCE)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.total


def fresh_call(py_func, x):
    """Call through a new Kernel (a new dispatcher reads the disk cache); (result, hits, warnings)."""
    k = _jit.Kernel(py_func)
    _jit._warned.clear()  # the "once per process" warning, counted per scenario here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = k(x, parallel=False)
    d = k.build(False)
    return result, sum(d.stats.cache_hits.values()), len(caught), d


def damage_scenario(root, damage):
    suffix, replace = DAMAGES[damage]
    directory = pathlib.Path(root) / damage
    directory.mkdir()
    py_func = load_probe(directory, "probe_" + damage.replace("-", "_"))
    x = np.arange(1000.0)
    _, _, _, d = fresh_call(py_func, x)  # compile and write the cache
    files = [p for p in pathlib.Path(d._cache.cache_path).iterdir()
             if p.suffix == suffix and p.name.startswith("probe.")]
    assert files, f"no {suffix} cache file written"
    for p in files:
        if replace is None:
            p.unlink()
        else:
            p.write_bytes(replace(p.read_bytes()))
    result, hits, warned, _ = fresh_call(py_func, x)
    _, hits_next, _, _ = fresh_call(py_func, x)
    return f"{damage} {result == x.sum()} {hits} {warned} {hits_next}"


def main(argv):
    if argv[0] == "damage":
        for damage in DAMAGES:
            print(damage_scenario(argv[1], damage), flush=True)
    elif argv[0] == "layer":
        py_func = load_probe(argv[1], "probe_layer")
        _jit.Kernel(py_func)(np.ones(10), parallel=argv[2] == "parallel")
        try:
            print(numba.threading_layer())
        except ValueError:
            print("none")
    else:
        raise SystemExit(f"unknown command {argv[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
