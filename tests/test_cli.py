"""The nbbn command and the benchmark registry behind it (smoke tests: a few seconds)."""
import json
import subprocess
import sys

import numpy as np
import pytest

import nbbn
from nbbn import cli
from nbbn._bench import registry, runner


def test_info_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "nbbn", "info"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "numba" in out and "threads" in out and "cache" in out and "cuda" in out


def test_info_json(capsys):
    assert cli.main(["info", "--json", "--no-probe"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["nbbn"] == nbbn.__version__
    assert info["threads"]["num_threads"] >= 1
    assert "cache_dir" in info["cache"]
    assert isinstance(info["cuda"]["available"], bool)


def test_bench_quick_writes_json_and_png(tmp_path, capsys):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    args = ["bench", "--quick", "--ops", "mean_var", "--no-progress", "--json", str(js)]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(png)]
    except ImportError:
        png = None
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "mean_var" in out and "x floor" in out
    data = json.loads(js.read_text())
    results = data["results"]
    assert {tuple(r["shape"]) for r in results} == set(cli.QUICK_SHAPES)
    for r in results:
        assert r["ms"]["nbbn"] > 0 and r["ms"]["floor"] > 0 and r["x_floor"] > 0
        assert r["bytes"] == np.prod(r["shape"]) * 4
    if png is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli.main(["bench", "--quick", "--ops", "mean_var", "--plot", str(tmp_path / "p.png")]) == 2
    assert "nbbn[plot]" in capsys.readouterr().err


def test_bench_rejects_unknown_op_and_bad_shape():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--ops", "nope"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "--shapes", "64xfoo"])


def test_interleaved_times_every_contender():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    times = runner.interleaved({"a": make("a"), "b": make("b")}, rounds=3, min_sample=1e-4)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    assert runner.ratios({"nbbn": 1.0, "numpy": 3.0, "floor": 0.5}) == {"vs_numpy": 3.0, "x_floor": 2.0}


def _as_numpy(v, case):
    """A contender's result part as a NumPy array in the stored layout of the case."""
    if hasattr(v, "detach"):  # torch: x was passed as logical NCHW (channels-last memory)
        v = v.detach()
        if case.layout == "NHWC" and v.ndim == len(case.shape):
            v = v.permute(0, *range(2, v.ndim), 1)
        v = v.contiguous().numpy()
    v = np.asarray(v, np.float64)  # JAX and TensorFlow arrays too
    if v.size == case.size and v.ndim > len(case.shape):  # TensorFlow's [N, 1, 1, C]
        v = v.reshape(case.stored_shape)
    return v


RESULT_PARTS = {"mean_var": 2, "forward": 1, "inference": 1, "backward": 3, "layer_step": 1,
                "renorm_forward": 1, "renorm_backward": 3, "ghost_forward": 1, "ghost_backward": 1}


@pytest.mark.parametrize("case", [c for c in registry.cases(shapes=registry.SMALL_SHAPES)
                                  if c.op in RESULT_PARTS], ids=lambda c: c.label)
def test_registry_contenders_compute_the_same(case):
    """The benchmarked calls compute the same thing (what is timed is a fair comparison),
    PyTorch, JAX and TensorFlow included where installed."""
    op = registry.OPS[case.op]
    if op.available():
        pytest.skip(op.available())
    got = {}
    for who, factory in registry.factories(case).items():
        out = factory(registry.prepare(case))()
        parts = out if isinstance(out, (tuple, list)) else (out,)
        got[who] = [_as_numpy(p, case) for p in parts[: RESULT_PARTS[case.op]]]
    tol = 1e-4 if case.dtype == "float32" else 1e-9
    for who, parts in got.items():
        for ref, part in zip(got["numpy"], parts):
            np.testing.assert_allclose(part, ref, rtol=tol, atol=tol, err_msg=f"{who} {case.label}")


@pytest.mark.parametrize("argv", [
    ["bench", "--rounds", "-1"], ["bench", "--rounds", "0"], ["bench", "--threads", "-3"],
    ["bench", "--budget", "0"], ["bench", "--json", "/no/such/folder/r.json"],
    ["bench", "--plot", "/no/such/folder/r.png"], ["bench", "--shapes", "100000x100000x1000"],
    ["bench", "--ops", "nope"], ["demo", "--batch", "0"], ["demo", "--batch", "1"],
    ["demo", "--eval-every", "0"], ["demo", "--steps", "0"], ["demo", "--target", "2"],
    ["demo", "--lrs", "0.1,-1"], ["demo", "--threads", "0"], ["demo", "--plot", "/no/such/p.png"],
], ids=" ".join)
def test_bad_arguments_are_usage_errors_before_any_work(argv, monkeypatch, capsys):
    from nbbn._bench import runner
    from nbbn import demo

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(runner, "run_cases", no_work)
    monkeypatch.setattr(demo, "run", no_work)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err
