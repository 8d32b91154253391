"""The ``nbbn`` command (also ``python -m nbbn``).

    nbbn info                 versions, threads, compilation cache, CUDA
    nbbn bench                side-by-side timings: nbbn / NumPy / PyTorch / bandwidth floor
                              (and JAX, TensorFlow where installed: nbbn[peers])
    nbbn bench --full         every shape, dtype and layout of the benchmark suite
    nbbn bench --json r.json --plot r.png
"""
import argparse
import json
import math
import sys
import time

from ._args import output_file, physical_memory, positive_float, positive_int

#: ``nbbn bench`` with no arguments: float32, the shapes that tell the story.
DEFAULT_SHAPES = ((64, 64, 56, 56), (256, 256, 14, 14), (4096, 1024), (32, 64))
QUICK_SHAPES = ((32, 64), (8, 16, 8, 8))
BENCH_ARRAYS = 4  # arrays of a case's shape alive at once, at most (x, dy, two outputs)


def _shape(text):
    try:
        shape = tuple(int(v) for v in text.replace(",", "x").split("x") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (write e.g. 64x64x56x56)") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape needs >= 2 positive sizes: {text!r}")
    # A case holds a few arrays of the shape (x, dy, outputs; float64 at most).
    need, memory = BENCH_ARRAYS * 8 * math.prod(shape), physical_memory()
    if memory is not None and need > memory:
        raise argparse.ArgumentTypeError(
            f"shape {text} needs about {need / 2**30:.1f} GiB, more than this machine's "
            f"{memory / 2**30:.1f} GiB")
    return shape


