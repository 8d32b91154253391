"""A worked trainer in NumPy + nbbn: does batch norm pay off on handwritten digits?

    nbbn demo [--plot loss.png]          (or: python -m nbbn.demo)

A small MLP and a small CNN (im2col convolutions, channels-last, so the
batch norms run with ``axis=-1``) are trained with plain SGD on scikit-learn's
8x8 digits (``sklearn.datasets.load_digits``, shipped with scikit-learn, no
download), with and without :class:`nbbn.BatchNorm`, at several learning
rates, from the same initial weights and the same mini-batches. The table
gives the final training loss, the test accuracy, and the steps taken to reach
a target test accuracy; ``--plot`` draws the loss curves.

Variants (``--norms``):

- ``plain``: no normalization;
- ``bn``: batch norm before the ReLU (Ioffe & Szegedy's placement);
- ``bn-after-relu``: batch norm after the ReLU;
- ``noisy-bn``: batch norm before the ReLU followed by a random per-channel
  scale and shift drawn anew at every step (Santurkar et al.'s "noisy BN"):
  the next layer sees a distribution that changes at every step, i.e. heavy
  internal covariate shift injected on purpose. Scale ~ U(1/(1+a), 1+a),
  shift ~ U(-a, a), with a = ``--noise``.

Needs the ``nbbn[demo]`` extra (scikit-learn, matplotlib).
"""
import argparse
import contextlib
import math
import sys
import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm

from ._args import float_range, int_at_least, output_file, positive_float, positive_int
from .layer import BatchNorm

NORMS = ("plain", "bn", "bn-after-relu", "noisy-bn")
MODELS = ("mlp", "cnn")
DIVERGED_LOSS = 1e3
DTYPE = np.float32


# ---- data ----------------------------------------------------------------------------------


def load_data(seed=0, test_fraction=0.2):
    """Digits as float32 images in [0, 1], shape (n, 8, 8, 1), split into (train, test)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("nbbn demo needs scikit-learn: pip install 'nbbn[demo]'") from exc
    digits = load_digits()
    x = (digits.images / 16.0).astype(DTYPE)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


# ---- layers: forward(x, training) -> y, backward(dy) -> dx, step(lr) ---------------------------


class Layer:
    def step(self, lr):
        pass


class Linear(Layer):
    def __init__(self, n_in, n_out, rng):
        self.w = (rng.standard_normal((n_in, n_out)) * math.sqrt(2.0 / n_in)).astype(DTYPE)
        self.b = np.zeros(n_out, DTYPE)

    def forward(self, x, training):
        self.x = x
        return x @ self.w + self.b

    def backward(self, dy):
        self.dw, self.db = self.x.T @ dy, dy.sum(axis=0)
        return dy @ self.w.T

    def step(self, lr):
        self.w -= lr * self.dw
        self.b -= lr * self.db


class Conv3x3(Layer):
    """3x3 convolution, stride 1, zero padding 1, channels-last ``(n, h, w, c)``, via im2col."""

    def __init__(self, c_in, c_out, rng):
        self.w = (rng.standard_normal((9 * c_in, c_out)) * math.sqrt(2.0 / (9 * c_in))).astype(DTYPE)
        self.b = np.zeros(c_out, DTYPE)

    def forward(self, x, training):
        n, h, w, c = x.shape
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        # (n, h, w, c, 3, 3) windows -> rows of (kh, kw, c) patches
        cols = sliding_window_view(xp, (3, 3), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
        self.cols = cols.reshape(n * h * w, 9 * c)
        self.shape = x.shape
        return (self.cols @ self.w + self.b).reshape(n, h, w, -1)

    def backward(self, dy):
        n, h, w, c = self.shape
        dy2 = dy.reshape(n * h * w, -1)
        self.dw, self.db = self.cols.T @ dy2, dy2.sum(axis=0)
        dcols = (dy2 @ self.w.T).reshape(n, h, w, 3, 3, c)
        dxp = np.zeros((n, h + 2, w + 2, c), DTYPE)
        for i in range(3):
            for j in range(3):
                dxp[:, i:i + h, j:j + w] += dcols[:, :, :, i, j]
        return dxp[:, 1:-1, 1:-1]

    step = Linear.step


class ReLU(Layer):
    def forward(self, x, training):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        return dy * self.mask


class AvgPool2(Layer):
    """2x2 average pooling, channels-last."""

    def forward(self, x, training):
        n, h, w, c = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))

    def backward(self, dy):
        return np.repeat(np.repeat(dy, 2, axis=1), 2, axis=2) * DTYPE(0.25)


class Flatten(Layer):
    def forward(self, x, training):
        self.shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, dy):
        return dy.reshape(self.shape)


class Norm(Layer):
    """:class:`nbbn.BatchNorm` over the last axis (features of an MLP, channels of NHWC)."""

    def __init__(self, channels):
        self.bn = BatchNorm(channels, axis=-1, dtype=DTYPE)

    def forward(self, x, training):
        return self.bn.train(training)(x)

    def backward(self, dy):
        return self.bn.backward(dy)

    def step(self, lr):
        self.bn.weight -= lr * self.bn.grad_weight
        self.bn.bias -= lr * self.bn.grad_bias


class Noise(Layer):
    """Santurkar et al.'s noise: a random per-channel scale and shift, new at every training step."""

    def __init__(self, level, rng):
        self.level, self.rng = level, rng

    def forward(self, x, training):
        if not training or self.level == 0:
            self.scale = None
            return x
        c, a = x.shape[-1], self.level
        self.scale = np.exp(self.rng.uniform(-math.log1p(a), math.log1p(a), c)).astype(DTYPE)
        shift = self.rng.uniform(-a, a, c).astype(DTYPE)
        return x * self.scale + shift

    def backward(self, dy):
        return dy if self.scale is None else dy * self.scale


