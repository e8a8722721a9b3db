"""The book's LeNet-5 as Triton kernels (lenet.triton_book), for the step on a GPU.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy on the CPU):
the same kernel code, checked against PyTorch autograd in float64. The tests marked `cuda`
compile them for the GPU and train with them (the lent device machine).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_run, interrupt_and_resume
from lenet import models
from lenet.config import PRESETS
from lenet.cuda_graph import numerics, triton_reason
from lenet.train import pick_engine

BOOK = PRESETS["book"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
if not torch.cuda.is_available():
    # Triton reads the switch when it is first imported: set at collection, before any test
    # imports it.
    os.environ["TRITON_INTERPRET"] = "1"


def test_which_networks_the_kernels_compute():
    pytest.importorskip("triton")
    assert triton_reason(BOOK.model) is None
    assert triton_reason(PRESETS["book-1.0"].model) is None
    modern = triton_reason(PRESETS["modern"].model)
    assert "activation relu" in modern and "pooling" in modern
    assert "batch norm" in triton_reason(PRESETS["best"].model)
    assert "10 classes" in triton_reason(replace(BOOK.model, num_classes=5))


def test_the_book_network_on_cuda_takes_the_triton_kernels():
    pytest.importorskip("triton")
    engine, text = pick_engine(BOOK.model, BOOK.train, torch.device("cuda"))
    assert engine == "triton" and "Triton kernels" in text and "CUDA graph" in text
    engine, text = pick_engine(PRESETS["modern"].model, BOOK.train, torch.device("cuda"))
    assert engine == "graph" and "Triton kernels: activation relu" in text


def test_without_triton_the_graph_runs_on_cudnn(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton":
            raise ImportError("no triton here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    import lenet

    monkeypatch.delitem(sys.modules, "lenet.triton_book", raising=False)
    monkeypatch.delattr(lenet, "triton_book", raising=False)
    engine, text = pick_engine(BOOK.model, BOOK.train, torch.device("cuda"))
    assert engine == "graph" and "triton cannot be imported (ImportError)" in text


def test_a_gpu_the_kernels_do_not_run_on_falls_back_to_cudnn(monkeypatch, kernels):
    """With a GPU at hand, pick_engine runs the kernels once first; an old GPU, or a
    failure to build or run them, gives cuDNN with the reason on the train line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    tried = []

    def fails(device, batch):
        tried.append(batch)
        return "they do not run here (RuntimeError: Failed to find C compiler)"

    monkeypatch.setattr(kernels, "self_check", fails)
    spec = replace(BOOK.train, batch_size=64)
    engine, text = pick_engine(BOOK.model, spec, torch.device("cuda"))
    assert engine == "graph" and tried == [64]
    assert "Triton kernels: they do not run here (RuntimeError: Failed to find C compiler)" in text
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    engine, text = pick_engine(BOOK.model, spec, torch.device("cuda"))
    assert engine == "graph" and "GPU compute capability 7.0 (the kernels need 7.5+)" in text


def test_self_check_runs_the_kernels_and_reports_a_failure_in_one_line(monkeypatch, kernels):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert kernels.self_check(device, 1) is None

    def broken(*args):
        raise RuntimeError("Failed to find C compiler. Please specify via CC\nmore detail")

    monkeypatch.delenv("LENET_TRITON_SPREAD", raising=False)  # "split", the default
    assert kernels.self_check(device, 1) is None
    monkeypatch.setattr(kernels._BookLeNetLoss, "apply", broken)  # split: the loss kernels too
    assert kernels.self_check(device, 1) == (
        "they do not run here (RuntimeError: Failed to find C compiler. Please specify via CC)")
    monkeypatch.setenv("LENET_TRITON_SPREAD", "image")
    assert kernels.self_check(device, 1) is None  # "image" has no loss kernels
    monkeypatch.setattr(kernels._BookLeNet, "apply", broken)
    assert kernels.self_check(device, 1) == (
        "they do not run here (RuntimeError: Failed to find C compiler. Please specify via CC)")


@pytest.fixture(scope="module")
def kernels():
    """lenet.triton_book: compiled for the GPU, or interpreted on a CPU-only machine."""
    pytest.importorskip("triton")
    from lenet import triton_book

    return triton_book


