"""How the CUDA kernels read and write one element, and the forward's epilogue.

float16 is native on the device; bfloat16 reaches the kernels as records of its 16 bits
(``BFLOAT16``), widened where read (``wide``: the bits are a float32's upper half) and
rounded to nearest even where written (``store``: from float32 by an integer add, from
float64 correctly, for per-channel results). The kernels compute in float32 for 16-bit
data and in float64 otherwise (``zero``: 0 in that precision).

Optional arrays (a residual, the ReLU's gate, what a layer keeps) are None or an array:
a device function is compiled per argument types and the branches of an absent one are
pruned, so no variant tests a flag in its loops. In the CUDA simulator (no overloads,
no intrinsics) ``wide``/``store`` and the bit casts are plain Python.
"""
import numpy as np
from numba import cuda, float32, float64, uint16, uint32, uint64

from .launch import SIMULATOR

BFLOAT16 = np.dtype([("bfloat16", "<u2")], align=True)

# The largest value that rounds to 0 when stored, by dtype (half the smallest subnormal).
_ZERO_BELOW = {"float64": 0.0, "float32": 2.0 ** -150, "float16": 2.0 ** -25,
               "bfloat16": 2.0 ** -134}

if SIMULATOR:
    def float32_of_bits(u):
        return np.uint32(u).view(np.float32)

    def bits_of_float32(f):
        return int(np.float32(f).view(np.uint32))

    def float64_of_bits(u):
        return np.uint64(u).view(np.float64)

    def bits_of_float64(f):
        return int(np.float64(f).view(np.uint64))
else:
    from numba.cuda.extending import intrinsic

    from .._bits import bitcast

    float32_of_bits = bitcast(intrinsic, uint32, float32)
    bits_of_float32 = bitcast(intrinsic, float32, uint32)
    float64_of_bits = bitcast(intrinsic, uint64, float64)
    bits_of_float64 = bitcast(intrinsic, float64, uint64)


@cuda.jit(device=True, cache=True)
def bfloat16_of_float32(value):
    """bfloat16 bits of a float32, rounded to nearest even (quiet NaNs keep their upper half:
    the increment never carries out of them)."""
    u = uint32(bits_of_float32(value))
    return uint16((u + uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1))) >> uint32(16))


@cuda.jit(device=True, cache=True)
def bfloat16_of_float64(value):
    """bfloat16 bits of a float64, rounded once to nearest even (per-channel results)."""
    if value != value:
        return uint16(0x7FC0)
    bits = uint64(bits_of_float64(value))
    sign = uint16((bits >> uint64(48)) & uint64(0x8000))
    magnitude = abs(value)
    if magnitude < 2.0 ** -126:  # steps of 2**-133: round the multiple
        return uint16(sign | uint16(round(magnitude * 2.0 ** 133)))
    # Round to 8 significant bits in float64's format (exact), then the float32's upper half.
    rounded = (bits + uint64((1 << 44) - 1) + ((bits >> uint64(45)) & uint64(1))) \
        & uint64(0xFFFFE00000000000)
    return uint16(uint32(bits_of_float32(float32(float64_of_bits(rounded)))) >> uint32(16))


if SIMULATOR:
    def _is_bfloat16(value):
        """Whether a kernel's element is a bfloat16 record (the simulator wraps records)."""
        return isinstance(getattr(value, "_ary", value), np.void)

    def wide(v, zero):
        """Element ``v`` as ``zero``'s precision (bfloat16 records widened)."""
        if _is_bfloat16(v):
            return zero + float32_of_bits(np.uint32(v["bfloat16"]) << np.uint32(16))
        return zero + v

    def store(a, i, value):
        """``a[i] = value`` rounded to nearest even into a's dtype; ``value`` may be an element
        of a's dtype (copied as is)."""
        if a.dtype != BFLOAT16:
            a[i] = wide(value, np.float32(0)) if _is_bfloat16(value) else value
        elif _is_bfloat16(value):
            a[i]["bfloat16"] = value["bfloat16"]
        elif isinstance(value, np.float32):
            a[i]["bfloat16"] = bfloat16_of_float32(value)
        else:
            a[i]["bfloat16"] = bfloat16_of_float64(value)

    def zero_below(a):
        return _ZERO_BELOW["bfloat16" if a.dtype == BFLOAT16 else a.dtype.name]
