"""End to end on the real Fashion-MNIST (where installed): the book recipe learns."""
import csv
import subprocess
import sys

import pytest

from lenet.data import sources

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_data():
    found = sources.locate("fashion-mnist")
    if found is None:
        pytest.skip("Fashion-MNIST is not installed (make data / lenet data fetch)")
    return found[1]


def test_book_two_epochs_learns_and_writes_a_run_folder(real_data, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lenet", "train", "--preset", "book",
                        "--epochs", "2", "--seed", "0", "--data", str(real_data),
                        "--out", str(run)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "60,000 train, 10,000 test" in r.stdout
    assert "examples/sec on cpu" in r.stdout or "examples/sec on cuda" in r.stdout
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 2
    assert float(rows[-1]["test_acc"]) > 0.5  # chance is 0.1
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    for name in ("config.json", "curves.png", "summary.txt", "last.ckpt", "best.ckpt",
                 "log.txt"):
        assert (run / name).is_file()

    e = subprocess.run([sys.executable, "-m", "lenet", "evaluate", str(run)],
                       capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr
    assert f"test acc {float(rows[-1]['test_acc']):.4f}" in e.stdout
    assert (run / "confusion.png").is_file() and (run / "misclassified.png").is_file()

    c = subprocess.run([sys.executable, "-m", "lenet", "compare", str(run), str(run),
                        "--out", str(tmp_path / "c.png")], capture_output=True, text=True,
                       timeout=120)
    assert c.returncode == 0, c.stderr
    assert "61,706" in c.stdout and (tmp_path / "c.png").stat().st_size > 10_000


def _train_preset(real_data, tmp_path, preset: str) -> list[dict]:
    """`lenet train --preset PRESET` on the real data; its metrics.csv rows."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lenet", "train", "--preset", preset,
                        "--data", str(real_data), "--out", str(run), "--no-progress"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return list(csv.DictReader((run / "metrics.csv").open()))


def test_modern_preset_reaches_088_in_ten_epochs(real_data, tmp_path):
    """Exercise 1: ReLU + max-pool at lr 0.1, 10 epochs, seed 0 (measured 0.8861 on the fused
    kernel, 0.8877 on autograd)."""
    rows = _train_preset(real_data, tmp_path, "modern")
    assert len(rows) == 10 and float(rows[-1]["test_acc"]) >= 0.88


def test_fast_preset_passes_091_in_ten_epochs_on_the_fused_kernel(real_data, tmp_path):
    """Exercise 1's network with Nesterov SGD, warm-up + cosine, weight decay and label
    smoothing, all in the fused C++ step; seed 0 (measured 0.913; seeds 0-4: the README)."""
    rows = _train_preset(real_data, tmp_path, "fast")
    assert len(rows) == 10 and float(rows[-1]["test_acc"]) >= 0.905
    from lenet import fused

    if fused.load() is not None:
        assert "step: fused C++ kernel" in (tmp_path / "run" / "log.txt").read_text()
