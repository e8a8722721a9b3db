"""inspect.py: capturing activations by name, their statistics, choosing inputs, and the
feature-map figure."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lenet import inspect, plots
from lenet.config import ConvSpec, ModelSpec
from lenet.errors import ConfigError
from lenet.models import build, init_model
from test_report import FASHION, assert_picture, trained_real_run


@pytest.fixture(scope="module")
def model():
    return init_model(ModelSpec(), seed=0)


def test_capture_returns_the_named_layers_after_their_activation(model):
    x = torch.rand(3, 1, 28, 28)
    acts = inspect.capture(model, x)
    assert list(acts) == ["act1", "act2"]
    assert acts["act1"].shape == (3, 6, 28, 28) and acts["act2"].shape == (3, 16, 10, 10)
    with torch.no_grad():
        expected = model.act1(model.conv1(x))
    assert torch.allclose(acts["act1"], expected)
    assert 0 < float(acts["act1"].min()) and float(acts["act1"].max()) < 1  # sigmoid outputs
    assert not acts["act1"].requires_grad


def test_capture_leaves_the_model_as_it_was(model):
    model.train()
    inspect.capture(model, torch.rand(1, 1, 28, 28), ("conv1", "act3", "fc3"))
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_unknown_layer_lists_the_valid_ones(model):
    with pytest.raises(ConfigError, match="unknown layer 'act9': expected one of conv1, act1"):
        inspect.capture(model, torch.rand(1, 1, 28, 28), ("act9",))


def test_conv_activations_follow_the_spec():
    assert inspect.conv_activations(build(ModelSpec())) == ["act1", "act2"]
    three = ModelSpec(convs=(ConvSpec(4, 3, 1), ConvSpec(8, 3, 1), ConvSpec(8, 3, 1)),
                      dense=(32,))
    m = build(three)
    assert inspect.conv_activations(m) == ["act1", "act2", "act3"]
    acts = inspect.capture(m, torch.rand(2, 1, 28, 28))  # the default: every conv layer's
    assert list(acts) == ["act1", "act2", "act3"]
    assert acts["act3"].shape == (2, 8, 7, 7)  # 28 -> 14 -> 7: act3 comes before pool3
    one = build(ModelSpec(convs=(ConvSpec(6, 5, 2),), dense=(64,)))  # act2 is a dense layer's
    assert list(inspect.capture(one, torch.rand(1, 1, 28, 28))) == ["act1"]


def test_stats_use_each_activations_midpoint():
    a = torch.tensor([[0.2, 0.6, 0.7, 0.5], [0.0, 0.0, 0.1, 0.9]]).reshape(2, 1, 2, 2)
    rows = inspect.stats({"act1": a}, "sigmoid")
    assert rows[0]["act1"] == inspect.LayerStats(pytest.approx(0.5), pytest.approx(0.7), 0.5)
    assert rows[1]["act1"].active == 0.25
    relu = inspect.stats({"act1": a}, "relu")
    assert relu[0]["act1"].active == 1.0 and relu[1]["act1"].active == 0.5
    with pytest.raises(ConfigError, match="expected one of sigmoid, tanh, relu, gelu"):
        inspect.stats({"act1": a}, "swish")


def test_class_names_match_case_insensitively_and_unknown_lists_them():
    assert inspect.class_indices(["pullover", " COAT ", "t-shirt/top"], FASHION) == [2, 4, 0]
    with pytest.raises(ConfigError) as e:
        inspect.class_indices(["jumper"], FASHION)
    assert str(e.value) == ("unknown class 'jumper': expected one of " + ", ".join(FASHION))


def test_an_exact_class_name_wins_over_one_in_another_case():
    balanced = ("0", "A", "B", "a", "b", "Dd", "dD")  # like EMNIST's balanced split
    assert inspect.class_indices(["A", "a", "b", " B", "dD"], balanced) == [1, 3, 4, 2, 6]
    assert inspect.class_indices(["Dd"], balanced) == [5]
    with pytest.raises(ConfigError) as e:
        inspect.class_indices(["dd"], balanced)
    assert str(e.value) == "unknown class 'dd': expected 'Dd' or 'dD'"


def _split():
    labels = np.array([4, 2, 2, 4, 2, 0, 4])
    images = np.arange(7, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
    return SimpleNamespace(images=images, labels=labels)


def test_choose_keeps_the_order_of_the_selectors(tmp_path):
    Image.new("L", (30, 40), 200).save(tmp_path / "mine.png")
    probes = inspect.choose(_split(), FASHION, class_names=["coat"], per_class=2,
                            indices=[5], images=[tmp_path / "mine.png"],
                            noises=["uniform", "gaussian"], seed=3, blank=True)
    assert [p.name for p in probes] == ["test #0", "test #3", "test #5", "mine.png (blank)",
                                        "uniform noise", "gaussian noise", "blank"]
    assert [p.label for p in probes] == ["Coat", "Coat", "T-shirt/top", None, None, None, None]
    assert all(p.image.shape == (28, 28) and p.image.dtype == np.uint8 for p in probes)
    assert probes[-1].image.max() == 0
    again = inspect.choose(None, FASHION, noises=["uniform", "gaussian"], seed=3)
    assert np.array_equal(again[0].image, probes[4].image)  # seeded
    assert not np.array_equal(again[0].image, inspect.choose(None, FASHION,
                                                             noises=["uniform"])[0].image)


def test_choose_default_is_pullovers_and_coats_else_the_first_two_classes_present():
    probes = inspect.choose(_split(), FASHION)
    assert [(p.name, p.label) for p in probes] == [
        ("test #1", "Pullover"), ("test #2", "Pullover"), ("test #0", "Coat"),
        ("test #3", "Coat")]
    digits = [str(k) for k in range(10)]  # labels 4, 2, 2, 4, 2, 0, 4: classes 0 and 2
    assert [(p.name, p.label) for p in inspect.choose(_split(), digits)] == [
        ("test #5", "0"), ("test #1", "2"), ("test #2", "2")]
    assert [p.name for p in inspect.choose(_split(), digits, per_class=1)] == [
        "test #5", "test #1"]


def test_choose_errors():
    with pytest.raises(ConfigError, match=r"--index 7: expected 0 to 6"):
        inspect.choose(_split(), FASHION, indices=[7])
    with pytest.raises(ConfigError, match="--index -1"):
        inspect.choose(_split(), FASHION, indices=[-1])
    with pytest.raises(ConfigError, match="class 'Dress': the test set holds no such image"):
        inspect.choose(_split(), FASHION, class_names=["dress"])
    with pytest.raises(ConfigError, match="needs the run's data set"):
        inspect.choose(None, FASHION, indices=[0])
    with pytest.raises(ConfigError, match="--per-class 0"):
        inspect.choose(_split(), FASHION, class_names=["coat"], per_class=0)


def test_activations_figure_is_a_readable_picture(model, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    acts = inspect.capture(model, torch.as_tensor(images[:, None] / 255, dtype=torch.float32))
    labels = [f"input {i}\ntrue -\n→ Coat 0.50" for i in range(8)]
    maps = {"conv1 → sigmoid": acts["act1"].numpy(), "conv2 → sigmoid": acts["act2"].numpy()}
    plots.activations_figure(images, labels, maps, tmp_path / "a.png", title="test")
    assert_picture(tmp_path / "a.png", (1200, 600), (2200, 1200))
    plots.activations_figure(images[:1], labels[:1], maps and {
        k: v[:1] for k, v in maps.items()}, tmp_path / "one.png")
    assert_picture(tmp_path / "one.png", (1200, 150), (2200, 500))


@pytest.mark.slow
def test_real_pullovers_and_coats_activate_differently_from_noise(tmp_path_factory):
    from lenet.data import sources
    from lenet.report import load_run

    run = load_run(trained_real_run(tmp_path_factory))
    ds = sources.load("fashion-mnist")
    probes = inspect.choose(ds.test, ds.classes, noises=["uniform"], blank=True)
    probes = inspect.choose(ds.test, ds.classes) + probes
    assert [p.label for p in probes[:4]] == ["Pullover", "Pullover", "Coat", "Coat"]
    x = torch.as_tensor(np.stack([p.image for p in probes])[:, None] / 255,
                        dtype=torch.float32)
    acts = inspect.capture(run.model, x)
    rows = inspect.stats(acts, "sigmoid")
    assert all(0 < r["act1"].active < 1 for r in rows[:4])
    # A blank input gives flat maps (each channel shows only its bias); clothes do not.
    assert float(acts["act1"][-1].flatten(1).std(1).max()) < 1e-6
    assert all(float(acts["act1"][i].flatten(1).std(1).max()) > 0.05 for i in range(4))
    noise, blank = rows[-2]["act1"], rows[-1]["act1"]
    assert noise.max > blank.max


def test_the_sample_photographs_ship_with_the_package_and_load_as_inputs():
    import fnmatch
    from pathlib import Path

    from lenet import samples
    from lenet.config import read_config_file
    from lenet.predict import load_image

    package = Path(samples.__file__).parent
    pyproject = read_config_file(package.parents[1] / "pyproject.toml")
    globs = pyproject["tool"]["setuptools"]["package-data"]["lenet"]
    credits = (package / "sample_images" / "CREDITS.txt").read_text()
    images = []
    for name in samples.NAMES:
        path = samples.path(name)
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, g) for g in globs), relative  # in the wheel
        assert path.name in credits  # each one says where it comes from and its licence
        with Image.open(path) as im:
            assert im.format == "JPEG" and max(im.size) == 160
        x = load_image(path, 28)
        assert x.shape == (28, 28) and x.dtype == np.uint8 and x.std() > 20  # a picture
        images.append(x)
    assert all(np.abs(a.astype(int) - b).mean() > 10  # three different pictures
               for i, a in enumerate(images) for b in images[i + 1:])
    with pytest.raises(ConfigError, match="sample 'dog': expected one of cat, cup, rocket"):
        samples.path("dog")


def test_choose_puts_samples_after_files_and_before_noise(tmp_path):
    Image.new("L", (40, 40), 255).save(tmp_path / "white.png")
    probes = inspect.choose(None, images=[tmp_path / "white.png"], samples=["rocket", "cat"],
                            noises=["uniform"], blank=True)
    assert [p.name for p in probes] == ["white.png (blank)", "rocket (sample)", "cat (sample)",
                                        "uniform noise", "blank"]
    assert all(p.label is None for p in probes)
