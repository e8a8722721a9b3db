"""Training on a GPU, in one run: eager PyTorch autograd vs the CUDA graph (lenet.cuda_graph).

    python benchmarks/gpu_speed.py [--data DIR] [--steps 400] [--only steps,runs]

steps: per training step of 128 for the book recipe on the Triton kernels (lenet.triton_book,
spread over the GPU each of its two ways, lenet.triton_book.SPREADS) and on cuDNN (also with
PyTorch's cuDNN defaults), and the fast and best recipes on cuDNN, on synthetic uint8
batches already on the GPU:
  eager     the trainer's autograd engine (LENET_FUSED=0): forward, backward, optimizer
  graph     the graph step: batch copied in, graph replayed, optimizer (torch.optim)
  inside    as the trainer runs it: only the batch's indices copied in, the graph gathering
            the batch from a resident split of 60,000 and, for plain SGD at a constant rate
            (book), updating the weights too; else torch.optim after it
  replay    the graph replayed back to back with nothing else: the GPU's own time per step
runs: whole `lenet train --preset P --device cuda` processes (imports, data, evaluation,
plots and checkpoints included) for book (graph, the Triton kernels spread "image" with
LENET_TRITON_SPREAD=image, and eager with LENET_FUSED=0), fast, best.
profile: the book step's CUDA kernels by GPU time (torch.profiler), on the Triton kernels
(profile-split: spread "split"; profile-cudnn: on cuDNN).
compile: the book step with cuDNN in channels_last, and with torch.compile'd forward and
backward (Inductor), in the graph.
Prints tables; not part of the test suite. Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import bench_ours  # noqa: E402

from lenet import models  # noqa: E402
from lenet.config import PRESETS  # noqa: E402
from lenet.cuda_graph import GraphStep, numerics  # noqa: E402
from lenet.data.batches import to_float  # noqa: E402
from lenet.train import make_optimizer, sgd_at_constant_rate  # noqa: E402

BATCH = 128


def per_step_us(step, steps: int) -> float:
    for _ in range(20):  # warm-up (and the graph's recording)
        step()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / steps * 1e6)
    return best


def variants(preset: str, x: torch.Tensor, y: torch.Tensor, channels_last: bool = False,
             compile_model: bool = False, kernels: str | None = None,
             split: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """kernels: None for cuDNN, else the Triton kernels spread that way ("image",
    "split"). split: (images, labels) resident on the GPU, for the "inside" variant."""
    cfg = PRESETS[preset]
    smooth = cfg.train.label_smoothing

    def model_and_optimizer():
        model = models.init_model(cfg.model, 0).cuda()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        forward = torch.compile(model) if compile_model else model
        if kernels:
            from lenet.triton_book import BookForward

            forward = BookForward(model, kernels)
        return model, forward, make_optimizer(model, cfg.train)

    def eager():
        model, forward, opt = model_and_optimizer()

        def step():
            total = F.cross_entropy(forward(to_float(x)), y, reduction="sum",
                                    label_smoothing=smooth)
            opt.zero_grad(set_to_none=True)
            (total / BATCH).backward()
            opt.step()
        return step

    def graph(optimizer: bool = True):
        model, forward, opt = model_and_optimizer()
        g = GraphStep(model, forward, to_float, smooth)
        g.step(x, y)

        def step():
            g.step(x, y)
            opt.step()

        def replay():
            g.graph.replay()
        return step if optimizer else replay

    def inside():
        model, forward, opt = model_and_optimizer()
        images, labels = split
        lr = cfg.train.lr if sgd_at_constant_rate(cfg.train) else None
        g = GraphStep(model, forward, to_float, smooth,
                      gather=lambda i: (images.index_select(0, i), labels.index_select(0, i)),
                      sgd_lr=lr, sgd_weight_decay=cfg.train.weight_decay)
        order = torch.randperm(len(labels), device=labels.device)
        starts = range(0, len(labels) - BATCH + 1, BATCH)
        at = iter(())

        def step():
            nonlocal at
            start = next(at, None)
            if start is None:
                at = iter(starts)
                start = next(at)
            g.step(order[start:start + BATCH])
            if lr is None:
                opt.step()
        return step

    out = {"eager": eager(), "graph": graph(), "replay": graph(optimizer=False)}
    if split is not None:
        out["inside"] = inside()
    return out


def pytorch_defaults():
    """PyTorch's own cuDNN settings (TF32 convolutions, any algorithm) instead of the
    trainer's (lenet.cuda_graph.numerics: fp32, deterministic)."""
    return contextlib.nullcontext()


