"""Runs whose input is not 28x28. One trained with --resize (its network takes N x N, the
data set's images are 28 x 28): every verb that shows it the data set's own images resizes
them as training did. One on a 32x32, 15-class IDX folder: its size and classes carry
through every verb."""
from __future__ import annotations

import base64
import importlib.util
import warnings

import numpy as np
import pytest
import torch

from conftest import make_idx_folder
from lenet import cli
from lenet.data.batches import Batches
from lenet.predict import fit_size
from test_report import FASHION, assert_picture

SIZE = 20


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    root = tmp_path_factory.mktemp("resized")
    data = make_idx_folder(root / "data", n_train=200, n_test=60)
    (data / "classes.txt").write_text("\n".join(FASHION) + "\n")
    run = root / "run"
    assert cli.main(["train", "--data", str(data), "--resize", str(SIZE), "--epochs", "1",
                     "--batch-size", "50", "--out", str(run), "--no-progress"]) == 0
    assert cli.main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "50",
                     "--out", str(root / "full"), "--no-progress"]) == 0  # 28x28, to compare
    return run


def test_fit_size_resizes_as_training_does():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    assert fit_size(images, 28) is images  # already the network's size
    small = fit_size(images, SIZE)
    assert small.shape == (5, SIZE, SIZE) and small.dtype == np.uint8
    trained = Batches(images, np.zeros(5, np.int64), 5, resize=SIZE).prepare(
        torch.from_numpy(images)[:, None])
    assert np.abs(small / 255 - trained[:, 0].numpy()).max() <= 0.5 / 255 + 1e-6


def test_activations_of_test_images_and_noise(resized, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert cli.main(["activations", str(resized), "--classes", "coat", "--per-class", "2",
                     "--noise", "uniform", "--sample", "cat", "--out", str(out)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:5]
    assert [r.split()[0] for r in rows] == ["test", "test", "cat", "uniform"]
    assert_picture(out, (1000, 200), (2400, 1000))


def test_export_is_checked_on_the_resized_test_images(resized, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(resized), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "checked on 60 test images of" in text and "argmax agreement 100.00%" in text
    assert f"input 'image' float32 (N, 1, {SIZE}, {SIZE})" in text and out.is_file()


def test_serve_resizes_a_raw_test_image_without_a_warning(resized):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from lenet import serve
    from lenet.data import sources

    served = serve.load_served(resized)
    test = sources.load(served.run.config.data.name, download=False).test
    full = serve.load_served(resized.parent / "full")
    with TestClient(serve.create_app([served, full], test)) as client:
        raw = base64.b64decode(client.get("/api/example?index=3").json()["image"]["data"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. torch's on the body's read-only bytes
            answer = client.post("/api/predict", content=raw,
                                 headers={"Content-Type": "application/octet-stream"}).json()
            as_is = client.post("/api/predict?model=1", content=raw,
                                headers={"Content-Type": "application/octet-stream"}).json()
    assert as_is["input"]["shape"] == [28, 28]  # a 28x28 run gets the bytes themselves
    assert answer["input"]["shape"] == [SIZE, SIZE]
    assert answer["feature_maps"]["conv1"]["shape"] == [6, SIZE, SIZE]
    shown = np.frombuffer(base64.b64decode(answer["input"]["data"]), np.uint8)
    expected = fit_size(np.frombuffer(raw, np.uint8).reshape(1, 28, 28), SIZE)[0]
    assert np.array_equal(shown.reshape(SIZE, SIZE), expected)


def test_a_32x32_15_class_idx_folder_through_every_verb(tmp_path, capsys):
    """Any MNIST-format folder: its own image size and class count carry through."""
    data = make_idx_folder(tmp_path / "data", n_train=150, n_test=45, size=32, classes=15)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "50",
                     "--out", str(run), "--no-progress"]) == 0
    assert cli.main(["summary", "--config", str(run / "config.json")]) == 0
    assert "conv1     Conv2d              6x32x32" in capsys.readouterr().out
    assert cli.main(["evaluate", str(run)]) == 0
    report = capsys.readouterr().out
    assert "on data test set, 45 images" in report and "\n14 " in report  # 15 classes
    assert cli.main(["activations", str(run), "--classes", "3,14", "--per-class", "1",
                     "--sample", "cup", "--out", str(tmp_path / "a.png")]) == 0
    rows = capsys.readouterr().out.splitlines()[1:4]
    assert [r.split()[2] for r in rows[:2]] == ["3", "14"]
    assert cli.main(["predict", str(run), str(tmp_path / "a.png"), "--json"]) == 0
    assert len(capsys.readouterr().out) > 0
    if all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnxscript")):
        assert cli.main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
        assert "(N, 1, 32, 32)" in capsys.readouterr().out