@pytest.mark.parametrize("spread", ["image", "split"])
def test_forward_and_every_gradient_match_autograd_in_float64(kernels, spread):
    """Logits and the ten parameter gradients of a batch of three (one of them all zeros,
    one saturated), against the same network in float64: no further from it than
    PyTorch's own fp32. For each way of spreading the work over the GPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = models.init_model(BOOK.model, 0).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 28, 28, generator=gen)
    x[1] = 0
    x[2] = 1
    x, y = x.to(device), torch.tensor([3, 0, 9], device=device)
    ours = kernels.BookForward(model, spread)
    logits = ours(x)
    grads = torch.autograd.grad(F.cross_entropy(logits, y), ours.params)
    fp32 = torch.autograd.grad(F.cross_entropy(model(x), y), ours.params)
    exact = models.init_model(BOOK.model, 0).double().to(device)
    ref_logits = exact(x.double())
    ref = torch.autograd.grad(F.cross_entropy(ref_logits, y), list(exact.parameters()))
    assert torch.allclose(logits.double(), ref_logits, rtol=1e-5, atol=1e-6)
    names = [name for name, _ in model.named_parameters()]
    for name, g, t, r in zip(names, grads, fp32, ref, strict=True):
        assert g.shape == r.shape
        scale = r.abs().max().item()
        ours_err = (g.double() - r).abs().max().item() / scale
        torch_err = (t.double() - r).abs().max().item() / scale
        assert ours_err <= max(2 * torch_err, 1e-6), (name, ours_err, torch_err)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_split_kernels_loss_matches_cross_entropy_in_float64(kernels, smoothing):
    """The split kernels' own loss (BookForward.fused_loss): the batch's summed
    cross-entropy with label smoothing, its right answers, and the ten gradients, against
    F.cross_entropy on the network in float64."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = models.init_model(BOOK.model, 0).to(device)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(4, 1, 28, 28, generator=gen).to(device)
    x[1] = 0
    exact = models.init_model(BOOK.model, 0).double().to(device)
    ref_logits = exact(x.double())
    y = torch.tensor([0, 3, 9, 5], device=device)
    y[0] = ref_logits[0].argmax()  # one right answer at least
    ours = kernels.BookForward(model, "split")
    assert kernels.BookForward(model, "image").fused_loss is None
    total, right = ours.fused_loss(x, y, smoothing)
    grads = torch.autograd.grad(total / 4, ours.params)
    ref_total = F.cross_entropy(ref_logits, y, reduction="sum", label_smoothing=smoothing)
    ref = torch.autograd.grad(ref_total / 4, list(exact.parameters()))
    fp32 = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum",
                                               label_smoothing=smoothing) / 4, ours.params)
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)
    assert right.item() == (ref_logits.argmax(1) == y).sum().item() >= 1
    assert right.dtype == torch.int64 and not right.requires_grad
    for g, t, r in zip(grads, fp32, ref, strict=True):
        scale = r.abs().max().item()
        ours_err = (g.double() - r).abs().max().item() / scale
        torch_err = (t.double() - r).abs().max().item() / scale
        assert ours_err <= max(2 * torch_err, 1e-6), (ours_err, torch_err)


def test_the_graph_step_takes_the_split_kernels_loss(kernels, monkeypatch):
    """GraphStep on the split kernels computes the loss in them, not in F.cross_entropy,
    and gets what the image kernels with F.cross_entropy get."""
    from lenet import cuda_graph
    from lenet.data.batches import to_float

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (3, 1, 28, 28), generator=gen, dtype=torch.uint8).to(device)
    y = torch.tensor([1, 7, 2], device=device)
    results = {}
    for spread in ("image", "split"):
        model = models.init_model(BOOK.model, 0).to(device)
        step = cuda_graph.GraphStep(model, kernels.BookForward(model, spread), to_float, 0.1)
        if spread == "split":
            monkeypatch.setattr(cuda_graph.F, "cross_entropy", None)  # must not be called
        total, right = step._run(x, y)
        results[spread] = (total, right, [g.clone() for g in step.grads])
    (t1, r1, g1), (t2, r2, g2) = results["image"], results["split"]
    assert t2.item() == pytest.approx(t1.item(), rel=1e-6) and r2.item() == r1.item()
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_the_spread_is_one_of_the_known_ways(kernels, monkeypatch):
    from lenet.errors import ConfigError

    assert kernels.SPREAD in kernels.SPREADS == ("image", "split")
    model = models.init_model(BOOK.model, 0)
    monkeypatch.delenv("LENET_TRITON_SPREAD", raising=False)
    assert kernels.BookForward(model).spread == kernels.SPREAD == "split"  # 1.6x on an H100
    with pytest.raises(ConfigError, match=r"^spread='rows': expected one of image, split$"):
        kernels.BookForward(model, "rows")
    monkeypatch.setenv("LENET_TRITON_SPREAD", "image")
    assert kernels.BookForward(model).spread == "image"
    assert kernels.BookForward(model, "split").spread == "split"  # the argument wins