def bench_steps(steps: int, rows: list[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (BATCH, 1, 28, 28), generator=gen, dtype=torch.uint8).cuda()
    y = torch.randint(0, 10, (BATCH,), generator=gen).cuda()
    split = (torch.randint(0, 256, (60000, 1, 28, 28), generator=gen, dtype=torch.uint8).cuda(),
             torch.randint(0, 10, (60000,), generator=gen).cuda())

    def trainer():
        return numerics(torch.device("cuda"))
    table = {  # label: (preset, cuDNN settings, channels_last, torch.compile, Triton spread)
        "book, Triton kernels": ("book", trainer, False, False, "image"),
        "book, Triton kernels, split": ("book", trainer, False, False, "split"),
        "book, cuDNN": ("book", trainer, False, False, None),
        "fast, cuDNN": ("fast", trainer, False, False, None),
        "best, cuDNN": ("best", trainer, False, False, None),
        "book, cuDNN with PyTorch's defaults (TF32, any algorithm)":
            ("book", pytorch_defaults, False, False, None),
        "book, cuDNN, channels_last": ("book", trainer, True, False, None),
        "book, cuDNN, torch.compile (cold compile not counted)":
            ("book", trainer, False, True, None),
    }
    print(f"\nper step of {BATCH} (best of 3 x {steps} steps); cuDNN fp32 deterministic as "
          "the trainer runs it unless the row says otherwise")
    print("| recipe | eager µs (ex/s) | graph µs (ex/s) | inside µs (ex/s) "
          "| replay alone µs (ex/s) | graph/eager |")
    print("|---|---|---|---|---|---|")
    for label in rows:
        preset, settings, channels_last, compile_model, kernels = table[label]
        t0 = time.perf_counter()
        with settings():
            fns = variants(preset, x, y, channels_last, compile_model, kernels, split)
            us = {name: per_step_us(fn, steps) for name, fn in fns.items()}
        cells = [f"{us[k]:.0f} ({BATCH / us[k] * 1e6:,.0f})"
                 for k in ("eager", "graph", "inside", "replay")]
        print(f"| {label} | " + " | ".join(cells) + f" | {us['eager'] / us['graph']:.2f}x |"
              + (f" ({time.perf_counter() - t0:.0f} s with compiling)" if compile_model else ""),
              flush=True)


def bench_split_warps(steps: int, warps: list[int]) -> None:
    """The split row with each number of warps per program for its convolutions' kernels
    (the dense layers' kernels keep PROGRAM_WARPS)."""
    from lenet import triton_book

    default = triton_book.SPLIT_WARPS
    for w in warps:
        triton_book.SPLIT_WARPS = w
        try:
            print(f"SPLIT_WARPS = {w}" + (" (the default)" if w == default else ""))
            bench_steps(steps, ["book, Triton kernels, split"])
        except Exception as e:  # a number of warps Triton cannot build for: the next one
            print(f"  failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        finally:
            triton_book.SPLIT_WARPS = default


def profile(out: str | None, kernels: str | None) -> None:
    """The CUDA kernels of the book's eager step (the graph replays the same kernels), on
    cuDNN or on the Triton kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (BATCH, 1, 28, 28), generator=gen, dtype=torch.uint8).cuda()
    y = torch.randint(0, 10, (BATCH,), generator=gen).cuda()
    with numerics(torch.device("cuda")):
        step = variants("book", x, y, kernels=kernels)["eager"]
        for _ in range(20):
            step()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(50):
                step()
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = next(k for k in ("self_device_time_total", "self_cuda_time_total")
               if hasattr(events[0], k))
    text = events.table(sort_by=key, row_limit=30, max_name_column_width=60)
    if out:
        Path(out).write_text(text)
    print(f"\nbook eager step ({f'Triton kernels, spread {kernels}' if kernels else 'cuDNN'}), "
          "50 steps, by GPU "
          "time:\n" + "\n".join(text.splitlines()[:24]))


def bench_runs(data: str, book_only: bool = False) -> None:
    print("\nwhole runs: lenet train --preset P --device cuda (own process each)")
    print("| run | steady examples/s | s/epoch | whole process s | test acc |")
    print("|---|---|---|---|---|")
    runs = [("book", {}, "the engine it picks"),
            ("book", {"LENET_TRITON_SPREAD": "image"}, "Triton kernels spread \"image\""),
            ("book", {"LENET_FUSED": "0"}, "LENET_FUSED=0: eager"),
            ("fast", {}, "the engine it picks"), ("best", {}, "the engine it picks")]
    for preset, env, label in runs[:3] if book_only else runs:
        r = bench_ours(None, data, preset, extra=["--device", "cuda"],
                       env={**os.environ, **env} if env else None)
        name = f"{r['name']} ({label})"
        print(f"| {name} | {r['rate']:,.0f} | {r['epoch_s']:.2f} | {r['wall']:.1f} | "
              f"{r['acc']:.4f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist", help="data set name or IDX folder")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--only", default="steps,runs",
                   help="steps (steps-book: its three book rows),runs (runs-book: book only),"
                        "profile (Triton kernels),profile-split,profile-cudnn,compile")
    p.add_argument("--profile-out", help="write the whole profile table here")
    p.add_argument("--split-warps", default="",
                   help="comma list of warps per program for the split kernels "
                        "(lenet.triton_book.SPLIT_WARPS): the split row again with each")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_speed.py: no CUDA device here")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    only = a.only.split(",")
    if "steps-book" in only:
        bench_steps(a.steps, ["book, Triton kernels", "book, Triton kernels, split",
                              "book, cuDNN"])
    if "steps" in only:
        bench_steps(a.steps, ["book, Triton kernels", "book, Triton kernels, split",
                              "book, cuDNN", "fast, cuDNN", "best, cuDNN",
                              "book, cuDNN with PyTorch's defaults (TF32, any algorithm)"])
    for option, kernels in (("profile", "image"), ("profile-split", "split"),
                            ("profile-cudnn", None)):
        if option in only:
            profile(a.profile_out, kernels)
    if "runs" in only or "runs-book" in only:
        bench_runs(a.data, book_only="runs-book" in only)
    if a.split_warps:
        bench_split_warps(a.steps, [int(w) for w in a.split_warps.split(",")])
    if "compile" in only:
        bench_steps(a.steps, ["book, cuDNN, channels_last",
                              "book, cuDNN, torch.compile (cold compile not counted)"])


if __name__ == "__main__":
    main()
