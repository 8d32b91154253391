"""Static view of the CUDA kernels: every specialization the public functions launch, compiled
for sm_90 and assembled with the linker numba-cuda uses at run time (nvJitLink, in process:
no GPU needed), with registers, spills, shared memory and occupancy per kernel.

Run as a script with NUMBA_ENABLE_CUDASIM=0: ``python tests/cuda_static.py shuffle|shared
[--sass]`` prints one JSON line per specialization (``shared``: those ``shared_path``
picks). ``tests/test_cuda_ptx.py`` checks the table; ``bench/cuda_sass.py`` adds SASS
instructions per element (needs ``nvdisasm``).

The signatures mirror what ``nbbn._cuda.backend`` passes (a simulator test,
``test_cuda.py::test_launched_kernels_have_static_signatures``, checks that every kernel the
public functions launch is listed here): data operands are 1-D contiguous element views,
strides and sizes are in the index type (uint32, or uint64 past 2**31 elements), per-channel
vectors are 1-D arrays of the caller's dtype, C-contiguous or strided.
"""
import json
import re
import sys

SM90 = {"regs": 65536, "threads": 2048, "blocks": 32, "smem": 228 * 1024, "smem_block": 1024}
ELEMENTWISE = ("affine_rows", "affine_columns", "dx_rows", "dx_columns")
REDUCTIONS = ("moments_rows", "moments_columns", "sums_rows", "sums_columns")


def specializations(t):
    """(module name, kernel name, argument types) for every launched specialization."""
    from numba.np.numpy_support import from_dtype

    from nbbn._cuda.elements import BFLOAT16

    def arr(dtype, ndim=1, layout="C"):
        return t.Array(dtype, ndim, layout)

    f4, f8, i4, i8, u1 = t.float32, t.float64, t.int32, t.int64, t.uint8
    bf16 = from_dtype(BFLOAT16)
    floats = (t.float16, bf16, f4, f8)
    out = []
    for idx in (t.uint32, t.uint64):
        rows_shape = t.Tuple((idx, i8, idx, idx))  # (outer, C, inner, rows per group)
        cols_shape = t.Tuple((idx, i8, idx))
        s3, s2 = t.UniTuple(idx, 3), t.UniTuple(idx, 2)
        for x, acc, stats in ((t.float16, f4, f4), (bf16, f4, bf16), (f4, f8, f4),
                              (f8, f8, f8), (i8, f8, f8), (t.boolean, f8, f8)):
            for layout in ("C", "A"):  # weight/bias/running buffers: contiguous or strided
                p = arr(stats if x in floats else f8, 1, layout)
                fin = t.Tuple((f8, i8, i8, f8, f8, f8, arr(stats), arr(stats), arr(f8),
                               arr(acc), arr(acc), p, p, p, p))
                for kernel, sx, shape in (("moments_rows", s3, rows_shape),
                                          ("moments_columns", s2, cols_shape)):
                    out.append(("moments", kernel, (arr(x), sx, shape, acc, acc, arr(f8, 3),
                                                    arr(i4), fin)))
                if x not in floats:
                    continue
                grad = t.Tuple((p, p, p, arr(f8), arr(f8), t.Tuple((f8, f8, i8)), i8, f8))
                for kind, sx, shape in (("rows", s3, rows_shape), ("columns", s2, cols_shape)):
                    # The epilogue's optional operands: none; a residual and the ReLU; and
                    # what a layer keeps besides (x's copy, the ReLU's mask).
                    plain = ((t.none, t.none, t.none, t.none),)
                    fused = ((arr(x), t.boolean, t.none, t.none),
                             (arr(x), t.boolean, arr(x), arr(u1)))
                    for res, relu, copy, mask in plain + (fused if layout == "C" else ()):
                        epi = t.Tuple((res, sx, relu, copy, sx, mask, sx))
                        out.append(("normalize", f"affine_{kind}",
                                    (arr(x), sx, arr(x), sx, shape, arr(acc), arr(acc), acc,
                                     epi)))
                    # The ReLU's gate: none, y (with the residual's gradient), a kept mask.
                    gated = ((arr(x), arr(x)), (arr(u1), t.none))
                    for gate, dres in ((t.none, t.none),) + (gated if layout == "C" else ()):
                        out.append(("backward", f"sums_{kind}",
                                    (arr(x), sx, arr(x), sx, shape, p, acc, arr(f8, 3),
                                     arr(i4), arr(f8), arr(f8), t.Tuple((gate, sx, dres, sx)))))
                        out.append(("backward", f"dx_{kind}",
                                    (arr(x), sx, arr(x), sx, arr(x), sx, shape, grad, acc,
                                     t.Tuple((gate, sx)))))
    for p_dtype, acc in ((t.float16, f4), (bf16, f4), (f4, f8), (f8, f8)):
        p = arr(p_dtype)
        out.append(("normalize", "scale_shift", (p, p, p, p, i8, f8, arr(acc), arr(acc))))
        out.append(("backward", "param_grads", (arr(f8), arr(f8), p, f8, p, p)))
        out.append(("ema", "ema", (p, p, arr(f8), arr(f8), f8, f8)))
        out.append(("ema", "ema", (p, p, p, p, f8, f8)))
        out.append(("strided", "fill_kernel", (arr(p_dtype), f8)))
        for w in (p, arr(f8)):  # weight/bias given, or None (a dummy float64 vector)
            out.append(("renorm", "renorm_coefficients", (arr(f8), arr(f8), p, p, w, w, i8, f8,
                                                         f8, f8, arr(f8), arr(f8), arr(acc),
                                                         arr(acc))))
            for r in (p, arr(f8)):  # r as returned by the forward (float64 in the layers)
                out.append(("renorm", "renorm_weight", (w, r, i8, arr(f8))))
        out.append(("renorm", "renorm_grads", (arr(f8), arr(f8), p, p, p, f8, p, p)))
        if p_dtype in (f4, f8):  # batch statistics as returned (at least float32)
            out.append(("merge", "merge_batches", (arr(f8, 2), p, p, f8, f8)))
        for src in floats:
            out.append(("strided", "copy_strided", (arr(src), i8, t.UniTuple(i8, 2), p, i8,
                                                    t.UniTuple(i8, 2), t.UniTuple(i8, 2))))
    return out


