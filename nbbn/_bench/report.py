"""Presenting benchmark results: the side-by-side table and the PNG chart."""

CONTENDER_ORDER = ("floor", "nbbn", "nbbn_out", "nbbn_plain", "nbbn_unfused", "numpy", "torch",
                   "jax", "tf")
# Columns shown whatever the results hold; the others only where they ran.
ALWAYS = ("floor", "nbbn", "nbbn_out", "numpy", "torch")
LABELS = {"nbbn_out": "out=", "nbbn_plain": "plain", "nbbn_unfused": "unfused"}


def _ms(v):
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def table(results):
    """A plain-text table: one line per case, times in ms, speed-ups and floor multiple."""
    shown = [c for c in CONTENDER_ORDER if c in ALWAYS or any(c in r["ms"] for r in results)]
    others = [c for c in shown if c not in ("floor", "nbbn", "nbbn_out")]
    header = (["op", "shape", "layout", "dtype"] + [f"{LABELS.get(c, c)} ms" for c in shown]
              + [f"vs {c}" for c in others] + ["x floor", "out= x floor"])
    rows = []
    for r in results:
        ms = r["ms"]
        rows.append([
            r["op"], "x".join(map(str, r["shape"])), r["layout"], r["dtype"],
            *(_ms(ms.get(k)) for k in shown),
            *(_x(r.get(f"vs_{c}")) for c in others), _x(r.get("x_floor")),
            _x(r.get("x_floor_out")),
        ])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    left = 4  # text columns are left-aligned, numbers right-aligned

    def line(cells):
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out.append("vs X: X's time / nbbn's (above 1: nbbn faster). "
               "x floor: nbbn's time / the bandwidth floor's (plain Numba read/copy kernels "
               "over the same bytes, writing into preallocated arrays; 1 is the memory-speed "
               "limit). out=: nbbn writing into a preallocated output, as the floor does; the "
               "gap to 'nbbn ms' is the cost of a fresh output array.")
    if "nbbn_plain" in shown:
        out.append("fused ops: nbbn is the fused call; plain: nbbn's batch norm alone (vs "
                   "plain below 1: the epilogue's cost); unfused: nbbn's batch norm, then "
                   "NumPy's add and ReLU (or the ReLU's mask); torch: PyTorch's BN + add + ReLU.")
    if "jax" in shown or "tf" in shown:
        out.append("jax: jitted Flax-style batch norm (XLA); tf: TensorFlow's moments and fused "
                   "batch norm (oneDNN), NHWC and 2-D float32 only.")
    return "\n".join(out)


class MatplotlibMissing(RuntimeError):
    pass


def plot(results, path, title="nbbn benchmark"):
    """A grouped bar chart (log-scale ms per case and contender) written to ``path``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MatplotlibMissing(
            "--plot needs matplotlib: pip install 'nbbn[plot]' (or pip install matplotlib)"
        ) from exc
    labels = [f"{r['op']}\n{'x'.join(map(str, r['shape']))} {r['layout']}\n{r['dtype']}" for r in results]
    present = [c for c in CONTENDER_ORDER if any(c in r["ms"] for r in results)]
    width = 0.8 / max(1, len(present))
    colors = {"floor": "0.6", "nbbn": "tab:green", "nbbn_out": "tab:olive", "numpy": "tab:blue",
              "torch": "tab:orange", "jax": "tab:purple", "tf": "tab:red",
              "nbbn_plain": "tab:cyan", "nbbn_unfused": "tab:brown"}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(results) + 2), 5.0))
    for k, name in enumerate(present):
        xs = [i + (k - (len(present) - 1) / 2) * width for i in range(len(results))]
        ys = [r["ms"].get(name, float("nan")) for r in results]
        label = {"floor": "bandwidth floor", "nbbn_out": "nbbn, out=", "jax": "JAX (XLA)",
                 "tf": "TensorFlow (oneDNN)", "nbbn_plain": "nbbn, batch norm alone",
                 "nbbn_unfused": "nbbn, then NumPy add/ReLU"}.get(name, name)
        ax.bar(xs, ys, width, label=label, color=colors.get(name))
    ax.set_yscale("log")
    ax.set_ylabel("milliseconds per call (median, lower is better)")
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
