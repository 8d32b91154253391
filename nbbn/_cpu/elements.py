"""How the CPU kernels read and write one element, and the forward's epilogue.

Numba has no 16-bit float on the CPU: float16 and bfloat16 arrays reach the kernels as
records of their 16 bits (``kernel_array``: a view, no converted copy), widened where
they are read (``wide``: bfloat16's bits are the upper half of a float32's; float16
converts in hardware) and rounded to nearest even where they are written (``store``).
16-bit data is computed in float32 (``work_dtype``: the widening is exact and the
result is rounded once, from float32), other floats in float64.

Optional arrays (a residual, a ReLU gate, copies a layer keeps) are None or an array:
Numba compiles one variant per combination and prunes the branches of the absent ones,
so no variant tests a flag inside its loops.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .._bits import bitcast
from .._layout import is_bfloat16
from ._jit import helper

FLOAT16 = np.dtype([("float16", "<u2")], align=True)
BFLOAT16 = np.dtype([("bfloat16", "<u2")], align=True)

# |v| at or below which a value of the working precision rounds to 0 when stored (half the
# smallest subnormal: the tie goes to the even 0), by the stored dtype.
_ZERO_BELOW = {np.dtype(np.float64): 0.0, np.dtype(np.float32): 2.0 ** -150,
               FLOAT16: 2.0 ** -25, BFLOAT16: 2.0 ** -134}


def kernel_array(a):
    """NumPy array ``a`` as the kernels read it: 16-bit floats as records of their bits (a
    view), a non-native byte order as a native copy."""
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype.kind == "f" and a.dtype.itemsize == 2:
        return a.view(FLOAT16)
    if is_bfloat16(a.dtype):
        return a.view(BFLOAT16)
    return a


def as_dtype(values, dtype):
    """Host values (float64) as a new array of ``dtype``, rounded once to nearest even: NumPy's
    astype, but for bfloat16 (ml_dtypes rounds float64 through float32: twice)."""
    values = np.asarray(values, np.float64)
    dtype = np.dtype(dtype)
    if not is_bfloat16(dtype):
        return values.astype(dtype)
    bits = np.ascontiguousarray(values).view(np.uint64)
    # Round to bfloat16's 8 significant bits in float64's format (exact from 2**-126 up),
    # then take the float32's upper half (the conversion is exact; 2**128 gives inf).
    drop = np.uint64(45)
    rounded = (bits + np.uint64((1 << 44) - 1) + ((bits >> drop) & np.uint64(1))) \
        & ~np.uint64((1 << 45) - 1)
    sign = ((bits >> np.uint64(48)) & np.uint64(0x8000)).astype(np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        normal = (rounded.view(np.float64).astype(np.float32).view(np.uint32)
                  >> np.uint32(16)).astype(np.uint16)
        # Below 2**-126, bfloat16's steps are 2**-133 apart: round the multiple directly.
        tiny = sign | np.rint(np.abs(values) * 2.0 ** 133).astype(np.uint16)
    out = np.where(np.abs(values) < 2.0 ** -126, tiny, normal)
    out = np.where(np.isnan(values), sign | np.uint16(0x7FC0), out)
    return out.astype(np.uint16).view(dtype)


def as_float64(a):
    """The float64 values of host array ``a`` (of a kernel dtype: 16-bit floats as records)."""
    if a.dtype == FLOAT16:
        return a.view(np.float16).astype(np.float64)
    if a.dtype == BFLOAT16:
        return (a.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32) \
            .astype(np.float64)
    return np.asarray(a, np.float64)


def work_dtype(dtype):
    """The dtype the elementwise kernels compute in for data of ``dtype``."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize == 2 else np.dtype(np.float64)


float32_of_bits = bitcast(intrinsic, types.uint32, types.float32)
bits_of_float32 = bitcast(intrinsic, types.float32, types.uint32)


@intrinsic
def float32_of_half(typingctx, bits):
    """The float32 value of float16 bits (exact; F16C's vcvtph2ps)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def half_of_float32(typingctx, value):
    """float16 bits of a float32, rounded to nearest even (F16C's vcvtps2ph)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@helper
def bfloat16_of_float32(value):
    """bfloat16 bits of a float32, rounded to nearest even. Vectorizes as integer adds and
    shifts. A NaN keeps its upper half: the NaNs here are widened 16-bit values or made by
    arithmetic (quiet, low 16 bits zero), so the increment never carries out of them."""
    u = bits_of_float32(value)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                     >> np.uint32(16))


def _record_field(dtype):
    """The field name of a 16-bit float record type, or None for other types."""
    if isinstance(dtype, types.Record):
        return next(iter(dtype.fields))
    return None


def wide(v):
    """Element ``v`` in the working precision: float32 for 16-bit floats, else float64."""


