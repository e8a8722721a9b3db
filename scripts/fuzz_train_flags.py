"""Random `lenet train` flag combinations on a small synthetic IDX folder, each as its own
process: every run must end with exit 0, or exit 1 and one `lenet: error:` line; no
traceback, no warning. Then evaluate, activations and export on some of the trained runs.
A hunt for crashes between features (not part of `make test`: ~3 s a run).

    .venv/bin/python scripts/fuzz_train_flags.py --runs 40 --seed 1
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_idx_folder  # noqa: E402 - the test suite's small learnable data set

CHOICES = {
    "--preset": ["book", "book-1.0", "modern", "fast", "best"],
    "--activation": [None, "sigmoid", "tanh", "relu", "gelu"],
    "--pooling": [None, "avg", "max"],
    "--batch-norm": [None, True],
    "--dropout": [None, "0.3"],
    "--optimizer": [None, "sgd", "adam", "adamw"],
    "--momentum": [None, "0.9", "0"],
    "--nesterov": [None, True],
    "--schedule": [None, "constant", "cosine", "linear"],
    "--warmup": [None, "0.2"],
    "--augment": [None, "none", "flip", "flip+shift"],
    "--label-smoothing": [None, "0.1"],
    "--init": [None, "xavier-uniform", "kaiming", "default"],
    "--resize": [None, "32", "24"],
    "--convs": [None, "8:3:1", "6:5:2,16:5", "4:3:1,8:3:1,16:3:1"],
    "--dense": [None, "none", "64", "120,84"],
    "--batch-size": [None, "7", "64"],
}
LENET = [sys.executable, "-m", "lenet"]


def clean(r: subprocess.CompletedProcess) -> bool:
    err = r.stderr.strip().splitlines()
    if "Traceback" in r.stderr or "Warning" in r.stderr:
        return False
    return r.returncode == 0 or (r.returncode == 1 and len(err) == 1
                                 and err[0].startswith("lenet"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    pick = random.Random(a.seed)
    root = Path(tempfile.mkdtemp(prefix="lenet-fuzz-"))
    data = make_idx_folder(root / "data", n_train=200, n_test=60, seed=a.seed)
    bad, trained = 0, []
    for n in range(a.runs):
        flags = []
        for flag, values in CHOICES.items():
            value = pick.choice(values)
            if value is True:
                flags.append(flag)
            elif value is not None:
                flags += [flag, value]
        out = root / f"run{n}"
        r = subprocess.run([*LENET, "train", "--data", str(data), "--epochs", "2", "--out",
                            str(out), "--no-progress", *flags],
                           capture_output=True, text=True, timeout=600)
        ok = clean(r)
        bad += not ok
        last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or [""]
        print(f"{'ok ' if ok else 'BAD'} exit {r.returncode}  {' '.join(flags)}  | {last[0][:120]}",
              flush=True)
        if not ok:
            print(r.stderr[-2000:])
        elif r.returncode == 0:
            trained.append(out)
    for out in trained[:: max(1, len(trained) // 5)]:
        for verb in (["evaluate", str(out)],
                     ["activations", str(out), "--sample", "cat", "--noise", "uniform",
                      "--out", str(root / "a.png")],
                     ["export", str(out), "--out", str(root / "m.onnx")]):
            r = subprocess.run([*LENET, *verb], capture_output=True, text=True, timeout=600)
            ok = clean(r)
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} exit {r.returncode}  lenet {verb[0]} {out.name}",
                  flush=True)
            if not ok:
                print(r.stderr[-2000:])
    print(f"{bad} bad of {a.runs} runs and their checks; folders in {root}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
