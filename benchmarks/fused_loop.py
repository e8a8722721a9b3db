"""The fused C++ book step on one batch, in a loop: something for a profiler to look at.

    perf record -o /tmp/fused.data python benchmarks/fused_loop.py 3000
    perf report -i /tmp/fused.data --sort dso,symbol --stdio | head -30

Prints ms per step. The batch is random bytes (the kernel's time does not depend on the
pixels); --recipe fast takes the fast preset's momentum, schedule and smoothing instead.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from lenet import fused, models
from lenet.config import PRESETS


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("steps", type=int, nargs="?", default=3000)
    p.add_argument("--recipe", choices=("book", "fast"), default="book")
    a = p.parse_args()
    cfg = PRESETS[a.recipe]
    model = models.init_model(cfg.model, 0)
    if fused.load() is None:
        sys.exit(f"fused_loop: the kernel is not available here: {fused.why_unavailable()}")
    step = fused.FusedStep.for_recipe(model, cfg.train)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (cfg.train.batch_size, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (cfg.train.batch_size,), generator=g)
    for _ in range(50):  # warm: scratch buffers, threads
        step.step(x, y, 0.1)
    gc.freeze()  # as lenet train does once set up: no collections in the profile
    t = time.perf_counter()
    for _ in range(a.steps):
        step.step(x, y, 0.1)
    ms = (time.perf_counter() - t) / a.steps * 1e3
    print(f"{a.recipe}: {ms:.3f} ms per step of {cfg.train.batch_size}, "
          f"{torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
