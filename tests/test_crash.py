"""A crash costs nothing: SIGKILL at a random moment, then --resume, ends bit-identical to
a run that was never interrupted (weights and metrics), on a slice of the real data."""
import csv
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_idx_folder
from lenet.checkpoint import load
from lenet.data import sources
from lenet.data.idx import write_idx

EPOCHS = 4


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """6,000 train and 1,000 test images of Fashion-MNIST (synthetic if it is absent)."""
    folder = tmp_path_factory.mktemp("subset")
    if sources.locate("fashion-mnist") is None:
        return make_idx_folder(folder, n_train=6000, n_test=1000)
    ds = sources.load("fashion-mnist")
    for prefix, split, n in (("train", ds.train, 6000), ("t10k", ds.test, 1000)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", split.images[:n])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", split.labels[:n].astype("uint8"))
    return folder


def _train(*args):
    return [sys.executable, "-m", "lenet", "train", "--no-progress", *map(str, args)]


def _numbers(run):
    """metrics.csv without the timing columns."""
    return [row[:5] for row in csv.reader((run / "metrics.csv").open())]


@pytest.fixture(scope="module")
def reference(subset, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_train("--data", subset, "--epochs", EPOCHS, "--out", run), check=True,
                   capture_output=True, timeout=300)
    return run


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(subset, reference, tmp_path,
                                                                 seed):
    run = tmp_path / "run"
    proc = subprocess.Popen(_train("--data", subset, "--epochs", EPOCHS, "--out", run),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "last.ckpt").exists():  # the first checkpoint
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = load(run / "last.ckpt")["epoch"]

    r = subprocess.run(_train("--resume", run), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    if killed_at < EPOCHS:
        assert f"resuming after epoch {killed_at}" in r.stdout
    final, ref = load(run / "last.ckpt"), load(reference / "last.ckpt")
    assert final["epoch"] == ref["epoch"] == EPOCHS
    for name, tensor in ref["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    assert _numbers(run) == _numbers(reference)