def shared_path(specs):
    """The specializations compiled with shared-memory block merges: the reductions only (the
    switch changes nothing else), and of each reduction one per input dtype, the first listed
    (32-bit indices, contiguous vectors, no gate): the merge depends on the accumulator's
    type alone, and every other operand is read as on the shuffle path, checked in full."""
    seen = set()
    for module, name, sig in specs:
        if name in REDUCTIONS and (name, sig[0].dtype) not in seen:
            seen.add((name, sig[0].dtype))
            yield module, name, sig


def planned_blocks(row):
    """Blocks per multiprocessor a kernel must reach: 2 for the elementwise kernels; the
    reductions' ``launch.BLOCKS_PER_SM``, but 3 for the channels-last statistics (the virtual
    batch's group beside the walk and the overflow rescue's second walk: 74 registers) and
    less for the backward sums behind a ReLU with 64-bit indices (past 2**31 elements): 3
    with the gate's offsets (66 registers), 2 when they also write the residual's gradient
    (four operands' offsets, up to 85 registers). Issue 17's floor is 3 for reductions; the reduction's blocks need not be resident
    together, so fewer only runs slower."""
    from nbbn._cuda import launch
    if row["kernel"] not in REDUCTIONS:
        return 2
    gating = row["sig"].rsplit("Tuple((", 1)[1]  # (gate, strides, dres, strides)
    if row["kernel"].startswith("sums_") and "uint64" in gating:
        return {0: 2, 1: 3}.get(gating.count("none"), launch.BLOCKS_PER_SM)
    if row["kernel"] == "moments_columns":
        return 3
    return launch.BLOCKS_PER_SM


