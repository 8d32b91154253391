"""What batch renorm, ghost batch norm and precise statistics buy when batches are small or
not i.i.d.: a worked NumPy + nbbn study on handwritten digits.

    nbbn demo small-batch [--plot small.png]     (or: python -m nbbn.demo_smallbatch)

The MLP of ``nbbn demo`` (batch norm over the batch alone: the hardest case for
small batches) is trained with plain SGD on scikit-learn's 8x8 digits in several
regimes (``--regimes``):

- ``b4``, ``b8``: i.i.d. mini-batches of 4 and 8 images;
- ``b64``: i.i.d. mini-batches of 64 (the reference);
- ``b64-2cls``: mini-batches of 64 drawn from two classes only, 32 of each
  (non-i.i.d.; the classes are mixed within the batch).

with three normalizations (``--norms``): ``bn`` (``nbbn.BatchNorm``), ``renorm``
(``nbbn.BatchRenorm``, the paper's warm-up: rmax from 1 to 3 and dmax from 0 to 5
over the first 30-40% of training) and ``ghost`` (``nbbn.BatchNorm`` with
``virtual_batch_size=8``; not run where the batch is no larger: it is batch norm
there). Each run reports the test accuracy twice: with the running (EMA)
statistics, and with precise statistics (``layer.precise_statistics()``: the exact
population statistics of one training-mode pass over the shuffled training set,
in batches of the regime's size). Every configuration runs with several seeds
(weights and batches); the table gives the mean and the spread.
"""
import argparse
import contextlib
import math
import sys
import time

import numpy as np

from . import demo
from .layer import BatchNorm, BatchRenorm

REGIMES = {"b4": (4, False), "b8": (8, False), "b64": (64, False), "b64-2cls": (64, True)}
NORMS = ("bn", "renorm", "ghost")
VIRTUAL_BATCH = 8
DTYPE = demo.DTYPE


class Norm(demo.Layer):
    """One normalization variant over the last axis (features of the MLP)."""

    def __init__(self, channels, kind, momentum):
        if kind == "renorm":
            self.bn = BatchRenorm(channels, momentum=momentum, rmax=1.0, dmax=0.0, axis=-1,
                                  dtype=DTYPE)
        else:
            self.bn = BatchNorm(channels, momentum=momentum, axis=-1, dtype=DTYPE,
                                virtual_batch_size=VIRTUAL_BATCH if kind == "ghost" else None)

    forward = demo.Norm.forward
    backward = demo.Norm.backward
    step = demo.Norm.step

    def warm_up(self, progress):
        """Batch renorm's limits, widened linearly over training's first part (Ioffe 2017)."""
        if isinstance(self.bn, BatchRenorm):
            self.bn.rmax = 1.0 + 2.0 * min(1.0, progress / 0.3)
            self.bn.dmax = 5.0 * min(1.0, max(0.0, progress - 0.05) / 0.35)


def build(kind, seed, momentum, width=128, depth=3):
    """The MLP of ``nbbn demo`` (same weights for every variant of a seed)."""
    rng = np.random.default_rng(seed)
    layers, n_in = [demo.Flatten()], 64
    for _ in range(depth):
        layers += [demo.Linear(n_in, width, rng), Norm(width, kind, momentum), demo.ReLU()]
        n_in = width
    return layers + [demo.Linear(n_in, 10, rng)]


def batches(y, size, two_classes, rng):
    """An epoch of index batches: shuffled (i.i.d.), or each drawn from two classes."""
    if not two_classes:
        order = rng.permutation(len(y))
        return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]
    half = size // 2
    by_class = [rng.permutation(np.flatnonzero(y == k)) for k in range(10)]
    out = []
    while True:
        live = [k for k in range(10) if len(by_class[k]) >= size - half]
        if len(live) < 2:
            return out
        first, second = rng.choice(live, size=2, replace=False)
        take = np.concatenate([by_class[first][:half], by_class[second][:size - half]])
        by_class[first] = by_class[first][half:]
        by_class[second] = by_class[second][size - half:]
        out.append(rng.permutation(take))  # the two classes mixed within the batch


def norms_of(layers):
    return [layer for layer in layers if isinstance(layer, Norm)]


def precise(layers, x, y, size, rng):
    """Precise statistics: one training-mode pass over the shuffled training set in batches
    of the regime's size, the running buffers set to the exact population statistics."""
    with contextlib.ExitStack() as stack:
        for norm in norms_of(layers):
            stack.enter_context(norm.bn.precise_statistics())
        with np.errstate(all="ignore"):
            for idx in batches(y, size, False, rng):
                demo.forward(layers, x[idx], True)


def train(regime, kind, data, *, epochs, lr, seed, momentum):
    """One run: SGD for ``epochs`` over the training set; test accuracy with EMA and with
    precise statistics."""
    (x_train, y_train), (x_test, y_test) = data
    size, two_classes = REGIMES[regime]
    layers = build(kind, seed, momentum)
    rng = np.random.default_rng(seed + 1)
    plan = [b for _ in range(epochs) for b in batches(y_train, size, two_classes, rng)]
    t0 = time.perf_counter()
    diverged = False
    for step, idx in enumerate(plan):
        for norm in norms_of(layers):
            norm.warm_up(step / len(plan))
        with np.errstate(all="ignore"):
            loss, dy = demo.cross_entropy(demo.forward(layers, x_train[idx], True), y_train[idx])
        if not math.isfinite(loss):
            diverged = True
            break
        for layer in reversed(layers):
            dy = layer.backward(dy)
        for layer in layers:
            layer.step(lr * size / 64)  # the linear scaling rule
    ema = float("nan") if diverged else demo.accuracy(layers, x_test, y_test)
    if not diverged:
        precise(layers, x_train, y_train, size, np.random.default_rng(seed + 2))
    return dict(regime=regime, norm=kind, seed=seed, steps=len(plan), ema=ema,
                precise=float("nan") if diverged else demo.accuracy(layers, x_test, y_test),
                seconds=time.perf_counter() - t0)


