"""The fused C++ step of two versions of the kernel, interleaved in one process: this
machine's timings drift by 20% within minutes, so two kernels are only comparable side by
side. Each git revision's csrc/ is built (once, cached by torch like the package's own
build) and loaded as its own module; `.` is the working tree's kernel.

    python benchmarks/kernel_ab.py 8506f59 .            # the previous release vs this tree
    python benchmarks/kernel_ab.py HEAD . --recipe fast --rounds 60
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from step_speed import ms_per_call  # noqa: E402 - benchmarks/, this script's folder

from lenet import fused, models  # noqa: E402
from lenet.config import PRESETS  # noqa: E402


def kernel(rev: str):
    """The extension module of git revision `rev` ('.' = the working tree)."""
    if rev == ".":
        ext = fused.load()
        if ext is None:
            sys.exit(f"kernel_ab: the working tree's kernel: {fused.why_unavailable()}")
        return ext
    from torch.utils import cpp_extension

    folder = Path(tempfile.mkdtemp(prefix="lenet-ab-"))
    digest = hashlib.sha1()
    for src in fused.SOURCES:
        path = f"src/lenet/csrc/{src.name}"
        try:
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
                                  check=True, capture_output=True).stdout
        except subprocess.CalledProcessError as e:
            sys.exit(f"kernel_ab: {rev}:{path}: {e.stderr.decode().strip()}")
        (folder / src.name).write_bytes(text)
        digest.update(text)
    return cpp_extension.load(name=f"lenet_ab_{digest.hexdigest()[:12]}",
                              sources=[str(folder / s.name) for s in fused.SOURCES],
                              extra_cflags=list(fused.CFLAGS), extra_ldflags=["-fopenmp"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="+", help="git revisions, '.' for the working tree")
    ap.add_argument("--recipe", default="book", help="a preset the fused kernel runs")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per round")
    ap.add_argument("--batch", type=int, default=128)
    a = ap.parse_args()
    cfg = PRESETS[a.recipe]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (a.batch, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    steps = {}
    for rev in a.revs:
        step = fused.FusedStep.for_recipe(models.init_model(cfg.model, 0), cfg.train)
        step._ext = kernel(rev)
        steps[rev] = functools.partial(step.step, x, y)
    times = {rev: [] for rev in a.revs}
    for r in range(a.rounds):
        for rev in (a.revs if r % 2 == 0 else a.revs[::-1]):
            ms_per_call(steps[rev], 5)  # back in cache after the other kernel
            times[rev].append(ms_per_call(steps[rev], a.steps))
    print(f"{a.recipe} recipe, batch {a.batch}, {torch.get_num_threads()} threads, "
          f"{a.rounds} interleaved rounds of {a.steps} steps; ms per step")
    print(f"{'kernel':>12} | {'min':>6} | {'p25':>6} | {'median':>6} | {'mean':>6}")
    for rev, t in times.items():
        t.sort()
        print(f"{rev:>12} | {t[0]:6.3f} | {t[len(t) // 4]:6.3f} | "
              f"{statistics.median(t):6.3f} | {statistics.mean(t):6.3f}")


if __name__ == "__main__":
    main()
