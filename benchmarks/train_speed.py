"""Training speed, side by side in one run on one machine: the book's loop vs ours.

    python benchmarks/train_speed.py [--epochs 10] [--only book,keras,lightning,ours,fast]
                                     [--data DIR] [--keras-python PYTHON]
                                     [--lightning-python PYTHON]

Keras 3 on TensorFlow (benchmarks/keras_loop.py) runs under an interpreter that has them:
--keras-python, else $LENET_KERAS_PYTHON, else this one if it can import tensorflow; where
there is none it is left out with a note (tensorflow-cpu is a separate ~600 MB install,
not a project dependency: `python -m venv kenv && kenv/bin/pip install tensorflow-cpu`).
PyTorch Lightning (benchmarks/lightning_loop.py) likewise: --lightning-python, else
$LENET_LIGHTNING_PYTHON, else this one if it can import lightning (`python -m venv lenv &&
lenv/bin/pip install torch==2.13.0 lightning`: pin torch, or pip pulls a CUDA build).

Each contender runs as its own process (so whole-process wall time and peak memory are
fair); this script measures the machine's fp32 matrix-multiply rate in the same run to
print the compute floor. Prints a table; not part of the test suite.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The book's own loop: shared/peers beside the checkout when present (the reference the
# project was measured against), else the faithful copy of train_ch6 kept here.
PEER_CANDIDATES = [ROOT.parent / "shared" / "peers" / "book_loop.py", HERE / "book_loop.py"]
FLOP_PER_EXAMPLE = 2.3e6  # book LeNet-5: ~1.13 M multiply-adds forward+backward, x2 FLOP


def matmul_gflops(seconds: float = 1.0) -> float:
    """fp32 GEMM rate with torch's default threads: the ceiling for conv/linear work."""
    import torch

    a, b = torch.rand(1024, 1024), torch.rand(1024, 1024)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0) / 1e9


