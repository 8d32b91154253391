"""Launch configurations from the shape, block-level merges, and the in-kernel helpers that
every kernel shares (index arithmetic, the walk over a channel's plane).

Rows kernels (``x[outer, C, inner]``, inner > 1) run a grid (C, blocks per channel): a
block works on one channel, its threads walk the channel's plane of ``outer * inner``
elements, thread t of the grid row taking elements t, t + T, t + 2T, ... (T threads per
channel), four at a time with the four loads issued together. The walk keeps the
element's row position and one memory offset per array, advanced by additions: no
division in the loop. Columns kernels (channels-last ``x[rows, C]``) run (channel tiles,
blocks along the rows), TX threads over consecutive channels.

Virtual batches (ghost batch norm) split the outer rows into groups of ``group_rows``
rows, each with its own statistics: the kernels then work on (group, channel) pairs
``j = g * C + c`` as they work on channels otherwise, a rows block on one pair's plane
(``group_plane``: grid (groups * C, blocks per pair)), a columns block on one group's
rows of a channel tile (``group_column_walk``: grid (groups * tiles, blocks along the
group)); per-pair vectors (statistics, sums, coefficients) are indexed by j, weight and
bias by c. One group (``group_rows`` = all rows) is plain batch norm.

Offsets are unsigned integers of the kernel's index type, 32-bit where every operand's
span is below 2**31 elements, else 64-bit (``index_type``): the host passes the strides
and sizes in that type and the kernels compute in it (``as_index``), one specialization
per width.

A reduction's threads accumulate privately, then ``block_merge``/``block_sum2`` combine
the threads that share a channel: a shared-memory tree whose first five levels are warp
shuffles on a real GPU (``USE_SHUFFLE``, the one switch: the CUDA simulator has no warp
intrinsics). Moments states are ``(n, mean, mean_low, m2)``, the mean a double-double,
merged by ``_math.chan_merge_dd`` (``merge``). The blocks of one channel then meet in
the same launch: each writes its partial state, and the last block to finish (an atomic
ticket per channel) merges them and writes the channel's results (``last_block``).
"""
import functools
import math
import types as pytypes

import numpy as np
from numba import cuda, float64, int32, int64, types

from .. import _math

SIMULATOR = bool(cuda.config.ENABLE_CUDASIM)
USE_SHUFFLE = not SIMULATOR  # the one switch between warp shuffles and shared memory

WARP = 32
FULL_MASK = 0xFFFFFFFF
MAX_THREADS = 512   # shared arrays are sized for this many threads per block
THREADS = 256       # threads per block (a power of 2, >= WARP on a GPU, <= MAX_THREADS)
BLOCKS_PER_SM = 4   # reduction blocks wanted per multiprocessor (occupancy the kernels keep)
MIN_WORK = 16       # elements per thread before a reduction adds blocks
UNROLL = 4          # elements a thread has in flight (the kernels' four-way walk)
ELEMENTWISE_WAVES = 8  # elementwise grids: at most this many times the reduction target
MAX_GRID_Y = 65535
# Rounds of four values a reduction's thread sums plainly before adding them into its
# float64 double-doubles (``folded``): a longer plain sum of squares of data on a coarse
# grid (1.7e9 + N(0, 1)) rounds with a bias (see ``_cpu/moments.CHUNK``).
CHUNK_ROUNDS = 16
ROUND0 = int32(0)  # the round counter: 32 bits (a register fewer than Python's int64)
PARTIAL_PAD = 16    # partial states of a channel start on a 128-byte line (float64)


@cuda.jit(device=True, cache=True)
def _fma(a, b, c):
    return cuda.fma(a, b, c)