def _block(layers, channels, norm, noise, rng):
    """After a linear/conv layer: its normalization and ReLU, in the variant's order."""
    if norm == "plain":
        return layers + [ReLU()]
    if norm == "bn-after-relu":
        return layers + [ReLU(), Norm(channels)]
    tail = [Noise(noise, rng)] if norm == "noisy-bn" else []
    return layers + [Norm(channels)] + tail + [ReLU()]


def build(model, norm, seed=0, noise=1.0, width=128, depth=3):
    """The layers of ``model`` ("mlp" or "cnn") with normalization variant ``norm``.

    Weights come from ``seed`` alone (normalization layers draw none), so the
    variants of one model start from the same weights.
    """
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng(seed + 1_000_003)
    if model == "mlp":
        layers, n_in = [Flatten()], 64
        for _ in range(depth):
            layers = _block(layers + [Linear(n_in, width, rng)], width, norm, noise, noise_rng)
            n_in = width
        return layers + [Linear(n_in, 10, rng)]
    if model == "cnn":
        layers = _block([Conv3x3(1, 16, rng)], 16, norm, noise, noise_rng) + [AvgPool2()]
        layers = _block(layers + [Conv3x3(16, 32, rng)], 32, norm, noise, noise_rng) + [AvgPool2()]
        return layers + [Flatten(), Linear(2 * 2 * 32, 10, rng)]
    raise ValueError(f"unknown model {model!r}; choose from {MODELS}")


def forward(layers, x, training):
    for layer in layers:
        x = layer.forward(x, training)
    return x


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -logp[np.arange(n), labels].mean()
    grad = np.exp(logp)
    grad[np.arange(n), labels] -= 1
    return float(loss), (grad / n).astype(DTYPE)


def accuracy(layers, x, y):
    with np.errstate(all="ignore"):
        return float((forward(layers, x, training=False).argmax(axis=1) == y).mean())


# ---- training ------------------------------------------------------------------------------


def train(model, norm, lr, data, *, steps=300, batch=64, seed=0, noise=1.0, target=0.95,
          eval_every=10, progress=None):
    """Train one configuration with plain SGD; returns a dict of results and curves."""
    (x_train, y_train), (x_test, y_test) = data
    layers = build(model, norm, seed, noise)
    batches = np.random.default_rng(seed + 1)
    order, pos = batches.permutation(len(y_train)), 0
    losses, evals = [], []
    reached = diverged = None
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if pos + batch > len(order):
            order, pos = batches.permutation(len(y_train)), 0
        idx = order[pos:pos + batch]
        pos += batch
        with np.errstate(all="ignore"):
            loss, dlogits = cross_entropy(forward(layers, x_train[idx], True), y_train[idx])
        losses.append(loss)
        if not math.isfinite(loss) or loss > DIVERGED_LOSS:
            diverged = step
            if progress is not None:
                progress.update(steps - step + 1)
            break
        dy = dlogits
        for layer in reversed(layers):
            dy = layer.backward(dy)
        for layer in layers:
            layer.step(lr)
        if step % eval_every == 0 or step == steps:
            acc = accuracy(layers, x_test, y_test)
            evals.append((step, acc))
            if reached is None and acc >= target:
                reached = step
        if progress is not None:
            progress.update(1)
    tail = losses[-max(1, eval_every):]
    return dict(model=model, norm=norm, lr=lr, losses=np.array(losses), evals=evals,
                final_loss=float(np.mean(tail)) if diverged is None else math.inf,
                test_acc=evals[-1][1] if evals and diverged is None else float("nan"),
                best_acc=max((a for _, a in evals), default=float("nan")),
                steps_to_target=reached, diverged_at=diverged,
                seconds=time.perf_counter() - t0)


