"""Launch configuration from the shape, and block-level merges shared by the reductions.

Threads of a block form (TY, TX) with TX fastest. A reduction's threads
accumulate privately, then ``block_merge``/``block_sum2`` combine the threads
that share a channel: a shared-memory tree, whose first five levels are warp
shuffles on a real GPU (``USE_SHUFFLE``, the one switch: the CUDA simulator
has no warp intrinsics, so it forces the shared-memory path). Partial states
of the blocks of one channel go to a (k, P, C) float64 buffer that a final
per-channel kernel merges (grid-level merge), so that a few channels with
huge planes still fill the GPU.
"""
import math

from numba import cuda, float64

from .. import _math

SIMULATOR = bool(cuda.config.ENABLE_CUDASIM)
USE_SHUFFLE = not SIMULATOR  # the one switch between warp shuffles and shared memory

WARP = 32
FULL_MASK = 0xFFFFFFFF
MAX_THREADS = 512   # shared arrays are sized for this many threads per block
THREADS = 256       # threads per block (a power of 2, >= WARP on a GPU, <= MAX_THREADS)
BLOCKS_PER_SM = 4   # reduction blocks wanted per multiprocessor
MIN_WORK = 16       # elements per thread before a reduction adds blocks
ELEMENTWISE_WAVES = 8  # elementwise grids: at most this many times the reduction target
MAX_GRID_Y = 65535

# The shared per-element math, compiled for the device.
chan_merge = cuda.jit(device=True)(_math.chan_merge)

_sm_count = None


def sm_count():
    global _sm_count
    if _sm_count is None:
        try:
            _sm_count = int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
        except Exception:  # the simulator's fake device has no attributes
            _sm_count = 2
    return _sm_count


def target_blocks():
    """Reduction blocks that fill the device."""
    return sm_count() * BLOCKS_PER_SM