def _device_math():
    """``_math``'s functions compiled for the device, calling each other and the FMA
    instruction (in the simulator, ``_math.fma``'s exact arithmetic). Strict as written:
    kernels are compiled without fastmath; whatever FMA contraction NVVM applies can only
    fuse a product into a sum of error terms (TwoSum has no product), which is harmless."""
    scope = dict(vars(_math), fma=_math.fma if SIMULATOR else _fma)
    for name, f in vars(_math).items():
        if isinstance(f, pytypes.FunctionType) and f.__module__ == _math.__name__ \
                and f is not _math.fma:
            scope[name] = cuda.jit(device=True, cache=True)(
                pytypes.FunctionType(f.__code__, scope, name, f.__defaults__))
    return scope


_device = _device_math()
merge = _device["chan_merge_dd"]              # two (n, mean, mean_low, m2) states
two_sum = _device["two_sum"]
shifted_moments = _device["shifted_moments"]  # a state from shifted double-double sums

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


def index_type(span):
    """The kernels' index dtype for operands spanning at most ``span`` elements: uint32 below
    2**31 (offsets plus a grid stride stay below 2**32), else uint64."""
    return np.uint32 if span < 2 ** 31 else np.uint64


def settings():
    """What launch configurations depend on besides the shape (tests patch the constants)."""
    return THREADS, BLOCKS_PER_SM, MIN_WORK, UNROLL, sm_count()


class Config:
    """A launch: grid, block, and the blocks each channel's work is split over (parts)."""

    def __init__(self, grid, block, parts=1):
        self.grid, self.block, self.parts = grid, block, parts

    def __repr__(self):
        return f"Config(grid={self.grid}, block={self.block}, parts={self.parts})"


def threads():
    """Threads per block: THREADS, at least a warp on a GPU (the shuffle path needs it)."""
    return THREADS if SIMULATOR else max(THREADS, WARP)