LRS = (0.02, 0.1, 0.5, 2.0, 5.0)


@contextlib.contextmanager
def limit_threads(n):
    """At most ``n`` threads in nbbn's kernels (Numba) and in NumPy's BLAS while inside.

    The demo's arrays are tiny (a few hundred kB): a thread pool's wake-up costs
    more than it saves, and on a busy machine a spinning pool costs far more.
    """
    import numba
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        from threadpoolctl import threadpool_limits
        blas = threadpool_limits(n)
    except ImportError:
        blas = contextlib.nullcontext()
    try:
        with blas:
            yield
    finally:
        numba.set_num_threads(before)


def run(models=MODELS, norms=NORMS, lrs=LRS, *, steps=300, batch=64, seed=0,
        noise=1.0, target=0.95, eval_every=10, progress=True, threads=1):
    """Every (model, norm, lr) configuration; returns the list of :func:`train` results."""
    data = load_data(seed)
    configs = [(m, n, lr) for m in models for lr in lrs for n in norms]
    results = []
    with tqdm(total=steps * len(configs), unit="step", file=sys.stderr, dynamic_ncols=True,
              disable=not progress) as bar, limit_threads(threads):
        for m, n, lr in configs:
            bar.set_description(f"{m} {n} lr={lr:g}")
            results.append(train(m, n, lr, data, steps=steps, batch=batch, seed=seed,
                                 noise=noise, target=target, eval_every=eval_every,
                                 progress=bar))
    return results


# ---- reporting -----------------------------------------------------------------------------


def _cell(r):
    if r["diverged_at"] is not None:
        return f"diverged (step {r['diverged_at']})"
    steps = r["steps_to_target"] if r["steps_to_target"] is not None else "never"
    return f"{steps} ({100 * r['test_acc']:.1f}%, {r['final_loss']:.3f})"


