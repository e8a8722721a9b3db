"""The "graph" engine (lenet.cuda_graph): the step recorded once as a CUDA graph and replayed.

On a CPU the recorder is `Rerun`, which keeps the graph's contract, so the bookkeeping around
the graph (static inputs and gradients, the warm-up leaving no trace, the partial batch, the
trainer's use of it) is checked everywhere. The tests marked `cuda` record real graphs and run
where PyTorch sees a GPU (the lent device machine); elsewhere they are skipped.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_run, interrupt_and_resume
from lenet import models
from lenet.config import PRESETS, ConvSpec
from lenet.cuda_graph import GraphStep, Rerun, numerics
from lenet.data.batches import Batches, to_float
from lenet.train import Callback, Trainer, TrainingInterrupted, pick_engine

BOOK, BEST = PRESETS["book"], PRESETS["best"]
SMALL_BEST = replace(BEST.model, convs=(ConvSpec(8, 3, 1), ConvSpec(16, 3, 1)), dense=(32,))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def images(n: int, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def eager_steps(model, spec, batches, lr=0.1):
    """What the trainer's autograd engine does for each batch: the reference."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, y in batches:
        logits = model(to_float(x))
        total = F.cross_entropy(logits, y, reduction="sum",
                                label_smoothing=spec.label_smoothing)
        opt.zero_grad(set_to_none=True)
        (total / len(y)).backward()
        opt.step()
        losses.append(total.item())
    return losses


