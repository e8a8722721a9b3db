"""Accuracy as mean ± std over seeds: `lenet train --preset P --seed S` for each seed, each
its own process, one after another, with its whole-process wall time.

    python benchmarks/seeds.py [--preset fast] [--seeds 0,1,2,3,4] [--epochs N] [--data DIR]
                               [--keep DIR]

Prints a row per seed (with the peak memory, PSS, of the run's process tree, sampled as
train_speed.py does) and the mean ± std (sample std) of the final test accuracy and of
the wall seconds. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from train_speed import run  # benchmarks/ is on sys.path when this file runs

from lenet.runs import RunFolder, read_history
from lenet.train import mean_examples_per_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fast")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--epochs", type=int, help="instead of the preset's")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--keep", help="keep the run folders under this folder")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.keep or tmp)
        accs, walls = [], []
        print(f"preset {a.preset}, seeds {a.seeds}"
              + (f", {a.epochs} epochs" if a.epochs else ""))
        print(f"{'seed':>4} {'test acc':>8} {'best':>6} {'wall s':>7} {'examples/s':>10} "
              f"{'peak PSS':>9}")
        for seed in seeds:
            out = root / f"{a.preset}-seed{seed}"
            epochs = ["--epochs", str(a.epochs)] if a.epochs else []
            _, wall, peak = run([sys.executable, "-m", "lenet", "train", "--preset", a.preset,
                                 "--seed", str(seed), "--data", a.data, "--out", str(out),
                                 "--no-progress", *epochs])  # exits with its stderr if it fails
            history = read_history(RunFolder(out))
            acc = history[-1].test_acc
            best = max(m.test_acc for m in history)
            rate = mean_examples_per_s(history)
            accs.append(acc)
            walls.append(wall)
            print(f"{seed:>4} {acc:>8.4f} {best:>6.4f} {wall:>7.1f} {rate:>10,.0f} "
                  f"{peak / 2**20:>7,.0f}MB", flush=True)
    sd = statistics.stdev if len(seeds) > 1 else (lambda _: 0.0)
    print(f"mean {statistics.mean(accs):.4f} ± {sd(accs):.4f} test acc; "
          f"wall {statistics.mean(walls):.1f} ± {sd(walls):.1f} s")


if __name__ == "__main__":
    main()
