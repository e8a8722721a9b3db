"""The training step on a GPU, recorded once as a CUDA graph and replayed (engines "graph"
and "triton": the latter with the book's network as lenet.triton_book's kernels).

LeNet's step is some 60 small kernels. Eager PyTorch pays a Python dispatch and a launch for
each (several microseconds apiece), more than the kernels' arithmetic at batch 128. Recorded
once, the step is one graph launch.

What the graph records is forward, loss and gradients, nothing more. The optimizer stays
torch.optim and runs eagerly on the gradients the graph writes: one foreach launch for SGD.
So learning-rate schedules, momentum, Adam and checkpoints work as they do on autograd.

A graph replays fixed shapes at fixed addresses. Each batch is copied into static input
tensors, and the gradients land in the same tensors every step (`param.grad`). A batch of
another size (the last, partial batch of a pass) runs the same function eagerly.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F


def numerics(device: torch.device):
    """Training on CUDA computes what the book's recipe says: fp32 convolutions (PyTorch lets
    cuDNN use TF32 by default, a 10-bit mantissa) with deterministic algorithms, so a seed
    gives the same run every time (some of cuDNN's fastest weight-gradient algorithms add in
    a varying order). A no-op elsewhere; the settings are put back on exit."""
    if device.type != "cuda":
        return nullcontext()
    return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False,
                                      deterministic=True, allow_tf32=False)


def triton_reason(model_spec, device: torch.device | None = None,
                  batch_size: int = 128) -> str | None:
    """None when lenet.triton_book computes this network (the book's LeNet-5: its shapes,
    sigmoid, average pooling, 10 classes) on `device`, else why not. With a GPU at hand it
    also runs the kernels once on a batch of zeros (lenet.triton_book.self_check), so that a
    GPU or machine they cannot be built for falls back to cuDNN, with the reason, instead of
    failing in the first training step."""
    from lenet.fused import book_shape_checks

    m = model_spec
    checks = [
        (m.activation != "sigmoid", f"activation {m.activation}"),
        (m.pooling != "avg", f"pooling {m.pooling}"),
        *book_shape_checks(m),
        (m.num_classes != 10, f"{m.num_classes} classes (the kernels need 10 classes)"),
    ]
    if device is not None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        checks.append(((major, minor) < (7, 5),
                       f"GPU compute capability {major}.{minor} (the kernels need 7.5+)"))
    reasons = [why for bad, why in checks if bad]
    if reasons:
        return ", ".join(reasons)
    try:
        from lenet import triton_book
    except Exception as e:  # not installed, or a broken install: the cuDNN graph still runs
        return f"triton cannot be imported ({type(e).__name__})"
    if device is not None and torch.cuda.is_available():
        return triton_book.self_check(device, batch_size)
    return None


WARMUP = 3  # eager runs before recording: cuBLAS/cuDNN handles and workspaces get allocated


class CudaGraph:
    """torch.cuda.CUDAGraph around `run`: recording executes nothing, replay executes it."""

    def __init__(self, run: Callable[[], tuple]):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = run()

    def replay(self) -> tuple:
        self.graph.replay()
        return self.outputs


class Rerun:
    """Stands in for CudaGraph where there is no GPU (tests): replay calls `run` again. It
    keeps CudaGraph's contract (recording computes nothing), so the bookkeeping around the
    graph can be checked on a CPU."""

    def __init__(self, run: Callable[[], tuple]):
        self.run = run

    def replay(self) -> tuple:
        return self.run()


class GraphStep:
    """Forward, summed cross-entropy and the gradients of the batch's mean loss, for one
    batch of uint8 images (`prepare` makes them the network's input, inside the graph).

    `step(x, y)` leaves the gradients in each parameter's `.grad` (the same tensors every
    step) and returns the batch's summed loss and correct count as device tensors. A
    `forward` with a `fused_loss` (lenet.triton_book's split kernels) computes the loss and
    the count itself, in its own kernels."""

    def __init__(self, model: torch.nn.Module, forward: Callable, prepare: Callable,
                 label_smoothing: float = 0.0, recorder: type | None = None):
        self.model = model
        self.forward = forward
        self.prepare = prepare
        self.label_smoothing = label_smoothing
        self.recorder = recorder
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.graph = None
        self.static_x = self.static_y = None  # the recorded batch's shapes and addresses
        self.replays = 0  # steps the graph ran (the rest ran eagerly): for tests and benches

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None:
            self._record(x, y)
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g  # cheap; and a caller's zero_grad(set_to_none=True) cannot unhook it
        if (x.shape, y.shape) != (self.static_x.shape, self.static_y.shape):
            return self._run(x, y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.replays += 1
        return self.graph.replay()

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step itself: a pure function of (x, y) and the weights that writes the
        gradients into the static `self.grads` (and updates BatchNorm's running stats)."""
        fused_loss = getattr(self.forward, "fused_loss", None)
        if fused_loss is not None:  # kernels that compute the loss with the network
            total, right = fused_loss(self.prepare(x), y, self.label_smoothing)
        else:
            logits = self.forward(self.prepare(x))
            total = F.cross_entropy(logits, y, reduction="sum",
                                    label_smoothing=self.label_smoothing)
            right = (logits.argmax(1) == y).sum()
        grads = torch.autograd.grad(total / len(y), self.params)
        torch._foreach_copy_(self.grads, grads)
        return total.detach(), right

    def _record(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static_x, self.static_y = x.clone(), y.clone()
        # The warm-up runs are real steps on the first batch: put back what they changed
        # (BatchNorm's running stats and batch count, the RNG that dropout draws from), so
        # that the run is the same as one that never warmed up.
        buffers = [b.clone() for b in self.model.buffers()]
        side = torch.cuda.Stream() if x.is_cuda else None
        if side is not None:  # warm-up on a side stream, as torch.cuda.graph asks
            side.wait_stream(torch.cuda.current_stream())
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), \
                torch.cuda.stream(side) if side is not None else nullcontext():
            for _ in range(WARMUP):
                self._run(self.static_x, self.static_y)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        for b, saved in zip(self.model.buffers(), buffers, strict=True):
            b.copy_(saved)
        recorder = self.recorder or (CudaGraph if x.is_cuda else Rerun)
        self.graph = recorder(lambda: self._run(self.static_x, self.static_y))

