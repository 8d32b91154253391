"""Smoke test of ``nbbn demo`` (a few steps) and checks of its NumPy layers."""
import numpy as np
import pytest

pytest.importorskip("sklearn")
from nbbn import cli, demo  # noqa: E402


def test_demo_smoke(tmp_path, capsys):
    png = tmp_path / "loss.png"
    assert cli.main(["demo", "--steps", "6", "--eval-every", "3", "--lrs", "0.1,1e4",
                     "--target", "0.2", "--long", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| model | variant | lr 0.1 | lr 10000 |" in out
    for model in demo.MODELS:
        for norm in demo.NORMS:
            assert f"| {model} | {norm} |" in out
    assert "| mlp | plain | 10000 | diverged" in out  # plain SGD blows up at an absurd rate
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_train_reports_progress_and_learns():
    data = demo.load_data(0)
    (x, y), (xt, yt) = data
    assert x.shape[1:] == (8, 8, 1) and len(x) + len(xt) == 1797 and x.max() <= 1
    r = demo.train("mlp", "bn", 0.5, data, steps=40, eval_every=20, target=0.5)
    assert r["diverged_at"] is None and len(r["losses"]) == 40
    assert r["losses"][-1] < r["losses"][0] and r["test_acc"] > 0.5
    assert r["steps_to_target"] in (20, 40) and [s for s, _ in r["evals"]] == [20, 40]


def _conv_reference(x, w, b):
    n, h, wd, c = x.shape
    k = w.reshape(3, 3, c, -1)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, wd, k.shape[-1]))
    for i in range(h):
        for j in range(wd):
            out[:, i, j] = np.einsum("nabc,abcf->nf", xp[:, i:i + 3, j:j + 3], k)
    return out + b


def test_conv_forward_and_adjoint():
    rng = np.random.default_rng(0)
    conv = demo.Conv3x3(3, 4, rng)
    conv.b[:] = rng.standard_normal(4)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    y = conv.forward(x, True)
    np.testing.assert_allclose(y, _conv_reference(x, conv.w, conv.b), rtol=1e-5, atol=1e-5)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = conv.backward(dy)
    # The convolution is linear in x and in w: <dy, conv(x)> = <dx, x> = <dw, w>.
    lhs = np.vdot(dy, y - conv.b)
    np.testing.assert_allclose(np.vdot(dx, x), lhs, rtol=1e-4)
    np.testing.assert_allclose(np.vdot(conv.dw, conv.w), lhs, rtol=1e-4)
    np.testing.assert_allclose(conv.db, dy.sum(axis=(0, 1, 2)), rtol=1e-5)


def test_pool_and_noise_adjoint():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    pool = demo.AvgPool2()
    y = pool.forward(x, True)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    np.testing.assert_allclose(np.vdot(pool.backward(dy), x), np.vdot(dy, y), rtol=1e-5)
    noise = demo.Noise(1.0, rng)
    y1, y2 = noise.forward(x, True), noise.forward(x, True)
    assert not np.allclose(y1, y2)  # a new draw at every step
    assert noise.forward(x, False) is x  # no noise in evaluation


def test_variants_share_initial_weights():
    layers = {n: demo.build("cnn", n, seed=3) for n in demo.NORMS}
    weights = {n: [l.w for l in ls if hasattr(l, "w")] for n, ls in layers.items()}
    for n in demo.NORMS[1:]:
        for a, b in zip(weights["plain"], weights[n]):
            np.testing.assert_array_equal(a, b)
    kinds = [type(l).__name__ for l in layers["bn-after-relu"][:3]]
    assert kinds == ["Conv3x3", "ReLU", "Norm"]
