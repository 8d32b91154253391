"""Batch renorm and ghost batch norm against plain batch norm; precise statistics against the
forwards they run. Interleaved, in one process (ratios mean more than times here).

    python bench/small_batch.py [--threads N] [--rounds R] [--quick]

Forward: ``batch_renorm_forward`` (running buffers updated) against ``batch_norm`` in
training with the same buffers; ``batch_norm_forward(virtual_batch_size=V)`` against
``batch_norm_forward``. Backward: ``batch_renorm_backward`` and the ghost
``batch_norm_backward`` against ``batch_norm_backward``. Layer step: forward and backward of
``nbbn.BatchNorm(virtual_batch_size=V)`` (running buffers moved by the groups' statistics)
against ``nbbn.BatchNorm``'s. Then
``nbbn.torch.recompute_batch_norm_stats`` over a small CNN against the same training-mode
forwards under ``torch.no_grad()`` (the model computed by nbbn, as it is while
recomputing, and by torch.nn).
"""
import argparse
import copy

import numpy as np

import nbbn
from nbbn._bench import runner

# (label, shape, channel axis, virtual batch size): images split into 8 virtual batches of 8;
# features (TabNet's ghost batch norm) into virtual batches of 128, and of 8 (the statistics are
# then an eighth of the data).
SHAPES = (("NCHW 64x64x56x56", (64, 64, 56, 56), 1, 8),
          ("NHWC 64x56x56x64", (64, 56, 56, 64), -1, 8),
          ("NC 4096x1024", (4096, 1024), 1, 128), ("NC 4096x1024", (4096, 1024), 1, 8),
          ("NC 4096x256", (4096, 256), 1, 8))


def kernels(shape, axis, virtual, rng):
    c = shape[axis]
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w = (rng.random(c) + 0.5).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, m, v = nbbn.batch_norm_forward(x, w, b, axis=axis)
    _, gm, gv = nbbn.batch_norm_forward(x, w, b, axis=axis, virtual_batch_size=virtual)
    _, _, _, r, d = nbbn.batch_renorm_forward(x, rm.copy(), rv.copy(), w, b, axis=axis)
    forward = {
        "bn (training, buffers)": lambda: nbbn.batch_norm(x, rm, rv, w, b, training=True,
                                                          axis=axis),
        "renorm": lambda: nbbn.batch_renorm_forward(x, rm, rv, w, b, axis=axis),
        "bn forward": lambda: nbbn.batch_norm_forward(x, w, b, axis=axis),
        f"ghost {virtual}": lambda: nbbn.batch_norm_forward(x, w, b, axis=axis,
                                                             virtual_batch_size=virtual),
    }
    backward = {
        "bn": lambda: nbbn.batch_norm_backward(dy, x, m, v, w, axis=axis),
        "renorm": lambda: nbbn.batch_renorm_backward(dy, x, m, v, r, d, w, axis=axis),
        f"ghost {virtual}": lambda: nbbn.batch_norm_backward(dy, x, gm, gv, w, axis=axis,
                                                             virtual_batch_size=virtual),
    }
    layers = {"bn": nbbn.BatchNorm(c, axis=axis),
              f"ghost {virtual}": nbbn.BatchNorm(c, axis=axis, virtual_batch_size=virtual)}
    step = {name: (lambda layer=layer: layer.backward(layer(x))) for name, layer in layers.items()}
    return forward, backward, step


def recompute_thunks(rng):
    import torch
    import nbbn.torch as nt
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10))
    converted = nt.convert(copy.deepcopy(model))
    batches = [torch.from_numpy(rng.standard_normal((32, 3, 32, 32), dtype=np.float32))
               for _ in range(4)]

    def forwards(m):
        def run():
            m.train()
            with torch.no_grad():
                for xb in batches:
                    m(xb)
        return run

    return {"recompute_batch_norm_stats": lambda: nt.recompute_batch_norm_stats(model, batches),
            "forwards (nbbn.torch)": forwards(converted),
            "forwards (torch.nn)": forwards(copy.deepcopy(model))}


def show(title, times, base):
    print(f"  {title}")
    for name, t in times.items():
        print(f"    {name:28s} {1e3 * t:8.2f} ms   {t / times[base]:5.2f}x {base}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="the NC shapes and recompute only")
    args = p.parse_args(argv)
    if args.threads:
        runner.set_threads(args.threads)
    rng = np.random.default_rng(0)
    import numba
    print(f"threads {numba.get_num_threads()}, float32, min over {args.rounds} interleaved "
          "rounds")
    for label, shape, axis, virtual in SHAPES:
        if args.quick and len(shape) > 2:
            continue
        forward, backward, step = kernels(shape, axis, virtual, rng)
        print(label)
        times = runner.interleaved(forward, rounds=args.rounds, stat=min)
        show("forward", {k: times[k] for k in list(forward)[:2]}, "bn (training, buffers)")
        show("forward", {k: times[k] for k in list(forward)[2:]}, "bn forward")
        show("backward", runner.interleaved(backward, rounds=args.rounds, stat=min), "bn")
        show("layer step", runner.interleaved(step, rounds=args.rounds, stat=min), "bn")
    try:
        thunks = recompute_thunks(rng)
    except ImportError:
        return 0
    print("small CNN, 4 batches of 32x3x32x32")
    show("precise statistics", runner.interleaved(thunks, rounds=args.rounds, stat=min),
         "forwards (nbbn.torch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