def probe(data_arg: str | None) -> None:
    """The data, the fused kernel, torch and the GEMM rate, as JSON on stdout (run as a
    child: see main)."""
    import torch

    from lenet import fused
    from lenet.data import sources

    found = sources.locate("fashion-mnist", data_arg)
    if found is None:
        sys.exit("Fashion-MNIST not found: run 'make data' or 'lenet data fetch fashion-mnist'")
    # Built at install (make setup); built here if not, so no contender's wall time and
    # memory include a compiler run.
    kernel = "ready" if fused.load() is not None else f"unavailable ({fused.why_unavailable()})"
    print(json.dumps({"data": str(found[1]), "kernel": kernel, "gflops": matmul_gflops(),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


def tree_memory(pid: int) -> int:
    """Bytes of memory a process and all its descendants (DataLoader workers count) use:
    their proportional set sizes (PSS), where pages a forked worker shares with its parent
    count once in all, not once per process as summed RSS would count them; summed RSS where
    the kernel gives no smaps_rollup."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += _pss(p)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return total


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, PermissionError):  # a kernel before 4.14: no smaps_rollup
        pass
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(cmd: list[str], env=None) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run a command; return it, its wall seconds and the peak memory (PSS) of its process
    tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_memory(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.join()
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return result, wall, peak[0]


def steady(rates: list[float]) -> float:
    """Median examples/s over epochs after the first (which pays warm-up)."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def bench_peer(name: str, python: str, script: Path, epochs: int, data: str) -> dict:
    """A peer script that prints 'epoch N: ..., R examples/s' lines and a last JSON line."""
    r, wall, memory = run([python, str(script), "--epochs", str(epochs), "--data", data])
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    res = rows[-1]
    epoch_rates = [float(line.rsplit(",", 1)[1].split()[0]) for line in r.stdout.splitlines()
                   if line.startswith("epoch ")]
    return {"name": name, "rate": steady(epoch_rates),
            "epoch_s": statistics.median(res["epoch_seconds"]), "wall": wall,
            "acc": res["test_acc"], "memory": memory, "book_recipe": True}


def bench_book(epochs: int, data: str) -> dict:
    peer = next((p for p in PEER_CANDIDATES if p.is_file()), None)
    if peer is None:
        sys.exit("the book's loop is missing: expected one of "
                 + ", ".join(map(str, PEER_CANDIDATES)))
    return bench_peer(f"book's train_ch6 loop ({peer.name})", sys.executable, peer, epochs,
                      data)


# Peers run by an interpreter of their own, named by --PEER-python or $LENET_PEER_PYTHON:
# (table label, script, the modules it imports).
PEERS = {
    "keras": ("Keras 3 / TensorFlow (keras_loop.py)", "keras_loop.py", "tensorflow, keras"),
    "lightning": ("PyTorch Lightning (lightning_loop.py)", "lightning_loop.py", "lightning"),
}


def peer_python(peer: str, given: str | None) -> str | None:
    """An interpreter that can import the peer's modules: the one given, else the one the
    environment names, else this one; None when none can."""
    modules, option = PEERS[peer][2], f"--{peer}-python"
    for py in (given, os.environ.get(f"LENET_{peer.upper()}_PYTHON"), sys.executable):
        if py and subprocess.run([py, "-c", f"import {modules}"], capture_output=True,
                                 env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}).returncode == 0:
            return py
        if py == given and given:
            sys.exit(f"{option} {given}: cannot import {modules} there")
    return None


def bench_ours(epochs: int | None, data: str, preset: str, extra=(), env=None) -> dict:
    """`lenet train --preset PRESET [EXTRA]`, for `epochs` or the preset's own number of
    epochs."""
    more = ["--epochs", str(epochs)] if epochs else []
    with tempfile.TemporaryDirectory() as tmp:
        r, wall, memory = run([sys.executable, "-m", "lenet", "train", "--preset", preset,
                               *more, *extra, "--data", data, "--out", f"{tmp}/run",
                               "--no-progress"], env=env)
        rows = list(csv.DictReader(open(f"{tmp}/run/metrics.csv")))
    name = f"lenet train --preset {preset}" + ("" if epochs else f" ({len(rows)} ep)")
    return {"name": name, "book_recipe": preset == "book",
            "rate": steady([float(x["examples_per_s"]) for x in rows]),
            "epoch_s": statistics.median(float(x["seconds"]) for x in rows), "wall": wall,
            "acc": float(rows[-1]["test_acc"]), "memory": memory}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--only", default="book,keras,lightning,ours,fast",
                   help="comma list of: book, keras, lightning, ours (the book preset), fast "
                   "(the fast preset, its own epochs)")
    p.add_argument("--keras-python", default=None,
                   help="python with tensorflow and keras 3 (default: $LENET_KERAS_PYTHON, "
                   "else this one if it has them)")
    p.add_argument("--lightning-python", default=None,
                   help="python with lightning (default: $LENET_LIGHTNING_PYTHON, else this "
                   "one if it has it)")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: discovered)")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.probe:
        probe(a.data)
        return
    # torch is imported only in a child: PSS splits the pages a contender shares with its
    # parent, and this process holding torch would take part of every torch contender's.
    done = subprocess.run([sys.executable, __file__, "--probe", *(["--data", a.data]
                                                                  if a.data else [])],
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(done.returncode)
    machine = json.loads(done.stdout)
    data, kernel, gflops = machine["data"], machine["kernel"], machine["gflops"]
    floor = gflops * 1e9 / FLOP_PER_EXAMPLE
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {machine['torch']} ({machine['threads']} threads), python "
          f"{platform.python_version()}")
    print(f"fp32 matmul {gflops:.0f} GFLOP/s -> compute floor ~{floor:,.0f} examples/s "
          f"(book LeNet-5, {FLOP_PER_EXAMPLE / 1e6:.1f} MFLOP per training example)")
    print(f"{a.epochs} epochs, batch 128, lr 0.9, seed 0; data {data}; fused kernel {kernel}\n",
          flush=True)

    results = []
    for name in a.only.split(","):
        if name == "book":
            results.append(bench_book(a.epochs, data))
        elif name in PEERS:
            label, script, modules = PEERS[name]
            py = peer_python(name, getattr(a, f"{name}_python"))
            if py is None:
                print(f"  left out: {name} (no python with {modules} here; see "
                      f"--{name}-python)", flush=True)
                continue
            results.append(bench_peer(label, py, HERE / script, a.epochs, data))
        elif name == "ours":
            results.append(bench_ours(a.epochs, data, "book"))
        elif name == "fast":
            results.append(bench_ours(None, data, "fast"))
        else:
            sys.exit(f"--only: unknown contender '{name}' (expected book, keras, lightning, "
                     "ours, fast)")
        results[-1]["key"] = name
        print(f"  done: {results[-1]['name']}", flush=True)

    # The ratio columns: ours (and each peer) against the book's loop and each other peer.
    by_key = {r["key"]: r for r in results}
    bases = [(f"vs {key}", by_key.get(key)) for key in ("book", *PEERS)]
    head = (f"{'':<37} {'examples/s':>10} {'s/epoch':>8} {'wall s':>7} {'test acc':>8} "
            f"{'peak PSS':>9} {'% floor':>7} " + " ".join(h for h, _ in bases))
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        # Ratios and the floor are for the book's network; another network does other work.
        same = r["book_recipe"]
        ratios = " ".join(
            (f"{r['rate'] / base['rate']:.2f}x" if base and same else "-").rjust(len(h))
            for h, base in bases)
        share = f"{100 * r['rate'] / floor:.1f}%" if same else "-"
        print(f"{r['name']:<37} {r['rate']:>10,.0f} {r['epoch_s']:>8.2f} {r['wall']:>7.1f} "
              f"{r['acc']:>8.3f} {r['memory'] / 2**20:>7,.0f}MB {share:>7} {ratios}")


if __name__ == "__main__":
    main()
