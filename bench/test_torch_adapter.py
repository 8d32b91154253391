"""A training step of a small ResNet-style CNN on the CPU: torch.nn's batch norm vs nbbn.torch's.

    pytest bench/test_torch_adapter.py --benchmark-only      # pytest-benchmark table
    python bench/test_torch_adapter.py [ROUNDS] [--threads N] # interleaved step-time ratio

The whole step is timed (forward, loss, backward, SGD update), so the ratio
is what a user sees after ``nbbn.torch.convert(model)``; batch norm is only a
part of the step, the convolutions dominate. The two models start from the
same weights; contenders are timed round-robin in one process (these machines
are shared and noisy, ratios mean more than absolute times).
"""
import copy
import sys

import pytest

from nbbn._bench import runner

torch = pytest.importorskip("torch")
nbbn_torch = pytest.importorskip("nbbn.torch")
nn = torch.nn

BATCH, CHANNELS, SIZE = 32, 3, 32
GROUP = f"torch adapter: ResNet-style training step, batch {BATCH}x{CHANNELS}x{SIZE}x{SIZE}"


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet(num_classes=10):
    """A ResNet-style CNN for 32x32 inputs: 16 -> 32 -> 64 channels, 10 batch norms."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(CHANNELS, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        BasicBlock(16, 16), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def _step_fn(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=g)
    t = torch.randint(0, 10, (BATCH,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        return loss

    return step


def contenders():
    """{"torch": step, "nbbn": step}: the same model, with torch.nn's and nbbn's batch norm."""
    ref = resnet()
    ours = nbbn_torch.convert(copy.deepcopy(ref))
    return {"torch": _step_fn(ref), "nbbn": _step_fn(ours)}


def step_time_ratio(rounds=15):
    """(median step seconds per contender, nbbn / torch) timed interleaved."""
    times = runner.interleaved(contenders(), rounds=rounds)
    return times, times["nbbn"] / times["torch"]


@pytest.fixture(scope="module")
def steps():
    return contenders()


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("contender", ["torch", "nbbn"])
def test_train_step(measure, steps, contender):
    measure(steps[contender], budget_s=2.0, max_rounds=10)


@pytest.mark.benchmark(group=GROUP + " (ratio)")
def test_train_step_ratio(benchmark):
    times, ratio = benchmark.pedantic(step_time_ratio, rounds=1, iterations=1)
    benchmark.extra_info.update({f"{k}_s": v for k, v in times.items()})
    benchmark.extra_info["nbbn_over_torch"] = ratio
    print(f"\nResNet-style training step: torch {times['torch'] * 1e3:.1f} ms, "
          f"nbbn {times['nbbn'] * 1e3:.1f} ms, ratio nbbn/torch {ratio:.3f}")


def _main(argv):
    import argparse
    import os
    p = argparse.ArgumentParser(description="interleaved step-time ratio, nbbn.torch / torch.nn")
    p.add_argument("rounds", type=int, nargs="?", default=15)
    p.add_argument("--threads", type=int, default=None,
                   help="torch and Numba threads (default: as configured)")
    args = p.parse_args(argv)
    if args.threads:
        import numba
        torch.set_num_threads(args.threads)
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    times, ratio = step_time_ratio(args.rounds)
    print(f"ResNet-style CNN, batch {BATCH}x{CHANNELS}x{SIZE}x{SIZE}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    for k, v in times.items():
        print(f"  {k:6s} {v * 1e3:8.2f} ms / training step")
    print(f"  ratio nbbn / torch: {ratio:.3f}")


if __name__ == "__main__":
    _main(sys.argv[1:])
