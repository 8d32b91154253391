"""Smoke test of ``nbbn demo small-batch`` (few steps) and checks of its batch sampler."""
import numpy as np
import pytest

pytest.importorskip("sklearn")
from nbbn import cli, demo_smallbatch  # noqa: E402


def test_small_batch_demo_smoke(tmp_path, capsys):
    png = tmp_path / "small.png"
    assert cli.main(["demo", "small-batch", "--seeds", "2", "--epochs", "1",
                     "--regimes", "b8,b64-2cls", "--plot", str(png), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| regime | bn EMA | bn precise | renorm EMA | renorm precise | ghost EMA |" in out
    row = next(line for line in out.splitlines() if line.startswith("| b8 |"))
    assert row.count("= bn") == 2  # ghost batches of 8 in batches of 8: batch norm
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_batches():
    y = np.repeat(np.arange(10), 13)
    rng = np.random.default_rng(0)
    iid = demo_smallbatch.batches(y, 8, False, rng)
    assert len(iid) == 130 // 8 and len(np.unique(np.concatenate(iid))) == 16 * 8
    two = demo_smallbatch.batches(y, 8, True, rng)
    assert len(two) >= 12 and all(len(b) == 8 and len(np.unique(y[b])) <= 2 for b in two)
    assert len(np.unique(np.concatenate(two))) == 8 * len(two)  # without replacement
    assert any(y[b[0]] != y[b[1]] for b in two)  # classes mixed within a batch


def test_precise_statistics_change_only_running_buffers():
    data = demo_smallbatch.demo.load_data(0)
    r = demo_smallbatch.train("b64", "renorm", data, epochs=1, lr=0.5, seed=0, momentum=0.1)
    assert r["steps"] == len(data[0][1]) // 64 and 0.5 < r["ema"] <= 1 and 0.5 < r["precise"]
