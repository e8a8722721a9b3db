"""The C++ BatchNorm-ReLU-max-pool block and single-channel convolution (lenet.blocks)
against what they replace: torch's modules under autograd, and float64 references.

Tests that run the ops skip (saying why) where the extension cannot be built.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lenet import blocks, fused, models
from lenet.config import PRESETS, ConvSpec, ModelSpec
from lenet.data import sources
from lenet.data.batches import Batches
from lenet.train import Trainer, pick_engine

BEST = PRESETS["best"]


@pytest.fixture(scope="module")
def ext():
    fused._reset_for_tests()
    loaded = fused.load()
    if loaded is None:
        pytest.skip(f"C++ extension unavailable here: {fused.why_unavailable()}")
    return loaded


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def reference_block(x, w, b, dout, dtype):
    """(out, dx, dw, db, running_mean, running_var) of torch's modules in `dtype`."""
    x, w, b = (t.to(dtype).detach().requires_grad_() for t in (x, w, b))
    rm, rv = torch.zeros(x.shape[1], dtype=dtype), torch.ones(x.shape[1], dtype=dtype)
    out = F.max_pool2d(F.relu(F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1)), 2)
    out.backward(dout.to(dtype))
    return out, x.grad, w.grad, b.grad, rm, rv


def our_block(ext, x, w, b, dout):
    rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    out, code, xmax, mean, invstd = ext.bn_relu_pool_forward(x, w, b, rm, rv, 0.1, 1e-5)
    dx, dw, db = ext.bn_relu_pool_backward(dout, x, w, code, xmax, mean, invstd)
    return out, dx, dw, db, rm, rv


def block_inputs(shape, seed=0, values=None):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(shape, generator=g) * 2 + 0.5 if values is None else values
    x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.1
    dout = torch.randn(n, c, h // 2, w // 2, generator=g)
    return x, weight, bias, dout


SHAPES = [(128, 16, 28, 28), (64, 32, 14, 14), (32, 64, 7, 7), (5, 8, 5, 3), (3, 24, 9, 8)]
NAMES = ("out", "dx", "dweight", "dbias", "running_mean", "running_var")


@pytest.mark.parametrize("shape", SHAPES)
def test_the_block_is_closer_to_float64_than_torchs_float32(ext, shape):
    x, w, b, dout = block_inputs(shape)
    exact = reference_block(x, w, b, dout, torch.float64)
    theirs = reference_block(x, w, b, dout, torch.float32)
    ours = our_block(ext, x, w, b, dout)
    for name, e, t, o in zip(NAMES, exact, theirs, ours, strict=True):
        scale = e.abs().max().item()
        our_err = (o.double() - e).abs().max().item()
        their_err = (t.double() - e).abs().max().item()
        # (odd sizes: a last row or column outside every window still gets BatchNorm's dx)
        assert our_err <= max(2 * their_err, 1e-6 * scale), (name, our_err, their_err)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    assert ours[1].is_contiguous(memory_format=torch.channels_last)


def test_ties_send_the_gradient_to_the_first_maximum_as_torch(ext):
    # Three values only: most windows hold equal maxima, which must tie in both.
    g = torch.Generator().manual_seed(3)
    values = torch.randint(0, 3, (16, 8, 6, 6), generator=g).float()
    x, w, b, dout = block_inputs(values.shape, values=values)
    w = torch.ones_like(w)  # a positive scale keeps the ordering of x
    exact = reference_block(x, w, b, dout, torch.float64)
    ours = our_block(ext, x, w, b, dout)
    torch.testing.assert_close(ours[1].double(), exact[1], rtol=1e-5, atol=1e-6)


def test_a_nan_passes_through_the_block(ext):
    x, w, b, dout = block_inputs((4, 8, 6, 6))
    x[1, 3, 2, 2] = float("nan")
    out = ext.bn_relu_pool_forward(x, w, b, torch.zeros(8), torch.ones(8), 0.1, 1e-5)[0]
    assert out[:, 3].isnan().any()  # a NaN statistic reaches the whole channel
    assert not out[:, 2].isnan().any()


def test_inference_uses_the_running_statistics(ext):
    x, w, b, _ = block_inputs((6, 16, 10, 10))
    rm, rv = torch.randn(16), torch.rand(16) + 0.5
    ours = ext.bn_relu_pool_inference(x, w, b, rm, rv, 1e-5)
    theirs = F.max_pool2d(F.relu(F.batch_norm(x, rm, rv, w, b, training=False)), 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, c, h, w, k, pad", [(128, 16, 28, 28, 3, 1), (3, 8, 5, 7, 5, 2),
                                               (2, 24, 9, 8, 3, 0), (4, 64, 11, 13, 5, 0)])
