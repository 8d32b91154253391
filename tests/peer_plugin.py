"""A pytest plugin that runs a peer's own tests (NumPy's) with nbbn's functions in its place.

Loaded into a child pytest by ``tests/test_peer_numpy.py`` (``-p tests.peer_plugin``):
``numpy.mean/var/std`` become ``nbbn.mean/var/std`` before any test runs; the tests
named in ``$NBBN_PEER_EXPECTED`` (JSON: node id suffix -> reason) are marked as strict
expected failures; the outcome of every test, and which tests reached nbbn, are written
to ``$NBBN_PEER_REPORT`` (JSON).
"""
import json
import os

import numpy as np
import pytest

import nbbn
from nbbn import stats

_EXPECTED = json.loads(os.environ.get("NBBN_PEER_EXPECTED", "{}"))
_outcomes = {}
_reached = set()
_current = [None]

for _name in ("mean", "var", "std"):
    setattr(np, _name, getattr(nbbn, _name))

_reduce = stats._reduce


def _counting_reduce(*args, **kwargs):
    _reached.add(_current[0])
    return _reduce(*args, **kwargs)


stats._reduce = _counting_reduce


def pytest_collection_modifyitems(items):
    for item in items:
        for suffix, reason in _EXPECTED.items():
            if item.nodeid.endswith(suffix):
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _current[0] = item.nodeid
    yield
    _current[0] = None


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
        if _outcomes.get(report.nodeid, "passed") == "passed":
            _outcomes[report.nodeid] = outcome


def pytest_sessionfinish(session):
    with open(os.environ["NBBN_PEER_REPORT"], "w") as fh:
        json.dump({"outcomes": _outcomes, "reached": sorted(n for n in _reached if n)}, fh)
