"""report.py (confusion matrix, per-class accuracy, most confused pairs, load_run) and the
report `lenet evaluate` prints. Also the trained runs the inspection tests share."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_idx_folder
from lenet import cli, plots, report
from lenet.cli_more import print_report
from lenet.config import DataSpec, RunConfig
from lenet.data import sources
from lenet.data.batches import Batches
from lenet.errors import CheckpointError, RunFolderError

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")


def trained_tiny_run(tmp_path_factory):
    """A one-epoch run on small synthetic data named like Fashion-MNIST's classes, trained
    once per test session (the other test modules import this) and kept under basetemp."""
    root = tmp_path_factory.getbasetemp() / "shared-tiny-run"
    run = root / "run"
    if not (run / "last.ckpt").is_file():
        data = make_idx_folder(root / "data")
        (data / "classes.txt").write_text("\n".join(FASHION) + "\n")
        with pytest.MonkeyPatch.context() as mp:  # blind to the machine's data sets
            (root / "system").mkdir(exist_ok=True)
            mp.setenv("LENET_CACHE", str(root / "cache"))
            mp.delenv("LENET_DATA", raising=False)
            mp.delenv("LENET_MIRROR", raising=False)
            mp.setattr(sources, "SYSTEM_DATASETS", root / "system")
            assert cli.main(["train", "--data", str(data), "--epochs", "1", "--batch-size",
                             "64", "--out", str(run), "--no-progress"]) == 0
    return run


def trained_real_run(tmp_path_factory):
    """A one-epoch book run on the real Fashion-MNIST (~15-20 s), once per session; skips
    when the data set is not on this machine."""
    if sources.locate("fashion-mnist") is None:
        pytest.skip("Fashion-MNIST is not installed here")
    run = tmp_path_factory.getbasetemp() / "shared-real-run"
    if not (run / "last.ckpt").is_file():
        assert cli.main(["train", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    return run


def assert_picture(path, min_size=(200, 150), max_size=(4000, 4000), min_std=10.0):
    """A PNG of a sensible size that is not blank."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        w, h = im.size
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert min_size[0] <= w <= max_size[0] and min_size[1] <= h <= max_size[1], (w, h)
    assert pixels.std() > min_std, f"{path} looks blank"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return trained_tiny_run(tmp_path_factory)


def test_confusion_matrix_counts_true_by_predicted():
    cm = report.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 0], 3)
    assert cm.dtype == np.int64
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [2, 0, 1]]
    assert report.confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(Exception, match="outside 0..2"):
        report.confusion_matrix([0, 3], [0, 0], 3)


def test_per_class_accuracy_is_nan_for_an_absent_class():
    acc = report.per_class_accuracy(np.array([[3, 1, 0], [0, 0, 0], [1, 1, 2]]))
    assert acc[0] == pytest.approx(0.75) and np.isnan(acc[1]) and acc[2] == pytest.approx(0.5)


def test_most_confused_is_largest_first_ties_row_major_zeros_left_out():
    cm = np.array([[9, 4, 0], [2, 9, 4], [1, 0, 9]])
    assert report.most_confused(cm, ["a", "b", "c"], k=5) == [
        ("a", "b", 4), ("b", "c", 4), ("b", "a", 2), ("c", "a", 1)]
    assert report.most_confused(cm, ["a", "b", "c"], k=1) == [("a", "b", 4)]
    assert report.most_confused(np.eye(3, dtype=int), ["a", "b", "c"]) == []


def test_misclassified_puts_the_most_confident_mistakes_first():
    p = report.Predictions(np.array([0, 1, 2, 3, 4]), np.array([0, 2, 2, 1, 0]),
                           np.array([0.9, 0.4, 0.8, 0.95, 0.6], np.float32))
    assert report.misclassified(p).tolist() == [3, 4, 1]
    assert p.accuracy == pytest.approx(0.4)


