"""The pool of large output arrays (nbbn._cpu.pool): distinct arrays, reuse only after
every array and view of a block is gone, bounded, thread-safe, fork-safe, NBBN_POOL."""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import nbbn
from nbbn._cpu import pool

MiB = 1 << 20
SHAPE = (3, MiB // 4)  # 3 MiB of float32


def _address(a):
    return a.__array_interface__["data"][0]


def test_small_arrays_are_plain_numpy():
    p = pool.Pool(64 * MiB)
    a = p.empty((10, 10), np.float32)
    assert a.base is None and a.flags.owndata


def test_arrays_are_distinct_while_alive_and_reused_once_dropped():
    p = pool.Pool(64 * MiB)
    a = p.empty(SHAPE, np.float32)
    b = p.empty(SHAPE, np.float32)
    assert not np.shares_memory(a, b)
    assert a.flags.c_contiguous and a.flags.writeable and a.shape == SHAPE
    assert _address(a) % pool.ALIGN == 0
    where = _address(a)
    del a
    assert p.cached > 0
    c = p.empty(SHAPE, np.float32)
    assert _address(c) == where and p.cached == 0
    assert not np.shares_memory(b, c)


@pytest.mark.parametrize("keep", [
    lambda a: a[::2],
    lambda a: a.T,
    lambda a: a.reshape(-1)[5:],
    lambda a: memoryview(a),
    lambda a: a.view(np.uint8),
], ids=["slice", "transpose", "reshape", "memoryview", "dtype-view"])
def test_a_block_reachable_through_a_view_is_never_handed_out(keep):
    p = pool.Pool(64 * MiB)
    a = p.empty(SHAPE, np.float32)
    a[...] = 7
    view = keep(a)
    del a
    assert p.cached == 0  # still reachable
    for other in [p.empty(SHAPE, np.float32) for _ in range(3)]:
        other[...] = -1
    np.testing.assert_array_equal(np.asarray(view), np.asarray(keep(np.full(SHAPE, 7, np.float32))))
    del view
    assert p.cached > 0


def test_bounded_oldest_freed_first_out():
    p = pool.Pool(7 * MiB)
    arrays = [p.empty(SHAPE, np.float32) for _ in range(4)]
    addresses = [_address(a) for a in arrays]
    for i in range(4):  # freed in order 0, 1, 2, 3; only two blocks of 3 MiB (and a bit) fit
        arrays[i] = None
    assert p.cached <= p.limit
    reused = [p.empty(SHAPE, np.float32) for _ in range(2)]
    assert {_address(a) for a in reused} == set(addresses[2:])
    assert p.cached == 0
    too_big = p.empty((8 * MiB,), np.uint8)  # larger than the whole pool: plain NumPy
    assert too_big.base is None


def test_threads(rng):
    p = pool.Pool(16 * MiB)
    errors = []

    def work(seed):
        r = np.random.default_rng(seed)
        live = []
        for _ in range(300):
            if live and r.random() < 0.5:
                value, a = live.pop(r.integers(len(live)))
                if not np.all(a == value):  # someone else wrote into a live array
                    errors.append(value)
            else:
                shape = (int(r.integers(1, 4)), MiB // 4)
                a = p.empty(shape, np.float32)
                value = float(r.integers(1 << 20))
                a[...] = value
                live.append((value, a))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert p.cached <= p.limit
    assert p.cached == sum(block.size for block in p._free.values())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_child_starts_with_an_empty_working_pool():
    keep = pool.empty(SHAPE, np.float32)
    keep[...] = 3
    dropped = pool.empty(SHAPE, np.float32)
    del dropped
    assert pool.POOL.cached > 0
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 on success
        ok = pool.POOL.cached == 0 and np.all(keep == 3)
        a = pool.empty(SHAPE, np.float32)
        where = _address(a)
        del a
        ok = ok and _address(pool.empty(SHAPE, np.float32)) == where
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert np.all(keep == 3)


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_nbbn_pool_zero_turns_it_off():
    code = """
        import numpy as np, nbbn
        from nbbn._cpu import pool
        assert pool.POOL.limit == 0
        x = np.ones((8, 4, 256, 256), np.float32)
        y = nbbn.batch_norm(x, None, None, training=True)
        base = y
        while base.base is not None:
            base = base.base
        assert isinstance(base, np.ndarray), type(base)
        print("plain")
    """
    done = _run(code, NBBN_POOL="0")
    assert done.returncode == 0, done.stderr
    assert "plain" in done.stdout


def test_nbbn_pool_size_and_bad_value():
    done = _run("from nbbn._cpu import pool; print(pool.POOL.limit)", NBBN_POOL="2.5")
    assert done.stdout.split() == [str(int(2.5 * MiB))]
    done = _run("from nbbn._cpu import pool; print(pool.POOL.limit)", NBBN_POOL="lots")
    assert done.stdout.split() == [str(pool.DEFAULT_LIMIT_MIB * MiB)]
    assert "NBBN_POOL must be a number" in done.stderr


def test_public_outputs_are_distinct_and_correct_when_reused(rng):
    x = rng.standard_normal((16, 8, 64, 64)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    ref = nbbn.batch_norm_forward(x)
    y1 = nbbn.batch_norm(x, None, None, training=True)
    y2 = nbbn.batch_norm(x * 2, None, None, training=True)
    assert not np.shares_memory(y1, y2)
    where = _address(y1)
    del y1
    y3 = nbbn.batch_norm(x, None, None, training=True)
    assert _address(y3) == where  # y1's memory, warm
    np.testing.assert_array_equal(y3, ref[0])
    np.testing.assert_allclose(y2, ref[0], rtol=1e-5, atol=1e-5)  # untouched
    dx1 = nbbn.batch_norm_backward(dy, x, ref[1], ref[2])[0]
    dx2 = nbbn.batch_norm_backward(dy, x, ref[1], ref[2])[0]
    assert not np.shares_memory(dx1, dx2) and not np.shares_memory(dx1, y3)
    np.testing.assert_array_equal(dx1, dx2)
