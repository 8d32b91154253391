"""Large output arrays from a pool of recently freed memory.

A fresh large NumPy array is a fresh ``mmap``: its first write faults in and
zeroes every page (3-7 ms for 51 MB here), as much as the batch-norm pass that
fills it. A training loop frees and asks again for the same sizes on every
step, so ``empty`` hands out memory its callers have dropped, pages still
mapped.

Each large array is a view of a block of the pool through an owner object
(``_Owner``, the array's ``base``). Every view of the array keeps the owner
alive; when the last one is gone the owner returns its block. So each call
still gets a distinct array that nothing else references, and memory that
any array or view can still reach is never handed out again.

The pool keeps at most ``NBBN_POOL`` MiB of free blocks (default 1024; 0 turns
it off), oldest freed first out, and only blocks of at least ``MIN_BYTES``
(smaller arrays come from malloc's heap, already warm). It is thread-safe, and
a forked child starts with an empty pool.
"""
import collections
import math
import os
import threading
import warnings

import numpy as np

MIN_BYTES = 1 << 20
# Blocks come in whole pages, so that shapes of nearly one size share them.
PAGE = 4096
# Arrays start on a cache line (vector loads and stores never straddle two).
ALIGN = 64
DEFAULT_LIMIT_MIB = 1024


class Pool:
    """Free blocks (``_Block``) by size, at most ``limit`` bytes in all."""

    def __init__(self, limit):
        self.limit = limit
        self._lock = threading.Lock()
        self._free = collections.OrderedDict()   # token -> block, oldest freed first
        self._tokens = {}                         # block size -> tokens of free blocks
        self._next_token = 0
        self.cached = 0                           # bytes held in free blocks

    def empty(self, shape, dtype):
        """A new uninitialized C-ordered array; large ones are views of a pool block."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_BYTES or nbytes > self.limit:
            return np.empty(shape, dtype)
        size = -(-(nbytes + ALIGN) // PAGE) * PAGE
        block = self._take(size) or _Block(size)
        array = np.asarray(_Owner(self, block, shape, dtype))
        # A dtype the interface's typestr cannot name (bfloat16: "<V2") is viewed back.
        return array if array.dtype == dtype else array.view(dtype)

    def _take(self, size):
        with self._lock:
            tokens = self._tokens.get(size)
            if not tokens:
                return None
            block = self._free.pop(tokens.pop())  # the most recently freed: warmest
            if not tokens:
                del self._tokens[size]
            self.cached -= size
            return block

    def give(self, block):
        """Keep a block dropped by its owner, evicting the oldest ones over the limit.

        Owners die at any allocation in any thread (garbage collection), even inside
        this pool's own critical section: a block that cannot have the lock at once
        is simply freed, so this never waits.
        """
        if block.size > self.limit or not self._lock.acquire(blocking=False):
            return
        try:
            while self.cached + block.size > self.limit:
                token, old = self._free.popitem(last=False)
                tokens = self._tokens[old.size]
                tokens.remove(token)
                if not tokens:
                    del self._tokens[old.size]
                self.cached -= old.size
            self._next_token += 1
            self._free[self._next_token] = block
            if block.size not in self._tokens:
                self._tokens[block.size] = []
            self._tokens[block.size].append(self._next_token)
            self.cached += block.size
        finally:
            self._lock.release()

    def clear(self):
        """Free every cached block (and make a new lock: after fork() the old one may be
        held by a thread the child does not have)."""
        self._lock = threading.Lock()
        self._free.clear()
        self._tokens.clear()
        self.cached = 0


class _Block:
    """``size`` bytes of memory and the first cache-line boundary in them (found once:
    reading an array's address costs a microsecond)."""

    __slots__ = ("memory", "size", "start")

    def __init__(self, size):
        self.memory = np.empty(size, np.uint8)
        self.size = size
        address = self.memory.__array_interface__["data"][0]
        self.start = address + (-address) % ALIGN


class _Owner:
    """The base of a pooled array: exposes part of a block, returns it when it dies."""

    def __init__(self, pool, block, shape, dtype):
        self._pool = pool
        self._block = block
        self.__array_interface__ = {"shape": tuple(shape), "typestr": dtype.str,
                                    "data": (block.start, False), "version": 3}

    def __del__(self):
        self._pool.give(self._block)


def _limit_from_env():
    text = os.environ.get("NBBN_POOL", "").strip()
    try:
        mib = float(text) if text else DEFAULT_LIMIT_MIB
    except ValueError:
        warnings.warn(f"nbbn: NBBN_POOL must be a number of MiB (0: no pool), got {text!r}; "
                      f"using {DEFAULT_LIMIT_MIB}", RuntimeWarning, stacklevel=2)
        mib = DEFAULT_LIMIT_MIB
    return int(max(mib, 0) * (1 << 20))


POOL = Pool(_limit_from_env())

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=POOL.clear)


def empty(shape, dtype):
    """An output array: ``np.empty(shape, dtype)``, taken from ``POOL`` when large."""
    return POOL.empty(shape, dtype)
