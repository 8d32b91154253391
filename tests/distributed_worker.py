"""One rank of a synchronized batch-norm run, and the single-process reference it must equal.

Run as a rank (each writes ``OUTDIR/rank{r}.npz``):

    mpiexec -n N python -m mpi4py tests/distributed_worker.py mpi OUTDIR
    RANK=r WORLD_SIZE=N python tests/distributed_worker.py torch OUTDIR   (GLOO_SOCKET_IFNAME=lo)

``tests/test_distributed.py`` also runs ``run_rank`` in threads over an
in-process communicator, and compares every rank's results with
``reference`` (one ``nbbn.BatchNorm`` on the concatenated batch).
"""
import os
import sys
from dataclasses import dataclass, field

import numpy as np

import nbbn
from nbbn.distributed import SyncBatchNorm, allreduce_moments

LR = 0.1
STEPS = ("train", "train", "eval")
LAYER_KEYS = ("grad_weight", "grad_bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass
class Case:
    name: str
    shape: tuple            # per-sample shape (channels on ``axis``, counted without the batch)
    axis: int
    dtype: type
    splits: dict            # world size -> samples on each rank (any may be 0)
    affine: bool = True
    track: bool = True
    momentum: object = 0.1
    offset: float = 0.5
    extra: dict = field(default_factory=dict)

    @property
    def nchan(self):
        full = (1, *self.shape)
        return full[self.axis]


CASES = [
    Case("flat64", (3,), 1, np.float64, {1: [9], 2: [4, 5], 3: [2, 0, 7]}),
    Case("nchw32", (4, 3, 5), 1, np.float32, {1: [5], 2: [0, 5], 3: [1, 3, 1]}),
    Case("nhwc64", (3, 2, 4), -1, np.float64, {1: [6], 2: [5, 1], 3: [0, 6, 0]},
         affine=False, momentum=None),
    Case("ncl32_untracked", (2, 7), 1, np.float32, {1: [4], 2: [2, 2], 3: [0, 0, 4]},
         track=False),
    Case("offset32", (3, 8), 1, np.float32, {1: [6], 2: [1, 5], 3: [2, 2, 2]}, offset=1e3),
]
# One value per channel over all ranks: every rank must raise the same ValueError.
TOO_FEW = Case("too_few", (3,), 1, np.float64, {1: [1], 2: [0, 1], 3: [0, 1, 0]})


def batch(case, size, step):
    """The whole batch (x, dy) of one step, the same on every rank."""
    rng = np.random.default_rng([sum(map(ord, case.name)), size, step])
    n = sum(case.splits[size])
    x = (case.offset + (step + 1) * rng.standard_normal((n, *case.shape))).astype(case.dtype)
    dy = rng.standard_normal((n, *case.shape)).astype(case.dtype)
    return x, dy


def shard(case, size, rank, a):
    starts = np.cumsum([0, *case.splits[size]])
    return a[starts[rank]:starts[rank + 1]]


def _layer(cls, case, **kw):
    return cls(case.nchan, momentum=case.momentum, affine=case.affine,
               track_running_stats=case.track, axis=case.axis, dtype=case.dtype, **kw)


def _record(out, prefix, layer, y, dx):
    out[f"{prefix}.y"] = y
    out[f"{prefix}.dx"] = dx
    for k in LAYER_KEYS:
        v = getattr(layer, k)
        if v is not None:
            out[f"{prefix}.{k}"] = np.array(v, copy=True)


def _steps(layer, case, size, part):
    """Run STEPS on ``layer``; ``part(a)`` is the slice of the batch this layer sees."""
    out = {}
    for step, mode in enumerate(STEPS):
        layer.train(mode == "train")
        x, dy = batch(case, size, step)
        y = layer(part(x))
        dx = layer.backward(part(dy))
        _record(out, f"{case.name}.{step}", layer, y, dx)
        if case.affine:
            layer.weight -= (LR * layer.grad_weight).astype(layer.weight.dtype)
            layer.bias -= (LR * layer.grad_bias).astype(layer.bias.dtype)
    return out


def run_rank(comm, rank, size):
    """Everything one rank computes, as a dict of arrays."""
    out = {}
    for case in CASES:
        layer = _layer(SyncBatchNorm, case, comm=comm)
        out.update(_steps(layer, case, size, lambda a: shard(case, size, rank, a)))
        # allreduce_moments on its own: per channel and over everything.
        x, _ = batch(case, size, 0)
        part = shard(case, size, rank, x)
        reduced = tuple(i for i in range(x.ndim) if i != case.axis % x.ndim)
        for tag, axis in (("chan", reduced), ("all", None)):
            m = allreduce_moments(nbbn.moments(part, axis=axis), comm)
            out[f"{case.name}.moments.{tag}"] = np.stack([np.broadcast_to(v, np.shape(m.mean))
                                                         for v in m])
    layer = _layer(SyncBatchNorm, TOO_FEW, comm=comm)
    x, _ = batch(TOO_FEW, size, 0)
    try:
        layer(shard(TOO_FEW, size, rank, x))
        out["too_few.raised"] = np.array("")
    except ValueError as exc:
        out["too_few.raised"] = np.array(str(exc))
    out["too_few.running_mean"] = layer.running_mean.copy()
    return out


def reference(case, size):
    """One BatchNorm on the concatenated batch: the results ``run_rank`` must reproduce."""
    return _steps(_layer(nbbn.BatchNorm, case), case, size, lambda a: a)


def compare(results, size, tol32=2e-6, tol64=1e-12):
    """Assert that every rank's ``run_rank`` results equal the single-process reference."""
    for case in CASES:
        ref = reference(case, size)
        tol = tol32 if case.dtype == np.float32 else tol64
        for rank, res in enumerate(results):
            for key, want in ref.items():
                got = res[key]
                if key.endswith((".y", ".dx")):
                    want = shard(case, size, rank, want)
                assert got.dtype == want.dtype and got.shape == want.shape, key
                np.testing.assert_allclose(got, want, rtol=tol, atol=tol,
                                           err_msg=f"rank {rank} of {size}: {key}")
            for key in res:
                if key.startswith(case.name + ".") and not key.endswith((".y", ".dx")):
                    # Statistics, gradients and buffers: the same bits on every rank.
                    np.testing.assert_array_equal(res[key], results[0][key],
                                                  err_msg=f"rank {rank} vs 0: {key}")
        x, _ = batch(case, size, 0)
        reduced = tuple(i for i in range(x.ndim) if i != case.axis % x.ndim)
        for tag, axis in (("chan", reduced), ("all", None)):
            want = nbbn.moments(x, axis=axis)
            got = results[0][f"{case.name}.moments.{tag}"]
            assert np.all(got[0] == want.count), (case.name, tag)
            np.testing.assert_allclose(got[1], want.mean, rtol=1e-13, atol=1e-13 * case.offset)
            np.testing.assert_allclose(got[2], want.m2, rtol=1e-12)
    for rank, res in enumerate(results):
        assert "Expected more than 1 value per channel" in str(res["too_few.raised"]), rank
        np.testing.assert_array_equal(res["too_few.running_mean"], 0.0)


def _main(backend, outdir):
    if backend == "mpi":
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
    elif backend == "torch":
        from datetime import timedelta

        import torch.distributed as dist
        from nbbn.distributed import TorchComm
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # Rendezvous through a file in OUTDIR (a TCP store would listen on every interface);
        # gloo's own connections stay on the interface GLOO_SOCKET_IFNAME names (lo).
        store = os.path.join(os.path.abspath(outdir), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=size, timeout=timedelta(seconds=60))
        comm = TorchComm()
    else:
        raise SystemExit(f"unknown backend {backend!r}")
    out = run_rank(comm, rank, size)
    np.savez(os.path.join(outdir, f"rank{rank}.npz"), **out)
    if backend == "torch":
        dist.destroy_process_group()


if __name__ == "__main__":
    _main(*sys.argv[1:3])