class _Oracle(torch.nn.Module):
    """Predicts class = the image's first pixel value, confidently."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        c = (x[:, 0, 0, 0] * 255).round().long()
        return torch.nn.functional.one_hot(c, self.k).float() * 10 + self.w


def test_classify_keeps_the_split_order_across_batches():
    labels = np.arange(50) % 5
    images = np.zeros((50, 28, 28), np.uint8)
    images[:, 0, 0] = (labels + np.arange(50) // 25) % 5  # the second half is off by one
    p = report.classify(_Oracle(5), Batches(images, labels, batch_size=7))
    assert p.pred.tolist() == images[:, 0, 0].tolist()
    assert p.labels.tolist() == labels.tolist() and p.prob.dtype == np.float32
    assert p.accuracy == pytest.approx(0.5) and (p.prob > 0.99).all()
    # logits 10 for the predicted class, 0 elsewhere: right ones cost log(1 + 4e^-10),
    # wrong ones 10 more
    right = np.log1p(4 * np.exp(-10.0))
    assert p.loss == pytest.approx(right + 0.5 * 10, rel=1e-5)
    cm = report.confusion_matrix(p.labels, p.pred, 5)
    assert np.trace(cm) == 25 and cm.sum() == 50


def test_class_names_come_without_loading_data(tmp_path, isolated_env):
    assert report.class_names(RunConfig()) == FASHION
    folder = tmp_path / "mine"
    folder.mkdir()
    cfg = RunConfig(data=DataSpec(name=str(folder)))
    assert report.class_names(cfg) == tuple(str(k) for k in range(10))
    (folder / "classes.txt").write_text("\n".join(f"c{k}" for k in range(10)) + "\n")
    assert report.class_names(cfg)[9] == "c9"


def test_load_run_and_its_errors(tiny_run, tmp_path, isolated_env):
    run = report.load_run(tiny_run)
    assert run.epoch == 1 and run.checkpoint.name == "last.ckpt" and not run.model.training
    assert report.load_run(tiny_run, "best").checkpoint.name == "best.ckpt"
    with pytest.raises(RunFolderError, match="no such run folder"):
        report.load_run(tmp_path / "nope")
    with pytest.raises(RunFolderError, match="not a run folder"):
        report.load_run(tmp_path)
    (tmp_path / "config.json").write_text((tiny_run / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        report.load_run(tmp_path)


def test_figures_are_readable_pictures(tmp_path):
    cm = np.random.default_rng(0).integers(0, 50, (10, 10)) + np.eye(10, dtype=int) * 800
    plots.confusion_figure(cm, FASHION, tmp_path / "c.png", title="run")
    assert_picture(tmp_path / "c.png", (500, 450), (1500, 1400))
    images = np.random.default_rng(1).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    plots.misclassified_gallery(images, np.arange(12) % 10, (np.arange(12) + 1) % 10,
                                np.full(12, 0.7), FASHION, tmp_path / "m.png")
    assert_picture(tmp_path / "m.png", (800, 300), (1500, 1200))
    plots.misclassified_gallery(images[:0], [], [], [], FASHION, tmp_path / "none.png")
    assert_picture(tmp_path / "none.png", (800, 100), (1500, 600), min_std=1)


@pytest.mark.parametrize(("k", "counts"), [(10, True), (47, True), (62, False), (255, False)])
def test_a_confusion_matrix_of_many_classes_stays_a_sensible_picture(tmp_path, monkeypatch, k,
                                                                     counts):
    """EMNIST's 47 or 62 classes (or 255): at most ~2,800 pixels a side, not 4,500 or 17,600;
    the counts are written in the cells up to 50 classes."""
    import matplotlib.axes

    written = []
    original = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, *a, **kw: written.append(a) or original(self, *a, **kw))
    cm = np.random.default_rng(0).integers(0, 3, (k, k)) + np.eye(k, dtype=int) * 90
    plots.confusion_figure(cm, [f"c{i}" for i in range(k)], tmp_path / "c.png")
    assert_picture(tmp_path / "c.png", (900, 850), (2800, 2700))
    assert len(written) == (np.count_nonzero(cm) if counts else 0)


def test_print_report_prints_tables_and_writes_both_figures(tiny_run, tmp_path, capsys,
                                                           isolated_env):
    run = report.load_run(tiny_run)
    ds = sources.load(run.config.data.name)
    p = report.classify(run.model, Batches(ds.test.images, ds.test.labels, 64))
    paths = print_report(p, ds, tmp_path)
    out = capsys.readouterr().out
    assert paths == (tmp_path / "confusion.png", tmp_path / "misclassified.png")
    for name in FASHION:
        assert name in out
    assert "accuracy" in out and "all" in out and "200" in out
    assert "most confused (true -> predicted):" in out
    assert_picture(paths[0], (500, 450), (1500, 1400))
    assert_picture(paths[1], (800, 150), (1500, 1200))


@pytest.mark.slow
def test_report_on_the_real_data(tmp_path_factory, tmp_path, capsys):
    run = report.load_run(trained_real_run(tmp_path_factory))
    ds = sources.load("fashion-mnist")
    capsys.readouterr()
    print_report(report.classify(run.model, Batches(ds.test.images, ds.test.labels, 2000)),
                 ds, tmp_path)
    out = capsys.readouterr().out
    overall = float(next(line for line in out.splitlines() if line.startswith("all")).split()[-1])
    assert overall > 0.45  # one epoch of the book recipe: 0.58; chance is 0.1
    confused = out.split("most confused")[1].splitlines()[1:6]
    assert len(confused) == 5 and all("->" in line for line in confused)
    assert_picture(tmp_path / "confusion.png", (500, 450), (1500, 1400))
    assert_picture(tmp_path / "misclassified.png", (800, 500), (1500, 1200))


def test_a_checkpoint_from_before_the_first_epoch_ended_is_not_called_epoch_0(tiny_run):
    run = report.load_run(tiny_run)
    assert run.epoch_words == "epoch 1"
    assert dataclasses.replace(run, epoch=0).epoch_words == "stopped during epoch 1"
    assert dataclasses.replace(run, epoch=3, partial=True).epoch_words == (
        "stopped during epoch 4")