def pow2_at_least(n):
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def cdiv(a, b):
    return -(-a // b)


class Config:
    """A launch: grid, block, and the split of each channel's work (bx x by blocks)."""

    def __init__(self, grid, block, bx=1, by=1):
        self.grid, self.block, self.bx, self.by = grid, block, bx, by

    @property
    def parts(self):
        """Partial states per channel (blocks per channel)."""
        return self.bx * self.by

    def __repr__(self):
        return f"Config(grid={self.grid}, block={self.block}, bx={self.bx}, by={self.by})"


def threads():
    """Threads per block: THREADS, at least a warp on a GPU (the shuffle path needs it)."""
    return THREADS if SIMULATOR else max(THREADS, WARP)


def rows_config(n_outer, nchan, n_inner, reduction=True):
    """x[outer, C, inner] with inner > 1: TX threads along inner (contiguous), TY along outer.

    A reduction's grid is (bx * by, channels): each channel's plane split into
    bx blocks along inner and by along outer, as many as fill the device with at
    least MIN_WORK elements per thread. An elementwise grid is (bx, rows).
    """
    t = threads()
    tx = min(t, pow2_at_least(n_inner))
    ty = t // tx
    if reduction:
        want = max(1, target_blocks() // max(1, nchan))
        want = min(want, max(1, cdiv(n_outer * n_inner, t * MIN_WORK)))
        bx = min(cdiv(n_inner, tx), want)
        by = min(cdiv(n_outer, ty), max(1, want // bx))
        return Config((bx * by, min(nchan, MAX_GRID_Y)), (tx, ty), bx, by)
    cap = target_blocks() * ELEMENTWISE_WAVES
    bx = min(cdiv(n_inner, tx), cap)
    by = min(cdiv(n_outer * nchan, ty), max(1, cap // bx), MAX_GRID_Y)
    return Config((bx, by), (tx, ty))


def columns_config(n_rows, nchan, reduction=True):
    """x[rows, C] (channels-last): TX threads along C (coalesced), TY along rows.

    Grid (channel tiles, by): each channel's column split into by blocks.
    """
    t = threads()
    tx = min(t, WARP if reduction else t, pow2_at_least(nchan))
    ty = t // tx
    cx = cdiv(nchan, tx)
    if reduction:
        want = max(1, target_blocks() // cx)
        by = min(want, max(1, cdiv(n_rows, ty * MIN_WORK)), MAX_GRID_Y)
    else:
        by = min(cdiv(n_rows, ty), max(1, target_blocks() * ELEMENTWISE_WAVES // cx),
                 MAX_GRID_Y)
    return Config((cx, by), (tx, ty), 1, by)


def channels_config(nchan):
    """One thread per channel (per-channel arithmetic: scale/shift, EMA)."""
    t = min(threads(), pow2_at_least(nchan))
    return Config((max(1, cdiv(nchan, t)),), (t,))


def final_config(nchan):
    """The grid-level merge: a block per channel, threads over the partial states."""
    return Config((max(1, min(nchan, 4 * target_blocks())),), (threads(),))


@cuda.jit(device=True)
def rows_walk(bx):
    """This thread's walk in a rows reduction over x[outer, C, inner]:
    ``(tid, o0, ostep, i0, istep)``. Block b = (by_i, bx_i) reads rows
    o = by_i*TY + ty + k*by*TY and elements i = bx_i*TX + tx + m*bx*TX."""
    ntx = cuda.blockDim.x
    nty = cuda.blockDim.y
    b = cuda.blockIdx.x
    by = cuda.gridDim.x // bx
    return (cuda.threadIdx.y * ntx + cuda.threadIdx.x, (b // bx) * nty + cuda.threadIdx.y,
            by * nty, (b % bx) * ntx + cuda.threadIdx.x, bx * ntx)


@cuda.jit(device=True)
def columns_walk():
    """This thread's walk in a channels-last reduction over x[rows, C]: ``(tid, part, r0,
    rstep)``: grid row ``part`` of blocks reads rows r = part*TY + ty + k*gridDim.y*TY."""
    nty = cuda.blockDim.y
    part = cuda.blockIdx.y
    return (cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x, part,
            part * nty + cuda.threadIdx.y, cuda.gridDim.y * nty)


@cuda.jit(device=True)
def _tree_merge(sn, sm, sq, tid, count, width):
    s = count // 2
    while s >= width:
        if tid < s:
            n, m, q = chan_merge(sn[tid], sm[tid], sq[tid], sn[tid + s], sm[tid + s],
                                 sq[tid + s])
            sn[tid] = n
            sm[tid] = m
            sq[tid] = q
        cuda.syncthreads()
        s //= 2


@cuda.jit(device=True)
def block_merge(n, mean, m2, tid, nthreads, width):
    """Merge the (n, mean, m2) states of threads with equal ``tid % width``.

    Returns the merged state, valid in threads ``tid < width``. Every thread of
    the block must call it (it synchronizes). nthreads and width are powers of 2.
    """
    sn = cuda.shared.array(MAX_THREADS, float64)
    sm = cuda.shared.array(MAX_THREADS, float64)
    sq = cuda.shared.array(MAX_THREADS, float64)
    cuda.syncthreads()  # the previous call's readers are done
    if USE_SHUFFLE and width < WARP:
        off = WARP // 2
        while off >= width:
            n_b = cuda.shfl_down_sync(FULL_MASK, n, off)
            mean_b = cuda.shfl_down_sync(FULL_MASK, mean, off)
            m2_b = cuda.shfl_down_sync(FULL_MASK, m2, off)
            n, mean, m2 = chan_merge(n, mean, m2, n_b, mean_b, m2_b)
            off //= 2
        lane = tid % WARP
        if lane < width:
            slot = (tid // WARP) * width + lane
            sn[slot] = n
            sm[slot] = mean
            sq[slot] = m2
        count = (nthreads // WARP) * width
    else:
        sn[tid] = n
        sm[tid] = mean
        sq[tid] = m2
        count = nthreads
    cuda.syncthreads()
    _tree_merge(sn, sm, sq, tid, count, width)
    return sn[tid], sm[tid], sq[tid]


@cuda.jit(device=True)
def _tree_sum(sa, sb, tid, count, width):
    s = count // 2
    while s >= width:
        if tid < s:
            sa[tid] += sa[tid + s]
            sb[tid] += sb[tid + s]
        cuda.syncthreads()
        s //= 2


@cuda.jit(device=True)
def block_sum2(a, b, tid, nthreads, width):
    """Sum two float64 values over the threads with equal ``tid % width`` (as block_merge)."""
    sa = cuda.shared.array(MAX_THREADS, float64)
    sb = cuda.shared.array(MAX_THREADS, float64)
    cuda.syncthreads()
    if USE_SHUFFLE and width < WARP:
        off = WARP // 2
        while off >= width:
            a += cuda.shfl_down_sync(FULL_MASK, a, off)
            b += cuda.shfl_down_sync(FULL_MASK, b, off)
            off //= 2
        lane = tid % WARP
        if lane < width:
            slot = (tid // WARP) * width + lane
            sa[slot] = a
            sb[slot] = b
        count = (nthreads // WARP) * width
    else:
        sa[tid] = a
        sb[tid] = b
        count = nthreads
    cuda.syncthreads()
    _tree_sum(sa, sb, tid, count, width)
    return sa[tid], sb[tid]


def launch(kernel, config, *args):
    kernel[config.grid, config.block](*args)

