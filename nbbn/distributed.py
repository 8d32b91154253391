"""Batch norm and statistics across processes: ``allreduce_moments``, ``SyncBatchNorm``.

Every rank holds a shard of one batch (shards may be unequal or empty). Only
small per-channel vectors cross between ranks:

- forward: each rank's ``(count, mean, mean_low, m2)`` per channel (the mean a
  double-double, see ``Moments``), all-gathered and merged pairwise with Chan's
  formula in rank order, so every rank computes the same bits from the same
  inputs, as accurate as one reduction of the whole batch;
- backward: each rank's ``sum(dy)`` and ``sum(dy * (x - mean))`` per channel,
  all-gathered and added in rank order.

A communicator is anything with ``rank``, ``size`` and
``allgather(a) -> (size, len(a))``, a 1-D float64 array from every rank in
rank order (the same length on every rank). ``TorchComm`` adapts a
``torch.distributed`` process group to it; an ``mpi4py`` communicator is
wrapped automatically. Neither mpi4py nor PyTorch is imported by this module.

Every rank must make the same calls in the same order (they are collective):
a rank that raises before communicating leaves the others waiting.
"""
import numpy as np

from . import _dispatch
from .layer import BatchNorm, BatchRenorm
from ._moments import Moments, _scalar_or_array

__all__ = ["SyncBatchNorm", "SyncBatchRenorm", "TorchComm", "allreduce_moments"]


# ---- communicators -------------------------------------------------------------------------


class _MPIComm:
    """An mpi4py communicator through the buffer-based ``Allgather`` (no pickling)."""

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def allgather(self, a):
        a = np.ascontiguousarray(a, np.float64)
        out = np.empty((self.size, a.size), np.float64)
        self.comm.Allgather(a, out)
        return out


class TorchComm:
    """A ``torch.distributed`` process group as an nbbn communicator.

    ``group=None`` is the default (world) group; ``torch.distributed`` must be
    initialized. The CPU backend (gloo) exchanges CPU tensors; a NCCL group
    exchanges them on the current CUDA device. Only C values per rank move.
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchComm needs an initialized torch.distributed process group "
                               "(torch.distributed.init_process_group)")
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._device = None
        if str(dist.get_backend(group)).lower() == "nccl":
            import torch
            self._device = torch.device("cuda", torch.cuda.current_device())

    def allgather(self, a):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a, np.float64))
        if self._device is not None:
            t = t.to(self._device)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self._dist.all_gather(parts, t, group=self.group)
        return np.stack([p.cpu().numpy() for p in parts]) if parts else np.empty((0, t.numel()))

    def __repr__(self):
        return f"TorchComm(rank={self.rank}, size={self.size})"


def _as_comm(comm):
    """The nbbn communicator for ``comm`` (mpi4py communicators are wrapped)."""
    if isinstance(comm, (_MPIComm, TorchComm)):
        return comm
    if hasattr(comm, "Allgather") and hasattr(comm, "Get_rank") and hasattr(comm, "Get_size"):
        return _MPIComm(comm)
    if all(hasattr(comm, name) for name in ("rank", "size", "allgather")):
        return comm
    raise TypeError("comm must be an mpi4py communicator, a nbbn.distributed.TorchComm or an "
                    "object with rank, size and allgather(array) -> (size, n) array; got "
                    f"{type(comm).__name__}")


def _gather(comm, a):
    """All ranks' 1-D float64 ``a`` as a (size, len(a)) array, rank order."""
    a = np.ascontiguousarray(a, np.float64).ravel()
    rows = np.asarray(comm.allgather(a), np.float64)
    if rows.shape != (comm.size, a.size):
        raise ValueError(f"communicator returned shape {rows.shape} from allgather, expected "
                         f"{(comm.size, a.size)} (do all ranks pass the same number of values?)")
    return rows


def _host(a):
    """A float64 NumPy array of ``a`` (GPU arrays: per-channel vectors, copied to the host)."""
    return np.asarray(_dispatch.backend(a=a).to_host(a), np.float64)


# ---- collectives on statistics -------------------------------------------------------------


def _allreduce_moments(m, comm):
    """``Moments`` merged over ranks; per-element float64 arrays of m.mean's shape."""
    mean = _host(m.mean)
    shape = mean.shape
    scalar_count = np.ndim(m.count) == 0 and not hasattr(m.count, "__cuda_array_interface__")
    count = np.asarray(m.count, np.float64) if scalar_count else _host(m.count)
    count = count.reshape(1) if scalar_count else np.broadcast_to(count, shape).ravel()
    n_count = count.size
    low = np.broadcast_to(_host(m.mean_low), shape)
    rows = _gather(comm, np.concatenate([count, mean.ravel(), low.ravel(), _host(m.m2).ravel()]))
    parts = []
    for row in rows:  # rank order: every rank merges the same values the same way
        c = row[:n_count]
        c = int(c[0]) if scalar_count else c.astype(np.int64).reshape(shape)
        mean, low, m2 = (v.reshape(shape) for v in np.split(row[n_count:], 3))
        parts.append(Moments.with_mean_low(c, mean, m2, low))
    total = Moments.combine(parts)
    count = int(total.count) if scalar_count else np.asarray(total.count, np.int64)
    return Moments.with_mean_low(count, total.mean, total.m2, total.mean_low)