def test_a_bad_spread_in_the_environment_is_one_line_not_a_fallback(kernels, monkeypatch):
    """On a GPU, $LENET_TRITON_SPREAD=typo stops before training with the variable named,
    instead of reading as a GPU the kernels cannot run on."""
    from lenet.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("LENET_TRITON_SPREAD", "spilt")
    with pytest.raises(ConfigError, match=r"^LENET_TRITON_SPREAD='spilt': expected one of "
                                          r"image, split$"):
        pick_engine(BOOK.model, BOOK.train, torch.device("cuda"))


def test_every_kernel_compiles_for_hopper_without_spilling(kernels):
    """Each kernel through Triton's GPU compiler and ptxas for sm_90 (H100, H200), without a
    GPU (benchmarks/triton_resources.py, in a process of its own: this one interprets):
    what the interpreter cannot show, a construct only the GPU compiler rejects, or
    registers spilled to memory."""
    source = Path(kernels.__file__).read_text()
    launched = set(re.findall(r"\b(_\w+)\[\(", source))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "triton_resources.py")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in out.stdout.splitlines() if line.startswith("| _")]
    assert {row[0] for row in rows} == launched and len(launched) == 10
    for name, _, regs, stack, *_ in rows:
        assert int(stack) == 0 and int(regs) <= 255, (name, regs, stack)


@cuda
@pytest.mark.parametrize("spread", ["image", "split"])
def test_the_kernels_give_the_same_bits_every_time(kernels, spread):
    model = models.init_model(BOOK.model, 0).cuda()
    x = torch.rand(128, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    ours = kernels.BookForward(model, spread)

    def grads():
        return torch.autograd.grad(F.cross_entropy(ours(x), y), ours.params)

    assert all(torch.equal(a, b) for a, b in zip(grads(), grads(), strict=True))


def _data(device, augment="flip"):
    """320 images: with augment "none" the graph gathers each batch itself."""
    from lenet.data.batches import Batches

    def data():
        gen = torch.Generator().manual_seed(3)
        x = torch.randint(0, 256, (320, 28, 28), generator=gen, dtype=torch.uint8)
        y = torch.randint(0, 10, (320,), generator=gen)
        return (Batches(x, y, 64, device=device, augment=augment),
                Batches(x[:100], y[:100], 100, device=device))
    return data


def _fit(engine, spec):
    from lenet.train import Trainer

    trainer = Trainer(spec, torch.device("cuda"), engine=engine)
    trainer.fit(models.init_model(BOOK.model, 0), *_data("cuda")())
    return trainer


@cuda
@pytest.mark.parametrize("spread", ["image", "split"])
def test_training_on_the_kernels_follows_cudnn(kernels, spread, monkeypatch):
    """Three epochs of the book recipe (lr 0.9), Triton kernels vs cuDNN, both in the graph."""
    monkeypatch.setenv("LENET_TRITON_SPREAD", spread)
    spec = replace(BOOK.train, epochs=3, batch_size=64)
    with numerics(torch.device("cuda")):
        ours, theirs = _fit("triton", spec), _fit("graph", spec)
    assert ours.step_model.spread == spread
    for a, b in zip(ours.history, theirs.history, strict=True):
        assert (a.train_loss, a.test_loss) == pytest.approx((b.train_loss, b.test_loss),
                                                            rel=1e-3)
    assert ours.graph.replays == 3 * 5


@cuda
@pytest.mark.parametrize("augment", ["flip", "none"])
def test_interrupt_and_resume_on_the_kernels_is_bit_identical(kernels, augment):
    spec = replace(BOOK.train, epochs=2, batch_size=64)
    full, resumed, _ = interrupt_and_resume(spec, BOOK.model, "triton",
                                            _data("cuda", augment), device="cuda")
    assert (full.graph.gather is None) == (augment == "flip")
    assert full.graph.sgd_lr == spec.lr  # the book's update, in the graph
    assert_same_run(resumed, full)