else:
    from numba.core import types
    from numba.cuda.extending import overload

    def _bfloat16_record(t):
        return isinstance(t, types.Record) and "bfloat16" in t.fields

    def wide(v, zero):
        """Element ``v`` as ``zero``'s precision (bfloat16 records widened)."""

    @overload(wide, target="cuda", inline="always")
    def _wide(v, zero):
        if _bfloat16_record(v):
            return lambda v, zero: zero + float32_of_bits(uint32(v["bfloat16"]) << uint32(16))
        return lambda v, zero: zero + v

    def store(a, i, value):
        """``a[i] = value`` rounded to nearest even into a's dtype; ``value`` may be an element
        of a's dtype (copied as is)."""

    @overload(store, target="cuda", inline="always")
    def _store(a, i, value):
        if not _bfloat16_record(a.dtype):
            if _bfloat16_record(value):
                def store_widened(a, i, value):
                    a[i] = wide(value, float32(0))
                return store_widened

            def store_value(a, i, value):
                a[i] = value
            return store_value
        if _bfloat16_record(value):
            def copy_bits(a, i, value):
                a[i]["bfloat16"] = value["bfloat16"]
            return copy_bits
        if value == types.float32:
            def store_float32(a, i, value):
                a[i]["bfloat16"] = bfloat16_of_float32(value)
            return store_float32

        def store_float64(a, i, value):
            a[i]["bfloat16"] = bfloat16_of_float64(float64(value))
        return store_float64

    def zero_below(a):
        """The largest value that rounds to 0 when stored in ``a``."""

    @overload(zero_below, target="cuda", inline="always")
    def _zero_below(a):
        name = "bfloat16" if _bfloat16_record(a.dtype) else str(a.dtype)
        limit = _ZERO_BELOW[name]
        return lambda a: limit


def load_if(a, off, zero):
    """``a[off]``, or ``zero`` where ``a`` is None."""
    return zero if a is None else a[off]


def load4_if(a, offsets, zero):
    """``a`` at four offsets, the loads issued together (zeros where ``a`` is None)."""
    if a is None:
        return zero, zero, zero, zero
    return a[offsets[0]], a[offsets[1]], a[offsets[2]], a[offsets[3]]


if not SIMULATOR:  # chosen by type: the two returns' types differ (bfloat16 records, zero)
    @overload(load_if, target="cuda", inline="always")
    def _load_if(a, off, zero):
        if isinstance(a, types.NoneType):
            return lambda a, off, zero: zero
        return lambda a, off, zero: a[off]

    @overload(load4_if, target="cuda", inline="always")
    def _load4_if(a, offsets, zero):
        if isinstance(a, types.NoneType):
            return lambda a, offsets, zero: (zero, zero, zero, zero)
        return lambda a, offsets, zero: (a[offsets[0]], a[offsets[1]], a[offsets[2]],
                                         a[offsets[3]])


@cuda.jit(device=True, cache=True)
def epilogue(v, r, residual, relu, zero):
    """The forward's value ``v`` (x * scale + shift) plus the residual's value ``r`` (where
    ``residual`` is an array), then max(., 0) where ``relu`` is True; NaN stays NaN."""
    if residual is not None:
        v = v + wide(r, zero)
    if relu is not None:
        if v < zero:
            v = zero
    return v


@cuda.jit(device=True, cache=True)
def keep(copy, off_copy, xv, mask, off_mask, v, y):
    """What a layer keeps of one element for backward (None: not kept): x's element ``xv``
    into ``copy``; whether y (value ``v``, stored in ``y``) is positive into ``mask``."""
    if copy is not None:
        store(copy, off_copy, xv)
    if mask is not None:
        mask[off_mask] = 1 if v > zero_below(y) else 0


@cuda.jit(device=True, cache=True)
def gated(d, gv, gate, zero):
    """dy value ``d`` where the forward's output (``gv``, an element of ``gate``: y or a kept
    mask) is positive, else 0: the gradient through the ReLU (``gate`` None: ``d``)."""
    if gate is not None:
        if not wide(gv, zero) > zero:
            return zero
    return d


@cuda.jit(device=True, cache=True)
def store_if(a, off, value):
    """``store(a, off, value)``, nothing where ``a`` is None."""
    if a is not None:
        store(a, off, value)
