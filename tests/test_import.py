"""Importing nbbn is cheap and compiles nothing; compiled kernels are cached on disk."""
import os
import subprocess
import sys
import textwrap


def run_python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=300, check=True)


def test_import_compiles_nothing_and_is_fast():
    out = run_python("""
        import time
        t = time.perf_counter()
        import nbbn
        elapsed = time.perf_counter() - t
        from nbbn._cpu import moments
        built = [k.__name__ for k in (moments.moments_rows, moments.moments_columns) if k._builds]
        print(elapsed, built)
    """).stdout.split(maxsplit=1)
    assert out[1].strip() == "[]"
    assert float(out[0]) < 2.0  # generous: the 0.5 s target is checked in bench/, not here


def test_kernels_cache_on_disk(tmp_path):
    code = """
        import numpy as np, nbbn
        nbbn.var(np.ones((3, 4, 5), np.float32), axis=(0, 2))
    """
    run_python(code, NUMBA_CACHE_DIR=str(tmp_path))
    assert any(p.suffix == ".nbi" for p in tmp_path.rglob("*"))


def test_unwritable_cache_warns_once_and_works(tmp_path):
    """No writable cache location: one warning, correct results."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    out = run_python("""
        import warnings, numpy as np
        import numba.core.caching as caching
        # No locator can write: simulate a read-only install with no cache directory.
        for cls in caching.CacheImpl._locator_classes:
            cls.ensure_cache_path = lambda self: (_ for _ in ()).throw(OSError("read-only"))
        import nbbn
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            v = nbbn.var(np.arange(12.0).reshape(3, 4), axis=0)
            v2 = nbbn.var(np.ones((300, 2)), axis=0)
        print(v.tolist(), v2.tolist(), sum("cannot cache" in str(x.message) for x in w))
    """, NUMBA_CACHE_DIR=str(ro))
    assert out.stdout.split() == ["[10.666666666666666,", "10.666666666666666,",
                                  "10.666666666666666,", "10.666666666666666]",
                                  "[0.0,", "0.0]", "1"], out.stdout + out.stderr
