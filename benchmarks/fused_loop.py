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

import torch
from step_speed import fused_step, ms_per_call  # benchmarks/, this script's folder

from lenet import fused
from lenet.config import PRESETS


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("steps", type=int, nargs="?", default=3000)
    p.add_argument("--recipe", choices=("book", "fast"), default="book")
    a = p.parse_args()
    if fused.load() is None:
        sys.exit(f"fused_loop: the kernel is not available here: {fused.why_unavailable()}")
    batch = PRESETS[a.recipe].train.batch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8, generator=g)  # as trained
    y = torch.randint(0, 10, (batch,), generator=g)
    step = fused_step(a.recipe, x, y)
    ms_per_call(step, 50)  # warm: scratch buffers, threads
    gc.freeze()  # as lenet train does once set up: no collections in the profile
    ms = ms_per_call(step, a.steps)
    print(f"{a.recipe}: {ms:.3f} ms per step of {batch}, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