def graph_steps(model, spec, batches, lr=0.1, recorder=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    step = GraphStep(model, model, to_float, spec.label_smoothing, recorder=recorder)
    losses = []
    for x, y in batches:
        total, _ = step.step(x, y)
        opt.step()
        losses.append(total.item())
    return losses, step


def two_models(model_spec, device="cpu"):
    return (models.init_model(model_spec, 0).to(device),
            models.init_model(model_spec, 0).to(device))


def batches_of(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


@pytest.mark.parametrize("model_spec", [BOOK.model, SMALL_BEST,
                                        replace(BOOK.model, dropout=0.5)],
                         ids=["book", "batchnorm", "dropout"])
def test_graph_steps_follow_eager_steps_exactly(model_spec):
    """Full batches through the (stand-in) graph and a partial last batch eagerly give the
    eager trainer's losses, weights and running statistics: the warm-up runs leave no trace
    (BatchNorm's statistics and batch count, dropout's random numbers)."""
    x, y = images(64 * 4 + 24)
    data = batches_of(x, y, 64)
    a, b = two_models(model_spec)
    torch.manual_seed(5)
    expected = eager_steps(a, BOOK.train, data)
    torch.manual_seed(5)
    got, step = graph_steps(b, BOOK.train, data)
    assert got == expected
    assert step.replays == 4  # the 24-image batch ran eagerly
    for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_gradients_land_in_the_same_tensors_every_step():
    """An optimizer reads .grad: the graph writes the same tensors each replay, and a
    zero_grad(set_to_none=True) in between cannot unhook them."""
    model = models.init_model(BOOK.model, 0)
    x, y = images(128)
    step = GraphStep(model, model, to_float, recorder=Rerun)
    step.step(x[:64], y[:64])
    first = [p.grad for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad(set_to_none=True)
    step.step(x[64:], y[64:])
    assert all(p.grad is g for p, g in zip(model.parameters(), first, strict=True))
    assert all(g.abs().sum() > 0 for g in first)


def test_recording_computes_nothing():
    """The recorder is handed the step without running it (a CUDA graph's recording executes
    no kernel); the first full batch's step is the first replay."""
    calls = []

    class Counting(Rerun):
        def __init__(self, run):
            calls.append("recorded")
            super().__init__(run)

        def replay(self):
            calls.append("replayed")
            return super().replay()

    model = models.init_model(BOOK.model, 0)
    x, y = images(64)
    GraphStep(model, model, to_float, recorder=Counting).step(x, y)
    assert calls == ["recorded", "replayed"]


def test_pick_engine_takes_the_graph_on_cuda(monkeypatch):
    engine, text = pick_engine(SMALL_BEST, BEST.train, torch.device("cuda"))
    assert engine == "graph" and "CUDA graph" in text and "LENET_FUSED=0" in text
    monkeypatch.setenv("LENET_FUSED", "0")
    for model_spec in (SMALL_BEST, BOOK.model):
        engine, text = pick_engine(model_spec, BOOK.train, torch.device("cuda"))
        assert engine == "autograd" and "turned off by LENET_FUSED=0" in text


def make_data(device="cpu", augment="none"):
    def data():
        x, y = images(320, seed=3, device=device)
        return (Batches(x[:, 0], y, 64, device=device, augment=augment),
                Batches(x[:100, 0], y[:100], 100, device=device))
    return data


def fit(engine, spec, model_spec, device="cpu", augment="none"):
    trainer = Trainer(spec, torch.device(device), engine=engine)
    trainer.fit(models.init_model(model_spec, 0), *make_data(device, augment)())
    return trainer


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_the_trainer_on_the_graph_follows_autograd(device):
    """Two epochs of the best recipe (momentum, schedule, label smoothing, flips) on the
    graph engine and on eager autograd: the same losses to float rounding."""
    spec = replace(BEST.train, epochs=2, batch_size=64)
    graph = fit("graph", spec, SMALL_BEST, device, "flip")
    eager = fit("autograd", spec, SMALL_BEST, device, "flip")
    assert graph.graph.replays == 2 * 5
    for g, e in zip(graph.history, eager.history, strict=True):
        assert (g.train_loss, g.test_loss) == pytest.approx((e.train_loss, e.test_loss),
                                                            rel=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_interrupt_and_resume_on_the_graph_is_bit_identical(device):
    spec = replace(BEST.train, epochs=2, batch_size=64)
    full, resumed, _ = interrupt_and_resume(spec, SMALL_BEST, "graph", make_data(device, "flip"),
                                            device=device)
    assert_same_run(resumed, full)


@cuda
@pytest.mark.parametrize("model_spec", [BOOK.model, SMALL_BEST], ids=["book", "batchnorm"])
def test_a_recorded_cuda_graph_follows_eager_steps(model_spec):
    """Real CUDA graphs: replays give eager PyTorch's losses and weights (same kernels)."""
    x, y = images(128 * 6 + 40, device="cuda")
    data = batches_of(x, y, 128)
    a, b = two_models(model_spec, "cuda")
    with numerics(torch.device("cuda")):
        expected = eager_steps(a, BOOK.train, data)
        got, step = graph_steps(b, BOOK.train, data)
    assert step.replays == 6
    assert got == pytest.approx(expected, rel=1e-5)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(p.float(), q.float(), rtol=1e-4, atol=1e-6), \
            f"{name}: max difference {(p.float() - q.float()).abs().max().item():.3g}"


def test_cuda_numerics_are_fp32_and_deterministic_and_put_back():
    """On CUDA the trainer asks cuDNN for fp32 (no TF32) deterministic algorithms, for the
    duration of the fit only; on a CPU it changes nothing."""
    cudnn = torch.backends.cudnn
    before = (cudnn.deterministic, cudnn.allow_tf32, cudnn.benchmark)
    with numerics(torch.device("cuda")):
        assert (cudnn.deterministic, cudnn.allow_tf32, cudnn.benchmark) == (True, False, False)
    assert (cudnn.deterministic, cudnn.allow_tf32, cudnn.benchmark) == before
    with numerics(torch.device("cpu")):
        assert (cudnn.deterministic, cudnn.allow_tf32, cudnn.benchmark) == before


@cuda
def test_the_cuda_trainer_is_reproducible_run_to_run():
    spec = replace(BOOK.train, epochs=2, batch_size=64)
    assert_same_run(fit("graph", spec, BOOK.model, "cuda"), fit("graph", spec, BOOK.model, "cuda"))


def test_gathering_and_sgd_in_the_graph_follow_torch_optim_exactly():
    """With `gather` and `sgd_lr`, the step takes indices into the resident split, and the
    update is torch.optim.SGD's (weight decay too): the same losses, running sums and bits
    as the step with torch.optim after it, the partial last batch included."""
    x, y = images(64 * 3 + 20)
    spec = replace(BOOK.train, weight_decay=5e-4)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    a, b = two_models(BOOK.model)
    opt = torch.optim.SGD(a.parameters(), lr=0.9, weight_decay=spec.weight_decay)
    plain = GraphStep(a, a, to_float, recorder=Rerun)
    split = Batches(x[:, 0], y, 64)
    inside = GraphStep(b, b, to_float, recorder=Rerun, gather=split.gather, sgd_lr=0.9,
                       sgd_weight_decay=spec.weight_decay)
    for start in range(0, len(y), 64):
        idx = order[start:start + 64]
        expected = plain.step(x[idx], y[idx])
        opt.step()
        got = inside.step(idx)
        assert [t.item() for t in got] == [t.item() for t in expected]
    assert inside.replays == 3
    assert [t.item() for t in inside.sums] == [t.item() for t in plain.sums]
    assert all(p.grad is None for p in b.parameters())  # no optimizer reads them
    for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_the_warm_up_leaves_the_weights_and_sums_as_they_were():
    """The recording's warm-up runs are real steps: with the update in the graph they move
    the weights and add to the sums, which must be put back (the first step is the first
    replay)."""
    model = models.init_model(BOOK.model, 0)
    before = [p.detach().clone() for p in model.parameters()]
    step = GraphStep(model, model, to_float, sgd_lr=0.9,
                     recorder=type("Still", (Rerun,), {"replay": lambda self: None}))
    step.step(*images(64))  # records, then "replays" nothing
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert [t.item() for t in step.sums] == [0, 0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_the_trainer_records_the_book_update_and_gather_in_the_graph(monkeypatch, device):
    """The book's recipe on the graph engine: gathered and updated in the graph, with the
    same run, bit for bit, as with torch.optim's step after the graph's."""
    from lenet import train

    spec = replace(BOOK.train, epochs=2, batch_size=64)
    inside = fit("graph", spec, BOOK.model, device)
    assert inside.graph.sgd_lr == spec.lr and inside.graph.gather is not None
    assert inside.graph.replays == 2 * 5  # 320 images: 5 batches of 64, 2 epochs
    monkeypatch.setattr(train, "sgd_at_constant_rate", lambda spec: False)
    outside = fit("graph", spec, BOOK.model, device)
    assert outside.graph.sgd_lr is None
    assert_same_run(inside, outside)
    assert [m.train_acc for m in inside.history] == [m.train_acc for m in outside.history]
    eager = fit("autograd", spec, BOOK.model, device)
    for g, e in zip(inside.history, eager.history, strict=True):
        assert (g.train_loss, g.train_acc, g.test_loss) == pytest.approx(
            (e.train_loss, e.train_acc, e.test_loss), rel=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_interrupt_and_resume_with_the_update_in_the_graph_is_bit_identical(device):
    spec = replace(BOOK.train, epochs=2, batch_size=64)
    full, resumed, _ = interrupt_and_resume(spec, BOOK.model, "graph", make_data(device),
                                            device=device)
    assert full.graph.sgd_lr is not None
    assert_same_run(resumed, full)


@pytest.mark.parametrize("change, inside", [
    ({}, True), ({"weight_decay": 5e-4}, True), ({"momentum": 0.9}, False),
    ({"schedule": "cosine"}, False), ({"warmup": 0.1}, False), ({"optimizer": "adam"}, False)])
def test_which_recipes_update_in_the_graph(change, inside):
    from lenet.train import sgd_at_constant_rate

    assert sgd_at_constant_rate(replace(BOOK.train, **change)) is inside


def test_batches_by_indices_give_the_same_batches():
    x, y = images(150)
    plain = Batches(x[:, 0], y, 64, generator=torch.Generator().manual_seed(4))
    plain.as_bytes = True
    lazy = Batches(x[:, 0], y, 64, generator=torch.Generator().manual_seed(4))
    for skip in (0, 1):
        got = [(lazy.gather(idx), none) for idx, none in lazy.epoch(skip, indices=True)]
        want = list(plain.epoch(skip))
        assert len(got) == len(want) == 3 - skip
        for ((gx, gy), none), (wx, wy) in zip(got, want, strict=True):
            assert none is None and torch.equal(gx, wx) and torch.equal(gy, wy)
    lazy.augment = "flip"
    with pytest.raises(ValueError, match="without augmentation"):
        next(lazy.epoch(indices=True))


def test_batches_serve_whatever_comes_after_a_graph_fit():
    """The graph engine takes its training batches as indices while it trains; afterwards
    the same Batches yield images: to evaluate(), and to another fit, as either split."""
    from lenet.evaluate import evaluate

    spec = replace(BOOK.train, epochs=1, batch_size=64)
    train, test = make_data()()
    model = models.init_model(BOOK.model, 0)
    graph = Trainer(spec, torch.device("cpu"), engine="graph")
    graph.fit(model, train, test)
    assert graph.graph.static[0].shape == (64,)  # the batch's indices
    assert not train.as_bytes
    loss, acc = evaluate(model, train)
    assert loss > 0 and 0 <= acc <= 1
    after = Trainer(spec, torch.device("cpu"), engine="autograd")
    after.fit(models.init_model(BOOK.model, 0), test, train)  # the splits swapped
    assert after.history[0].train_loss > 0


def test_the_graph_is_recorded_on_a_full_batch_only():
    """A step of another size before any full batch (a run resumed just before a pass's
    last batch) runs eagerly; the first full batch records the graph."""
    x, y = images(64 + 20)
    model = models.init_model(BOOK.model, 0)
    step = GraphStep(model, model, to_float, recorder=Rerun, batch_size=64)
    step.step(x[64:], y[64:])
    assert step.graph is None and step.replays == 0
    step.step(x[:64], y[:64])
    assert step.static[0].shape[0] == 64 and step.replays == 1


def test_a_resume_before_the_last_batch_still_replays_the_full_ones():
    spec = replace(BOOK.train, epochs=2, batch_size=64)

    def data():
        x, y = images(64 * 3 + 20, seed=3)
        return (Batches(x[:, 0], y, 64), Batches(x[:100, 0], y[:100], 100))
    stop_at = []

    class StopBeforeTheLast(Callback):
        def on_step(self, trainer, step):
            if step == 3 and not stop_at:
                stop_at.append(step)
                trainer.stop_requested = True
    first = Trainer(spec, torch.device("cpu"), [StopBeforeTheLast()], engine="graph")
    with pytest.raises(TrainingInterrupted):
        first.fit(models.init_model(BOOK.model, 0), *data())
    resumed = Trainer(spec, torch.device("cpu"), engine="graph")
    resumed.restore({"model": first.model.state_dict(),
                     "optimizer": first.optimizer.state_dict(),
                     "rng": {"torch": torch.get_rng_state(),
                             "generator": first.generator.get_state()},
                     "epoch": first.epoch, "history": [], "partial": first.partial})
    resumed.fit(models.init_model(BOOK.model, 0), *data())
    assert resumed.graph.static[0].shape[0] == 64
    assert resumed.graph.replays == 3  # epoch 1's last batch and epoch 2's ran eagerly
