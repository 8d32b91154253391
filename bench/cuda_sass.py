"""The static table of the CUDA kernels for sm_90, with SASS instructions per element.

Compiles every specialization the public functions launch (``tests/cuda_static.py``),
assembles it with nvJitLink (no GPU needed) and, for the elementwise kernels, counts the
SASS instructions of the steady-state loop (four elements per iteration) with ``nvdisasm``
(``pip install nvidia-cuda-nvdisasm``, or on PATH). Prints a Markdown table: per kernel and
index width, the worst case over dtypes and argument layouts.

    PYTHONPATH=<tree> python bench/cuda_sass.py [shuffle|shared] [--json rows.jsonl]

Targets (issue 17): 0 spills; elementwise <= 60 SASS instructions per element (float32);
reductions >= 3 blocks per multiprocessor.
"""
import argparse
import json
import os
import subprocess
import sys

UNINDEXED = ("ema", "param_grads", "scale_shift", "fill_kernel", "copy_strided")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", default="shuffle", choices=("shuffle", "shared"))
    ap.add_argument("--json", help="also write every row here")
    args = ap.parse_args()
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cuda_static.py"),
                        args.path, "--sass"], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    table = {}
    for row in rows:
        width = "-" if row["kernel"] in UNINDEXED else \
            "64-bit" if "uint64" in row["sig"] else "32-bit"
        key = (row["kernel"], width)
        worst = table.setdefault(key, {"regs": 0, "spill_bytes": 0, "smem": 0, "blocks": 99,
                                       "sass_f32": None, "sass": 0.0})
        worst["regs"] = max(worst["regs"], row["regs"])
        worst["spill_bytes"] = max(worst["spill_bytes"], row["spill_bytes"])
        worst["smem"] = max(worst["smem"], row["smem"])
        worst["blocks"] = min(worst["blocks"], row["blocks_per_sm"])
        per = row.get("sass_per_element")
        if per is not None:
            worst["sass"] = max(worst["sass"], per)
            if row["sig"].startswith("(Array(float32"):
                worst["sass_f32"] = max(worst["sass_f32"] or 0.0, per)
    print(f"sm_90, {args.path} path, 256 threads per block; worst case over dtypes and layouts\n")
    print("| kernel | index | registers | spills (bytes) | shared memory (bytes) | "
          "blocks/SM | SASS/element float32 (all dtypes) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for (kernel, width), w in sorted(table.items()):
        sass = "" if w["sass_f32"] is None else f"{w['sass_f32']:.1f} ({w['sass']:.1f})"
        print(f"| {kernel} | {width} | {w['regs']} | {w['spill_bytes']} | {w['smem']} | "
              f"{w['blocks']} | {sass} |")


if __name__ == "__main__":
    main()