def test_single_channel_conv_matches_float64(ext, n, c, h, w, k, pad):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, h, w, generator=g)
    weight, bias = torch.randn(c, 1, k, k, generator=g), torch.randn(c, generator=g)
    wd, bd = weight.double().requires_grad_(), bias.double().requires_grad_()
    exact = F.conv2d(x.double(), wd, bd, padding=pad)
    dout = torch.randn(exact.shape, generator=g, dtype=torch.float64)
    exact.backward(dout)
    out = ext.conv1x_forward(x, weight, bias, pad)
    dw, db = ext.conv1x_backward(dout.float(), x, weight, pad)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), exact.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), wd.grad, rtol=1e-5, atol=1e-5 * n * h * w)
    torch.testing.assert_close(db.double(), bd.grad, rtol=1e-5, atol=1e-5 * n * h * w)


def test_bad_inputs_are_refused(ext):
    x, w, b, _ = block_inputs((2, 8, 4, 4))
    with pytest.raises(RuntimeError, match="channels-last"):
        ext.bn_relu_pool_forward(x.contiguous(), w, b, torch.zeros(8), torch.ones(8), 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        six = x[:, :6].contiguous(memory_format=torch.channels_last)
        ext.bn_relu_pool_inference(six, w[:6], b[:6], torch.zeros(6), torch.ones(6), 1e-5)
    with pytest.raises(RuntimeError, match="3x3 or 5x5"):
        ext.conv1x_forward(torch.rand(2, 1, 8, 8), torch.rand(8, 1, 7, 7), torch.rand(8), 0)


# ---------------------------------------------------------------------------------------------
# BlockForward: the `best` network's forward

def best(seed=0, **changes):
    model = models.init_model(replace(BEST.model, **changes), seed)
    return model.to(memory_format=torch.channels_last)


def batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def gradients(model, forward, x, y, dtype=torch.float32):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(forward(x.to(dtype)), y, label_smoothing=0.1).backward()
    return {k: p.grad.double() for k, p in model.named_parameters()}


def test_gradients_of_the_best_network_are_closer_to_float64_than_autograds(ext):
    x, y = batch(128)
    model = best()
    exact = gradients(model.double(), model, x, y, torch.float64)
    model = best()
    theirs = gradients(model, model, x, y)
    ours = gradients(model, blocks.BlockForward(model), x, y)
    # (the biases before a BatchNorm have a zero gradient: both errors are rounding there)
    floor = 1e-6 * max(e.abs().max().item() for e in exact.values())
    for name, e in exact.items():
        our_err = (ours[name] - e).abs().max().item()
        their_err = (theirs[name] - e).abs().max().item()
        assert our_err <= max(2 * their_err, floor), (name, our_err, their_err)


def test_running_statistics_and_batch_count_follow_batchnorm(ext):
    x, _ = batch(64)
    a, b = best(), best()
    a(x), blocks.BlockForward(b)(x)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    assert b.bn1.num_batches_tracked.item() == 1


def test_eval_mode_matches_the_model_and_keeps_autograd_when_asked(ext):
    model = best()
    forward = blocks.BlockForward(model)
    for seed in range(3):  # running statistics away from their start
        forward(batch(64, seed)[0])
    model.eval()
    x, _ = batch(50, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(forward(x), model(x), rtol=1e-4, atol=1e-5)
    assert forward(x).requires_grad  # gradients enabled: the modules themselves


def test_the_ops_give_the_same_bits_on_any_thread_count(ext, threads):
    x, w, b, dout = block_inputs((37, 16, 12, 12))
    xs, ws, bs = torch.rand(37, 1, 12, 12), torch.randn(16, 1, 3, 3), torch.randn(16)
    runs = []
    for n in (1, 2, 3):
        threads(n)
        conv = ext.conv1x_forward(xs, ws, bs, 1)
        runs.append([*our_block(ext, x, w, b, dout), conv,
                     *ext.conv1x_backward(conv, xs, ws, 1)])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))


