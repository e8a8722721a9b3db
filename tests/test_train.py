import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import stop_and_save
from lenet.config import PRESETS, ModelSpec, TrainSpec
from lenet.data.batches import Batches
from lenet.errors import DivergenceError
from lenet.evaluate import evaluate
from lenet.models import init_model
from lenet.train import DIVERGED_LOSS, Callback, Trainer, make_optimizer


def _toy(n, seed=0):
    """Ten classes, each a bright bar in its own rows: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, (n, 28, 28), dtype=np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 + 2 * k: 4 + 2 * k, 4:24] = 230
    return images, labels


def test_one_sgd_step_lowers_the_loss_on_a_fixed_batch():
    model = init_model(PRESETS["book"].model, seed=0)
    x, y = next(iter(Batches(*_toy(128), 128)))
    opt = make_optimizer(model, PRESETS["book-1.0"].train)
    before = F.cross_entropy(model(x), y)
    opt.zero_grad()
    before.backward()
    opt.step()
    assert F.cross_entropy(model(x), y) < before.detach()


# The sigmoid book net sits at chance for a few hundred steps (as in the book); the trainer's
# mechanics are tested on the ReLU/max-pool variant, which learns the toy task in seconds.
FAST = ModelSpec(activation="relu", pooling="max", init="kaiming")


def test_fit_learns_and_reports_each_epoch():
    spec = TrainSpec(epochs=4, batch_size=32, lr=0.05)
    seen = []

    class Spy(Callback):
        def on_epoch_end(self, trainer, metrics):
            seen.append(metrics)

    model = init_model(FAST, seed=0)
    trainer = Trainer(spec, torch.device("cpu"), [Spy()])
    history = trainer.fit(model, Batches(*_toy(640), 32), Batches(*_toy(200, seed=1), 100))
    assert [m.epoch for m in history] == [1, 2, 3, 4] and seen == history
    assert history[-1].test_acc > 0.5  # chance is 0.1
    assert history[-1].train_loss < history[0].train_loss
    assert all(m.examples_per_s > 0 and m.seconds > 0 for m in history)
    loss, acc = evaluate(model, Batches(*_toy(200, seed=1), 100))
    assert (loss, acc) == pytest.approx((history[-1].test_loss, history[-1].test_acc))


def _weights_after(epochs, seed=0, resume_from=None):
    model = init_model(PRESETS["book"].model, seed=seed)
    trainer = Trainer(TrainSpec(epochs=epochs, batch_size=64, seed=seed), torch.device("cpu"))
    if resume_from is not None:
        trainer.restore(resume_from)
    trainer.fit(model, Batches(*_toy(320), 64), Batches(*_toy(100, seed=1), 100))
    return trainer


def test_same_seed_same_numbers():
    a, b = _weights_after(2), _weights_after(2)
    assert [m.train_loss for m in a.history] == [m.train_loss for m in b.history]
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                  b.model.state_dict().values(), strict=True))
    c = _weights_after(2, seed=1)
    assert [m.train_loss for m in a.history] != [m.train_loss for m in c.history]


def test_resume_from_state_is_bit_identical():
    full = _weights_after(3)
    half = _weights_after(1)
    state = {"model": half.model.state_dict(), "optimizer": half.optimizer.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "generator": half.generator.get_state()},
             "epoch": 1, "history": [m.as_dict() for m in half.history]}
    resumed = _weights_after(3, resume_from=state)
    assert [m.train_loss for m in resumed.history] == [m.train_loss for m in full.history]
    assert all(torch.equal(x, y) for x, y in zip(resumed.model.state_dict().values(),
                                                  full.model.state_dict().values(), strict=True))


def test_divergence_stops_with_a_clear_message():
    model = init_model(PRESETS["book"].model, seed=0)
    with torch.no_grad():
        model.fc3.weight.fill_(float("nan"))
    trainer = Trainer(TrainSpec(epochs=2, batch_size=64), torch.device("cpu"))
    with pytest.raises(DivergenceError, match="epoch 1, step 1: .*lower learning rate"):
        trainer.fit(model, Batches(*_toy(128), 64), Batches(*_toy(64), 64))


def test_a_finite_but_exploded_loss_is_divergence_and_a_merely_bad_one_is_not():
    """ReLU at --lr 100 on Fashion-MNIST: the loss reaches ~1e17 yet stays finite, and the
    run would sit at chance for all its epochs. A bad but sane network (loss in the tens)
    trains on."""
    def fit(scale: float) -> Trainer:
        model = init_model(PRESETS["book"].model, seed=0)
        with torch.no_grad():
            model.fc3.weight.mul_(scale)  # logits `scale` times larger
        trainer = Trainer(TrainSpec(epochs=1, batch_size=64), torch.device("cpu"))
        trainer.fit(model, Batches(*_toy(128), 64), Batches(*_toy(64), 64))
        return trainer

    with pytest.raises(DivergenceError, match=r"epoch 1, step 1: the training loss reached "
                       r"\d\.\d\de\+\d\d per example \(training diverged\)"):
        fit(1e7)
    bad = fit(60.0)
    assert 20 < bad.history[0].train_loss < DIVERGED_LOSS  # bad, and not stopped


def test_divergence_is_caught_at_the_step_it_happens():
    model = init_model(FAST, seed=0)
    trainer = Trainer(TrainSpec(epochs=1, batch_size=16, lr=1e6), torch.device("cpu"))
    with pytest.raises(DivergenceError, match=r"epoch 1, step (\d+):") as caught:
        trainer.fit(model, Batches(*_toy(640), 16), Batches(*_toy(64), 64))
    assert int(caught.value.args[0].split("step ")[1].split(":")[0]) < 40  # of 40 steps


def test_interrupt_mid_epoch_then_resume_is_bit_identical():
    """Ctrl-C sets stop_requested: the step finishes, the state (mid-epoch) is handed to
    on_interrupt, and a resume from it ends with exactly the uninterrupted weights."""
    from lenet.train import TrainingInterrupted

    full = _weights_after(2)
    saved = {}

    model = init_model(PRESETS["book"].model, seed=0)
    stop = stop_and_save(saved, epoch=1, step=2)  # in the 2nd epoch, after its 2nd step
    trainer = Trainer(TrainSpec(epochs=2, batch_size=64), torch.device("cpu"), [stop])
    with pytest.raises(TrainingInterrupted, match="epoch 2 after step 2"):
        trainer.fit(model, Batches(*_toy(320), 64), Batches(*_toy(100, seed=1), 100))
    assert saved["partial"]["step"] == 2 and saved["epoch"] == 1
    resumed = _weights_after(2, resume_from=saved)
    assert [m.train_loss for m in resumed.history] == [m.train_loss for m in full.history]
    assert all(torch.equal(x, y) for x, y in zip(resumed.model.state_dict().values(),
                                                  full.model.state_dict().values(), strict=True))