def _csv(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser():
    parser = argparse.ArgumentParser(prog="nbbn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="versions, threading layer, cache directory, CUDA")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument("--no-probe", action="store_true",
                      help="don't start the thread pool to learn the threading layer")

    bench = sub.add_parser(
        "bench", help="time nbbn beside NumPy and PyTorch, and against the bandwidth floor",
        description="Times each operation on each case interleaved in one process "
                    "(round-robin over the contenders, repeated; medians), and reports "
                    "nbbn's speed-up over NumPy and PyTorch and its multiple of the "
                    "bandwidth floor (plain Numba read/copy kernels over the same bytes).")
    bench.add_argument("--ops", type=_csv, default=None,
                       help="comma-separated operations (default: all available): "
                            "mean_var, forward, backward, inference, ema_update, layer_step, "
                            "fused_forward, fused_backward")
    bench.add_argument("--shapes", type=_shape, nargs="+", default=None, metavar="SHAPE",
                       help="logical shapes [b,c,...] such as 64x64x56x56 (default: "
                            + ", ".join("x".join(map(str, s)) for s in DEFAULT_SHAPES) + ")")
    bench.add_argument("--dtypes", type=_csv, default=None, help="float32,float64,bfloat16 (default: float32)")
    bench.add_argument("--layouts", type=_csv, default=None,
                       help="NCHW,NHWC for shapes of >= 3 dims (default: both)")
    bench.add_argument("--full", action="store_true",
                       help="the whole suite: every shape, float32 and float64, both layouts")
    bench.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (a smoke test)")
    bench.add_argument("--rounds", type=positive_int, default=None,
                       help="round-robin rounds (default 7; 3 with --quick)")
    bench.add_argument("--budget", type=positive_float, default=1.0,
                       help="seconds per case after which rounds stop early (at least 3 rounds; default 1)")
    bench.add_argument("--threads", type=positive_int, default=None,
                       help="threads for nbbn, the floor and PyTorch alike (default: all cores)")
    bench.add_argument("--json", metavar="FILE", type=output_file,
                       help="also write the results as JSON")
    bench.add_argument("--plot", metavar="FILE", type=output_file,
                       help="also write a PNG bar chart (needs matplotlib: nbbn[plot])")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(usage_error=bench.error)  # for the checks that need the registry

    # `nbbn demo ARGS` is handed to nbbn.demo.main whole (see main); listed here for --help.
    sub.add_parser("demo", add_help=False,
                   help="train a NumPy MLP/CNN on sklearn digits with and without nbbn.BatchNorm "
                        "(nbbn demo --help; needs nbbn[demo]); nbbn demo small-batch: batch "
                        "renorm, ghost batch norm and precise statistics")
    return parser


# --- nbbn info -------------------------------------------------------------------

def _format_info(info):
    v, t, c, g = info["versions"], info["threads"], info["cache"], info["cuda"]
    lines = ["nbbn " + v["nbbn"], ""]
    lines += [f"  {k:<10} {val or 'not installed'}" for k, val in v.items() if k != "nbbn"]
    lines += ["", f"platform     {info['platform']}", f"cpu          {t.get('cpu')} ({t['cpu_count']} logical CPUs)",
              f"threads      numba {t['num_threads']}, layer {t['threading_layer']} "
              f"(configured: {t['threading_layer_configured']})"]
    if "torch_num_threads" in t:
        lines.append(f"             torch {t['torch_num_threads']}")
    if t.get("parallel_min_elements"):
        lines.append(f"             serial below {t['parallel_min_elements']} elements (no thread pool)")
    state = "writable" if c["cache_writable"] else "NOT writable (kernels recompile each run)"
    lines += [f"cache        {c['cache_dir']} ({c['cache_dir_from']}; {state})"]
    if g["available"]:
        devs = ", ".join(f"#{d['id']} {d['name']} (sm_{''.join(map(str, d['compute_capability']))})"
                         for d in g.get("devices", []))
        lines.append(f"cuda         available{' (simulator)' if g.get('simulator') else ''}: {devs}")
    else:
        lines.append(f"cuda         not available: {g.get('reason', 'unknown')}")
    return "\n".join(lines)


def cmd_info(args):
    from ._info import collect
    info = collect(probe=not args.no_probe)
    print(json.dumps(info, indent=2) if args.json else _format_info(info))
    return 0


# --- nbbn bench --------------------------------------------------------------------

def _select(args, usage_error):
    from ._bench import registry
    if args.full:
        shapes, dtypes = registry.SHAPES, registry.DTYPES
    elif args.quick:
        shapes, dtypes = QUICK_SHAPES, ("float32",)
    else:
        shapes, dtypes = DEFAULT_SHAPES, ("float32",)
    shapes = args.shapes or shapes
    dtypes = args.dtypes or dtypes
    bad = [d for d in dtypes if d not in registry.KNOWN_DTYPES]
    if bad:
        usage_error(f"unsupported dtype(s) {bad}: use {', '.join(registry.KNOWN_DTYPES)}")
    names = args.ops or list(registry.OPS)
    unknown = [n for n in names if n not in registry.OPS]
    if unknown:
        usage_error(f"unknown op(s) {unknown}; known: {', '.join(registry.OPS)}")
    ops, skipped = [], []
    for name in names:
        why = registry.OPS[name].available()
        (skipped.append(f"{name} ({why})") if why else ops.append(name))
    layouts = [v.upper() for v in args.layouts] if args.layouts else None
    return registry.cases(ops, shapes=shapes, dtypes=dtypes, layouts=layouts), skipped


def cmd_bench(args):
    from tqdm import tqdm

    from ._bench import peers, registry, report, runner
    from ._info import collect
    cases, skipped = _select(args, args.usage_error)
    for s in skipped:
        print(f"skipped: {s}", file=sys.stderr)
    if not registry.torch_available():
        print("note: PyTorch not installed; its column stays empty", file=sys.stderr)
    missing = [p for p in ("jax", "tf") if p not in peers.available()]
    if missing:
        print(f"note: {' and '.join(missing)} not installed (pip install 'nbbn[peers]' "
              "to compare with JAX and TensorFlow)", file=sys.stderr)
    if not cases:
        print("nothing to run", file=sys.stderr)
        return 1
    if args.plot:  # fail before the measurements, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("nbbn bench: --plot needs matplotlib: pip install 'nbbn[plot]'", file=sys.stderr)
            return 2
    if args.threads:
        runner.set_threads(args.threads)
    busy = runner.busy_fraction()
    if busy is not None and busy > 0.25:
        print(f"warning: the CPUs were {busy:.0%} busy before the run; timings will be noisy "
              "(ratios are measured interleaved, but still suffer)", file=sys.stderr)
    rounds = args.rounds or (3 if args.quick else 7)
    budget = min(args.budget, 0.2) if args.quick else args.budget
    start = time.perf_counter()
    # disable=None: a bar only where stderr is a terminal.
    with tqdm(total=len(cases), unit="case", file=sys.stderr, dynamic_ncols=True,
              disable=True if args.no_progress else None) as bar:
        results = runner.run_cases(cases, rounds=rounds, budget_s=budget, progress=bar)
    elapsed = time.perf_counter() - start
    info = collect(probe=True)
    t = info["threads"]
    info["versions"].update(peers.versions())
    v = info["versions"]
    print(f"nbbn {v['nbbn']} | numpy {v['numpy']} | torch {v['torch'] or '-'} | "
          f"jax {v['jax'] or '-'} | tensorflow {v['tensorflow'] or '-'} | {t.get('cpu')} | "
          f"numba threads {t['num_threads']} ({t['threading_layer']}) | median ms, "
          f"interleaved, {rounds} rounds max")
    print(report.table(results))
    print(f"({len(results)} cases in {elapsed:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rounds": rounds, "busy_before": busy,
                       "results": results}, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["demo", "small-batch"]:
        from .demo_smallbatch import main as small_batch_main
        return small_batch_main(argv[2:])
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main
        return demo_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "bench":
        return cmd_bench(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