def table(results, target):
    """A Markdown table: one row per (model, variant), one column per learning rate."""
    lrs = list(dict.fromkeys(r["lr"] for r in results))
    rows = list(dict.fromkeys((r["model"], r["norm"]) for r in results))
    cells = {(r["model"], r["norm"], r["lr"]): _cell(r) for r in results}
    lines = [f"Each cell: steps to {100 * target:g}% test accuracy (final test accuracy, final "
             "training loss).", "",
             "| model | variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "| --- | --- |" + " ---: |" * len(lrs)]
    for m, n in rows:
        lines.append(f"| {m} | {n} | " + " | ".join(cells.get((m, n, lr), "") for lr in lrs)
                     + " |")
    return "\n".join(lines)


def long_table(results, target):
    """A Markdown table with one row per configuration."""
    lines = [f"| model | variant | lr | final train loss | test accuracy | steps to "
             f"{100 * target:g}% | seconds |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r["diverged_at"] is not None:
            loss, acc = f"diverged (step {r['diverged_at']})", "-"
        else:
            loss, acc = f"{r['final_loss']:.3f}", f"{100 * r['test_acc']:.1f}%"
        reached = r["steps_to_target"] if r["steps_to_target"] is not None else "never"
        lines.append(f"| {r['model']} | {r['norm']} | {r['lr']:g} | {loss} | {acc} | {reached} "
                     f"| {r['seconds']:.2f} |")
    return "\n".join(lines)


def summary(results, target):
    """Per (model, variant): the learning rates that reach the target, the fastest, divergences."""
    out = []
    pct = f"{100 * target:g}%"
    for m, n in dict.fromkeys((r["model"], r["norm"]) for r in results):
        rs = [r for r in results if r["model"] == m and r["norm"] == n]
        ok = [r for r in rs if r["steps_to_target"] is not None]
        bad = [f"{r['lr']:g}" for r in rs if r["diverged_at"] is not None]
        lrs = ", ".join(f"{r['lr']:g}" for r in ok) or "-"
        line = f"{m:4s} {n:14s} reaches {pct} at lr {lrs}"
        if ok:
            best = min(ok, key=lambda r: r["steps_to_target"])
            line += f"; fastest {best['steps_to_target']} steps (lr {best['lr']:g})"
        if bad:
            line += f"; diverges at lr {', '.join(bad)}"
        out.append(line)
    return "\n".join(out)


def _smooth(losses, k=10):
    if len(losses) < k:
        return losses
    c = np.cumsum(np.insert(losses, 0, 0.0))
    head = c[1:k] / np.arange(1, k)
    return np.concatenate([head, (c[k:] - c[:-k]) / k])


def plot(results, path):
    """Loss curves: one panel per (model, learning rate), one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    lrs = list(dict.fromkeys(r["lr"] for r in results))
    colors = dict(zip(NORMS, ("tab:red", "tab:blue", "tab:green", "tab:orange")))
    fig, axes = plt.subplots(len(models), len(lrs), figsize=(4 * len(lrs), 3.2 * len(models)),
                             sharey=True, squeeze=False)
    for i, m in enumerate(models):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            for r in results:
                if r["model"] != m or r["lr"] != lr:
                    continue
                losses = np.asarray(r["losses"], float)
                finite = np.where(np.isfinite(losses), losses, np.nan)
                steps = np.arange(1, len(losses) + 1)
                label = r["norm"] + (" (diverged)" if r["diverged_at"] else "")
                ax.plot(steps, _smooth(np.nan_to_num(finite, nan=DIVERGED_LOSS)),
                        color=colors.get(r["norm"]), label=label, lw=1.4)
                if r["diverged_at"]:
                    ax.plot([r["diverged_at"]], [min(DIVERGED_LOSS, 30)], "x",
                            color=colors.get(r["norm"]), ms=9, mew=2)
            ax.set_yscale("log")
            ax.set_ylim(3e-3, 30)
            ax.set_title(f"{m.upper()}, lr = {lr:g}")
            ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("training loss (10-step mean)")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle("NumPy + nbbn on sklearn digits: plain SGD, with and without batch norm")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _floats(text):
    return tuple(positive_float(v) for v in text.split(","))


def _names(choices):
    def parse(text):
        names = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return names
    return parse


def parser(prog="nbbn demo"):
    p = argparse.ArgumentParser(
        prog=prog, description="Train a small MLP and CNN on sklearn's digits in NumPy, with "
        "and without nbbn.BatchNorm, at several learning rates. 'nbbn demo small-batch "
        "--help': batch renorm, ghost batch norm and precise statistics with small batches.")
    p.add_argument("--models", type=_names(MODELS), default=MODELS,
                   help="comma-separated: mlp,cnn (default both)")
    p.add_argument("--norms", type=_names(NORMS), default=NORMS,
                   help="comma-separated variants: plain, bn (before ReLU), bn-after-relu, "
                        "noisy-bn (default all)")
    p.add_argument("--lrs", type=_floats, default=LRS,
                   help="comma-separated SGD learning rates (default "
                        f"{','.join(f'{v:g}' for v in LRS)})")
    p.add_argument("--steps", type=positive_int, default=300,
                   help="SGD steps per run (default 300)")
    p.add_argument("--batch", type=int_at_least(2), default=64,
                   help="mini-batch size (default 64; batch norm needs >= 2)")
    p.add_argument("--target", type=float_range(0, 1), default=0.95,
                   help="test accuracy whose first crossing is reported (default 0.95)")
    p.add_argument("--noise", type=float_range(0, float("inf")), default=1.0,
                   help="noisy-bn level a: scale ~ U(1/(1+a), 1+a), shift ~ U(-a, a) per channel "
                        "and step (default 1)")
    p.add_argument("--eval-every", type=positive_int, default=10,
                   help="steps between test evaluations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1,
                   help="threads for nbbn's kernels and BLAS (default 1: the arrays are tiny)")
    p.add_argument("--plot", metavar="FILE", type=output_file,
                   help="write the loss curves to this PNG")
    p.add_argument("--long", action="store_true", help="also print one table row per run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None, prog="nbbn demo"):
    args = parser(prog).parse_args(argv)
    t0 = time.perf_counter()
    results = run(args.models, args.norms, args.lrs, steps=args.steps, batch=args.batch,
                  seed=args.seed, noise=args.noise, target=args.target,
                  eval_every=args.eval_every, progress=not args.no_progress,
                  threads=args.threads)
    print(table(results, args.target))
    print()
    if args.long:
        print(long_table(results, args.target))
        print()
    print(summary(results, args.target))
    if args.plot:
        plot(results, args.plot)
        print(f"\nloss curves written to {args.plot}")
    print(f"\n{len(results)} runs of {args.steps} steps in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m nbbn.demo"))