def occupancy(regs, smem, threads):
    """Blocks per multiprocessor on sm_90 for a kernel of ``regs`` registers per thread and
    ``smem`` bytes of static shared memory, launched with ``threads`` per block."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (SM90["regs"] // regs_per_warp) // warps
    by_smem = SM90["smem"] // (smem + SM90["smem_block"])
    return min(by_regs, by_smem, SM90["blocks"], SM90["threads"] // threads)


def _parse(info):
    """Registers, spill bytes, shared memory and stack from nvJitLink's verbose log."""
    regs = re.search(r"used (\d+) registers", info)
    smem = re.search(r"(\d+) bytes smem", info)
    stack = re.search(r"(\d+) stack", info)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)]
    return {"regs": int(regs.group(1)), "smem": int(smem.group(1)) if smem else 0,
            "stack": int(stack.group(1)) if stack else 0, "spill_bytes": sum(spills)}


def sass_loop_per_element(sass):
    """SASS instructions per element of the steady-state loop of an elementwise kernel: the
    innermost loop with four global stores (the kernels' four-way unroll), divided by 4."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4}\*/", ln)
             or re.match(r"\.L_x_\d+:", ln.strip())]
    labels, code = {}, []
    for ln in lines:
        s = ln.strip()
        if s.startswith(".L_x_"):
            labels[s[:-1]] = len(code)
        else:
            code.append(s.split("*/", 1)[1].strip())
    best = None
    for end, ins in enumerate(code):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", ins)
        if m and labels.get(m.group(1), end + 1) <= end:
            body = code[labels[m.group(1)]:end + 1]
            stores = sum(1 for b in body if re.search(r"\bSTG\b|\bST\.E", b))
            if stores == 4 and (best is None or len(body) < len(best)):
                best = body
    return None if best is None else len(best) / 4


def find_nvdisasm():
    """nvdisasm on PATH, else the one of the nvidia-cuda-nvdisasm wheel, else None."""
    import glob
    import os
    import shutil
    import sysconfig
    found = shutil.which("nvdisasm")
    if found:
        return found
    pattern = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu*", "bin", "nvdisasm")
    return next(iter(sorted(glob.glob(pattern))), None)


def disassemble(nvdisasm, cubin):
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout


def main():
    import os
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    path = sys.argv[1]
    want_sass = "--sass" in sys.argv
    from numba import cuda, types as t
    import numba.cuda.dispatcher

    class Sm90:  # device functions ask the current device for its compute capability
        compute_capability = (9, 0)

    numba.cuda.dispatcher.get_current_device = Sm90
    from cuda.core import Linker, LinkerOptions, ObjectCode

    from nbbn._cuda import launch
    launch.USE_SHUFFLE = path == "shuffle"
    from nbbn._cuda import (arrays, backward, ema, merge, moments, normalize,  # noqa: F401
                            renorm, strided)
    modules = {m.__name__.rsplit(".", 1)[1]: m for m in (backward, ema, merge, moments,
                                                         normalize, renorm, strided)}
    nvdisasm = find_nvdisasm() if want_sass else None
    if want_sass and nvdisasm is None:
        sys.exit("nvdisasm not found: pip install nvidia-cuda-nvdisasm (or put it on PATH)")
    threads = launch.THREADS
    for module, name, sig in (specializations(t) if path == "shuffle"
                              else shared_path(specializations(t))):
        kernel = getattr(modules[module], name)
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0), fastmath=False)
        linker = Linker(ObjectCode.from_ptx(ptx.encode(), name=name),
                        options=LinkerOptions(arch="sm_90", verbose=True))
        cubin = linker.link("cubin").code
        row = {"module": module, "kernel": name, "sig": str(sig), "path": path,
               "shuffle": "shfl.sync" in ptx, **_parse(linker.get_info_log())}
        row["blocks_per_sm"] = occupancy(row["regs"], row["smem"], threads)
        if nvdisasm is not None and name in ELEMENTWISE:
            row["sass_per_element"] = sass_loop_per_element(disassemble(nvdisasm, cubin))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