def test_models_without_a_block_are_refused():
    with pytest.raises(Exception, match="no BatchNorm2d"):
        blocks.BlockForward(models.init_model(ModelSpec(), 0))


def test_supports_names_every_reason():
    assert blocks.supports(BEST.model, "cpu") is None
    why = blocks.supports(ModelSpec(), "cuda")
    assert all(w in why for w in ("device cuda", "no batch norm", "activation sigmoid",
                                  "pooling avg", "multiples of 8"))


def test_pick_engine_chooses_the_blocks_for_best_and_plain_autograd_without_the_kernel(
        ext, monkeypatch):
    engine, text = pick_engine(BEST.model, BEST.train, torch.device("cpu"))
    assert engine == "blocks" and "BatchNorm-ReLU-max-pool blocks in C++" in text
    monkeypatch.setenv("LENET_FUSED", "0")
    assert pick_engine(BEST.model, BEST.train, torch.device("cpu")) == (
        "autograd", "PyTorch autograd (C++ blocks: turned off by LENET_FUSED=0)")
    odd = replace(BEST.model, convs=(ConvSpec(6, 3, 1), ConvSpec(16, 3, 1)))
    monkeypatch.delenv("LENET_FUSED")
    assert pick_engine(odd, BEST.train, torch.device("cpu"))[0] == "autograd"


def test_evaluation_of_a_batchnorm_run_uses_the_blocks(ext):
    from lenet.report import classify

    model = best()
    forward = fused.inference_forward(model, "cpu")
    assert isinstance(forward, blocks.BlockForward)
    x, y = batch(300)
    test = Batches((x * 255).round().to(torch.uint8)[:, 0], y, 128)
    fast, slow = classify(model, test, forward=forward), classify(model, test)
    assert (fast.pred == slow.pred).all()
    assert fast.loss == pytest.approx(slow.loss, rel=1e-5)


def test_two_epochs_on_the_blocks_follow_plain_autograd(ext, tiny_data):
    data = sources.load(tiny_data)
    spec = replace(BEST.train, epochs=2, augment="none")
    model_spec = replace(BEST.model, convs=(ConvSpec(8, 3, 1), ConvSpec(16, 3, 1)), dense=(32,))
    results = {}
    for engine in ("autograd", "blocks"):
        model = models.init_model(model_spec, 0)
        train = Batches(data.train.images, data.train.labels, 128)
        test = Batches(data.test.images, data.test.labels, 500)
        history = Trainer(spec, torch.device("cpu"), engine=engine).fit(model, train, test)
        results[engine] = [(m.train_loss, m.test_loss) for m in history]
    for ours, theirs in zip(results["blocks"], results["autograd"], strict=True):
        assert ours == pytest.approx(theirs, rel=2e-3)
    assert results["blocks"][-1][0] < results["blocks"][0][0]


def test_interrupt_and_resume_on_the_blocks_is_bit_identical(ext):
    """Ctrl-C mid-epoch and a resume from the saved state end with exactly the weights,
    running statistics and losses of the uninterrupted run (best's recipe, flips included)."""
    from conftest import assert_same_run, interrupt_and_resume

    spec = replace(BEST.train, epochs=2, batch_size=64)
    model_spec = replace(BEST.model, convs=(ConvSpec(8, 3, 1), ConvSpec(16, 3, 1)), dense=(32,))

    def data():
        x, y = batch(320, seed=3)
        images = (x * 255).round().to(torch.uint8)[:, 0]
        return (Batches(images, y, 64, augment="flip"),
                Batches(images[:100], y[:100], 100))

    full, resumed, _ = interrupt_and_resume(spec, model_spec, "blocks", data)
    assert_same_run(resumed, full)
