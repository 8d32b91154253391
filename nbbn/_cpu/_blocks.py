"""How the CPU kernels cut an (outer, C, inner) view into work.

Rows (inner > 1): items are BLOCK-sized pieces of the rows x[o, c, :]; short rows
are read as columns instead (``short_rows``).

Columns (inner == 1, channels-last): each thread takes a contiguous share of
the rows x[r, :] and walks it as a few sequential streams in lockstep
(``stream_split``): rows r, r + step, r + 2*step, ... are handled in one sweep
across the channels. Each stream reads memory in order, which the hardware
prefetchers need (interleaving rows of one stream, or walking a tile of
columns down the rows, costs 1.5-4x here), and the streams of one sweep share
the per-channel loads: coefficients, and a reduction's float64 partial sums,
which add the streams' values in registers before touching memory.

With few channels a row is too short to vectorize, so contiguous rows are
regrouped (not in small arrays: AS_LAID_OUT): (R, C) is viewed as (R // k, k*C)
— k copies of each channel side by side — plus R % k leftover rows; each
family folds the k copies back into C channels.

Virtual batches (ghost batch norm) split the outer rows into groups of
``group_rows`` consecutive rows (all rows: one group), each with its own
statistics and coefficients: per-channel vectors become (groups, C) arrays. Row
items find their group by one division per item. Channels-last kernels walk a
thread's rows in runs of one group (``run_stop``), each run as lockstep streams
with the group's coefficients. A reduction keeps the state of each thread's
first run apart (``heads``: the only run a group may share with other threads)
and writes the others straight into the group's state, which no other thread
touches; the heads are merged in afterwards (``head_groups``). A regrouped row
holds rows of one group only: k must divide group_rows.
"""
import math

import numpy as np

from ._jit import PARALLEL_MIN_ELEMENTS, helper

# Elements per row item: small enough to stay in L1/L2 between two passes.
BLOCK = 4096
# Channels-last rows shorter than this are regrouped (see above).
MIN_ROW_WIDTH = 256
# Regrouped rows are a multiple of this many elements (whole vectors, no scalar remainder).
ROW_QUANTUM = 16
# Lockstep streams per thread (see the module docstring), as (rows of fewer than
# WIDE_ROW channels, rows of WIDE_ROW or more). More streams share more of the
# per-channel loads but slow the prefetchers down; the loads only matter where
# the per-channel vectors no longer stay in L1 beside the data. Measured (51-67 MB
# float32, 1 and 2 threads): the reduction's 4 streams cost 5-25% on rows of 256-512
# channels and save 20-40% on 1024-4096; dx's 2 streams (6 arrays' streams) cost
# 10-15% on rows of 256 and save 20-30% on 1024; affine's 2 gain on both.
WIDE_ROW = 1024
# Rows (x[o, c, :]) of at most this many elements are read as channels-last columns by the
# elementwise and backward passes (``short_rows``; not in small arrays: AS_LAID_OUT): in the
# rows kernels the per-row work dominates them (one thread, 4-8 MB float32: 2-3.5x slower at
# 16 and 32 elements, even at 64); the statistics keep reading rows (as fast either way at 16).
SHORT_ROW = 32
# Arrays of fewer elements are read as they are laid out: no regrouped rows, short rows read
# as rows. Such calls' time is their Python steps, and the small calls that run in one
# compiled call (``backend.fused``: half the size at which a backward goes parallel, so
# every pass is serial anyway) read them so: every path agrees with those bit for bit.
AS_LAID_OUT = PARALLEL_MIN_ELEMENTS // 2
AFFINE_STREAMS = 2
GRAD_STREAMS = (1, 2)
SUMS_STREAMS = (2, 4)



def short_rows(*arrays):
    """``(n_inner, planes)`` for 3-D (outer, C, inner) views whose rows are short (2 to
    SHORT_ROW elements): each (None aside) viewed as 2-D (outer, C * inner), channel c in
    columns c * inner to (c + 1) * inner - 1; None where the rows are not short, the arrays
    small (AS_LAID_OUT) or an array has no such view."""
    n_outer, nchan, n_inner = arrays[0].shape
    if not short_columns(n_inner, arrays[0].size):
        return None
    try:
        return n_inner, tuple(None if a is None else a.reshape(n_outer, nchan * n_inner, copy=False)
                              for a in arrays)
    except ValueError:  # the channel and inner axes do not merge
        return None


