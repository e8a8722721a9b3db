"""The fused C++ step against the reference it replaces: nn.Sequential + F.cross_entropy +
autograd + torch.optim.SGD, same weights, same batches.

Tests that run the kernel skip (saying why) where it cannot be built; the first build takes
about a minute, later runs load it from torch's extension cache.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_run, interrupt_and_resume
from lenet import fused, models
from lenet.config import ConvSpec, ModelSpec, TrainSpec
from lenet.data import sources
from lenet.data.batches import Batches
from lenet.errors import ConfigError
from lenet.evaluate import evaluate
from lenet.sgd import SGD

TOL = dict(rtol=1e-4, atol=1e-5)
LR = 0.9  # the book preset's


@pytest.fixture(scope="module")
def kernel():
    fused._reset_for_tests()
    if fused.load() is None:
        pytest.skip(f"fused kernel unavailable here: {fused.why_unavailable()}")


@pytest.fixture
def threads():
    """Set torch's thread count inside a test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def book(seed=0, **changes) -> torch.nn.Sequential:
    return models.init_model(replace(ModelSpec(), **changes), seed)


def batch(n, seed=1, classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, classes, (n,), generator=g)


def autograd_step(model, opt, x, y):
    """The reference step, reporting what the trainer reports."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


def assert_params_close(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}", **(tol or TOL))


# ---------------------------------------------------------------------------------------------
# supports(): a pure check, never needs the compiler

def test_supports_book_and_says_why_for_every_other_recipe():
    spec, train = ModelSpec(), TrainSpec()
    assert fused.supports(spec, train, torch.device("cpu")) is None
    assert fused.supports(spec, train, "cpu") is None
    assert fused.supports(spec, train, "cuda:0") == "device cuda"
    assert fused.supports(replace(spec, num_classes=3), train, "cpu") is None  # any class count
    recipe = replace(train, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine",
                     warmup=0.1, label_smoothing=0.1, augment="flip+shift")
    for act in ("sigmoid", "relu"):
        for pool in ("avg", "max"):
            assert fused.supports(replace(spec, activation=act, pooling=pool), recipe,
                                  "cpu") is None
    cases = [
        (spec, train, "cuda", "device cuda"),
        (spec, replace(train, optimizer="adam"), "cpu", "optimizer adam"),
        (spec, replace(train, optimizer="adamw"), "cpu", "optimizer adamw"),
        (replace(spec, activation="tanh"), train, "cpu", "activation tanh"),
        (replace(spec, activation="gelu"), train, "cpu", "activation gelu"),
        (replace(spec, pool=3), train, "cpu", "pool size 3"),
        (replace(spec, batch_norm=True), train, "cpu", "batch norm"),
        (replace(spec, dropout=0.5), train, "cpu", "dropout"),
        (replace(spec, convs=(ConvSpec(6, 5, 2), ConvSpec(32, 5, 0))), train, "cpu",
         "convs differ from the book's"),
        (replace(spec, convs=(ConvSpec(6, 5, 2),)), train, "cpu", "convs differ from the book's"),
        (replace(spec, dense=(256, 84)), train, "cpu", "dense widths differ"),
        (replace(spec, image_size=32), train, "cpu", "image size 32"),
        (replace(spec, in_channels=3), train, "cpu", "3 input channels"),
    ]
    for model_spec, train_spec, device, reason in cases:
        assert fused.supports(model_spec, train_spec, device) == reason


def test_supports_lists_every_reason():
    spec = replace(ModelSpec(), activation="tanh", batch_norm=True)
    assert fused.supports(spec, TrainSpec(), "cpu") == "activation tanh, batch norm"


def test_lenet_fused_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("LENET_FUSED", "0")
    fused._reset_for_tests()
    try:
        assert fused.load() is None
        assert "LENET_FUSED=0" in fused.why_unavailable()
    finally:
        fused._reset_for_tests()


def test_lenet_fused_takes_the_usual_spellings_of_off_and_on(monkeypatch):
    from lenet.errors import ConfigError

    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv("LENET_FUSED", off)
        assert fused.disabled()
    for on in ("", "1", "True", "on", "yes"):
        monkeypatch.setenv("LENET_FUSED", on)
        assert not fused.disabled()
    monkeypatch.setenv("LENET_FUSED", "maybe")
    with pytest.raises(ConfigError, match=r"^LENET_FUSED='maybe': expected 0 \(or false, off"):
        fused.disabled()


def test_needs_build_says_whether_load_would_compile(kernel, monkeypatch, tmp_path):
    assert not fused.needs_build()  # loaded (the fixture)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "empty"))
    fused._reset_for_tests()
    try:
        assert fused.needs_build()  # an empty cache: load() would build
        monkeypatch.setenv("LENET_FUSED", "0")
        assert not fused.needs_build()  # turned off: nothing to build
    finally:
        fused._reset_for_tests()


def test_a_cached_build_is_found_where_torch_puts_it_and_loaded_directly(kernel, monkeypatch,
                                                                         tmp_path):
    from torch.utils import cpp_extension

    name = fused._build_name()
    built = fused._cached_build()  # where the fixture's load() left it
    for extensions_dir in (None, str(tmp_path / "ext")):
        if extensions_dir is not None:  # a copy of the build where torch would look for it
            monkeypatch.setenv("TORCH_EXTENSIONS_DIR", extensions_dir)
            folder = Path(cpp_extension._get_build_directory(name, verbose=False))
            shutil.copy(built, folder / built.name)
        so = fused._cached_build()
        expected = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
        assert so == expected
        fused._reset_for_tests()
        try:
            assert hasattr(fused.load(), "bn_relu_pool_forward")
            assert not fused.needs_build()
        finally:
            fused._reset_for_tests()
    (so.parent / "lock").touch()  # a build in progress: torch's loader waits for it
    assert fused._cached_build() is None


def test_a_fresh_process_loads_the_build_without_torchs_extension_loader(kernel):
    """What a `lenet train` process does: the built extension loads straight from the cache,
    and torch.utils.cpp_extension (~0.2 s with setuptools) is never imported."""
    code = ("import sys; from lenet import fused; ext = fused.load(); "
            "print(ext is not None, 'torch.utils.cpp_extension' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False"]


def test_a_failed_build_is_reported_not_raised(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error deliberately broken\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("LENET_FUSED", raising=False)
    for source, words in ((broken, ""), (tmp_path / "absent.cpp", "missing")):
        monkeypatch.setattr(fused, "SOURCES", (source, fused.SOURCES[1]))
        fused._reset_for_tests()
        try:
            assert fused.load() is None  # whatever the reason here: no compiler, no ninja, ...
            assert words in fused.why_unavailable()
        finally:
            fused._reset_for_tests()


def test_no_compiler_is_one_clear_reason_and_torch_logs_nothing(monkeypatch, tmp_path,
                                                                 caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))  # no cached build
    monkeypatch.delenv("LENET_FUSED", raising=False)
    broken = [tmp_path / f"broken{k}.cpp" for k in (1, 2)]
    for source in broken:
        source.write_text("#error deliberately broken\n")
    monkeypatch.setattr(fused, "SOURCES", tuple(broken))  # fails at once, compiler or not
    path = os.environ["PATH"]
    # (CXX, PATH, the program reported missing); CXX None: unset, so torch runs c++
    cases = [("/nowhere/g++", path, "/nowhere/g++"), (None, str(tmp_path), "c++")]
    # A program that is there but is no compiler torch knows: torch logs a warning (which
    # must not show), then its build fails.
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho fakecc 1.0\n")
    fake.chmod(0o755)
    cases.append((str(fake), path, None))
    for cxx, search, missing in cases:
        if cxx is None:
            monkeypatch.delenv("CXX", raising=False)
        else:
            monkeypatch.setenv("CXX", cxx)
        monkeypatch.setenv("PATH", search)
        fused._reset_for_tests()
        try:
            assert fused.needs_build() == (missing is None)  # no "building..." for nothing
            assert fused.load() is None
            reason = fused.why_unavailable()
            if missing:
                assert reason == (f"no C++ compiler to build it ({missing} not found; "
                                  "install g++ or set CXX)")
            else:  # the build ran, and failed
                assert reason.startswith("could not build it ("), reason
        finally:
            fused._reset_for_tests()
    torch_said = [r.getMessage() for r in caplog.records if r.name.startswith("torch")]
    assert torch_said == []


def test_refuses_a_model_that_is_not_the_books():
    with pytest.raises(ConfigError, match="not the book's LeNet-5"):
        fused.FusedStep(book(activation="tanh"), LR)
    with pytest.raises(ConfigError, match="not the book's LeNet-5"):
        fused.FusedStep(book(batch_norm=True), LR)
    with pytest.raises(ConfigError, match="not the book's LeNet-5"):
        fused.FusedStep(book(dense=(100, 84)), LR)


# ---------------------------------------------------------------------------------------------
# The kernel against autograd

@pytest.mark.parametrize("n", [128, 37, 1])
def test_logits_match_the_model(kernel, n):
    model = book()
    x, _ = batch(n)
    with torch.no_grad():
        torch.testing.assert_close(fused.FusedStep(model, LR).forward(x), model(x), **TOL)


@pytest.mark.parametrize("n", [128, 37, 1])
def test_one_step_matches_autograd_and_sgd(kernel, n):
    model = book()
    ref = copy.deepcopy(model)
    x, y = batch(n)
    loss, right = fused.FusedStep(model, LR).step(x, y)
    ref_loss, ref_right = autograd_step(ref, torch.optim.SGD(ref.parameters(), lr=LR), x, y)
    assert_params_close(model, ref)
    assert loss.shape == () and loss.dtype == torch.float32
    assert right.shape == () and right.dtype == torch.int64
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert right.item() == ref_right.item()
    assert all(p.grad is None for p in model.parameters())


def test_gradients_match_autograd(kernel):
    model = book(seed=3)
    x, y = batch(128, seed=4)
    grads = fused.FusedStep(model, LR)._gradients(x, y)
    F.cross_entropy(model(x), y).backward()
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("block", [1, 5, 13, 40])
def test_any_chunk_size_gives_autograds_gradients_and_logits(kernel, block):
    # conv2 runs on lane groups of 8 images inside each chunk: chunks that are not a multiple
    # of 8, or larger than the batch, leave part of their last group empty.
    model = book(seed=3)
    x, y = batch(37, seed=4)
    step = fused.FusedStep(model, LR, block=block)
    grads = step._gradients(x, y)
    F.cross_entropy(model(x), y).backward()
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(step.forward(x), model(x), **TOL)


def test_any_number_of_classes(kernel):
    model = book(num_classes=3)
    ref = copy.deepcopy(model)
    x, y = batch(50, classes=3)
    loss, right = fused.FusedStep(model, LR).step(x, y)
    ref_loss, ref_right = autograd_step(ref, torch.optim.SGD(ref.parameters(), lr=LR), x, y)
    assert_params_close(model, ref)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert right.item() == ref_right.item()


@pytest.mark.parametrize("n_threads", [1, 2])
def test_same_input_same_bits(kernel, threads, n_threads):
    threads(n_threads)
    runs = []
    for _ in range(2):
        model = book(seed=5)
        step = fused.FusedStep(model, LR)
        losses = [step.step(*batch(100 + i % 3, seed=i))[0] for i in range(20)]  # ragged chunks
        runs.append((list(model.parameters()), losses))
    (p1, l1), (p2, l2) = runs
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(l1, l2, strict=True))


def test_one_and_two_threads_agree(kernel, threads):
    results = []
    for n_threads in (1, 2):
        threads(n_threads)
        model = book()
        fused.FusedStep(model, LR).step(*batch(128))
        results.append(model)
    assert_params_close(*results)


def test_one_two_and_four_threads_give_the_same_bits(kernel, threads):
    # Up to as many threads as groups of 64 images, each thread takes whole groups through the
    # step in one parallel region; with more (4 threads, 2 groups) the step runs layer by layer.
    # The sums run in the same order either way.
    results = []
    for n_threads in (1, 2, 4):
        threads(n_threads)
        model = book()
        step = fused.FusedStep(model, LR)
        metrics = [m for n in (128, 96, 130) for m in step.step(*batch(n, seed=n))]
        results.append(list(model.parameters()) + metrics)
    first, *others = results
    for other in others:
        assert all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_reads_the_live_parameters(kernel):
    model, other = book(seed=0), book(seed=1)
    step = fused.FusedStep(model, LR)
    step.step(*batch(16))
    model.load_state_dict(other.state_dict())  # copies in place
    model.fc3.weight = torch.nn.Parameter(model.fc3.weight.detach().clone())  # a new tensor
    model.fc1 = copy.deepcopy(model.fc1)  # a new layer
    ref = copy.deepcopy(model)
    x, y = batch(64, seed=2)
    step.step(x, y)
    autograd_step(ref, torch.optim.SGD(ref.parameters(), lr=LR), x, y)
    assert_params_close(model, ref)


def test_three_epochs_follow_autograds_loss_curve(kernel, tiny_data):
    data = sources.load(tiny_data)
    curves = []
    for use_fused in (False, True):
        model = book()
        batches = Batches(data.train.images, data.train.labels, 128,
                          generator=torch.Generator().manual_seed(0))  # 600: last batch of 88
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        step = fused.FusedStep(model, LR) if use_fused else None
        curve = []
        for _ in range(3):
            total = torch.zeros(())
            for x, y in batches:
                loss, _ = step.step(x, y) if step else autograd_step(model, opt, x, y)
                total += loss * len(y)
            curve.append(total.item() / batches.num_examples)
        curves.append(curve)
    assert curves[1] == pytest.approx(curves[0], abs=1e-4)
    assert curves[0][-1] < curves[0][0]


# ---------------------------------------------------------------------------------------------
# Exercise 1's variants and the modern recipe: ReLU, max pooling, label smoothing, momentum,
# Nesterov, weight decay, a learning rate that changes every step

KINDS = [("sigmoid", "avg"), ("sigmoid", "max"), ("relu", "avg"), ("relu", "max")]
RECIPES = {
    "plain": {},
    "nesterov+wd+smoothing": dict(momentum=0.9, nesterov=True, weight_decay=5e-4,
                                  label_smoothing=0.1),
    "momentum+smoothing": dict(momentum=0.9, label_smoothing=0.2),
}


@pytest.mark.parametrize("act, pool", KINDS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_steps_match_autograd_and_torch_sgd(kernel, act, pool, recipe):
    opts = RECIPES[recipe]
    smoothing = opts.get("label_smoothing", 0.0)
    model = book(seed=2, activation=act, pooling=pool)
    ref = copy.deepcopy(model)
    step = fused.FusedStep(model, 0.1, **opts)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=opts.get("momentum", 0.0),
                          nesterov=opts.get("nesterov", False),
                          weight_decay=opts.get("weight_decay", 0.0))
    for i, n in enumerate((128, 37, 1, 128)):
        x, y = batch(n, seed=10 + i)
        lr = 0.1 * (i + 1) / 4  # a warm-up: the rate changes every step
        loss, right = step.step(x, y, lr)
        for group in opt.param_groups:
            group["lr"] = lr
        logits = ref(x)
        ref_loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        ref_loss.backward()
        opt.step()
        torch.testing.assert_close(loss, ref_loss.detach(), **TOL)
        assert right.item() == (logits.argmax(1) == y).sum().item()
        assert_params_close(model, ref)
    with torch.no_grad():
        torch.testing.assert_close(step.forward(x), ref(x), **TOL)


@pytest.mark.parametrize("act", ["sigmoid", "relu"])
@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_max_pooling_ties_send_the_gradient_to_the_first_maximum(kernel, act, layer):
    """A constant conv output ties in every pooling window; torch gives the gradient to the
    window's first element, and so must the kernel (else that conv's weight gradient, which
    weighs each position by a different input, differs)."""
    model = book(seed=1, activation=act, pooling="max")
    conv = getattr(model, layer)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(0.3)
    x, y = batch(16, seed=5)
    grads = fused.FusedStep(model, LR)._gradients(x, y)
    F.cross_entropy(model(x), y).backward()
    for (name, p), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert conv.weight.grad.abs().sum() > 0  # the ties did carry a gradient


@pytest.mark.parametrize("sgd", [torch.optim.SGD, SGD], ids=["torch.optim", "lenet.sgd"])
def test_momentum_state_is_torch_sgds_both_ways(kernel, sgd):
    """state_dict() loads into torch.optim.SGD (or lenet.sgd's, the CPU trainer's) and
    continues as the kernel does; and the kernel continues from its state: a checkpoint
    resumes on either engine."""
    opts = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)
    model = book(activation="relu", pooling="max")
    step = fused.FusedStep(model, 0.05, **opts)
    assert step.state_dict()["state"] == {}  # torch's SGD has no buffers before a step
    for i in range(3):
        step.step(*batch(64, seed=i))
    ref = copy.deepcopy(model)
    opt = sgd(ref.parameters(), lr=0.05, **opts)
    opt.load_state_dict(step.state_dict())
    x, y = batch(64, seed=9)
    step.step(x, y)
    autograd_step(ref, opt, x, y)
    assert_params_close(model, ref)
    again = fused.FusedStep(model, 0.05, **opts)
    again.load_state_dict(opt.state_dict())
    x, y = batch(64, seed=10)
    again.step(x, y)
    autograd_step(ref, opt, x, y)
    assert_params_close(model, ref)
    with pytest.raises(ConfigError, match="does not fit"):
        fused.FusedStep(book(), 0.1, momentum=0.9).load_state_dict(
            {"state": {0: {"momentum_buffer": torch.zeros(3)}}})


def test_interrupt_and_resume_of_the_modern_recipe_is_bit_identical(kernel):
    """The trainer on the fused engine with momentum and a schedule: Ctrl-C mid-epoch and a
    resume from the saved state end with exactly the uninterrupted weights."""
    spec = TrainSpec(epochs=2, batch_size=64, lr=0.05, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, schedule="cosine", warmup=0.2, label_smoothing=0.1)
    model_spec = replace(ModelSpec(), activation="relu", pooling="max")

    def data():
        x, y = batch(320, seed=3)
        images = (x * 255).round().to(torch.uint8)[:, 0]
        return Batches(images, y, 64), Batches(images[:100], y[:100], 100)

    full, resumed, saved = interrupt_and_resume(spec, model_spec, "fused", data)
    assert saved["optimizer"]["state"]  # the momentum buffers are in the checkpoint
    assert_same_run(resumed, full)


@pytest.mark.parametrize("act, pool", KINDS[1:])
def test_a_nan_weight_gives_a_nan_loss_with_every_variant(kernel, act, pool):
    model = book(activation=act, pooling=pool)
    with torch.no_grad():
        model.conv1.weight[0, 0, 2, 2] = float("nan")
    loss, _ = fused.FusedStep(model, LR).step(*batch(8))
    assert not torch.isfinite(loss)


def test_a_nan_weight_gives_a_nan_loss(kernel):
    """The divergence guard needs non-finite weights to show as a non-finite loss."""
    model = book()
    with torch.no_grad():
        model.conv1.weight[0, 0, 2, 2] = float("nan")
    loss, _ = fused.FusedStep(model, LR).step(*batch(8))
    assert not torch.isfinite(loss)


def test_bad_inputs_are_refused(kernel):
    step = fused.FusedStep(book(), LR)
    x, y = batch(4)
    with pytest.raises(IndexError, match="out of bounds"):
        step.step(x, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(RuntimeError, match="shape"):
        step.step(x[:, :, :27], y)
    with pytest.raises(RuntimeError, match="float32"):
        step.step(x.double(), y)


# ---------------------------------------------------------------------------------------------
# Real data

@pytest.mark.slow
def test_one_epoch_of_fashion_mnist_matches_autograd(kernel, threads):
    if sources.locate("fashion-mnist") is None:
        pytest.skip("Fashion-MNIST is not installed (make data / lenet data fetch)")
    # One thread: this checks numbers, not speed, and on a busy 2-core machine two-thread
    # barriers stall (~20 s here instead of ~250 s); the thread tests above cover two.
    threads(1)
    data = sources.load("fashion-mnist", download=False)
    test = Batches(data.test.images, data.test.labels, 2_000)
    results = []
    for use_fused in (False, True):
        model = book()
        train = Batches(data.train.images, data.train.labels, 128,
                        generator=torch.Generator().manual_seed(0))
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        step = fused.FusedStep(model, LR) if use_fused else None
        total = torch.zeros(())
        for x, y in train:
            loss, _ = step.step(x, y) if step else autograd_step(model, opt, x, y)
            total += loss * len(y)
        _, test_acc = evaluate(model, test, forward=step.forward if step else None)
        results.append((total.item() / train.num_examples, test_acc))
    (loss_a, acc_a), (loss_f, acc_f) = results
    assert loss_f == pytest.approx(loss_a, abs=1e-3)
    assert acc_f == pytest.approx(acc_a, abs=1e-3)
    assert acc_a > 0.5  # it learned: chance is 0.1


def test_evaluate_uses_the_kernels_forward_for_the_book_net_only(kernel):
    from lenet.report import classify

    model = book()
    forward = fused.inference_forward(model, "cpu")
    assert forward is not None
    assert fused.inference_forward(book(activation="relu", pooling="max"), "cpu") is not None
    assert fused.inference_forward(book(activation="tanh"), "cpu") is None
    assert fused.inference_forward(model, torch.device("cuda")) is None
    x, y = batch(300)
    test = Batches((x * 255).round().to(torch.uint8)[:, 0], y, 128)
    fast, slow = classify(model, test, forward=forward), classify(model, test)
    assert (fast.pred == slow.pred).all()
    assert fast.loss == pytest.approx(slow.loss, rel=1e-5)


@pytest.mark.parametrize("act, pool", KINDS)
def test_uint8_images_are_scaled_as_to_float_does(kernel, act, pool):
    """The trainer hands the kernel the bytes; the result is bit for bit that of the float
    images the book's ToTensor (batches.to_float) makes."""
    from lenet.data.batches import to_float

    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (37, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (37,), generator=g)
    runs = []
    for x in (images, to_float(images)):
        model = book(seed=4, activation=act, pooling=pool)
        step = fused.FusedStep(model, 0.1, momentum=0.9)
        losses = [step.step(x, y)[0] for _ in range(2)]
        runs.append((losses, list(model.parameters()), step.forward(x)))
    (l1, p1, f1), (l2, p2, f2) = runs
    assert all(torch.equal(a, b) for a, b in zip(l1, l2, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    assert torch.equal(f1, f2)


def test_the_trainer_hands_the_kernel_bytes(kernel, monkeypatch):
    """While it trains, the fused engine's batches are the stored uint8 pixels; afterwards
    the Batches yield floats again."""
    from lenet.train import Trainer

    x, y = batch(64, seed=3)
    images = (x * 255).round().to(torch.uint8)[:, 0]
    train, test = Batches(images, y, 32), Batches(images, y, 64)
    handed = []
    real = fused.FusedStep.step

    def step(self, x, y, *args):
        handed.append((x.dtype, train.as_bytes, test.as_bytes))
        return real(self, x, y, *args)
    monkeypatch.setattr(fused.FusedStep, "step", step)
    Trainer(TrainSpec(epochs=1, batch_size=32), torch.device("cpu"),
            engine="fused").fit(book(), train, test)
    assert handed == [(torch.uint8, True, False)] * 2
    assert not train.as_bytes and next(iter(train))[0].dtype == torch.float32


def test_the_trainers_evaluation_hands_the_kernel_bytes_with_the_floats_result(kernel,
                                                                             monkeypatch):
    from lenet.train import Trainer

    seen = []
    forward = fused.FusedStep.forward
    monkeypatch.setattr(fused.FusedStep, "forward",
                        lambda self, x: seen.append(x.dtype) or forward(self, x))
    x, y = batch(96, seed=5)
    images = (x * 255).round().to(torch.uint8)[:, 0]
    train, test = Batches(images, y, 32), Batches(images, y, 40)
    model = book()
    trainer = Trainer(TrainSpec(epochs=1, batch_size=32), torch.device("cpu"), engine="fused")
    last = trainer.fit(model, train, test)[-1]
    assert seen == [torch.uint8] * 3 and not test.as_bytes
    assert (last.test_loss, last.test_acc) == evaluate(model, test, forward=trainer.fused.forward)
    loss, acc = evaluate(model, test)  # autograd on the float images
    assert last.test_loss == pytest.approx(loss, rel=1e-5) and last.test_acc == acc


def test_pick_engine_says_when_the_kernel_must_be_built_first(kernel, monkeypatch):
    from lenet.train import pick_engine

    said = []
    monkeypatch.setattr(fused, "needs_build", lambda: True)
    assert pick_engine(ModelSpec(), TrainSpec(), "cpu", say=said.append)[0] == "fused"
    assert said == ["building the fused C++ kernel (once, about a minute)"]
    said.clear()
    assert pick_engine(ModelSpec(activation="tanh"), TrainSpec(), "cpu",
                       say=said.append)[0] == "autograd"
    assert said == []  # nothing to build for a recipe the kernel does not compute


def test_gradients_before_the_first_step_leave_the_momentum_unstarted(kernel):
    """torch.optim.SGD starts its momentum buffer at the first update; reading gradients
    (no update) must not count as one."""
    model = book(seed=6, activation="relu", pooling="max")
    ref = copy.deepcopy(model)
    step = fused.FusedStep(model, 0.05, momentum=0.9)
    x, y = batch(32, seed=8)
    step._gradients(x, y)
    assert step.state_dict()["state"] == {}
    step.step(x, y)
    autograd_step(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), x, y)
    assert_params_close(model, ref)
