"""Training-step speed, batch 128: PyTorch autograd (as the trainer runs it) vs the fused C++
step (lenet.fused) for the book and fast presets' recipes, and vs autograd with the C++
BatchNorm blocks (lenet.blocks) for the best preset's, at 1 and 2 threads, plus evaluation
forwards of 10,000 images.

    python benchmarks/step_speed.py [--rounds 12] [--steps 10]

On a shared machine one slow variant run after another would measure the neighbours' load,
not the code: the variants run interleaved, round-robin blocks of --steps steps in one
process, and the table gives the min and median ms/step over the rounds (examples/s and
speed-up from the min). Not part of the test suite.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from lenet import blocks, fused, models
from lenet.config import PRESETS
from lenet.train import channels_last_pays, make_optimizer

BATCH = 128  # the book's
EVAL_IMAGES = 10_000  # Fashion-MNIST's test split


def autograd_step(preset, x, y, with_blocks=False):
    """The trainer's autograd step for a preset's recipe (its optimizer, label smoothing and
    memory layout), optionally with the C++ BatchNorm blocks."""
    cfg = PRESETS[preset]
    model = models.init_model(cfg.model, 0)
    if with_blocks or channels_last_pays(model):
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg.train)
    forward = blocks.BlockForward(model) if with_blocks else model

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y, label_smoothing=cfg.train.label_smoothing).backward()
        opt.step()
    return step


def fused_step(preset, x, y):
    cfg = PRESETS[preset]
    f = fused.FusedStep.for_recipe(models.init_model(cfg.model, 0), cfg.train)
    return lambda: f.step(x, y)


def ms_per_call(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def measure_steps(rounds: int, steps: int, preset: str) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    if preset == "best":
        variants = {f"{preset}: autograd": autograd_step(preset, x, y),
                    f"{preset}: autograd + C++ blocks": autograd_step(preset, x, y, True)}
    else:
        variants = {f"{preset}: autograd": autograd_step(preset, x, y),
                    f"{preset}: fused C++ step": fused_step(preset, x, y)}
    for fn in variants.values():  # warm-up: allocator, MKL and OpenMP thread pools
        ms_per_call(fn, 5)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(ms_per_call(fn, steps))
    return times


def measure_eval(preset: str, repeats: int = 3) -> dict[str, list[float]]:
    """A 10,000-image forward in eval mode, in the evaluation's batches of 500."""
    xs = torch.rand(EVAL_IMAGES, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    xs = xs.split(500)
    model = models.init_model(PRESETS[preset].model, 0).eval()
    if preset == "best":
        model.to(memory_format=torch.channels_last)
    fast = fused.inference_forward(model, "cpu")
    kind = "fused forward" if preset != "best" else "C++ blocks"
    variants = {f"eval 10k {preset}: autograd": lambda: [model(x) for x in xs],
                f"eval 10k {preset}: {kind}": lambda: [fast(x) for x in xs]}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():
            fn()
        for _ in range(repeats):
            for name, fn in variants.items():
                times[name].append(ms_per_call(fn, 1))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds per thread count")
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    args = ap.parse_args()

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average "
          f"{os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    if fused.load() is None:
        raise SystemExit(f"fused kernel unavailable: {fused.why_unavailable()}")
    print(f"fused kernel build/load: {time.perf_counter() - t0:.1f} s")

    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for times, per in ((measure_steps(args.rounds, args.steps, "book"), BATCH),
                           (measure_steps(args.rounds, args.steps, "fast"), BATCH),
                           (measure_steps(args.rounds, args.steps, "best"), BATCH),
                           (measure_eval("book"), EVAL_IMAGES),
                           (measure_eval("best"), EVAL_IMAGES)):
            base = min(next(iter(times.values())))
            for name, ts in times.items():
                best = min(ts)
                rows.append((threads, name, best, statistics.median(ts), per / best * 1e3,
                             base / best))

    print(f"\nbatch {BATCH}, {args.rounds} interleaved rounds of {args.steps} steps; "
          "eval rows: ms per 10,000-image forward")
    print(f"{'thr':>3} | {'variant':<34} | {'min ms':>8} | {'median ms':>9} | "
          f"{'ex/s (min)':>10} | {'speed-up':>8}")
    print("-" * 89)
    for threads, name, best, median, per_s, speedup in rows:
        print(f"{threads:>3} | {name:<34} | {best:8.2f} | {median:9.2f} | {per_s:10.0f} | "
              f"{speedup:7.2f}x")


if __name__ == "__main__":
    main()
