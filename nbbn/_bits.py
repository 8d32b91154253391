"""Reinterpreting a value's bits as another type, for the CPU and CUDA kernels alike (how
both backends widen bfloat16: its bits are the upper half of a float32's)."""


def bitcast(intrinsic, source, target):
    """A Numba intrinsic (made with ``intrinsic``: ``numba.extending``'s or
    ``numba.cuda.extending``'s) returning a ``source`` value's bits as ``target`` (Numba
    types of one width)."""
    @intrinsic
    def cast(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(target))
        return target(source), codegen
    return cast
