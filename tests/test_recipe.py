"""Beyond the book's recipe: lr schedules, Nesterov, label smoothing, augmentation, `fast`."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from lenet import fused
from lenet.config import PRESETS, TrainSpec, override
from lenet.data.batches import Batches, augment, augment_draws
from lenet.errors import ConfigError
from lenet.models import init_model, num_params
from lenet.train import lr_at


def test_constant_schedule_is_the_books():
    spec = TrainSpec(lr=0.9)
    assert {lr_at(spec, s, 100) for s in range(100)} == {0.9}


def test_warmup_then_cosine_and_linear_decay():
    cos = TrainSpec(lr=1.0, schedule="cosine", warmup=0.25)
    lrs = [lr_at(cos, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1 / 25) and lrs[24] == pytest.approx(1.0)
    assert lrs[25] == pytest.approx(1.0)  # the peak, then down
    assert lrs[25 + 75 // 2] == pytest.approx(0.5, abs=0.03)
    assert all(a >= b for a, b in zip(lrs[25:], lrs[26:], strict=False))
    assert 0 < lrs[-1] < 0.001
    lin = TrainSpec(lr=1.0, schedule="linear")
    assert [lr_at(lin, s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize("changes, words", [
    ({"nesterov": True}, "nesterov: needs optimizer sgd with momentum > 0"),
    ({"schedule": "step"}, "train.schedule: expected one of constant, cosine, linear"),
    ({"augment": "rotate"}, "train.augment: expected one of none, flip, flip+shift"),
    ({"label_smoothing": 1.0}, "train.label_smoothing: expected 0 <= x < 1"),
    ({"warmup": -0.1}, "train.warmup: expected 0 <= x < 1"),
])
def test_bad_recipe_values_are_one_line_errors(changes, words):
    with pytest.raises(ConfigError, match=words.replace("+", r"\+")):
        TrainSpec(**changes)


def test_fused_kernel_computes_the_recipes_and_declines_the_rest():
    for name in ("book", "book-1.0", "modern", "fast"):
        cfg = PRESETS[name]
        assert fused.supports(cfg.model, cfg.train, "cpu") is None, name
    for cfg in (override(PRESETS["book"], "train", schedule="cosine", label_smoothing=0.1,
                         augment="flip+shift", momentum=0.9, weight_decay=1e-4),):
        assert fused.supports(cfg.model, cfg.train, "cpu") is None
    best = PRESETS["best"]
    assert "batch norm" in fused.supports(best.model, best.train, "cpu")
    for section, changes, why in [("train", {"optimizer": "adam"}, "optimizer adam"),
                                  ("model", {"activation": "tanh"}, "activation tanh"),
                                  ("model", {"batch_norm": True}, "batch norm")]:
        cfg = override(PRESETS["book"], section, **changes)
        assert why in fused.supports(cfg.model, cfg.train, "cpu")


def test_fast_and_best_presets_are_lenet_sized():
    fast, best = PRESETS["fast"], PRESETS["best"]
    assert num_params(init_model(fast.model, 0)) == 61_706  # the book's network, ReLU + max
    assert num_params(init_model(best.model, 0)) == 61_226
    assert fast.train.epochs == 10 and best.train.epochs == 9
    assert best.train.augment == "flip" and fast.train.augment == "none"


def _tagged(n=300):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return images, np.arange(n) % 10


def test_flip_mirrors_exactly_the_drawn_images():
    x = torch.arange(2 * 28 * 28, dtype=torch.uint8).reshape(2, 1, 28, 28)
    draws = torch.tensor([[1, 0], [0, 0], [0, 0]])
    out = augment(x, "flip", draws)
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_shift_moves_the_picture_and_fills_with_background():
    x = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    x[0, 0, 10, 12] = 255
    out = augment(x, "flip+shift", torch.tensor([[0], [2], [-1]]))  # 2 down, 1 left
    assert out[0, 0, 12, 11] == 255 and out.sum() == 255
    edge = torch.full((1, 1, 28, 28), 7, dtype=torch.uint8)
    out = augment(edge, "flip+shift", torch.tensor([[0], [-2], [2]]))
    assert (out[0, 0, -2:] == 0).all() and (out[0, 0, :, :2] == 0).all()
    assert (out[0, 0, :-2, 2:] == 7).all()


def test_augmented_passes_are_seeded_and_replay_exactly_after_a_skip():
    images, labels = _tagged()

    def batches(seed):
        return Batches(images, labels, 64, generator=torch.Generator().manual_seed(seed),
                       augment="flip+shift")

    a = batches(0)
    first = list(a.epoch())
    assert not torch.equal(first[0][0], Batches(images, labels, 64).prepare(
        torch.as_tensor(images)[:64, None]))  # something changed
    again = list(batches(0).epoch())
    assert all(torch.equal(p[0], q[0]) for p, q in zip(first, again, strict=True))
    skipped = list(batches(0).epoch(skip=2))  # a resumed epoch: the same later batches
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
               for p, q in zip(first[2:], skipped, strict=True))
    assert len(augment_draws(10, torch.Generator())[0]) == 10


def test_evaluation_batches_are_never_augmented():
    images, labels = _tagged(100)
    test = Batches(images, labels, 100, augment="flip+shift")  # no generator: in order
    x, _ = next(iter(test))
    assert torch.equal(x, torch.as_tensor(images)[:, None].float() / 255)


def test_fast_recipe_flags_reach_config_json_and_a_resumed_run_matches_a_straight_one(
        tmp_path, isolated_env, monkeypatch):
    """Schedule, Nesterov, smoothing and augmentation: a run stopped in the middle of
    epoch 2 (as Ctrl-C does) and resumed ends with exactly the metrics of an uninterrupted
    run (the lr is a function of the step; the augmentation draws come from the
    checkpointed generator)."""
    import csv
    import json

    from conftest import make_idx_folder
    from lenet import cli
    from lenet.train import Trainer

    data = make_idx_folder(tmp_path / "data", n_train=256, n_test=64)
    common = ["--preset", "fast", "--data", str(data), "--batch-size", "32", "--no-progress",
              "--augment", "flip+shift", "--schedule", "linear", "--warmup", "0.2",
              "--label-smoothing", "0.05", "--epochs", "3"]
    assert cli.main(["train", *common, "--out", str(tmp_path / "a")]) == 0

    call = Trainer._call

    def stop_in_epoch_2(self, hook, *args):
        if hook == "on_step" and self.epoch == 1 and args[0] == 3:
            self.stop_requested = True
        call(self, hook, *args)

    monkeypatch.setattr(Trainer, "_call", stop_in_epoch_2)
    assert cli.main(["train", *common, "--out", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(Trainer, "_call", call)
    assert cli.main(["train", "--resume", str(tmp_path / "b"), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "a" / "config.json").read_text())["train"]
    assert saved["augment"] == "flip+shift" and saved["schedule"] == "linear"
    assert saved["nesterov"] is True and saved["label_smoothing"] == 0.05

    def numbers(name):
        return [r[:5] for r in csv.reader((tmp_path / name / "metrics.csv").open())]

    assert len(numbers("a")) == 4 and numbers("a") == numbers("b")


def test_channels_last_only_where_it_measured_faster():
    from lenet.train import channels_last_pays

    pays = {name: channels_last_pays(init_model(cfg.model, 0)) for name, cfg in PRESETS.items()}
    assert pays == {"book": True, "book-1.0": True, "modern": True, "fast": True,
                    "best": True}
    few = replace(PRESETS["modern"].model, batch_norm=True)  # BatchNorm over 6 and 16 channels
    assert not channels_last_pays(init_model(few, 0))