def short_columns(n_inner, size):
    """Whether rows of ``n_inner`` elements, in arrays of ``size`` elements, are read as
    columns (``short_rows``)."""
    return 1 < n_inner <= SHORT_ROW and size >= AS_LAID_OUT


def widen(*arrays, group_rows=None):
    """``(k, wide, rest)`` for same-shaped 2-D (R, C) arrays (see the module docstring);
    None entries (a kernel's absent optional arrays) stay None.

    ``k == 1`` means no regrouping: ``wide`` are the arrays themselves.
    Otherwise ``wide`` are (R // k, k*C) views and ``rest`` the leftover
    (R % k, C) rows, or None when there are none. With virtual batches of
    ``group_rows`` rows, only where k divides it (a group is then group_rows // k
    wide rows, and the leftover rows are the last group's).
    """
    n_rows, nchan = arrays[0].shape
    given = [a for a in arrays if a is not None]
    if not regroups(n_rows, nchan) or any(a.strides[0] != nchan * a.strides[1] for a in given):
        return 1, arrays, None
    k = -(-MIN_ROW_WIDTH // nchan)
    step = ROW_QUANTUM // math.gcd(nchan, ROW_QUANTUM)  # k*C a whole number of quanta
    k = -(-k // step) * step
    if group_rows is not None and group_rows % k:  # a virtual batch must be whole wide rows
        return 1, arrays, None
    cut = n_rows - n_rows % k
    # Rows that follow each other in memory merge: these reshapes are views.
    wide = tuple(None if a is None else a[:cut].reshape(cut // k, k * nchan) for a in arrays)
    rest = tuple(None if a is None else a[cut:] for a in arrays) if cut < n_rows else None
    return k, wide, rest


def regroups(n_rows, nchan):
    """Whether ``widen`` regroups (n_rows, nchan) arrays with contiguous rows: rows too short
    to vectorize, in arrays not read as laid out (AS_LAID_OUT)."""
    return 0 < nchan < MIN_ROW_WIDTH and n_rows * nchan >= AS_LAID_OUT


def tiled(a, k):
    """Per-channel coefficients, (groups, C), for k regrouped copies of each channel (see
    ``widen``): (groups, k*C)."""
    return a if k == 1 else np.tile(a, (1, k))


@helper
def blocks_per_row(n_inner):
    """Row items (BLOCK-sized pieces) in a row of ``n_inner`` elements."""
    return (n_inner + BLOCK - 1) // BLOCK


@helper
def row_items(shape):
    """The row items of an (outer, C, inner) view's rows x[o, c, :]: the units its rows
    kernels split among threads (``shape[0]`` groups of rows: the items of one group)."""
    return shape[0] * shape[1] * blocks_per_row(shape[2])


@helper
def row_block(item, nchan, n_inner):
    """(o, c, start, stop) of row item ``item``: block ``x[o, c, start:stop]``."""
    row, blk = divmod(item, blocks_per_row(n_inner))
    o, c = divmod(row, nchan)
    start = blk * BLOCK
    return o, c, start, min(n_inner, start + BLOCK)


@helper
def next_block(o, c, start, stop, nchan, n_inner):
    """The row item after block ``x[o, c, start:stop]``, in ``row_block``'s order, stepped
    rather than divided out (two integer divisions per item cost ~1 us of the 5 us backward
    of 8x16x8x8, rows of 64 values)."""
    if stop == n_inner:
        start = 0
        c += 1
        if c == nchan:
            c = 0
            o += 1
    else:
        start = stop
    return o, c, start, min(n_inner, start + BLOCK)


@helper
def stream_step(first, stop, n_streams):
    """Rows first:stop as n_streams streams: sweep ``r`` in ``range(first, first + step)``
    covers rows r, r + step, ..., r + (n_streams - 1) * step; rows ``first + n_streams *
    step`` to ``stop`` are left over, one stream each. Returns ``step``."""
    return (stop - first) // n_streams


@helper
def run_stop(r, stop, group_rows):
    """Where the run of units (rows or row items) from r ends: at the end of r's group
    (``group_rows`` units each) or at ``stop``."""
    return min(stop, (r // group_rows + 1) * group_rows)


@helper
def head_groups(n_units, group_rows, nthreads):
    """The group of each thread's first run (``heads``), -1 for threads without work,
    when thread t takes units ``t * n_units // nthreads`` on."""
    first = np.empty(nthreads, np.int64)
    for t in range(nthreads):
        start = t * n_units // nthreads
        first[t] = start // group_rows if start < (t + 1) * n_units // nthreads else -1
    return first
