"""Each registry case x contender: floor, nbbn (and nbbn with out=), numpy, and torch, jax, tf
where installed (see conftest.py)."""
import pytest

from nbbn._bench import registry
from nbbn._bench.floor import floor_runner


def _params():
    out = []
    for case in registry.cases():
        op = registry.OPS[case.op]
        for who in ("floor",) * bool(op.floor) + tuple(registry.factories(case)):
            out.append(pytest.param(case, who, id=f"{case.label.replace(' ', '-')}-{who}"))
    return out


@pytest.mark.parametrize("case,who", _params())
def test_op(benchmark, measure, case_inputs, case, who):
    op = registry.OPS[case.op]
    why = op.available()
    if why:
        pytest.skip(why)
    benchmark.group = case.label
    inputs = case_inputs(case)
    fn = (floor_runner(op.floor, inputs["x"]) if who == "floor"
          else registry.factories(case)[who](inputs))
    nbytes = op.bytes_moved(case)
    benchmark.extra_info.update(op=case.op, shape=list(case.shape), layout=case.layout,
                                dtype=case.dtype, contender=who, bytes=nbytes)
    measure(fn)
    if nbytes and benchmark.stats is not None:
        benchmark.extra_info["GB_per_s"] = nbytes / benchmark.stats.stats.median / 1e9
