"""The README's Speed tables, in Markdown, from one ``nbbn bench --json`` file.

Run from the repository root: ``python -m bench.readme_tables
bench/results/cpu-2thread-peers-f32.json``. Prints the large-input table (milliseconds, ratios,
multiples of the floor) and the small-input table (microseconds: shapes below SMALL_BYTES,
and ``ema_update`` everywhere), every figure from the file, nothing measured here.
"""
import argparse
import json

PEERS = (("numpy", "NumPy"), ("torch", "PyTorch"), ("jax", "JAX"), ("tf", "TF"))
SMALL_BYTES = 1 << 20  # x's bytes below which a case is a per-call cost, shown in microseconds


def _ms(v):
    return "" if v is None else f"{v:.3g}"


def _ratio(v):
    return "" if v is None else f"{v:.2f}x" if v < 10 else f"{v:.1f}x"


def _case(r):
    return [r["op"].replace("layer_step", "layer step"), "x".join(map(str, r["shape"])), r["layout"]]


def _small(r):
    return r["op"] == "ema_update" or r["bytes"] < SMALL_BYTES


def _rows(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---" if i < 3 else "---:" for i in range(len(header))) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def large(results):
    header = (["op", "shape", "layout", "nbbn ms", "out= ms"]
              + [f"{label} ms" for _, label in PEERS]
              + [f"vs {label}" for _, label in PEERS] + ["x floor", "out= x floor"])
    rows = [_case(r) + [_ms(r["ms"].get("nbbn")), _ms(r["ms"].get("nbbn_out"))]
            + [_ms(r["ms"].get(key)) for key, _ in PEERS]
            + [_ratio(r.get(f"vs_{key}")) for key, _ in PEERS]
            + [_ratio(r.get("x_floor")), _ratio(r.get("x_floor_out"))]
            for r in results if not _small(r)]
    return _rows(header, rows)


def small(results):
    def us(v):
        return "" if v is None else f"{v * 1000:.0f}"

    header = ["op", "shape", "layout", "nbbn"] + [label for _, label in PEERS] + ["vs PyTorch"]
    rows = [_case(r) + [us(r["ms"].get("nbbn"))] + [us(r["ms"].get(key)) for key, _ in PEERS]
            + [_ratio(r.get("vs_torch"))] for r in results if _small(r)]
    return _rows(header, rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a file written by nbbn bench --json")
    results = json.load(open(parser.parse_args().json))["results"]
    print(large(results))
    print("\nSmall inputs, where the per-call cost dominates (microseconds, same run):\n")
    print(small(results))


if __name__ == "__main__":
    main()
