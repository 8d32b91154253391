"""How the CPU kernels cut an (outer, C, inner) view into work.

Rows (inner > 1): items are BLOCK-sized pieces of the rows x[o, c, :].
Columns (inner == 1, channels-last): items are runs of rows x[r, :], read in
memory order and vectorized across channels. With few channels a row is too
short to vectorize, so contiguous rows are regrouped: (R, C) is viewed as
(R // k, k*C) — k copies of each channel side by side — plus R % k leftover
rows; each family folds the k copies back into C channels.

Virtual batches (ghost batch norm) split the outer rows into groups of
``group_rows`` consecutive rows (0: one group, all rows), each with its own
statistics and coefficients, which are then per (group, channel): vectors of
groups * C values, index g * C + c. A kernel finds a row's group by one
division per row (or per row item); a tile of a reduction never straddles two
groups; a regrouped row holds rows of one group only (k divides group_rows);
channels-last kernels walk a thread's rows in runs of one group
(``group_segment``).
"""
import numpy as np

from ._jit import helper

# Elements per row item: small enough to stay in L1/L2 between two passes.
BLOCK = 4096
# Channels-last rows shorter than this are regrouped (see above).
MIN_ROW_WIDTH = 256


def widen(*arrays, group_rows=0):
    """``(k, wide, rest)`` for same-shaped 2-D (R, C) arrays (see the module docstring).

    ``k == 1`` means no regrouping: ``wide`` are the arrays themselves.
    Otherwise ``wide`` are (R // k, k*C) views and ``rest`` the leftover
    (R % k, C) rows, or None when there are none. With virtual batches of
    ``group_rows`` rows, only where k divides it (then a group is group_rows // k
    wide rows, and the leftover rows are the last group's).
    """
    n_rows, nchan = arrays[0].shape
    k = -(-MIN_ROW_WIDTH // max(nchan, 1))
    contiguous_rows = all(a.strides[0] == nchan * a.strides[1] for a in arrays)
    # Small inputs: the regrouping costs more than it saves.
    if k == 1 or n_rows * nchan < 16 * MIN_ROW_WIDTH or not contiguous_rows or group_rows % k:
        return 1, arrays, None
    cut = n_rows - n_rows % k
    # Rows that follow each other in memory merge: these reshapes are views.
    wide = tuple(a[:cut].reshape(cut // k, k * nchan) for a in arrays)
    rest = tuple(a[cut:] for a in arrays) if cut < n_rows else None
    return k, wide, rest


def tiled(a, k, nchan=None):
    """Per-channel coefficients for k regrouped copies of each channel (see ``widen``); per
    (group, channel) ones of ``nchan`` channels are tiled within each group."""
    if k == 1:
        return a
    return np.tile(a, k) if nchan is None else np.tile(a.reshape(-1, nchan), (1, k)).ravel()


@helper
def group_size(group_rows, n_rows):
    """Rows per group: ``group_rows``, or all rows (at least 1) where it is 0 (one group)."""
    return group_rows if group_rows > 0 else max(n_rows, 1)


@helper
def group_segment(r, end, rows, nchan):
    """Rows r:stop of one group, the first run of rows r:end: ``(s, stop)``, s the group's
    first (group, channel) index (groups of ``rows`` rows)."""
    return r // rows * nchan, min(end, (r // rows + 1) * rows)


def group_count(group_rows, n_rows):
    """Groups of ``group_rows`` rows (0: one) in n_rows rows."""
    return -(-n_rows // group_rows) if group_rows > 0 else 1


@helper
def row_block(item, nchan, blocks_per_row, n_inner):
    """(o, c, start, stop) of row item ``item``: block ``x[o, c, start:stop]``."""
    row, blk = divmod(item, blocks_per_row)
    o, c = divmod(row, nchan)
    start = blk * BLOCK
    return o, c, start, min(n_inner, start + BLOCK)
