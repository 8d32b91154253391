"""pytest-benchmark suite: ``pytest bench/ --benchmark-only`` (not part of ``pytest``'s test run).

Every case of ``nbbn._bench.registry`` (the same registry ``nbbn bench`` uses)
is benchmarked for each contender: the bandwidth floor, nbbn, NumPy and
PyTorch, grouped by operation, shape, layout and dtype.

Options: ``--bench-ops mean_var,forward`` and ``--bench-dtypes float32`` narrow it.
"""
import pytest

from nbbn._bench import registry, runner


def pytest_addoption(parser):
    group = parser.getgroup("nbbn benchmarks")
    group.addoption("--bench-ops", default=None, help="comma-separated registry ops to run")
    group.addoption("--bench-dtypes", default=None, help="comma-separated dtypes to run")


def pytest_collection_modifyitems(config, items):
    ops = config.getoption("--bench-ops")
    dtypes = config.getoption("--bench-dtypes")
    keep, drop = [], []
    for item in items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if case is not None and ((ops and case.op not in ops.split(","))
                                 or (dtypes and case.dtype not in dtypes.split(","))):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


class _Inputs:
    """The prepared inputs of the current case (kept while its contenders run, then dropped)."""

    case = None
    inputs = None

    @classmethod
    def get(cls, case):
        if cls.case != case:
            cls.case, cls.inputs = None, None  # free the previous arrays first
            cls.inputs = registry.prepare(case)
            cls.case = case
        return cls.inputs


@pytest.fixture
def case_inputs():
    return _Inputs.get


@pytest.fixture
def measure(benchmark):
    """``measure(fn)``: benchmark fn with calls per round and rounds sized to its duration.

    A round lasts at least ``runner.MIN_SAMPLE_S`` (small calls are repeated
    within it); 5 to 15 rounds, fewer for slow calls, keep the suite short.
    """
    def run(fn, budget_s=0.25, max_rounds=15, min_rounds=5):
        fn()  # compile and warm up
        number, per_call = runner.calibrate(fn, runner.MIN_SAMPLE_S)
        rounds = int(min(max_rounds, max(min_rounds, budget_s / (per_call * number))))
        return benchmark.pedantic(fn, rounds=rounds, iterations=number, warmup_rounds=1)

    return run