def applies(regime, kind):
    """Ghost batch norm differs from batch norm only where the batch exceeds a virtual batch."""
    return kind != "ghost" or REGIMES[regime][0] > VIRTUAL_BATCH


def run(regimes=tuple(REGIMES), norms=NORMS, *, seeds=5, epochs=6, lr=0.5, momentum=0.1,
        progress=True, threads=1):
    """Every (regime, normalization, seed); returns the list of :func:`train` results."""
    data = demo.load_data(0)
    configs = [(r, n, s) for r in regimes for n in norms if applies(r, n)
               for s in range(seeds)]
    results = []
    with demo.limit_threads(threads):
        for i, (regime, kind, seed) in enumerate(configs):
            if progress:
                print(f"[{i + 1}/{len(configs)}] {regime} {kind} seed {seed}", file=sys.stderr,
                      flush=True)
            results.append(train(regime, kind, data, epochs=epochs, lr=lr, seed=seed,
                                 momentum=momentum))
    return results


def _summary(results, regime, kind, key):
    values = np.array([r[key] for r in results if r["regime"] == regime and r["norm"] == kind])
    return 100 * values.mean(), 100 * values.std()


def table(results):
    """Markdown: one row per regime, for each normalization the test accuracy with EMA and
    with precise statistics (mean +- std over seeds)."""
    regimes = list(dict.fromkeys(r["regime"] for r in results))
    norms = list(dict.fromkeys(r["norm"] for r in results))
    head = "| regime | " + " | ".join(f"{n} EMA | {n} precise" for n in norms) + " |"
    lines = ["Test accuracy (%), mean ± std over seeds; EMA: running statistics, precise: "
             "exact population statistics of one training-mode pass.", "", head,
             "| --- |" + " ---: |" * (2 * len(norms))]
    for regime in regimes:
        cells = []
        for kind in norms:
            for key in ("ema", "precise"):
                if not applies(regime, kind):
                    cells.append("= bn")
                    continue
                mean, std = _summary(results, regime, kind, key)
                cells.append(f"{mean:.1f} ± {std:.1f}")
        lines.append(f"| {regime} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path, title="MLP on sklearn digits: small and non-i.i.d. batches"):
    """Grouped bars: per regime, each normalization's accuracy with EMA and precise statistics."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(dict.fromkeys(r["regime"] for r in results))
    norms = list(dict.fromkeys(r["norm"] for r in results))
    colors = dict(zip(NORMS, ("tab:blue", "tab:orange", "tab:green")))
    fig, ax = plt.subplots(figsize=(1.2 * len(regimes) * len(norms) + 2, 4.2))
    width = 0.8 / (2 * len(norms))
    for j, kind in enumerate(norms):
        for k, key in enumerate(("ema", "precise")):
            stats = [_summary(results, regime, kind, key) if applies(regime, kind)
                     else (np.nan, np.nan) for regime in regimes]
            pos = np.arange(len(regimes)) - 0.4 + width * (2 * j + k + 0.5)
            ax.bar(pos, [m for m, _ in stats], width, yerr=[s for _, s in stats],
                   color=colors.get(kind), alpha=0.55 if key == "ema" else 1.0,
                   label=f"{kind}, {'EMA' if key == 'ema' else 'precise'} statistics",
                   capsize=2)
    ax.set_xticks(np.arange(len(regimes)), regimes)
    ax.set_ylabel("test accuracy (%)")
    low = min(100 * r[key] for r in results for key in ("ema", "precise")
              if np.isfinite(r[key]))
    ax.set_ylim(max(0, low - 5), 100)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(norms), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser(prog="nbbn demo small-batch"):
    p = argparse.ArgumentParser(
        prog=prog, description="Batch renorm, ghost batch norm and precise statistics with "
        "small and non-i.i.d. batches: an MLP on sklearn's digits in NumPy + nbbn.")
    p.add_argument("--regimes", type=demo._names(tuple(REGIMES)), default=tuple(REGIMES),
                   help=f"comma-separated: {', '.join(REGIMES)} (default all)")
    p.add_argument("--norms", type=demo._names(NORMS), default=NORMS,
                   help="comma-separated: bn, renorm, ghost (default all)")
    p.add_argument("--seeds", type=int, default=5, help="runs per configuration (default 5)")
    p.add_argument("--epochs", type=int, default=6,
                   help="passes over the training set (default 6)")
    p.add_argument("--lr", type=float, default=0.5,
                   help="SGD learning rate at batch 64, scaled linearly with the batch")
    p.add_argument("--momentum", type=float, default=0.1,
                   help="the running statistics' EMA factor (default 0.1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", metavar="FILE", help="write a bar chart to this PNG")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None, prog="nbbn demo small-batch"):
    args = parser(prog).parse_args(argv)
    t0 = time.perf_counter()
    results = run(args.regimes, args.norms, seeds=args.seeds, epochs=args.epochs, lr=args.lr,
                  momentum=args.momentum, progress=not args.no_progress, threads=args.threads)
    print(table(results))
    if args.plot:
        plot(results, args.plot, f"MLP on sklearn digits, running-statistics momentum "
                                 f"{args.momentum:g}")
        print(f"\nbar chart written to {args.plot}")
    print(f"\n{len(results)} runs in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m nbbn.demo_smallbatch"))
