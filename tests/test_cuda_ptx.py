"""Every CUDA kernel specialization compiled for sm_90 and assembled with nvJitLink (the linker
numba-cuda uses at run time), with the simulator off and no GPU: registers, spills, shared
memory and occupancy (``tests/cuda_static.py`` makes the table).

The simulator runs kernels as Python and type-checks nothing; ``compile_ptx`` types and
lowers them as a real GPU would: the warp-shuffle path that real GPUs take for every
specialization, and the shared-memory path the simulator takes for each reduction and
input dtype (``cuda_static.shared_path``: the switch changes the block merge alone). Needs
NVRTC/libNVVM and nvJitLink (``pip install "nbbn[cuda]"``); skipped, saying so, where
they are missing.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba.cuda")

from tests import cuda_static

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toolchain_missing():
    """A reason to skip where PTX cannot be compiled or assembled here, else None."""
    probe = textwrap.dedent('''
        from numba import cuda
        from cuda.core import Linker, LinkerOptions, ObjectCode
        def k(a):
            a[0] = 1.0
        ptx, _ = cuda.compile_ptx(k, "void(float64[:])", cc=(9, 0))
        Linker(ObjectCode.from_ptx(ptx.encode(), name="k"),
               options=LinkerOptions(arch="sm_90")).link("cubin")
    ''')
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode:
        return ("cannot compile and assemble PTX here (NVRTC/libNVVM/nvJitLink missing? "
                "pip install 'nbbn[cuda]'): " + r.stderr.strip().splitlines()[-1])
    return None


@pytest.fixture(scope="module")
def toolchain():
    reason = _toolchain_missing()
    if reason:
        pytest.skip(reason)


def _table(path):
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cuda_static.py"), path],
                       capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-5000:]
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_occupancy_model():
    """sm_90: 64K registers, 2048 threads, 228 KB shared memory per multiprocessor."""
    assert cuda_static.occupancy(64, 0, 256) == 4
    assert cuda_static.occupancy(65, 0, 256) == 3
    assert cuda_static.occupancy(32, 0, 256) == 8
    assert cuda_static.occupancy(32, 100 * 1024, 256) == 2


@pytest.mark.parametrize("path", ["shuffle", "shared"])
def test_every_specialization_assembles_without_spills_at_the_planned_occupancy(path,
                                                                               toolchain):
    from nbbn._cuda import backward, ema, merge, moments, normalize, renorm, strided
    table = _table(path)
    every = {(m.__name__.rsplit(".", 1)[1], k) for m in (backward, ema, merge, moments,
                                                         normalize, renorm, strided)
             for k in m.KERNELS}
    if path == "shared":  # only the reductions merge across threads (the shuffle path checks)
        every = {(m, k) for m, k in every if k in cuda_static.REDUCTIONS}
    compiled = {(row["module"], row["kernel"]) for row in table}
    assert every <= compiled, f"kernels without a static check: {sorted(every - compiled)}"
    for row in table:
        where = f"{row['kernel']} {row['sig']}"
        assert row["spill_bytes"] == 0 and row["stack"] == 0, f"spills: {where}"
        planned = cuda_static.planned_blocks(row)
        assert row["blocks_per_sm"] >= planned, \
            f"{row['regs']} registers, {row['smem']} B shared: {row['blocks_per_sm']} " \
            f"blocks/SM < {planned} planned: {where}"
    for row in table:  # shuffles only where a block merges (the shared path's only kernels)
        merges = path == "shuffle" and row["kernel"] in cuda_static.REDUCTIONS
        assert row["shuffle"] == merges, f"warp shuffles where not wanted, or missing: {row}"


CACHE_SCRIPT = textwrap.dedent('''
    import sys
    from numba import types as t
    import numba.cuda.codegen as codegen
    import numba.cuda.dispatcher as dispatcher

    class Sm90:  # no GPU: the current device and context, as far as the cache asks
        compute_capability = (9, 0)
        id = 0

    class Context:
        device = Sm90()

    dispatcher.get_current_device = Sm90
    codegen.devices.get_context = lambda devnum=None: Context()
    # Assemble (nvJitLink) instead of loading the module onto a device.
    dispatcher._Kernel.bind = lambda self: self._codelibrary.get_cubin(cc=(9, 0))
    sys.path.insert(0, sys.argv[1])
    import cuda_static
    from nbbn._cuda import moments
    sig = next(s for _, name, s in cuda_static.specializations(t) if name == "moments_rows")
    moments.moments_rows.compile(sig)
    stats = moments.moments_rows.stats
    print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
''')


def test_kernels_are_cached_on_disk(tmp_path, toolchain):
    """A second process loads the compiled kernel from NUMBA_CACHE_DIR instead of compiling."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "NUMBA_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": ROOT}
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, os.path.join(ROOT, "tests")],
                           capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-5000:]
        runs.append(r.stdout.split())
    assert runs == [["0", "1"], ["1", "0"]]  # (hits, misses): compiled, then loaded


def test_every_kernel_and_device_function_asks_for_the_disk_cache():
    import ast
    for path in (Path(ROOT) / "nbbn" / "_cuda").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "cuda.jit":
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert keywords.get("cache") == "True", f"{path.name}: {ast.unparse(node)}"
