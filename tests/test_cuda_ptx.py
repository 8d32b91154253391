"""Every CUDA kernel compiles to PTX for sm_90 with the simulator off (no GPU needed).

The simulator runs kernels as Python and type-checks nothing; ``compile_ptx``
types and lowers them as a real GPU would, both the warp-shuffle path that
real GPUs take and the shared-memory path the simulator takes, for every input
dtype. Needs NVRTC/libNVVM (``pip install "nbbn[cuda]"``); skipped, saying so,
where they are missing.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba.cuda")

SCRIPT = textwrap.dedent('''
    import sys
    from numba import cuda, types as t
    import numba.cuda.dispatcher

    class Sm90:  # device functions ask the current device for its compute capability
        compute_capability = (9, 0)

    numba.cuda.dispatcher.get_current_device = Sm90
    from nbbn._cuda import launch
    launch.USE_SHUFFLE = sys.argv[1] == "shuffle"
    from nbbn._cuda import arrays, backward, ema, merge, moments, normalize, renorm

    def arr(dtype, ndim):
        return t.Array(dtype, ndim, "A")

    f8 = t.float64
    compiled = set()

    shuffles = []

    def compile(module, name, *sig):
        ptx, _ = cuda.compile_ptx(getattr(module, name).py_func, sig, cc=(9, 0))
        compiled.add((module.__name__, name))
        shuffles.append("shfl.sync" in ptx)

    for x, acc in ((t.float16, t.float32), (t.float32, f8), (t.float64, f8), (t.int64, f8),
                   (t.boolean, f8)):
        compile(moments, "moments_rows", arr(x, 3), acc, t.int64, t.int64, arr(f8, 3))
        compile(moments, "moments_columns", arr(x, 2), acc, t.int64, arr(f8, 3))
        if x not in (t.int64, t.boolean):
            compile(normalize, "affine_rows", arr(x, 3), arr(acc, 1), arr(acc, 1), acc,
                    t.int64, arr(x, 3))
            compile(normalize, "affine_columns", arr(x, 2), arr(acc, 1), arr(acc, 1), acc,
                    t.int64, arr(x, 2))
            compile(backward, "sums_rows", arr(x, 3), arr(x, 3), arr(f8, 1), acc, t.int64,
                    t.int64, arr(f8, 3))
            compile(backward, "sums_columns", arr(x, 2), arr(x, 2), arr(f8, 1), acc, t.int64,
                    arr(f8, 3))
            compile(backward, "dx_rows", arr(x, 3), arr(x, 3), arr(x, 1), arr(acc, 2), acc,
                    t.int64, arr(x, 3))
            compile(backward, "dx_columns", arr(x, 2), arr(x, 2), arr(x, 1), arr(acc, 2), acc,
                    t.int64, arr(x, 2))
            compile(arrays, "copy_strided", arr(x, 1), t.int64, t.UniTuple(t.int64, 3),
                    arr(x, 1), t.int64, t.UniTuple(t.int64, 3), t.UniTuple(t.int64, 3))
    for out, p, acc in ((t.float32, t.float16, t.float32), (t.float64, t.float32, f8),
                        (t.float64, t.float64, f8)):
        compile(moments, "finalize_moments", arr(f8, 3), f8, t.int64, arr(out, 1),
                arr(out, 1))
        compile(moments, "finalize_forward", arr(f8, 3), arr(p, 1), arr(p, 1), f8, f8, f8,
                t.int64, arr(out, 1), arr(out, 1), arr(acc, 1), arr(acc, 1), arr(p, 1),
                arr(p, 1))
        compile(normalize, "scale_shift", arr(p, 1), arr(p, 1), arr(p, 1), arr(p, 1),
                t.int64, f8, arr(acc, 1), arr(acc, 1))
        compile(backward, "dx_coefficients", arr(f8, 1), arr(f8, 1), f8, f8, t.int64,
                arr(out, 1), arr(p, 1), t.int64, f8, arr(acc, 2))
        compile(backward, "param_grads", arr(f8, 1), arr(f8, 1), arr(out, 1), f8, arr(p, 1),
                arr(p, 1))
        compile(ema, "ema", arr(p, 1), arr(p, 1), arr(out, 1), arr(out, 1), f8, f8)
        compile(renorm, "renorm_coefficients", arr(f8, 1), arr(f8, 1), arr(p, 1), arr(p, 1),
                arr(p, 1), arr(p, 1), t.int64, f8, f8, f8, arr(f8, 1), arr(f8, 1), arr(acc, 1),
                arr(acc, 1))
        compile(renorm, "renorm_grads", arr(f8, 1), arr(f8, 1), arr(out, 1), arr(out, 1),
                arr(out, 1), arr(p, 1), t.int64, f8, arr(f8, 1), arr(p, 1), arr(p, 1))
        compile(merge, "merge_batches", arr(f8, 2), arr(out, 1), arr(out, 1), f8, f8)
        compile(arrays, "fill_kernel", arr(p, 1), f8)
    compile(backward, "finalize_sums", arr(f8, 3), arr(f8, 1), arr(f8, 1))
    every = {(m.__name__, k) for m in (arrays, backward, ema, merge, moments, normalize, renorm)
             for k in m.KERNELS}
    missing = every - compiled
    assert not missing, f"kernels without a PTX check: {sorted(missing)}"
    assert any(shuffles) == launch.USE_SHUFFLE, "warp shuffles where not wanted, or missing"
    print("compiled", len(compiled), "kernels")
''')


def _ptx_toolchain_missing():
    """A reason to skip where NVRTC/libNVVM cannot be loaded, else None."""
    probe = textwrap.dedent('''
        from numba import cuda
        def k(a):
            a[0] = 1.0
        cuda.compile_ptx(k, "void(float64[:])", cc=(9, 0))
    ''')
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode:
        return ("cannot compile PTX here (NVRTC/libNVVM missing? pip install 'nbbn[cuda]'; "
                "or point CUDA_HOME at a CUDA toolkit): " + r.stderr.strip().splitlines()[-1])
    return None


@pytest.fixture(scope="module")
def toolchain():
    reason = _ptx_toolchain_missing()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("path", ["shuffle", "shared"])
def test_every_kernel_compiles_to_ptx(path, toolchain):
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, path], capture_output=True, text=True,
                       env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr[-5000:]
    assert "compiled" in r.stdout
