"""Where a whole GPU run's training loop spends its host time, per step of the book recipe.

    python benchmarks/gpu_loop_profile.py DATA_DIR [--epochs 3]

A whole `lenet train --preset book --device cuda` can run slower than the step alone
(benchmarks/gpu_speed.py): when the GPU's step is short, the host's work per step (launching
the graph, the optimizer, gathering the batch, summing the metrics) sets the pace. This trains
the book recipe through the library's Trainer and profiles its last epoch's host side
(torch.profiler, by CPU time), then times each of the loop's pieces alone, per call, with
nothing waiting on the GPU. Needs a CUDA device; not part of the test suite.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lenet.config import override, preset
from lenet.data import sources
from lenet.data.batches import Batches
from lenet.models import init_model
from lenet.train import Callback, Trainer, pick_engine


class LastEpochProfile(Callback):
    def __init__(self, epochs: int):
        self.epochs, self.prof, self.steps = epochs, None, 0

    def on_epoch_start(self, trainer, epoch, steps):
        self.steps = steps
        if epoch == self.epochs:
            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()

    def on_epoch_end(self, trainer, m):
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
        print(f"epoch {m.epoch}: loop {m.examples_per_s:,.0f} examples/s "
              f"({60000 / m.examples_per_s / self.steps * 1e6:.0f} µs per step)"
              + (" (profiled)" if self.prof is not None else ""), flush=True)


def per_call_us(fn, sync, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    sync()
    return host


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_loop_profile.py: no CUDA device here")
    cfg = override(preset("book"), "train", epochs=a.epochs)
    ds = sources.load(a.data)
    model = init_model(cfg.model, seed=0)
    engine, why = pick_engine(cfg.model, cfg.train, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}: engine {engine}: {why}")
    train = Batches(ds.train.images, ds.train.labels, cfg.train.batch_size, device)
    test = Batches(ds.test.images, ds.test.labels, 1000, device)
    cb = LastEpochProfile(a.epochs)
    trainer = Trainer(cfg.train, device, [cb], engine)
    trainer.fit(model, train, test)
    print(cb.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                       max_name_column_width=50))

    print("host µs per call, alone:")
    imgs = train.images
    order = torch.randperm(60000, device=device)
    acc = torch.zeros((), device=device)
    one = torch.ones((), device=device)
    g = trainer.graph
    pieces = {
        "order[s:s+128]": lambda: order[128:256],
        "images.index_select": lambda: imgs.index_select(0, order[:128]),
        "scalar +=": lambda: acc.add_(one),
        "optimizer.step": trainer.optimizer.step,
    }
    if g is not None:  # the batch as the trainer hands it: indices, or uint8 images
        batch = (order[:128],) if g.gather is not None else (imgs[:128], train.labels[:128])
        pieces["graph.step (copies + replay)"] = lambda: g.step(*batch)
        pieces["graph.replay alone"] = g.graph.replay
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, fn in pieces.items():
        print(f"  {name}: {per_call_us(fn, sync):.1f}")


if __name__ == "__main__":
    main()
