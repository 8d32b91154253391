"""Per-call cost: nbbn against PyTorch on small inputs, and the nbbn.torch module on a
CIFAR ResNet-18's batch-norm shapes (batch 128, NCHW and channels-last) and [256, 1024].

    python -m bench.overhead [--rounds 9] [--threads 1 2] [--only small|module]

Each pair is timed interleaved in one process (``nbbn._bench.runner.interleaved``);
the ratio is nbbn's time over PyTorch's (below 1: nbbn is faster). The module case is
a training-mode forward and ``y.backward(dy)`` in float32, a fresh ``x`` leaf each time.
"""
import argparse
import copy

import numpy as np
import torch

import nbbn
import nbbn.torch as nbbn_torch
from nbbn._bench import runner

EPS, MOMENTUM = 1e-5, 0.1
# A CIFAR ResNet-18 at batch 128: the input of each of its batch norms.
RESNET18 = ((128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8), (128, 512, 4, 4))


def small_pairs(shape=(32, 64)):
    """{label: {"nbbn": fn, "torch": fn}} for the per-call functions on ``shape``."""
    rng = np.random.default_rng(0)
    c = shape[1]
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.random(c).astype(np.float32) + 0.5
    b = rng.standard_normal(c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, mean, var = nbbn.batch_norm_forward(x, w, b, EPS)
    tx, tdy, tw, tb, trm, trv, tm = (torch.from_numpy(a.copy()) for a in (x, dy, w, b, rm, rv,
                                                                          mean))
    tinv = torch.from_numpy((1 / np.sqrt(var.astype(np.float64) + EPS)).astype(np.float32))
    F = torch.nn.functional
    bwd = torch.ops.aten.native_batch_norm_backward
    layer = nbbn.BatchNorm(c)
    tlayer = torch.nn.BatchNorm1d(c)

    def layer_step():
        layer(x)
        return layer.backward(dy)

    def torch_layer_step():
        tlayer.zero_grad(set_to_none=True)
        xg = tx.detach().requires_grad_()
        tlayer(xg).backward(tdy)
        return xg.grad

    label = "x".join(map(str, shape))
    return {
        f"forward (batch_norm training) {label}": {
            "nbbn": lambda: nbbn.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS),
            "torch": lambda: F.batch_norm(tx, trm, trv, tw, tb, True, MOMENTUM, EPS)},
        f"batch_norm_forward {label}": {
            "nbbn": lambda: nbbn.batch_norm_forward(x, w, b, EPS),
            "torch": lambda: F.batch_norm(tx, None, None, tw, tb, True, MOMENTUM, EPS)},
        f"backward {label}": {
            "nbbn": lambda: nbbn.batch_norm_backward(dy, x, mean, var, w, EPS),
            "torch": lambda: bwd(tdy, tx, tw, None, None, tm, tinv, True, EPS,
                                 [True, True, True])},
        f"inference {label}": {
            "nbbn": lambda: nbbn.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS),
            "torch": lambda: F.batch_norm(tx, trm, trv, tw, tb, False, MOMENTUM, EPS)},
        f"layer step (BatchNorm forward+backward) {label}": {
            "nbbn": layer_step, "torch": torch_layer_step},
    }


def module_pairs(shapes=RESNET18 + ((256, 1024),)):
    """{label: {"nbbn": fn, "torch": fn}}: a training-mode module's forward + backward, on
    each 4-D shape in NCHW and channels-last memory format."""
    pairs = {}
    cases = [(shape, fmt) for shape in shapes
             for fmt in ((torch.contiguous_format, torch.channels_last) if len(shape) == 4
                         else (torch.contiguous_format,))]
    for shape, fmt in cases:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
        dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
        cls = torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d
        ref = cls(shape[1])
        ours = nbbn_torch.convert(copy.deepcopy(ref))

        def step(module, x=x, dy=dy):
            module.zero_grad(set_to_none=True)
            xg = x.detach().requires_grad_()
            module(xg).backward(dy)
            return xg.grad

        label = "x".join(map(str, shape)) + (" NHWC" if fmt is torch.channels_last else "")
        pairs["module fwd+bwd " + label] = {
            "nbbn": lambda m=ours, s=step: s(m), "torch": lambda m=ref, s=step: s(m)}
    return pairs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, nargs="+", default=[None],
                   help="thread counts (nbbn and PyTorch alike), one table each")
    p.add_argument("--only", choices=("small", "module"), default=None)
    args = p.parse_args(argv)
    pairs = {}
    if args.only != "module":
        pairs.update(small_pairs())
    if args.only != "small":
        pairs.update(module_pairs())
    for threads in args.threads:
        if threads:
            runner.set_threads(threads)
        print(f"{'case':48s} {'nbbn us':>10s} {'torch us':>10s} {'ratio':>6s}   "
              f"({torch.get_num_threads()} threads)")
        for label, thunks in pairs.items():
            t = runner.interleaved(thunks, rounds=args.rounds, stat=min)
            print(f"{label:48s} {t['nbbn'] * 1e6:10.1f} {t['torch'] * 1e6:10.1f} "
                  f"{t['nbbn'] / t['torch']:6.2f}", flush=True)


if __name__ == "__main__":
    main()