def allreduce_moments(m, comm):
    """The ``Moments`` of the union of every rank's data, on every rank (collective).

    ``m`` is this rank's ``Moments`` (e.g. ``nbbn.moments(shard, axis=...)``);
    its mean/m2 must have the same shape on every rank. Ranks may hold
    unequal amounts of data or none (count 0): each rank's state is weighed
    by its own count (Chan et al.), so the result is exact, and every rank
    gets bit-identical values (merged in rank order). ``comm``: an mpi4py
    communicator, a ``TorchComm`` or any object with ``rank``, ``size`` and
    ``allgather``. GPU arrays in ``m`` are copied to the host (small vectors);
    the result is on the host.
    """
    if not isinstance(m, Moments):
        m = Moments(*m)
    total = _allreduce_moments(m, _as_comm(comm))
    return Moments.with_mean_low(total.count, *map(_scalar_or_array,
                                                    (total.mean, total.m2, total.mean_low)))


def _allreduce_sum(comm, *vectors):
    """Elementwise sums over ranks of equally long float64 vectors, added in rank order."""
    sizes = [v.size for v in vectors]
    rows = _gather(comm, np.concatenate([_host(v).ravel() for v in vectors]))
    total = rows[0].copy()
    for row in rows[1:]:
        total += row
    return tuple(np.split(total, np.cumsum(sizes)[:-1]))


# ---- the layer -----------------------------------------------------------------------------


class _Synchronized:
    """The hooks that make a layer's batch the union of every rank's shard (``comm``)."""

    def __repr__(self):
        return "Sync" + super().__repr__() + f" on {self.comm.size} ranks"

    # The all-reduces move per-channel float64 vectors through the host (C values per rank,
    # from and back to the device for CUDA arrays); the per-element work stays on its side.

    def _batch_stats(self, be, call):
        mean, m2, mean_low = be.batch_moments(call, mean_low=True)
        local = Moments.with_mean_low(call.plan.count, mean, m2, mean_low)
        total = _allreduce_moments(local, self.comm)
        var = total.m2 / total.count if total.count else np.full(np.shape(total.m2), np.nan)
        return total.count, be.to_float64(total.mean), be.to_float64(var)

    def _reduce_sums(self, be, sum_dy, sum_dy_xmu, batch_stats):
        # dx needs the batch's sums when the statistics came from the batch; the
        # parameter gradients always do. Same decision on every rank (configuration).
        if not batch_stats and self.weight is None:
            return sum_dy, sum_dy_xmu
        return tuple(map(be.to_float64, _allreduce_sum(self.comm, sum_dy, sum_dy_xmu)))


class SyncBatchNorm(_Synchronized, BatchNorm):
    """``BatchNorm`` whose batch is the union of every rank's shard.

    Each rank calls ``forward``/``backward`` on its own shard (any size,
    including empty); the statistics, the backward sums and the running
    statistics' count are those of the whole batch, so every rank's output
    shard, dx shard, ``grad_weight``/``grad_bias`` and running buffers equal
    those of one ``BatchNorm`` on the concatenated batch (to rounding).
    ``grad_weight``/``grad_bias`` are thus already summed over ranks: don't
    all-reduce them again. Calls are collective: every rank must call
    ``forward`` and ``backward`` in the same order and mode.

    ``comm``: an mpi4py communicator, a ``TorchComm`` or any object with
    ``rank``, ``size`` and ``allgather(array) -> (size, n)``. Host or CUDA arrays
    (``device="cuda"``), as ``BatchNorm``.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, comm, axis=1, dtype=np.float32, device="cpu"):
        comm = _as_comm(comm)
        BatchNorm.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                           axis=axis, dtype=dtype, device=device)
        self.comm = comm


class SyncBatchRenorm(_Synchronized, BatchRenorm):
    """``BatchRenorm`` whose batch is the union of every rank's shard: r and d come from the
    merged moments (the whole batch's), and every rank's output, gradients and running
    buffers equal those of one ``BatchRenorm`` on the concatenated batch (to rounding).
    Collective calls and ``comm`` as ``SyncBatchNorm``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.01, affine=True, *, comm, rmax=3.0,
                 dmax=5.0, axis=1, dtype=np.float32, device="cpu"):
        comm = _as_comm(comm)
        BatchRenorm.__init__(self, num_features, eps, momentum, affine, rmax=rmax, dmax=dmax,
                             axis=axis, dtype=dtype, device=device)
        self.comm = comm
