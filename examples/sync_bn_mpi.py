"""Synchronized batch norm over MPI ranks: every rank normalizes with the whole batch's statistics.

    mpiexec -n 2 python -m mpi4py examples/sync_bn_mpi.py

Each rank holds an unequal shard of one batch (rank r: r + 3 samples; any
size works, including 0). After a few training steps every rank's output,
gradients and running statistics are checked against one ``nbbn.BatchNorm``
on the concatenated batch, computed on rank 0.
"""
import numpy as np
from mpi4py import MPI

import nbbn
from nbbn.distributed import SyncBatchNorm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
C = 8
sizes = [r + 3 for r in range(size)]                    # unequal shards
start = sum(sizes[:rank])

layer = SyncBatchNorm(C, comm=comm)                     # mpi4py communicator, used directly
reference = nbbn.BatchNorm(C) if rank == 0 else None    # one process, whole batch

worst = 0.0
for step in range(3):
    rng = np.random.default_rng(step)                   # the same whole batch on every rank
    x = (2.0 + 3.0 * rng.standard_normal((sum(sizes), C, 4, 4))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    shard = slice(start, start + sizes[rank])

    y = layer(x[shard])                                 # forward on this rank's shard
    dx = layer.backward(dy[shard])                      # gradients of the whole batch's loss
    layer.weight -= 0.1 * layer.grad_weight             # grads are already summed over ranks
    layer.bias -= 0.1 * layer.grad_bias

    ys, dxs = comm.gather(y, root=0), comm.gather(dx, root=0)
    if rank == 0:
        y_ref, dx_ref = reference(x), reference.backward(dy)
        reference.weight -= 0.1 * reference.grad_weight
        reference.bias -= 0.1 * reference.grad_bias
        worst = max(worst, np.abs(np.concatenate(ys) - y_ref).max(),
                    np.abs(np.concatenate(dxs) - dx_ref).max())

states = comm.gather(layer.state_dict(), root=0)
if rank == 0:
    for state in states:                                # every rank holds the same buffers
        for k, v in reference.state_dict().items():
            worst = max(worst, float(np.abs(state[k] - v).max()))
    print(f"{size} ranks, shards of {sizes} samples, {C} channels")
    print(f"largest difference from one BatchNorm on the whole batch: {worst:.1e}")
    assert worst < 1e-4
