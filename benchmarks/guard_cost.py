"""What the always-on divergence guard costs per training step (target: <= 2%).

    python benchmarks/guard_cost.py

Times the book recipe's step (fused kernel when available, else autograd) in interleaved
blocks with and without the guard's check, and the check alone.
"""
import statistics
import time

import torch
import torch.nn.functional as F

from lenet import fused
from lenet.config import PRESETS
from lenet.models import init_model
from lenet.train import make_optimizer


def main() -> None:
    model = init_model(PRESETS["book"].model, 0)
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    if fused.load() is not None:
        step, engine = fused.FusedStep(model, 0.1).step, "fused"
    else:
        opt, engine = make_optimizer(model, PRESETS["book-1.0"].train), "autograd"

        def step(x, y):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss, None

    def block(guard: bool, n: int = 50) -> float:
        total = torch.zeros(())
        t0 = time.perf_counter()
        for _ in range(n):
            loss, _ = step(x, y)
            total += loss.detach() * len(y)
            if guard and not torch.isfinite(total):  # the trainer's check
                raise SystemExit("diverged")
        return (time.perf_counter() - t0) / n

    for _ in range(3):
        block(True), block(False)
    with_guard, without = [], []
    for _ in range(20):  # interleaved, so machine noise hits both alike
        with_guard.append(block(True))
        without.append(block(False))
    s = torch.zeros(())
    t0 = time.perf_counter()
    for _ in range(10_000):
        bool(torch.isfinite(s))
    check = (time.perf_counter() - t0) / 10_000
    base = statistics.median(without)
    guarded = statistics.median(with_guard)
    print(f"{engine} step, median of 20 blocks: with guard {guarded * 1e3:.3f} ms, "
          f"without {base * 1e3:.3f} ms")
    print(f"the check alone: {check * 1e6:.1f} us per step = {100 * check / base:.2f}% of a step")


if __name__ == "__main__":
    main()
