"""Autograd training steps in PyTorch's default (contiguous) layout vs channels-last, batch
128: the book's and exercise 1's nets (were they to train on autograd: LENET_FUSED=0, or no
AVX2), exercise 1's with BatchNorm (over 6 and 16 channels), and `best`.

    python benchmarks/layout_speed.py [--rounds 8] [--steps 10] [--threads N]

The variants run interleaved, round-robin blocks of --steps steps in one process (a shared
machine's load then hits them alike); the table gives the min ms/step over the rounds and
the speed-up of channels-last. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lenet.config import PRESETS, override
from lenet.models import init_model
from lenet.train import make_optimizer

BATCH = 128
NETS = {"book": PRESETS["book"], "modern": PRESETS["modern"],
        "modern+bn": override(PRESETS["modern"], "model", batch_norm=True),
        "best": PRESETS["best"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    x, y = torch.rand(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    variants = {}
    for name, cfg in NETS.items():
        for layout in ("contiguous", "channels_last"):
            model = init_model(cfg.model, 0)
            if layout == "channels_last":
                model.to(memory_format=torch.channels_last)
            variants[(name, layout)] = (model, make_optimizer(model, cfg.train),
                                        cfg.train.label_smoothing)

    def block(model, opt, smoothing) -> float:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / a.steps * 1e3

    for v in variants.values():  # warm-up: oneDNN picks and caches its kernels
        block(*v)
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(a.rounds):
        for k, v in variants.items():
            best[k] = min(best[k], block(*v))
    print(f"{a.threads} thread(s), batch {BATCH}, {a.rounds} interleaved rounds of {a.steps}"
          " steps; min ms per step")
    print(f"{'net':<10} {'contiguous':>10} {'channels_last':>13} {'speed-up':>8}")
    for name in NETS:
        c, cl = best[(name, "contiguous")], best[(name, "channels_last")]
        print(f"{name:<10} {c:>10.2f} {cl:>13.2f} {c / cl:>7.2f}x")


if __name__ == "__main__":
    main()
