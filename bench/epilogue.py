"""The README's figures for fused epilogues and bfloat16: every ratio from one interleaved run.

Run from the repository root: ``python -m bench.epilogue [--shape 64x64x56x56] [--threads 1]
[--rounds 9]``. For each layout (NCHW, NHWC) it times, round-robin in one process (see
``nbbn._bench.runner.interleaved``; fastest sample, as interference only adds time):
nbbn's fused forward ``relu(BN(x) + r)`` and backward (with the residual's gradient), nbbn's
plain forward/backward, nbbn's batch norm then NumPy's add and ReLU, PyTorch's BN + add +
ReLU, each in float32, and nbbn's plain and fused calls in bfloat16; then prints the
ratios the issue targets.
"""
import argparse

from nbbn._bench import registry, runner

PAIRS = (("fused_forward", "forward"), ("fused_backward", "backward"))


def thunks(shape, layout):
    """{(op, dtype, contender): zero-argument callable} for one shape and layout."""
    out = {}
    for op, _ in PAIRS:
        for dtype in ("float32", "bfloat16"):
            case = registry.Case(op, shape, dtype, layout)
            made = registry.thunks(case)
            wanted = ("nbbn", "nbbn_plain", "nbbn_unfused", "torch") if dtype == "float32" \
                else ("nbbn", "nbbn_plain")
            out.update({(op, dtype, name): made[name] for name in wanted if name in made})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64x64x56x56")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split("x"))
    runner.set_threads(args.threads)
    print(f"shape {args.shape}, {args.threads} thread(s), {args.rounds} rounds, fastest sample")
    for layout in registry.layouts_for(shape):
        t = runner.interleaved(thunks(shape, layout), rounds=args.rounds, stat=min)
        print(f"\n{layout}: ms per call")
        for key, seconds in t.items():
            print(f"  {' '.join(key):<40} {seconds * 1e3:9.2f}")
        print(f"{layout}: ratios")
        for op, plain in PAIRS:
            fused = t[(op, "float32", "nbbn")]
            print(f"  {plain:<9} fused / plain (float32)           "
                  f"{fused / t[(op, 'float32', 'nbbn_plain')]:.2f}x")
            print(f"  {plain:<9} PyTorch BN+add+ReLU / fused       "
                  f"{t[(op, 'float32', 'torch')] / fused:.2f}x")
            print(f"  {plain:<9} nbbn then NumPy add/ReLU / fused  "
                  f"{t[(op, 'float32', 'nbbn_unfused')] / fused:.2f}x")
            for name, what in (("nbbn_plain", "plain"), ("nbbn", "fused")):
                print(f"  {plain:<9} bfloat16 / float32 ({what:<5})         "
                      f"{t[(op, 'bfloat16', name)] / t[(op, 'float32', name)]:.2f}x")


if __name__ == "__main__":
    main()