@overload(wide, inline="always")
def _wide(v):
    field = _record_field(v)
    if field == "bfloat16":
        return lambda v: float32_of_bits(np.uint32(v.bfloat16) << np.uint32(16))
    if field == "float16":
        return lambda v: float32_of_half(v.float16)
    if isinstance(v, (types.Number, types.Boolean)):
        return lambda v: np.float64(v)


def store(a, i, value):
    """``a[i] = value`` rounded to a's dtype (16-bit floats from float32, nearest even); a
    ``value`` that is an element of a's 16-bit dtype is copied as it is (its bits)."""


@overload(store, inline="always")
def _store(a, i, value):
    field = _record_field(a.dtype)
    if field is not None and _record_field(value) == field:
        def copy_bits(a, i, value):
            a[i] = value
        return copy_bits
    if field == "bfloat16":
        def store_bfloat16(a, i, value):
            a[i].bfloat16 = bfloat16_of_float32(np.float32(value))
        return store_bfloat16
    if field == "float16":
        def store_float16(a, i, value):
            a[i].float16 = half_of_float32(np.float32(value))
        return store_float16

    def store_float(a, i, value):
        a[i] = value
    return store_float


def zero_below(a):
    """The largest working-precision value that rounds to 0 when stored in ``a``."""


@overload(zero_below, inline="always")
def _zero_below(a):
    dtype = np.dtype(np.float64) if isinstance(a.dtype, types.Float) \
        and a.dtype.bitwidth == 64 else None
    if isinstance(a.dtype, types.Record):
        dtype = BFLOAT16 if _record_field(a.dtype) == "bfloat16" else FLOAT16
    elif dtype is None:
        dtype = np.dtype(np.float32)
    limit = _ZERO_BELOW[dtype]
    return lambda a: limit


def zero_as(v):
    """0 in the type of value ``v``."""


@overload(zero_as, inline="always")
def _zero_as(v):
    zero = np.float32(0) if v == types.float32 else 0.0
    return lambda v: zero


# Optional arrays: each helper below is chosen at typing time, by whether its optional
# argument is None, so the compiled kernel holds no test of it.

def _absent(a):
    return isinstance(a, types.NoneType)


def part(a, o, c, start, stop):
    """``a[o, c, start:stop]``, or None where ``a`` is None (a rows kernel's optional arrays)."""


@overload(part, inline="always")
def _part(a, o, c, start, stop):
    if _absent(a):
        return lambda a, o, c, start, stop: None
    return lambda a, o, c, start, stop: a[o, c, start:stop]


def plus(v, residual, i):
    """``v + residual[i]`` (None: ``v``)."""


@overload(plus, inline="always")
def _plus(v, residual, i):
    if _absent(residual):
        return lambda v, residual, i: v
    return lambda v, residual, i: v + wide(residual[i])


def relu(v, on):
    """max(v, 0) where ``on`` is True (None: ``v``); NaN stays NaN."""


@overload(relu, inline="always")
def _relu(v, on):
    if _absent(on):
        return lambda v, on: v
    zero = np.float32(0) if v == types.float32 else 0.0

    def impl(v, on):
        if v < zero:
            return zero
        return v
    return impl


@helper
def epilogue(v, residual, i, on):
    """The forward's value ``v`` (x * scale + shift) plus ``residual[i]``, then the ReLU
    where ``on`` (residual, on: None for nothing)."""
    return relu(plus(v, residual, i), on)


def store_if(a, i, value):
    """``store(a, i, value)``, nothing where ``a`` is None."""


@overload(store_if, inline="always")
def _store_if(a, i, value):
    if _absent(a):
        return lambda a, i, value: None
    return lambda a, i, value: store(a, i, value)


@helper
def keep(x, copy, mask, i, v, y):
    """What a layer keeps of element i for backward (each None: not kept): x[i]'s bits into
    ``copy``; whether the stored y is positive, from its value ``v`` (the ReLU's gate:
    uint8) into ``mask``."""
    store_if(copy, i, x[i])
    mask_if(mask, i, v, y)


def mask_if(mask, i, v, y):
    """``mask[i] = y[i] > 0`` as stored, from its value ``v``; nothing where mask is None."""


@overload(mask_if, inline="always")
def _mask_if(mask, i, v, y):
    if _absent(mask):
        return lambda mask, i, v, y: None

    def impl(mask, i, v, y):
        mask[i] = v > zero_below(y)
    return impl


def gated(d, gate, i):
    """dy value ``d`` where the forward's output was positive (``gate``: y or the kept mask;
    None: everywhere), else 0: the gradient through the ReLU."""


@overload(gated, inline="always")
def _gated(d, gate, i):
    if _absent(gate):
        return lambda d, gate, i: d

    def impl(d, gate, i):
        if wide(gate[i]) > 0:
            return d
        return zero_as(d)
    return impl