def rows_config(n_outer, nchan, n_inner, reduction=True, groups=1):
    """Grid (channels, blocks per channel) over x[outer, C, inner]: a reduction spreads a
    channel over as many blocks as fill the device with at least MIN_WORK elements per
    thread; an elementwise pass gives each thread about UNROLL elements per round. One
    channel per block and no loop over channels: nothing of a channel's walk stays live
    across the block merges, which keeps the registers at the planned occupancy. With
    ``groups`` virtual batches of n_outer rows each: (groups * C, blocks per pair)."""
    t = threads()
    plane = n_outer * n_inner
    nchan = max(1, nchan * groups)
    if reduction:
        parts = min(max(1, target_blocks() // nchan), cdiv(plane, t * MIN_WORK))
    else:
        parts = min(cdiv(plane, t * UNROLL), target_blocks() * ELEMENTWISE_WAVES // nchan)
    parts = max(1, min(parts, MAX_GRID_Y))
    return Config((nchan, parts), (t,), parts)


def columns_config(n_rows, nchan, reduction=True, groups=1):
    """x[rows, C] (channels-last): TX threads along C (coalesced), TY along rows; grid
    (channel tiles, by): each channel's column split into by blocks (one tile per block).
    With ``groups`` virtual batches of n_rows rows each: (groups * tiles, by)."""
    t = threads()
    tx = min(t, WARP if reduction else t, pow2_at_least(nchan))
    ty = t // tx
    cx = max(1, cdiv(nchan, tx)) * groups
    if reduction:
        want = max(1, target_blocks() // cx)
        by = min(want, max(1, cdiv(n_rows, ty * MIN_WORK)), MAX_GRID_Y)
    else:
        by = min(cdiv(n_rows, ty), max(1, target_blocks() * ELEMENTWISE_WAVES // cx),
                 MAX_GRID_Y)
    return Config((cx, max(1, by)), (tx, ty), max(1, by))


def channels_config(nchan):
    """One thread per channel (per-channel arithmetic: scale/shift, EMA)."""
    return _channels_config(nchan, settings())


@functools.lru_cache(maxsize=256)
def _channels_config(nchan, _settings):
    t = min(threads(), pow2_at_least(nchan))
    return Config((max(1, cdiv(nchan, t)),), (t,))


def padded_parts(parts):
    return cdiv(parts, PARTIAL_PAD) * PARTIAL_PAD


# ---- index arithmetic ----------------------------------------------------------------------

if SIMULATOR:
    def cast(value, like):  # Python numbers: no width to keep
        return value

    def load_partial(partial, c, k, p):
        return partial[c, k, p]
else:
    from numba.cuda.extending import intrinsic

    @intrinsic
    def cast(typingctx, value, like):
        """``value`` converted to the numeric type of ``like`` (integers wrap)."""
        if not (isinstance(value, types.Number) and isinstance(like, types.Number)):
            return None

        def codegen(context, builder, signature, args):
            return context.cast(builder, args[0], signature.args[0], signature.return_type)

        return like(value, like), codegen

    @cuda.jit(device=True, cache=True)
    def load_partial(partial, c, k, p):
        """partial[c, k, p] read past the (incoherent) L1 cache: a value another block wrote
        in this launch."""
        return cuda.ldcg(partial, (int64(c), int64(k), int64(p)))

as_index = cast  # offsets: an integer in the kernel's index type (``like``: one of its operands)
U32 = np.uint32(0)  # ``cast(v, U32)``: v in 32 unsigned bits (pair indices: a grid's x fits)


@cuda.jit(device=True, cache=True)
def plane_walk(n_outer, n_inner):
    """This thread's walk over a channel's plane of n_outer * n_inner elements, in the
    index type of n_inner: ``(q, o, i, step, step_o, step_i, plane, limit, n_inner)``: its
    first element q = (o, i), the grid stride in elements and in (rows, elements), the
    plane's size, and the bound below which four elements are left (``four_limit``)."""
    q = as_index(cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x, n_inner)
    step = as_index(cuda.gridDim.y * cuda.blockDim.x, n_inner)
    o = as_index(q // n_inner, n_inner)
    step_o = as_index(step // n_inner, n_inner)
    plane = as_index(n_outer * n_inner, n_inner)
    return (q, o, as_index(q - o * n_inner, n_inner), step, step_o,
            as_index(step - step_o * n_inner, n_inner), plane, four_limit(plane, step),
            n_inner)


@cuda.jit(device=True, cache=True)
def group_plane(nchan, group_rows, n_outer):
    """A rows block's (group, channel) pair: ``(j, c, first, rows)``, its index j = g * C +
    c = blockIdx.x, its channel, and its group's first row and rows (the last group may
    be shorter), in n_outer's index type."""
    j = cuda.blockIdx.x
    g = as_index(cast(j, U32) // cast(nchan, U32), n_outer)  # int64's division costs registers
    first = as_index(g * group_rows, n_outer)
    return j, j - g * nchan, first, min(group_rows, as_index(n_outer - first, n_outer))


@cuda.jit(device=True, cache=True)
def group_column(nchan):
    """This thread's (group, channel) pair in a channels-last kernel: ``(g, j, c)``, j = g *
    C + c (c may be past the last channel: no work; TX threads over consecutive channels)."""
    tiles = (nchan + cuda.blockDim.x - 1) // cuda.blockDim.x
    g = cuda.blockIdx.x // tiles
    c = (cuda.blockIdx.x - g * tiles) * cuda.blockDim.x + cuda.threadIdx.x
    return g, g * nchan + c, c


@cuda.jit(device=True, cache=True)
def group_column_walk(nchan, group_rows, n_rows):
    """This thread's pair and rows in a channels-last kernel with virtual batches:
    ``(j, c, first, rows, r0, rstep, limit)``: pair j and channel c (``group_column``), the
    group's first row and rows, and the thread's rows r0 + k*rstep within the group (TY
    threads over rows, grid row ``blockIdx.y`` of blocks), four at a time while r < limit."""
    g, j, c = group_column(nchan)
    first = as_index(as_index(g, n_rows) * group_rows, n_rows)
    rows = min(group_rows, as_index(n_rows - first, n_rows))
    r0 = as_index(cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, n_rows)
    rstep = as_index(cuda.gridDim.y * cuda.blockDim.y, n_rows)
    return j, c, first, rows, r0, rstep, four_limit(rows, rstep)


@cuda.jit(device=True, cache=True)
def operand_walk(strides, walk, c, row0):
    """(offset of the walk's first element in channel c of the plane from row ``row0``,
    (offset step of one grid stride, extra offset when the row wraps)) for an operand of
    element ``strides``."""
    _, o, i, _, step_o, step_i, _, _, n_inner = walk
    s_o, s_c, s_i = strides
    first = as_index(as_index(as_index(o + row0, s_i) * s_o, s_i)
                     + as_index(as_index(c, s_i) * s_c, s_i)
                     + as_index(i * s_i, s_i), s_i)
    step = as_index(as_index(step_o * s_o, s_i) + as_index(step_i * s_i, s_i), s_i)
    return first, (step, as_index(s_o - as_index(n_inner * s_i, s_i), s_i))


@cuda.jit(device=True, cache=True)
def advance(i, step_i, n_inner):
    """The row position one grid stride on, and whether it wrapped into the next row."""
    i = as_index(i + step_i, n_inner)
    wrapped = i >= n_inner
    if wrapped:
        i = as_index(i - n_inner, n_inner)
    return i, wrapped


@cuda.jit(device=True, cache=True)
def moved(off, steps, wrapped):
    step, wrap = steps
    off = as_index(off + step, step)
    if wrapped:
        off = as_index(off + wrap, step)
    return off


@cuda.jit(device=True, cache=True)
def four(off, steps, i, step_i, n_inner):
    """Offsets of this and the next three elements of a walk, and the walk's (off, i) after them."""
    i1, w1 = advance(i, step_i, n_inner)
    i2, w2 = advance(i1, step_i, n_inner)
    i3, w3 = advance(i2, step_i, n_inner)
    i4, w4 = advance(i3, step_i, n_inner)
    o1 = moved(off, steps, w1)
    o2 = moved(o1, steps, w2)
    o3 = moved(o2, steps, w3)
    return off, o1, o2, o3, moved(o3, steps, w4), i4


@cuda.jit(device=True, cache=True)
def four_limit(plane, step):
    """Walks with q < four_limit(...) have four elements left (no overflow near 2**32)."""
    three = as_index(step * 3, step)
    if plane > three:
        return as_index(plane - three, step)
    return as_index(0, step)


@cuda.jit(device=True, cache=True)
def column_start(strides, r, c, rstep):
    """(offset of (r, c), offset step of ``rstep`` rows) for a channels-last operand."""
    s_r, s_c = strides
    first = as_index(as_index(r * s_r, s_r) + as_index(as_index(c, s_c) * s_c, s_c), s_r)
    return first, as_index(rstep * s_r, s_r)


@cuda.jit(device=True, cache=True)
def four_rows(off, row_step):
    """Offsets of this and the next three rows of a column walk, and the offset after them."""
    o1 = as_index(off + row_step, row_step)
    o2 = as_index(o1 + row_step, row_step)
    o3 = as_index(o2 + row_step, row_step)
    return off, o1, o2, o3, as_index(o3 + row_step, row_step)


@cuda.jit(device=True, cache=True)
def load4(x, a, b, c, d):
    """x at four offsets, the four loads issued together."""
    return x[a], x[b], x[c], x[d]


@cuda.jit(device=True, cache=True)
def folded(h1, h2, s1, s2):
    """A chunk's sums added into the thread's float64 sums h1, h2 (TwoSum): ``(h1, h2, e1,
    e2)``, the rounding errors e in the chunk sums' dtype, to start the next chunk with
    (then ``h + e`` is the sum so far to the chunk sums' precision: a double-double whose
    low part goes on accumulating, in two registers fewer than a separate one)."""
    h1, e1 = two_sum(h1, float64(s1))
    h2, e2 = two_sum(h2, float64(s2))
    if not math.isfinite(h1):  # inf or nan stays so (inf's error term would be nan)
        e1 = 0.0
    if not math.isfinite(h2):
        e2 = 0.0
    return h1, h2, cast(e1, s1), cast(e2, s2)


# ---- block-level merges ----------------------------------------------------------------------


@cuda.jit(device=True, cache=True)
def _tree_merge(sn, sh, sl, sq, tid, count, width):
    s = count // 2
    while s >= width:
        if tid < s:
            n, h, l, q = merge(sn[tid], sh[tid], sl[tid], sq[tid], sn[tid + s], sh[tid + s],
                               sl[tid + s], sq[tid + s])
            sn[tid] = n
            sh[tid] = h
            sl[tid] = l
            sq[tid] = q
        cuda.syncthreads()
        s //= 2


@cuda.jit(device=True, cache=True)
def block_merge(state, tid, nthreads, width, shuffle=True):
    """Merge the (n, mean, mean_low, m2) states of threads with equal ``tid % width``.

    Returns the merged state, valid in threads ``tid < width``. Every thread of
    the block must call it (it synchronizes). nthreads and width are powers of 2.
    ``shuffle=False``: the shared-memory tree even on a GPU (where the shuffles would cost
    a kernel its occupancy: ``moments.moments_columns``).
    """
    sn = cuda.shared.array(MAX_THREADS, float64)
    sh = cuda.shared.array(MAX_THREADS, float64)
    sl = cuda.shared.array(MAX_THREADS, float64)
    sq = cuda.shared.array(MAX_THREADS, float64)
    n, hi, lo, m2 = state
    cuda.syncthreads()  # the previous call's readers are done
    if USE_SHUFFLE and shuffle and width < WARP:
        off = WARP // 2
        while off >= width:
            n, hi, lo, m2 = merge(n, hi, lo, m2, cuda.shfl_down_sync(FULL_MASK, n, off),
                                  cuda.shfl_down_sync(FULL_MASK, hi, off),
                                  cuda.shfl_down_sync(FULL_MASK, lo, off),
                                  cuda.shfl_down_sync(FULL_MASK, m2, off))
            off //= 2
        lane = tid % WARP
        if lane < width:
            slot = (tid // WARP) * width + lane
            sn[slot] = n
            sh[slot] = hi
            sl[slot] = lo
            sq[slot] = m2
        count = (nthreads // WARP) * width
    else:
        sn[tid] = n
        sh[tid] = hi
        sl[tid] = lo
        sq[tid] = m2
        count = nthreads
    cuda.syncthreads()
    _tree_merge(sn, sh, sl, sq, tid, count, width)
    return sn[tid], sh[tid], sl[tid], sq[tid]


@cuda.jit(device=True, cache=True)
def _tree_sum(sa, sb, tid, count, width):
    s = count // 2
    while s >= width:
        if tid < s:
            sa[tid] += sa[tid + s]
            sb[tid] += sb[tid + s]
        cuda.syncthreads()
        s //= 2


@cuda.jit(device=True, cache=True)
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


@cuda.jit(device=True, cache=True)
def last_block(tickets, slot, parts, tid):
    """True in every thread of the block that is the last of ``parts`` blocks to call this
    for ticket ``slot`` (the blocks' partial writes are then visible to it); that block
    resets the ticket for the next launch. Every thread of the block must call it."""
    flag = cuda.shared.array(1, int32)
    cuda.threadfence()  # this block's partial state is visible before its ticket is taken
    cuda.syncthreads()
    if tid == 0:
        ticket = cuda.atomic.add(tickets, slot, 1)
        last = ticket == parts - 1
        flag[0] = 1 if last else 0
        if last:
            tickets[slot] = 0
    cuda.syncthreads()
    return flag[0] != 0
